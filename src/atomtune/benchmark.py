"""Speed and memory, side by side: the bare model, atoms, and PEFT's LoRA, DoRA and OFT.

One process, one method after the other, on a PixArt transformer built from its published config
with random weights (cost does not depend on weight values). Per method: training step time
(forward + backward + AdamW step), peak memory, trainable parameters and their ratio to LoRA r=16's,
inference forward time with the adapter active, adapter file size; for atoms also inference after
pruning to the important atoms. The bare model is always measured first: it is the reference of the
"vs bare" columns (its "training step" is forward + backward to the input, no optimizer: what the
frozen model costs an adapter). Optional phases: inference through regional ``torch.compile``
(``--compile``) and peak training memory at other resolutions (``--memory-resolutions``). Warm-up
runs are excluded; times are medians of repeated runs. The JSON is rewritten after every
measurement, so a run cut short keeps what it measured. JSON + a markdown table.

    python -m atomtune.benchmark --preset sigma-1024 --device cuda --dtype bfloat16 --batch 4 \\
        --methods bare,atoms,lora,dora,oft --atoms parity,256 --compile bare,lora,atoms \\
        --memory-resolutions 512,2048
    python -m atomtune.benchmark --preset cpu-tiny          # CI-sized smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atomtune.core.config import AtomConfig
from atomtune.core.hosts import diffusers as dx
from atomtune.core.model import AtomModel
from atomtune.core.selection import top_k_masks
from atomtune.core.stats import weight_importance
from atomtune.errors import AtomtuneError

PRESETS: dict[str, dict[str, int]] = {
    "cpu-tiny": dict(heads=2, head_dim=16, layers=2, sample=16, text=8, caption=32),
    "cpu-small": dict(heads=4, head_dim=64, layers=8, sample=32, text=32, caption=256),
    # PixArt-Σ XL-2: 16 heads x 72, 28 blocks, T5-XXL captions (4096 features, 300 tokens)
    "sigma-512": dict(heads=16, head_dim=72, layers=28, sample=64, text=300, caption=4096),
    "sigma-1024": dict(heads=16, head_dim=72, layers=28, sample=128, text=300, caption=4096),
}
METHODS = ("bare", "atoms", "atoms_padcat", "atoms_separate", "lora", "dora", "oft")
# atoms: one attention call, widened heads from the projections where the device gains from it
# (hosts.diffusers.PADDED_PROJECTION_DEVICES); atoms_padcat: one call, heads padded and
# concatenated per call (the path before); atoms_separate: a second attention call
ATOM_METHODS = ("atoms", "atoms_padcat", "atoms_separate")
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_RANK = 16
LATENT_SCALE = 8  # pixels per latent cell (the VAE's downsampling)


# -- the host and the adapters ------------------------------------------------------------------
def build_transformer(preset: str, device: str, dtype: torch.dtype, sample: int | None = None) -> nn.Module:
    """PixArt at the preset's size with random weights; ``sample`` (latent side) overrides the preset's."""
    from diffusers import PixArtTransformer2DModel

    from atomtune.progress import show_notices_once

    show_notices_once(("diffusers",))  # a notice per model built would repeat once per method
    p = PRESETS[preset]
    sample = sample or p["sample"]
    torch.manual_seed(0)
    with torch.device(device):  # initialise in place: a 600 M model builds in seconds on a GPU
        model = PixArtTransformer2DModel(
            num_attention_heads=p["heads"],
            attention_head_dim=p["head_dim"],
            in_channels=4,
            out_channels=8,
            num_layers=p["layers"],
            cross_attention_dim=p["heads"] * p["head_dim"],
            sample_size=sample,
            patch_size=2,
            caption_channels=p["caption"],
            interpolation_scale=max(sample // 64, 1),
            use_additional_conditions=False,  # as PixArt-Σ's published config
        )
    return cast_host(model, dtype)


def cast_host(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model as ``from_pretrained(torch_dtype=dtype)`` leaves it: everything in ``dtype`` except
    the class's ``_keep_in_fp32_modules``. (diffusers' own ``.to(dtype)`` warns that such modules
    exist even for models that have none, PixArt among them.)"""
    nn.Module.to(model, dtype=dtype)
    keep = getattr(model, "_keep_in_fp32_modules", None) or []
    for name, module in model.named_modules():
        if any(k in name for k in keep):
            nn.Module.to(module, dtype=torch.float32)
    return model


