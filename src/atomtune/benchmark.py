"""Speed and memory, side by side: the bare model, atoms, and PEFT's LoRA, DoRA and OFT.

One process, one method after the other, on a PixArt transformer built from its published config
with random weights (cost does not depend on weight values). Per method: training step time
(forward + backward + AdamW step), peak memory, trainable parameters, inference forward time with
the adapter active, adapter file size; for atoms also inference after pruning to the important
atoms. Warm-up runs are excluded; times are medians of repeated runs. JSON + a markdown table.

    python -m atomtune.benchmark --preset sigma-1024 --device cuda --dtype bfloat16 --batch 1
    python -m atomtune.benchmark --preset cpu-tiny          # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .config import AtomConfig
from .model import AtomModel
from .selection import top_k_masks
from .stats import weight_importance

PRESETS: dict[str, dict[str, int]] = {
    "cpu-tiny": dict(heads=2, head_dim=16, layers=2, sample=16, text=8, caption=32),
    "cpu-small": dict(heads=4, head_dim=64, layers=8, sample=32, text=32, caption=256),
    # PixArt-Σ XL-2: 16 heads x 72, 28 blocks, T5-XXL captions (4096 features, 300 tokens)
    "sigma-512": dict(heads=16, head_dim=72, layers=28, sample=64, text=300, caption=4096),
    "sigma-1024": dict(heads=16, head_dim=72, layers=28, sample=128, text=300, caption=4096),
}
METHODS = ("bare", "atoms", "atoms_separate", "lora", "dora", "oft")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def build_transformer(preset: str, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import PixArtTransformer2DModel

    from .progress import show_notices_once

    show_notices_once(("diffusers",))  # a notice per model built would repeat once per method
    p = PRESETS[preset]
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 600 M model builds in seconds on a GPU
        model = PixArtTransformer2DModel(
            num_attention_heads=p["heads"],
            attention_head_dim=p["head_dim"],
            in_channels=4,
            out_channels=8,
            num_layers=p["layers"],
            cross_attention_dim=p["heads"] * p["head_dim"],
            sample_size=p["sample"],
            patch_size=2,
            caption_channels=p["caption"],
            interpolation_scale=max(p["sample"] // 64, 1),
            use_additional_conditions=False,  # as PixArt-Σ's published config
        )
    return model.to(dtype=dtype)


def make_inputs(preset: str, batch: int, device: str, dtype: torch.dtype) -> dict[str, Any]:
    p = PRESETS[preset]
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, p["sample"], p["sample"], generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, p["text"], p["caption"], generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def apply_method(model: torch.nn.Module, method: str, num_atoms: int) -> tuple[Any, Callable[[Path], None]]:
    """Adapt ``model`` in place; return a handle and a function that saves the adapter to a folder."""
    if method in ("atoms", "atoms_separate"):  # coefficients in the values' attention call, or a second
        atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms, fused=method == "atoms"))
        for a in atoms.atoms().values():  # trained-looking atoms: D != 0
            torch.nn.init.normal_(a.D, std=1e-3)
        return atoms, atoms.save
    from peft import LoraConfig, OFTConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    if method in ("lora", "dora"):
        config = LoraConfig(r=16, lora_alpha=16, target_modules=TARGETS, use_dora=method == "dora")
    elif method == "oft":
        config = OFTConfig(r=4, oft_block_size=0, target_modules=TARGETS)
    else:
        raise ValueError(f"unknown method {method!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model)

    def save(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(folder / "adapter_model.safetensors"))

    return model, save


def median_ms(fn: Callable[[], None], warmup: int, repeats: int, device: str) -> float:
    times = []
    for i in range(warmup + repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def measure(
    method: str,
    preset: str,
    batch: int,
    device: str,
    dtype: torch.dtype,
    num_atoms: int,
    warmup: int,
    repeats: int,
    prune_to: int,
    compile_inference: bool = False,
) -> dict[str, Any]:
    """All figures of one method, on a freshly built model. With ``compile_inference`` the
    inference forward runs through ``torch.compile`` (every method alike; compile time excluded)."""
    _reset_peak(device)
    model = build_transformer(preset, device, dtype)
    inputs = make_inputs(preset, batch, device, dtype)
    row: dict[str, Any] = {"method": method}
    if method == "bare":
        model.requires_grad_(False)
        handle, save = None, None
    else:
        handle, save = apply_method(model, method, num_atoms)
    trainable = [p for p in model.parameters() if p.requires_grad]
    row["trainable_params"] = sum(p.numel() for p in trainable)

    if trainable:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        model.train()

        def step() -> None:
            out = model(**inputs).sample
            loss = out.float().pow(2).mean()
            if isinstance(handle, AtomModel):
                loss = loss + handle.regularization_loss()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        _reset_peak(device)
        row["train_step_ms"] = median_ms(step, warmup, repeats, device)
        row["train_peak_gb"] = _peak_gb(device)
        del optimizer
    model.eval()

    infer = torch.compile(model) if compile_inference else model

    @torch.no_grad()
    def forward() -> None:
        infer(**inputs)

    _reset_peak(device)
    row["inference_ms"] = median_ms(forward, warmup, repeats, device)
    row["inference_peak_gb"] = _peak_gb(device)
    if not trainable:
        row["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if save is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            row["adapter_mb"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    if isinstance(handle, AtomModel):
        handle.set_masks(top_k_masks(weight_importance(handle), prune_to))
        handle.prune()
        if compile_inference:  # new shapes: compile again, outside the timing
            torch._dynamo.reset()
            infer = torch.compile(model)
        row["pruned_atoms_per_module"] = prune_to
        row["inference_pruned_ms"] = median_ms(forward, warmup, repeats, device)
    return row


def run(
    preset: str = "cpu-tiny",
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    methods: tuple[str, ...] = METHODS,
    num_atoms: int = 256,
    warmup: int = 2,
    repeats: int = 5,
    prune_to: int = 32,
    compile_inference: bool = False,
) -> dict[str, Any]:
    torch_dtype = getattr(torch, dtype)
    rows = []
    for m in methods:
        if compile_inference:
            torch._dynamo.reset()
        rows.append(
            measure(
                m, preset, batch, device, torch_dtype, num_atoms, warmup, repeats, prune_to, compile_inference
            )
        )
    bare = next((r for r in rows if r["method"] == "bare"), None)
    if bare is not None:
        for r in rows:
            r["inference_vs_bare"] = r["inference_ms"] / bare["inference_ms"]
            if "inference_pruned_ms" in r:
                r["inference_pruned_vs_bare"] = r["inference_pruned_ms"] / bare["inference_ms"]
    env = {"torch": torch.__version__, "device_name": _device_name(device)}
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    settings = {"preset": preset, **PRESETS[preset], "batch": batch, "device": device, "dtype": dtype}
    settings.update(num_atoms=num_atoms, warmup=warmup, repeats=repeats, optimizer="AdamW")
    settings["compiled_inference"] = compile_inference
    return {"settings": settings, "environment": env, "results": rows}


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"{s['preset']}, {s['dtype']}, batch {s['batch']}, {report['environment']['device_name']}, "
        f"torch {report['environment']['torch']}, median of {s['repeats']} after {s['warmup']} warm-up"
        + (", inference through torch.compile" if s.get("compiled_inference") else ""),
        "",
        "| method | trainable params | train step | train peak | inference forward | vs bare | adapter file |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["results"]:
        infer = f"{r['inference_ms']:.1f} ms"
        if "inference_pruned_ms" in r:
            infer += f" ({r['inference_pruned_ms']:.1f} ms pruned to {r['pruned_atoms_per_module']})"
        vs = f"{r.get('inference_vs_bare', float('nan')):.2f}x"
        if "inference_pruned_vs_bare" in r:
            vs += f" ({r['inference_pruned_vs_bare']:.2f}x)"
        lines.append(
            f"| {r['method']} | {r['trainable_params']:,} | {_ms(r.get('train_step_ms'))} | "
            f"{_gb(r.get('train_peak_gb'))} | {infer} | {vs} | {_mb(r.get('adapter_mb'))} |"
        )
    return "\n".join(lines) + "\n"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} ms"


def _gb(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} GB"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} MB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="atoms vs PEFT baselines: speed and memory")
    parser.add_argument("--preset", choices=PRESETS, default="cpu-tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--num-atoms", type=int, default=256)
    parser.add_argument("--prune-to", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the inference forward (all methods)"
    )
    parser.add_argument("--out", type=Path, help="folder for speed.json and speed.md")
    args = parser.parse_args(argv)
    report = run(
        args.preset,
        args.batch,
        args.device,
        args.dtype,
        tuple(args.methods.split(",")),
        args.num_atoms,
        args.warmup,
        args.repeats,
        args.prune_to,
        args.compile,
    )
    table = markdown(report)
    print(table)
    if args.out:
        from .serialization import atomic_write

        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "speed.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
        atomic_write(args.out / "speed.md", lambda p: p.write_text(table))


if __name__ == "__main__":
    main()
