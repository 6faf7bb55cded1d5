"""What the edit benchmark reports: a curve per method and knob (alignment against identity), the
alignment of every curve where its identity crosses the same levels, paired comparisons of atoms'
top-k removal against its controls, the figure, the image grid and the markdown.

Identity here is the feature cosine of the drawn glyph to the source glyph (the stand-in for DINO):
it is defined for every source, the held-out digit and the known ones alike. Every curve runs from
its method's full adapter to the pretrained model (every knob at zero), the point all curves share.
A curve is read at an identity level where it first crosses it, walking from the full adapter.
"""

from __future__ import annotations

import itertools
import statistics
from pathlib import Path
from typing import Any

IDENTITY = "feature_cosine"
METRICS = ("alignment", "alignment_color", "alignment_place", "alignment_size", "feature_cosine", "p_source")
FRACTIONS = (
    0.2,
    0.4,
    0.6,
    0.8,
)  # identity levels, as fractions of the way from pretrained to the best full adapter
TOPK, RANDOM = "atoms: top-k", "atoms: random-k"


def run_curves(record: dict[str, Any], method: str, base: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """One run's curves, each ``[full, knob points…, pretrained]``, named ``"method: knob"``."""
    full = {"value": "full", **{m: record["full"][m] for m in METRICS}}
    end = {"value": 0, **{m: base[m] for m in METRICS}}
    return {f"{method}: {knob}": [full, *points, end] for knob, points in record["curves"].items()}


def _paired(runs: dict[str, list[dict[str, Any]]]) -> list[dict[str, list[dict[str, Any]]]]:
    """Per (source, seed): every method's curves of that run together."""
    base = {(r["source"], r["seed"]): r for r in runs["pretrained"]}
    out: dict[tuple[str, int], dict[str, list]] = {key: {} for key in base}
    for method, records in runs.items():
        if method == "pretrained":
            continue
        for record in records:
            key = (record["source"], record["seed"])
            out[key].update(run_curves(record, method, base[key]))
    return list(out.values())


def mean_curves(paired: list[dict[str, list[dict[str, Any]]]]) -> dict[str, list[dict[str, Any]]]:
    """Each curve's points averaged over the runs that have it (a diverged run has none), knob value
    by knob value."""
    curves: dict[str, list[dict[str, Any]]] = {}
    for name in dict.fromkeys(name for run in paired for name in run):
        points = zip(*[run[name] for run in paired if name in run], strict=True)
        curves[name] = [
            {"value": pts[0]["value"], **{m: statistics.fmean(p[m] for p in pts) for m in METRICS}}
            for pts in points
        ]
    return curves


def at_identity(curve: list[dict[str, Any]], level: float, key: str = "alignment") -> float | None:
    """``key`` where the curve's identity first crosses ``level`` (from the full adapter on), linearly
    interpolated between the two points around the crossing; None if it never does."""
    for a, b in itertools.pairwise(curve):
        lo, hi = sorted((a[IDENTITY], b[IDENTITY]))
        if lo <= level <= hi:
            if hi == lo:
                return a[key]
            w = (level - a[IDENTITY]) / (b[IDENTITY] - a[IDENTITY])
            return a[key] + w * (b[key] - a[key])
    return None


def levels(curves: dict[str, list[dict[str, Any]]]) -> list[float]:
    """Identity levels between the pretrained model's and the most faithful full adapter's."""
    base = next(iter(curves.values()))[-1][IDENTITY]
    top = max(c[0][IDENTITY] for c in curves.values())
    return [base + f * (top - base) for f in FRACTIONS]


def compare(paired: list[dict[str, list]], first: str, second: str) -> dict[str, Any] | None:
    """Per run, ``first``'s alignment minus ``second``'s at that run's identity levels (both curves
    crossing them), averaged over the levels; then mean, standard error and wins over runs."""
    diffs = []
    for run in paired:
        if first not in run or second not in run:
            continue
        pair = {first: run[first], second: run[second]}
        per_level = []
        for level in levels(pair):
            a, b = at_identity(run[first], level), at_identity(run[second], level)
            if a is not None and b is not None:
                per_level.append(a - b)
        if per_level:
            diffs.append(statistics.fmean(per_level))
    if not diffs:
        return None
    sem = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return {
        "mean": statistics.fmean(diffs),
        "sem": sem,
        "wins": sum(d > 0 for d in diffs),
        "losses": sum(d < 0 for d in diffs),
        "runs": len(diffs),
    }


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    paired = _paired(runs)
    curves = mean_curves(paired)
    marks = levels(curves)
    matched = {name: [at_identity(c, lv) for lv in marks] for name, c in curves.items()}
    matched_p = {name: [at_identity(c, lv, "p_source") for lv in marks] for name, c in curves.items()}
    comparisons = {}
    if TOPK in curves:
        for other in curves:
            if other != TOPK:
                comparisons[other] = compare(paired, TOPK, other)
    return {
        "identity": IDENTITY,
        "curves": curves,
        "levels": marks,
        "matched_alignment": matched,
        "matched_p_source": matched_p,
        "topk_against": comparisons,
    }


def strength(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Every method trained at one rate: its full adapter's identity and alignment (does it stick to
    the source?), and top-k removal against each other knob, with a verdict."""
    paired = _paired(runs)
    curves = mean_curves(paired)
    full = {}
    for name, curve in curves.items():
        full.setdefault(name.split(": ")[0], {m: curve[0][m] for m in (IDENTITY, "p_source", "alignment")})
    against = {}
    if TOPK in curves:
        for other in curves:
            if other != TOPK:
                c = compare(paired, TOPK, other)
                against[other] = None if c is None else {**c, "verdict": verdict(c)}
    diverged = {m: sum(bool(r.get("diverged")) for r in rs) for m, rs in runs.items() if m != "pretrained"}
    return {"full": full, "topk_against": against, "diverged": diverged}


def verdict(c: dict[str, Any]) -> str:
    """ "ahead" / "behind" when the mean alignment difference is two standard errors off zero."""
    if c["runs"] < 2:
        return "one run"
    if c["mean"] - 2 * c["sem"] > 0:
        return "ahead"
    if c["mean"] + 2 * c["sem"] < 0:
        return "behind"
    return "tie"


# -- figure, grid, markdown ------------------------------------------------------------------------
def curves_figure(report: dict[str, Any], path: Path) -> Path:
    """Alignment against identity (feature cosine; P(source digit)), a line per method and knob."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from atomtune.io import atomic_write

    fig = Figure(figsize=(11, 4.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    styles = {"atoms": "C0", "lora": "C1", "dora": "C2", "oft": "C3"}
    for name, curve in report["curves"].items():
        method, knob = name.split(": ")
        dashed = knob in ("random-k", "rank")
        for ax, key in zip(axes, (IDENTITY, "p_source"), strict=True):
            ax.plot(
                [p[key] for p in curve], [p["alignment"] for p in curve], marker="o", markersize=3,
                color=styles.get(method), linestyle="--" if dashed else "-", label=name,
            )  # fmt: skip
    base = next(iter(report["curves"].values()))[-1]
    for ax, key, label in zip(
        axes, (IDENTITY, "p_source"), ("feature cosine to the source glyph", "P(source digit)"), strict=True
    ):
        ax.scatter([base[key]], [base["alignment"]], color="black", zorder=5, label="pretrained")
        ax.set_xlabel(f"identity: {label}")
        ax.set_ylabel("alignment to the target prompt")
        ax.grid(alpha=0.3)
    for level in report["levels"]:
        axes[0].axvline(level, color="grey", alpha=0.25, linewidth=0.8)
    axes[1].legend(fontsize=7)
    fig.suptitle("edit: full adapter (high identity) → pretrained model; mean over sources and seeds")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


SHOWN = (0, 2, 4)  # the targets shown in the grid: the first color, place and size edit


def image_grid(out: Path, source, settings, chosen: dict[str, float]):
    """One source (first seed): a row per method and knob, full adapter → pretrained, each cell its
    color, place and size edit; the first row is the source glyph rendered as each edit asks."""
    from PIL import Image

    from atomtune.diffusion.images import grid
    from atomtune.testbed.digit_pipeline import to_pil
    from atomtune.testbed.digits import render_batch

    seed = settings.seeds[0]

    def cells(strip_path: Path):
        strip = Image.open(strip_path).convert("RGB")
        side = strip.height
        return _hstack([strip.crop((i * side, 0, (i + 1) * side, side)) for i in SHOWN])

    wanted = render_batch([source.glyph] * len(SHOWN), [source.targets[i].attributes for i in SHOWN])
    ideal = _hstack(to_pil((wanted + 1) / 2))
    base = cells(out / "runs" / "pretrained" / source.name / f"seed-{seed}" / "images" / "base.png")
    rows, labels = [[ideal]], ["wanted (source glyph)"]
    for method in settings.methods:
        run = out / "runs" / method / f"lr-{chosen[method]:g}" / source.name / f"seed-{seed}" / "images"
        knobs = sorted({p.stem.rsplit("-", 1)[0] for p in run.glob("*-*.png")})
        for knob in knobs:
            points = sorted(run.glob(f"{knob}-*.png"), key=lambda p: -float(p.stem.rsplit("-", 1)[1]))
            rows.append([cells(run / "full.png"), *[cells(p) for p in points], base])
            labels.append(f"{method} {knob}: " + ",".join(p.stem.rsplit("-", 1)[1] for p in points))
    width = max(len(r) for r in rows)
    blank = Image.new("RGB", ideal.size)
    rows = [r[:-1] + [blank] * (width - len(r)) + r[-1:] if len(r) > 1 else r for r in rows]
    picture = grid(rows, ["full", *[""] * (width - 2), "pretrained"], labels)
    return picture.resize((picture.width * 2, picture.height * 2), 0)


def _hstack(images: list):
    from PIL import Image

    out = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    for j, image in enumerate(images):
        out.paste(image, (j * image.width, 0))
    return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lrs = ", ".join(f"{m} {lr:g}" for m, lr in report["chosen_learning_rate"].items())
    n_runs = len(report["runs"]["pretrained"])
    lines = [
        f"{len(report['sources'])} sources (digits {', '.join(str(x['digit']) for x in report['sources'])}) x "
        f"{len(s['seeds'])} seeds = {n_runs} runs per method; each fine-tunes on one image for {s['steps']} steps "
        f"(CAME), learning rate from {', '.join(f'{x:g}' for x in s['learning_rates'])} chosen on "
        f"{len(report['selection_sources'])} selection sources (best redrawing of the source): {lrs}. "
        f"Atoms: {s['num_atoms']} per module cut to {s['atom_budget']} during training. 6 target drawings per "
        f"point ({s['sample_steps']} sampling steps). Identity: feature cosine of the drawn glyph to the source glyph.",
        "",
        "Alignment to the target prompt where each curve's identity crosses the same levels (mean curves; "
        "— : the curve never reaches that identity):",
        "",
        "| curve | "
        + " | ".join(f"identity {lv:.3f}" for lv in report["levels"])
        + " | full adapter: identity / alignment |",
        "|---|" + "---|" * (len(report["levels"]) + 1),
    ]
    for name, values in report["matched_alignment"].items():
        full = report["curves"][name][0]
        lines.append(
            f"| {name} | " + " | ".join(_fmt(v) for v in values)
            + f" | {full[IDENTITY]:.3f} / {full['alignment']:.2f} |"
        )  # fmt: skip
    base = next(iter(report["curves"].values()))[-1]
    lines += [
        "",
        f"Pretrained model (every curve's end): identity {base[IDENTITY]:.3f}, P(source) "
        f"{base['p_source']:.2f}, alignment {base['alignment']:.2f}.",
    ]
    if report["topk_against"]:
        lines += [
            "",
            "Top-k atoms against each other curve, run by run (same source and seed) at the run's own identity "
            "levels: alignment difference, mean ± standard error over runs, and runs won / lost:",
            "",
            "| top-k against | alignment difference | won / lost / runs |",
            "|---|---|---|",
        ]
        for other, c in report["topk_against"].items():
            if c is None:
                lines.append(f"| {other} | — (no shared identity level) | — |")
            else:
                lines.append(
                    f"| {other} | {c['mean']:+.3f} ± {c['sem']:.3f} | {c['wins']} / {c['losses']} / {c['runs']} |"
                )
    lines += _strength_lines(report)
    lines += ["", "Every curve, point by point (knob value: identity / P(source) / alignment):", ""]
    for name, curve in report["curves"].items():
        pts = "; ".join(
            f"{p['value'] if isinstance(p['value'], str) else format(p['value'], 'g')}: {p[IDENTITY]:.3f} / {p['p_source']:.2f} / {p['alignment']:.2f}"
            for p in curve
        )
        lines.append(f"- {name}: {pts}")
    return "\n".join(lines) + "\n"


def _strength_lines(report: dict[str, Any]) -> list[str]:
    """Every rate of the grid: where the full adapters stick to the source, and whether top-k removal
    then restores alignment better than each other knob."""
    rows = report.get("strengths") or []
    if not rows:
        return []
    methods = list(dict.fromkeys(m for row in rows for m in [*row["full"], *row.get("diverged", {})]))
    others = list(dict.fromkeys(o for row in rows for o in row["topk_against"]))
    lines = [
        "",
        "Every training strength (each rate of the grid, every method trained at it on the report sources): "
        "the full adapter's alignment (lower: it sticks to the source; identity in brackets), and top-k "
        "removal's alignment difference against each other knob (mean ± standard error; ahead / behind: "
        "two standard errors off zero):",
        "",
        "| learning rate | " + " | ".join(f"{m}: full" for m in methods)
        + "".join(f" | top-k vs {o}" for o in others) + " |",
        "|---|" + "---|" * (len(methods) + len(others)),
    ]  # fmt: skip
    for row in rows:
        cells = [_full_cell(row, m) for m in methods]
        for o in others:
            c = row["topk_against"].get(o)
            cells.append("—" if c is None else f"{c['mean']:+.3f} ± {c['sem']:.3f} {c['verdict']}")
        lines.append(f"| {row['learning_rate']:g} | " + " | ".join(cells) + " |")
    return lines


def _full_cell(row: dict[str, Any], method: str) -> str:
    """A method's full adapter at one rate: alignment (identity), and how many of its runs diverged."""
    full, diverged = row["full"].get(method), row.get("diverged", {}).get(method, 0)
    cell = "—" if full is None else f"{full['alignment']:.2f} ({full[IDENTITY]:.3f})"
    return cell + (f", {diverged} diverged" if diverged else "")