def make_inputs(
    preset: str, batch: int, device: str, dtype: torch.dtype, sample: int | None = None
) -> dict[str, Any]:
    p = PRESETS[preset]
    sample = sample or p["sample"]
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(batch, 4, sample, sample, generator=g).to(device, dtype),
        "encoder_hidden_states": torch.randn(batch, p["text"], p["caption"], generator=g).to(device, dtype),
        "timestep": torch.full((batch,), 500, device=device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def _attentions(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if dx.is_attention(m)]


def lora_params(model: nn.Module, rank: int = LORA_RANK) -> int:
    """Trainable parameters of LoRA ``rank`` on ``TARGETS``: ``rank·(in + out)`` per linear."""
    total = 0
    for attn in _attentions(model):
        for linear in (attn.to_q, attn.to_k, attn.to_v, attn.to_out[0]):
            total += rank * (linear.in_features + linear.out_features)
    return total


def parity_atoms(model: nn.Module, rank: int = LORA_RANK) -> int:
    """Atoms per module whose trainable parameters come nearest LoRA ``rank``'s (a multiple of the heads).

    Per attention module atoms train ``W_s`` (context x M), ``D`` (M x value width) and λ (M).
    """
    attns = _attentions(model)
    per_atom = sum(a.to_v.in_features + a.to_out[0].in_features + 1 for a in attns)
    heads = attns[0].heads
    return max(heads, round(lora_params(model, rank) / per_atom / heads) * heads)


def apply_method(model: nn.Module, method: str, num_atoms: int) -> tuple[Any, Callable[[Path], None]]:
    """Adapt ``model`` in place; return a handle and a function that saves the adapter to a folder.

    PEFT's adapters are cast to float32 as diffusers' training scripts do (``cast_training_params``)
    and as atomtune's trainer does: atoms train in float32 too, whatever the host's precision.
    """
    if method in ATOM_METHODS:  # coefficients in the values' attention call, or a second
        atoms = AtomModel(model, AtomConfig(num_atoms=num_atoms, fused=method != "atoms_separate"))
        for a in atoms.atoms().values():  # trained-looking atoms: D != 0
            torch.nn.init.normal_(a.D, std=1e-3)
        return atoms, atoms.save
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, OFTConfig, get_peft_model_state_dict, inject_adapter_in_model
    from safetensors.torch import save_file

    if method in ("lora", "dora"):
        config = LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, target_modules=TARGETS, use_dora=method == "dora"
        )
    elif method == "oft":
        config = OFTConfig(r=4, oft_block_size=0, target_modules=TARGETS)
    else:
        raise AtomtuneError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model)
    cast_training_params(model, dtype=torch.float32)

    def save(folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, str(folder / "adapter_model.safetensors"))

    return model, save


def adapt(model: nn.Module, method: str, num_atoms: int) -> tuple[Any, Callable[[Path], None] | None]:
    """``apply_method``, or freeze the model for ``bare``."""
    if method == "bare":
        model.requires_grad_(False)
        return None, None
    return apply_method(model, method, num_atoms)


@contextmanager
def attention_path(method: str) -> Iterator[None]:
    """``atoms_padcat`` measures the per-call pad/concat path on every device."""
    if method != "atoms_padcat":
        yield
        return
    devices = dx.PADDED_PROJECTION_DEVICES
    dx.PADDED_PROJECTION_DEVICES = ()
    try:
        yield
    finally:
        dx.PADDED_PROJECTION_DEVICES = devices


