"""A whole speed run: every phase in turn, the report rewritten after each measurement.

Phases: an optional profile first (so a run cut short still has it), the eager table (the bare
model first: the reference of every "vs bare" ratio), compiled inference, then peak training memory
at other resolutions. Every option is checked before the first measurement, which can take minutes;
``plan`` says what a run would measure, from the model's shapes alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError
from atomtune.speed.adapt import attention_path
from atomtune.speed.measure import measure, measure_compiled, measure_memory, profile
from atomtune.speed.models import (
    atom_parameters,
    build_transformer,
    host,
    lora_params,
    parity_atoms,
    resolve_atoms,
)
from atomtune.speed.report import write_report
from atomtune.speed.settings import (
    COMPILED_HOSTS,
    HOST_METHODS,
    LATENT_SCALE,
    PRESETS,
    check_memory_resolutions,
    check_methods,
    host_of,
    method_specs,
)


def run(
    preset: str = "cpu-tiny",
    batch: int = 1,
    device: str = "cpu",
    dtype: str = "float32",
    methods: tuple[str, ...] | None = None,
    atoms: tuple[str | int, ...] = (256,),
    warmup: int = 2,
    repeats: int = 5,
    prune_to: int = 32,
    compiled: tuple[str, ...] = (),
    memory_resolutions: tuple[int, ...] = (),
    out: Path | None = None,
    profile_first: bool = False,
) -> dict[str, Any]:
    """Every phase in turn; with ``out`` the report is rewritten after each measurement. ``methods``
    defaults to every method that applies to the preset's host."""
    torch_dtype = getattr(torch, dtype)
    name = host_of(preset)
    methods = HOST_METHODS[name] if methods is None else methods
    if profile_first and out is None:
        raise AtomtuneError("--profile writes into the --out folder: give --out")
    check_methods(methods, name)
    for m in compiled:
        if m not in ("bare", *methods):
            raise AtomtuneError(f"--compile {m}: not among the measured methods")
    if compiled and name not in COMPILED_HOSTS:
        raise AtomtuneError(f"--compile is measured on PixArt only; {preset} ({name}) runs eager")
    counts = resolve_atoms(atoms, preset)
    specs = method_specs(methods, counts, name)
    check_memory_resolutions(memory_resolutions)
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
        relate(report)
        save()
    for spec in specs:  # atoms compiled at the first --atoms size only: compiling costs minutes
        if spec["method"] in compiled and spec.get("num_atoms") in (None, counts[0]):
            row = next(r for r in report["results"] if r["label"] == spec["label"])
            with attention_path(spec["method"]):
                row.update(measure_compiled(spec, preset, batch, device, torch_dtype, timing))
            relate(report)
            save()
    memory_specs = [s for s in specs if s["method"] in ("bare", "lora", "atoms")]
    memory_specs = [s for s in memory_specs if s.get("num_atoms") in (None, counts[0])]
    for resolution in memory_resolutions:
        for spec in memory_specs:
            report["memory"].append(measure_memory(spec, preset, batch, device, torch_dtype, resolution))
            save()
    return report


def plan(
    preset: str, methods: tuple[str, ...] | None = None, atoms: tuple[str | int, ...] = ("parity",)
) -> str:
    """The preset's sizes and the rows a run would measure, read from the model on the meta device
    (nothing allocated, nothing timed): parameters, LoRA r=16's on the host's targets, atoms per
    module at parity."""
    name = host_of(preset)
    methods = HOST_METHODS[name] if methods is None else methods
    check_methods(methods, name)
    specs = method_specs(methods, resolve_atoms(atoms, preset), name)
    model = build_transformer(preset, "meta", torch.float32)
    targets = ", ".join(host(preset).target_modules)
    parity = parity_atoms(model, preset)
    return (
        f"{preset} ({name}, {PRESETS[preset]['sample'] * LATENT_SCALE} px): "
        f"{sum(p.numel() for p in model.parameters()):,} parameters\n"
        f"LoRA r=16 on {targets}: {lora_params(model, preset):,} parameters\n"
        f"atoms at parity: {parity} per attention module, {atom_parameters(model, parity):,} parameters\n"
        f"rows: {', '.join(sp['label'] for sp in specs)}"
    )


def relate(report: dict[str, Any]) -> None:
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
