"""The figures of one method on a freshly built host: eager step and forward times with peak memory,
inference through regional ``torch.compile``, peak training memory at another resolution, and a
profile of where the time goes.

Each phase builds its own host so one method's buffers, optimizer state or compiled code never
weigh on the next. Warm-up runs are excluded; times are medians of repeated runs, synchronised with
the device so they measure the work and not its queueing.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from atomtune.core.hosts import diffusers as dx
from atomtune.core.selection import top_k_masks
from atomtune.core.stats import weight_importance
from atomtune.diffusion.tuned import SIDECAR, AtomTuned, Tuned
from atomtune.speed.adapt import adapt
from atomtune.speed.models import build_transformer, host, lora_params, make_inputs
from atomtune.speed.settings import LATENT_SCALE


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


def training_step(model: nn.Module, tuned: Tuned | None, inputs: dict[str, Any]) -> Callable[[], None]:
    """One AdamW step on the trainable parameters; for the bare model, forward + backward to the input.

    Atoms add their regularisation loss (the weighted penalties), as in training; the trainer's
    logging of the terms is left out, since it is not the method's cost.
    """
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
    atoms = tuned.handle if isinstance(tuned, AtomTuned) else None

    def step() -> None:
        out = model(**inputs).sample
        loss = out.float().pow(2).mean()
        if atoms is not None:
            loss = loss + atoms.regularization_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _forward(model: nn.Module, inputs: dict[str, Any]) -> Callable[[], None]:
    @torch.no_grad()
    def forward() -> None:
        model(**inputs)

    return forward


def _adapt(model: nn.Module, spec: dict[str, Any], preset: str) -> Tuned | None:
    return adapt(model, spec["method"], spec.get("num_atoms", 0), host(preset).target_modules)


def adapter_mb(tuned: Tuned) -> float:
    """Size of the method's own files as training saves them (atomtune's sidecar left out: the same
    small record for every method)."""
    with tempfile.TemporaryDirectory() as tmp:
        tuned.save(Path(tmp))
        return sum(f.stat().st_size for f in Path(tmp).iterdir() if f.name != SIDECAR) / 2**20


def measure(
    spec: dict[str, Any], preset: str, batch: int, device: str, dtype: torch.dtype, timing: dict
) -> dict:
    """Eager figures of one method (``spec``: method, label, num_atoms), on a freshly built model."""
    _reset_peak(device)
    model = build_transformer(preset, device, dtype)
    inputs = make_inputs(preset, batch, device, dtype)
    row: dict[str, Any] = dict(spec)
    row["lora_r16_params"] = lora_params(model, preset)
    tuned = _adapt(model, spec, preset)
    row["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    row["params_vs_lora_r16"] = row["trainable_params"] / row["lora_r16_params"]

    step = training_step(model, tuned, inputs)
    _reset_peak(device)
    try:
        row["train_step_ms"] = median_ms(step, timing["warmup"], timing["repeats"], device)
        row["train_peak_gb"] = _peak_gb(device)
    except torch.OutOfMemoryError:  # the table says so; inference is still measured
        row["train_step_ms"], row["train_peak_gb"], row["out_of_memory"] = None, None, True
    del step
    model.eval()
    model.zero_grad(set_to_none=True)

    forward = _forward(model, inputs)
    _reset_peak(device)
    row["inference_ms"] = median_ms(forward, timing["warmup"], timing["repeats"], device)
    row["inference_peak_gb"] = _peak_gb(device)
    if tuned is None:
        row["weights_gb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    else:
        row["adapter_mb"] = adapter_mb(tuned)
    if isinstance(tuned, AtomTuned):
        atoms = tuned.handle
        atoms.set_masks(top_k_masks(weight_importance(atoms), timing["prune_to"]))
        atoms.prune()
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
    _adapt(model, spec, preset)
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
    tuned = _adapt(model, spec, preset)
    row: dict[str, Any] = {"label": spec["label"], "resolution": resolution, "tokens": (sample // 2) ** 2}
    step = training_step(model, tuned, inputs)
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
    tuned = _adapt(model, spec, preset)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort = "self_device_time_total" if cuda else "self_cpu_time_total"
    sections = []
    for name, fn in (
        ("training step", training_step(model, tuned, inputs)),
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
