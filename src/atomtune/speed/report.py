"""The report of a speed run as files: ``speed.json`` (every figure) and ``speed.md`` (the tables).

Both are written atomically after every measurement, so a run cut short leaves a whole report of
what it measured, never a half-written one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from atomtune.io import atomic_write


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    atomic_write(out / "speed.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    atomic_write(out / "speed.md", lambda p: p.write_text(table))


def markdown(report: dict[str, Any]) -> str:
    """The eager table (with compiled columns when measured), then the memory table if any."""
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
            _gb("out of memory" if r.get("out_of_memory") else r.get("train_peak_gb")),
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