# -- timing and memory --------------------------------------------------------------------------
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
    torch._dynamo.reset()  # compiled code holds on to the last compiled model: free it first
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def training_step(model: nn.Module, handle: Any, inputs: dict[str, Any]) -> Callable[[], None]:
    """One AdamW step on the trainable parameters; for the bare model, forward + backward to the input."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if not trainable:
        latents = inputs["hidden_states"].detach().requires_grad_(True)

        def backward_only() -> None:
            out = model(**{**inputs, "hidden_states": latents}).sample
            out.float().pow(2).mean().backward()
            latents.grad = None

        return backward_only
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        out = model(**inputs).sample
        loss = out.float().pow(2).mean()
        if isinstance(handle, AtomModel):
            loss = loss + handle.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _forward(model: nn.Module, inputs: dict[str, Any]) -> Callable[[], None]:
    @torch.no_grad()
    def forward() -> None:
        model(**inputs)

    return forward


def measure(
    spec: dict[str, Any], preset: str, batch: int, device: str, dtype: torch.dtype, timing: dict
) -> dict:
    """Eager figures of one method (``spec``: method, label, num_atoms), on a freshly built model."""
    _reset_peak(device)
    model = build_transformer(preset, device, dtype)
    inputs = make_inputs(preset, batch, device, dtype)
    row: dict[str, Any] = dict(spec)
    row["lora_r16_params"] = lora_params(model)
    handle, save = adapt(model, spec["method"], spec.get("num_atoms", 0))
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["params_vs_lora_r16"] = row["trainable_params"] / row["lora_r16_params"]

    step = training_step(model, handle, inputs)
    _reset_peak(device)
    row["train_step_ms"] = median_ms(step, timing["warmup"], timing["repeats"], device)
    row["train_peak_gb"] = _peak_gb(device)
    del step
    model.eval()
    model.zero_grad(set_to_none=True)

    forward = _forward(model, inputs)
    _reset_peak(device)
    row["inference_ms"] = median_ms(forward, timing["warmup"], timing["repeats"], device)
    row["inference_peak_gb"] = _peak_gb(device)
    if handle is None:
        row["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    if save is not None:
        with tempfile.TemporaryDirectory() as tmp:
            save(Path(tmp))
            row["adapter_mb"] = sum(f.stat().st_size for f in Path(tmp).iterdir()) / 2**20
    if isinstance(handle, AtomModel):
        handle.set_masks(top_k_masks(weight_importance(handle), timing["prune_to"]))
        handle.prune()
        row["pruned_atoms_per_module"] = timing["prune_to"]
        row["inference_pruned_ms"] = median_ms(forward, timing["warmup"], timing["repeats"], device)
    return row


def measure_compiled(
    spec: dict[str, Any], preset: str, batch: int, device: str, dtype: torch.dtype, timing: dict
) -> dict:
    """Inference through regional ``torch.compile`` (compile time reported apart, not in the median)."""
    _reset_peak(device)
    model = build_transformer(preset, device, dtype)
    inputs = make_inputs(preset, batch, device, dtype)
    adapt(model, spec["method"], spec.get("num_atoms", 0))
    model.eval()
    dx.compile_blocks(model)
    forward = _forward(model, inputs)
    _sync(device)
    start = time.perf_counter()
    forward()
    _sync(device)
    compile_s = time.perf_counter() - start
    ms = median_ms(forward, timing["warmup"], timing["repeats"], device)
    return {"label": spec["label"], "inference_compiled_ms": ms, "compile_s": compile_s}


def measure_memory(
    spec: dict[str, Any], preset: str, batch: int, device: str, dtype: torch.dtype, resolution: int
) -> dict:
    """Peak memory of training steps at ``resolution`` pixels (one warm-up step, one measured)."""
    sample = resolution // LATENT_SCALE
    _reset_peak(device)
    model = build_transformer(preset, device, dtype, sample)
    inputs = make_inputs(preset, batch, device, dtype, sample)
    handle, _ = adapt(model, spec["method"], spec.get("num_atoms", 0))
    row: dict[str, Any] = {"label": spec["label"], "resolution": resolution, "tokens": (sample // 2) ** 2}
    step = training_step(model, handle, inputs)
    try:
        step()
        _reset_peak(device)
        row["train_step_ms"] = median_ms(step, 0, 1, device)
        row["train_peak_gb"] = _peak_gb(device)
    except torch.OutOfMemoryError:  # the table says so; the other resolutions still get measured
        row["train_peak_gb"], row["out_of_memory"] = None, True
    return row


def profile(
    spec: dict[str, Any], preset: str, batch: int, device: str, dtype: torch.dtype, out: Path
) -> Path:
    """Where one method's time goes: operators of 3 training steps and 3 inference forwards
    (after one warm-up each), sorted by their own device time (CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model = build_transformer(preset, device, dtype)
    inputs = make_inputs(preset, batch, device, dtype)
    handle, _ = adapt(model, spec["method"], spec.get("num_atoms", 0))
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for name, fn in (
        ("training step", training_step(model, handle, inputs)),
        ("inference", _forward(model, inputs)),
    ):
        if name == "inference":
            model.eval()
        fn()
        _sync(device)
        with torch_profile(activities=activities) as prof:
            for _ in range(3):
                fn()
            _sync(device)
        sections.append(
            f"## {spec['label']}: {name} x 3\n\n{prof.key_averages().table(sort_by=sort, row_limit=40)}"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"profile-{spec['label'].replace(' ', '-')}.txt"
    path.write_text("\n\n".join(sections) + "\n")
    return path


# -- the run ------------------------------------------------------------------------------------
def method_specs(methods: tuple[str, ...], atoms: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per method, atoms once per entry of ``atoms``; the bare model first, always."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AtomtuneError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    specs = [{"method": "bare", "label": "bare"}]
    for m in methods:
        if m == "bare":
            continue
        if m in ATOM_METHODS:
            specs += [{"method": m, "label": f"{m} {n}", "num_atoms": n} for n in atoms]
        else:
            specs.append({"method": m, "label": m})
    return specs


def resolve_atoms(entries: tuple[str | int, ...], preset: str) -> tuple[int, ...]:
    """``"parity"`` → the atom count at LoRA r=16's parameters (``parity_atoms``); numbers as given."""
    counts = []
    for entry in entries:
        if entry == "parity":
            counts.append(parity_atoms(build_transformer(preset, "meta", torch.float32)))  # shapes only
        else:
            try:
                counts.append(int(entry))
            except ValueError:
                raise AtomtuneError(f"--atoms takes numbers or 'parity', got {entry!r}") from None
            if counts[-1] < 1 or counts[-1] % PRESETS[preset]["heads"]:
                raise AtomtuneError(
                    f"--atoms {entry}: must be a positive multiple of the {PRESETS[preset]['heads']} heads"
                )
    return tuple(dict.fromkeys(counts))


def run(
    preset: str = "cpu-tiny",
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    methods: tuple[str, ...] = METHODS,
    atoms: tuple[str | int, ...] = (256,),
    warmup: int = 2,
    repeats: int = 5,
    prune_to: int = 32,
    compiled: tuple[str, ...] = (),
    memory_resolutions: tuple[int, ...] = (),
    out: Path | None = None,
    profile_first: bool = False,
) -> dict[str, Any]:
    """Every phase in turn; with ``out`` the report is rewritten after each measurement."""
    torch_dtype = getattr(torch, dtype)
    if profile_first and out is None:
        raise AtomtuneError("--profile writes into the --out folder: give --out")
    counts = resolve_atoms(atoms, preset)
    specs = method_specs(methods, counts)
    for m in compiled:
        if m not in ("bare", *methods):
            raise AtomtuneError(f"--compile {m}: not among the measured methods")
    for resolution in memory_resolutions:  # checked before the first measurement, not after
        if resolution < 2 * LATENT_SCALE or resolution % (2 * LATENT_SCALE):
            raise AtomtuneError(f"memory resolution {resolution} is not a multiple of {2 * LATENT_SCALE}")
    timing = {"warmup": warmup, "repeats": repeats, "prune_to": prune_to}
    settings = {"preset": preset, **PRESETS[preset], "batch": batch, "device": device, "dtype": dtype}
    settings.update(atoms=list(counts), warmup=warmup, repeats=repeats, optimizer="AdamW")
    settings.update(compiled=list(compiled), memory_resolutions=list(memory_resolutions))
    settings["resolution"] = PRESETS[preset]["sample"] * LATENT_SCALE
    report: dict[str, Any] = {"settings": settings, "environment": _environment(device), "results": []}
    report["memory"] = []

    def save() -> None:
        if out is not None:
            write_report(report, out)

    if profile_first and out is not None:  # before the long phases: a run cut short still has it
        atom_specs = [sp for sp in specs if sp["method"] == "atoms"] or specs
        report["profile"] = profile(atom_specs[0], preset, batch, device, torch_dtype, out).name
    for spec in specs:
        with attention_path(spec["method"]):
            report["results"].append(measure(spec, preset, batch, device, torch_dtype, timing))
        _relate(report)
        save()
    for spec in specs:  # atoms compiled at the first --atoms size only: compiling costs minutes
        if spec["method"] in compiled and spec.get("num_atoms") in (None, counts[0]):
            row = next(r for r in report["results"] if r["label"] == spec["label"])
            with attention_path(spec["method"]):
                row.update(measure_compiled(spec, preset, batch, device, torch_dtype, timing))
            _relate(report)
            save()
    memory_specs = [s for s in specs if s["method"] in ("bare", "lora", "atoms")]
    memory_specs = [s for s in memory_specs if s.get("num_atoms") in (None, counts[0])]
    for resolution in memory_resolutions:
        for spec in memory_specs:
            report["memory"].append(measure_memory(spec, preset, batch, device, torch_dtype, resolution))
            save()
    return report


def _relate(report: dict[str, Any]) -> None:
    """Fill the "vs bare" ratios (the bare row is measured first)."""
    rows = report["results"]
    bare = rows[0]
    for r in rows:
        r["inference_vs_bare"] = r["inference_ms"] / bare["inference_ms"]
        if "inference_pruned_ms" in r:
            r["inference_pruned_vs_bare"] = r["inference_pruned_ms"] / bare["inference_ms"]
        if "inference_compiled_ms" in r and "inference_compiled_ms" in bare:
            r["inference_compiled_vs_bare"] = r["inference_compiled_ms"] / bare["inference_compiled_ms"]


def _environment(device: str) -> dict[str, str]:
    import diffusers

    env = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "device_name": _device_name(device),
    }
    try:
        import peft

        env["peft"] = peft.__version__
    except ImportError:  # pragma: no cover
        pass
    return env


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name()
    import platform

    return platform.processor() or platform.machine()


def write_report(report: dict[str, Any], out: Path) -> None:
    from atomtune.io import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    atomic_write(out / "speed.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(out / "speed.md", lambda p: p.write_text(table))


# -- the tables ---------------------------------------------------------------------------------
def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    compiled = any("inference_compiled_ms" in r for r in report["results"])
    lines = [
        f"{s['preset']} ({s['resolution']} px), {s['dtype']}, batch {s['batch']}, "
        f"{report['environment']['device_name']}, torch {report['environment']['torch']}, "
        f"median of {s['repeats']} after {s['warmup']} warm-up; bare's train step is forward + backward "
        f"to the input",
        "",
        "| method | trainable params | vs LoRA r16 params | train step | train peak | inference forward | "
        "vs bare |" + (" compiled | vs bare compiled |" if compiled else "") + " adapter file |",
        "|---|---|---|---|---|---|---|" + ("---|---|" if compiled else "") + "---|",
    ]
    for r in report["results"]:
        infer = f"{r['inference_ms']:.1f} ms"
        if "inference_pruned_ms" in r:
            infer += f" ({r['inference_pruned_ms']:.1f} ms pruned to {r['pruned_atoms_per_module']})"
        vs = _x(r.get("inference_vs_bare"))
        if "inference_pruned_vs_bare" in r:
            vs += f" ({_x(r['inference_pruned_vs_bare'])})"
        cells = [
            r["label"],
            f"{r['trainable_params']:,}",
            _x(r["params_vs_lora_r16"]),
            _ms(r.get("train_step_ms")),
            _gb(r.get("train_peak_gb")),
            infer,
            vs,
        ]
        if compiled:
            cells += [_ms(r.get("inference_compiled_ms")), _x(r.get("inference_compiled_vs_bare"))]
        cells.append(_mb(r.get("adapter_mb")))
        lines.append("| " + " | ".join(cells) + " |")
    if report.get("memory"):
        lines += ["", *memory_table(report)]
    return "\n".join(lines) + "\n"


def memory_table(report: dict[str, Any]) -> list[str]:
    """Peak training memory against tokens; the growth beside the bare model's from the lowest to
    the highest resolution measured (the main table's resolution included)."""
    s = report["settings"]
    peaks: dict[str, dict[int, float | None]] = {}
    for r in report["results"]:
        if r["label"] in {m["label"] for m in report["memory"]}:
            peaks.setdefault(r["label"], {})[s["resolution"]] = r.get("train_peak_gb")
    for m in report["memory"]:
        peaks.setdefault(m["label"], {})[m["resolution"]] = (
            "out of memory" if m.get("out_of_memory") else m.get("train_peak_gb")
        )
    resolutions = sorted({res for p in peaks.values() for res in p})
    lines = [
        "Peak training memory against resolution (tokens = (px / 16)²); growth = its rise from the "
        "lowest to the highest resolution, against the bare model's",
        "",
        "| method | "
        + " | ".join(f"{res} px ({(res // 16) ** 2} tokens)" for res in resolutions)
        + " | growth vs bare |",
        "|---|" + "---|" * len(resolutions) + "---|",
    ]
    bare = peaks.get("bare", {})
    for label, p in peaks.items():
        growth = _growth(p, bare, resolutions[0], resolutions[-1])
        lines.append(
            f"| {label} | " + " | ".join(_gb(p.get(res)) for res in resolutions) + f" | {_x(growth)} |"
        )
    return lines


def _growth(p: dict[int, float | None], bare: dict[int, float | None], low: int, high: int) -> float | None:
    values = (p.get(low), p.get(high), bare.get(low), bare.get(high))
    if not all(isinstance(v, float) for v in values) or values[3] == values[2]:
        return None
    return (values[1] - values[0]) / (values[3] - values[2])


def _x(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}x"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x:.1f} ms"


def _gb(x: float | str | None) -> str:
    if isinstance(x, str):
        return x
    return "—" if x is None else f"{x:.2f} GB"


def _mb(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f} MB"


def _list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="atoms vs PEFT baselines: speed and memory")
    parser.add_argument("--preset", choices=PRESETS, default="cpu-tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default=",".join(METHODS), help="the bare model is always measured")
    parser.add_argument(
        "--atoms",
        default="256",
        help="atoms per module, one row each: numbers or 'parity' (LoRA r=16's parameters)",
    )
    parser.add_argument("--num-atoms", dest="atoms", help=argparse.SUPPRESS)  # the former name
    parser.add_argument("--prune-to", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--compile",
        nargs="?",
        const="all",
        default="",
        help="also time inference through regional torch.compile for these methods (default: all measured)",
    )
    parser.add_argument(
        "--memory-resolutions",
        default="",
        help="pixels, e.g. 512,2048: peak training memory of bare, LoRA, atoms",
    )
    parser.add_argument("--out", type=Path, help="folder for speed.json and speed.md (rewritten as it goes)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="first write --out/profile-atoms-N.txt: the operators of atoms' step",
    )
    args = parser.parse_args(argv)
    try:
        methods = _list(args.methods)
        compiled = ("bare", *methods) if args.compile == "all" else _list(args.compile)
        try:
            resolutions = tuple(int(r) for r in _list(args.memory_resolutions))
        except ValueError:
            raise AtomtuneError(
                f"--memory-resolutions takes pixels, got {args.memory_resolutions!r}"
            ) from None
        report = run(
            args.preset,
            args.batch,
            args.device,
            args.dtype,
            methods,
            _list(args.atoms),
            args.warmup,
            args.repeats,
            args.prune_to,
            tuple(dict.fromkeys(compiled)),
            resolutions,
            args.out,
            args.profile,
        )
    except AtomtuneError as exc:
        parser.exit(2, f"atomtune.benchmark: error: {exc}\n")
    print(markdown(report))


if __name__ == "__main__":
    main()
