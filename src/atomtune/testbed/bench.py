"""``atomtune testbed bench``: the mini-DreamBooth benchmark, atoms against LoRA, DoRA and OFT.

Every method goes through the same trainer, optimizer (CAME), steps and learning-rate budget: each
learning rate of the grid is tried on a selection seed the report does not use; the kept one draws
the concept best (P(target)) while keeping alignment and the other digits (both ≥ 0.8), and it is
rerun on every report seed. Then, for atoms: fidelity and alignment as atoms are removed (top-k
per module, ranked by contribution E|s|·‖d‖ measured while sampling), and a concept + color-style
merge (sum and concat).

Each run writes its result next to its adapter; a rerun skips runs already done (resume).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..diffusion.images import grid, save_json, save_png, save_text
from ..errors import AtomtuneError
from ..progress import progress_bar
from ..selection import top_k_masks
from ..serialization import read_json
from . import customize as cz
from .judges import load_classifier
from .pipeline import digit_pipeline, to_pil

METHODS = ("atoms", "lora", "dora", "oft")


@dataclass
class BenchSettings:
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    select_seed: int = 100
    steps: int = 300
    num_atoms: int = 66  # 11 per head of 6: 25.4k parameters per attention module, LoRA r=16's 24.6k
    holdout_digit: int = 9
    instances: int = 5
    eval_seeds: tuple[int, ...] = (0, 1)
    prompts: str | None = None  # a file of prompts ("{}" = the concept); default: the 25-prompt grid
    topk: bool = True
    merge: bool = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise AtomtuneError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        if not self.methods or not self.seeds or not self.learning_rates or not self.eval_seeds:
            raise AtomtuneError("methods, seeds, learning rates and eval seeds must not be empty")
        if self.steps < 1 or self.instances < 1 or min(self.learning_rates) <= 0:
            raise AtomtuneError("steps, instances and learning rates must be positive")
        if self.select_seed in self.seeds:
            raise AtomtuneError(f"the selection seed {self.select_seed} must not be a report seed")


def run_bench(
    settings: BenchSettings, out_dir: str | Path, weights: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the benchmark; write bench.json and bench.md under ``out_dir``."""

    out = Path(out_dir).expanduser()
    prompts = cz.read_prompts(settings.prompts) if settings.prompts else cz.grid_prompts()
    pipe = digit_pipeline(weights)  # bad input fails here, before anything is written
    _check_settings(out, settings, [p.text for p in prompts], weights)
    classifier = load_classifier()
    target = settings.holdout_digit
    references = cz.instance_images(target, settings.instances)
    instance_dir = cz.write_images(references, out / "instance_images")
    fingerprint = _fingerprint(pipe.transformer)

    def evaluate(run_dir: Path) -> dict[str, Any]:
        scores, images = cz.score_concept(
            pipe, prompts, list(settings.eval_seeds), target, references, classifier
        )
        scores["prior"] = cz.score_prior(pipe, target, list(settings.eval_seeds), classifier)
        save_png(_sheet(images, len(prompts), len(settings.eval_seeds)), run_dir / "images.png")
        return scores

    def run(method: str, lr: float, seed: int) -> dict[str, Any]:
        run_dir = out / "runs" / method / f"lr-{lr:g}" / f"seed-{seed}"
        done = run_dir / "result.json"
        if done.is_file():
            return read_json(done, "run result")
        result = cz.train_adapter(
            pipe,
            method,
            instance_dir,
            cz.INSTANCE_PROMPT,
            run_dir,
            lr,
            settings.steps,
            seed,
            settings.num_atoms,
        )
        try:
            record = {"method": method, "learning_rate": lr, "seed": seed, **evaluate(run_dir)}
            record["trainable_params"] = result.tuned.num_trainable_parameters()
            record["adapter_mb"] = cz.adapter_megabytes(result.adapter_dir)
            record["train_seconds"] = result.seconds
        finally:
            result.tuned.unload()
        if _fingerprint(pipe.transformer) != fingerprint:
            raise AtomtuneError(f"unloading {method} did not restore the pretrained model")
        save_json(record, done)
        return record

    base_file = out / "base.json"
    if base_file.is_file():
        base = read_json(base_file, "base scores")
    else:
        base = {"method": "pretrained (no tuning)", **evaluate(out / "base")}
        save_json(base, base_file)
    jobs = [(m, lr, settings.select_seed) for m in settings.methods for lr in settings.learning_rates]
    bar = progress_bar(
        total=len(jobs) + len(settings.methods) * len(settings.seeds), desc="bench", disable=not progress
    )
    selection: dict[str, list[dict[str, Any]]] = {m: [] for m in settings.methods}
    for method, lr, seed in jobs:
        selection[method].append(run(method, lr, seed))
        bar.update(1)
    chosen = {m: _choose(rows)["learning_rate"] for m, rows in selection.items()}
    results: dict[str, list[dict[str, Any]]] = {}
    for method in settings.methods:
        results[method] = []
        for seed in settings.seeds:
            results[method].append(run(method, chosen[method], seed))
            bar.update(1)
    bar.close()
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "prompts": [p.text for p in prompts],
        "base": base,
        "chosen_learning_rate": chosen,
        "selection": selection,
        "results": results,
        "summary": {m: _summary(rows) for m, rows in results.items()},
    }
    if "atoms" in settings.methods:
        concept = out / "runs" / "atoms" / f"lr-{chosen['atoms']:g}" / f"seed-{settings.seeds[0]}" / "adapter"
        if settings.topk:
            report["topk"] = _topk_curve(pipe, settings, concept, out, prompts, references, classifier)
        if settings.merge:
            report["merge"] = _merge(pipe, settings, chosen["atoms"], concept, out, references, classifier)
    save_json(report, out / "bench.json")
    save_text(markdown(report), out / "bench.md")
    return report


KEEP = 0.8  # the learning rate must leave alignment and prior preservation at least this high


def _choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The strongest concept (P(target)) among the runs that keep alignment and the other digits
    (both ≥ KEEP): what a user tunes for. If no run keeps both, the best mean of the three."""
    kept = [r for r in rows if r["prior"] >= KEEP and r.get("alignment", 1.0) >= KEEP]
    if kept:
        return max(kept, key=lambda r: r["p_target"])
    return max(rows, key=lambda r: (r["p_target"] + r.get("alignment", r["p_target"]) + r["prior"]) / 3)


def _fingerprint(model: torch.nn.Module) -> tuple[int, float]:
    with torch.no_grad():
        params = list(model.parameters())
        return len(params), float(sum(p.double().abs().sum() for p in params))


def _check_settings(out: Path, settings: BenchSettings, prompts: list[str], weights: str | None) -> None:
    """Resuming with other settings, prompts or weights would mix two benchmarks in one table."""
    path = out / "bench_settings.json"
    current = json.loads(json.dumps({**asdict(settings), "prompt_texts": prompts, "weights": weights}))
    if path.is_file():
        previous = read_json(path, "benchmark settings")
        if previous != current:
            changed = sorted(k for k in current if previous.get(k) != current[k])
            raise AtomtuneError(
                f"{out} holds a benchmark with other settings ({', '.join(changed)}); use a new --out"
            )
    else:
        save_json(current, path)


def _sheet(images: torch.Tensor, prompts: int, seeds: int):
    """Prompts as rows (at most 25), seeds as columns, 3x enlarged."""
    pil = to_pil(images)
    rows = [pil[i * seeds : (i + 1) * seeds] for i in range(min(prompts, 25))]
    sheet = grid(rows)
    return sheet.resize((sheet.width * 3, sheet.height * 3), 0)


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("p_target", "feature_cosine", "alignment", "prior", "train_seconds"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}
    out["trainable_params"] = rows[0]["trainable_params"]
    out["adapter_mb"] = rows[0]["adapter_mb"]
    out["learning_rate"] = rows[0]["learning_rate"]
    return out


def _topk_curve(pipe, settings, concept, out, prompts, references, classifier) -> list[dict[str, Any]]:
    """The first report seed's atoms adapter, ranked by contribution while sampling the prompts,
    then scored with only the top-k atoms of every module."""
    from ..diffusion.analysis import calibrate, heatmap, sweep_ks
    from ..diffusion.methods import load_adapters
    from ..diffusion.pipeline import pipeline_name, spec_for

    tuned = load_adapters(pipe.transformer, [concept], pipeline_name(pipe))
    curve = []
    try:
        texts = [p.text for p in prompts]
        stats, _ = calibrate(spec_for(pipe), tuned, texts, [0], cz.SAMPLE_STEPS, cz.GUIDANCE, 24, 24)
        contribution = stats.contribution()
        heatmap(contribution, out / "topk" / "heatmap.png", "testbed concept: atom contribution E|s|·‖d‖")
        seeds = list(settings.eval_seeds)
        for k in sweep_ks(settings.num_atoms):
            tuned.handle.set_masks(top_k_masks(contribution, k))
            scores, _ = cz.score_concept(pipe, prompts, seeds, settings.holdout_digit, references, classifier)
            curve.append({"k": k, **scores})
    finally:
        tuned.unload()
    save_json(curve, out / "topk" / "curve.json")
    return curve


def _merge(pipe, settings, lr, concept, out, references, classifier) -> dict[str, Any]:
    """Concept + magenta style adapters, alone and merged (sum, concat), on "a sks digit, zwx style"."""
    from ..diffusion.methods import load_adapters
    from ..diffusion.pipeline import pipeline_name
    from .judges import fidelity

    seed = settings.seeds[0]
    style_dir = cz.write_images(
        cz.style_images(settings.holdout_digit, settings.instances), out / "style_images"
    )
    style_run = out / "merge" / "style"
    if not (style_run / "adapter").is_dir():
        cz.train_adapter(
            pipe, "atoms", style_dir, cz.STYLE_PROMPT, style_run, lr, settings.steps, seed, settings.num_atoms
        ).tuned.unload()
    merged_prompts = [f"a {size} {cz.SUBJECT}, {cz.STYLE_TOKEN} style" for size in ("large", "small")]
    seeds = list(range(8))
    rows = {}
    cases = {
        "concept only": ([concept], "concat"),
        "style only": ([style_run / "adapter"], "concat"),
        "merge: sum": ([concept, style_run / "adapter"], "sum"),
        "merge: concat": ([concept, style_run / "adapter"], "concat"),
    }
    for name, (dirs, how) in cases.items():
        tuned = load_adapters(pipe.transformer, dirs, pipeline_name(pipe), combine=how)
        try:
            images = cz.draw(pipe, merged_prompts, seeds)
            fid = fidelity(classifier, images, settings.holdout_digit, (references + 1) / 2)
            rows[name] = {"p_target": fid["p_target"].mean().item(), "style": cz.style_share(images)}
            save_png(
                _sheet(images, len(merged_prompts), len(seeds)),
                out / "merge" / f"{name.replace(': ', '-').replace(' ', '-')}.png",
            )
        finally:
            tuned.unload()
    return {"prompts": merged_prompts, "seeds": seeds, "rows": rows}


def _pm(stat: dict[str, float] | None, digits: int = 3) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    base = report["base"]
    lines = [
        f'Held-out digit {s["holdout_digit"]} from {s["instances"]} real samples, "{cz.INSTANCE_PROMPT}"; '
        f"{s['steps']} steps, CAME; learning rate chosen from {', '.join(f'{x:g}' for x in s['learning_rates'])} "
        f"on seed {s['select_seed']} (highest P(target) with alignment and prior kept ≥ {KEEP}); mean ± std over seeds {', '.join(map(str, s['seeds']))}; "
        f"{len(report['prompts'])} prompts x {len(s['eval_seeds'])} samples each.",
        "",
        "| method | lr | P(target) | feature cos | alignment | prior kept | params | adapter | train |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| pretrained | — | {base['p_target']:.3f} | {base['feature_cosine']:.3f} | "
        f"{base.get('alignment', float('nan')):.3f} | {base['prior']:.3f} | — | — | — |",
    ]
    for method, m in report["summary"].items():
        lines.append(
            f"| {method} | {m['learning_rate']:g} | {_pm(m['p_target'])} | {_pm(m['feature_cosine'])} | "
            f"{_pm(m.get('alignment'))} | {_pm(m['prior'])} | {m['trainable_params']:,} | "
            f"{m['adapter_mb']:.2f} MB | {_pm(m['train_seconds'], 1)} s |"
        )
    if "topk" in report:
        lines += ["", "Atoms kept per module (top-k by contribution) → fidelity and alignment:", ""]
        lines += ["| k | P(target) | feature cos | alignment |", "|---|---|---|---|"]
        for r in report["topk"]:
            lines.append(
                f"| {r['k']} | {r['p_target']:.3f} | {r['feature_cosine']:.3f} | {r.get('alignment', float('nan')):.3f} |"
            )
    if "merge" in report:
        mg = report["merge"]
        lines += ["", f"Concept + style ({'; '.join(mg['prompts'])}; {len(mg['seeds'])} seeds each):", ""]
        lines += ["| adapters | P(target) | style share |", "|---|---|---|"]
        for name, r in mg["rows"].items():
            lines.append(f"| {name} | {r['p_target']:.3f} | {r['style']:.3f} |")
    return "\n".join(lines) + "\n"


def parse_list(text: str, kind: type = float) -> tuple:
    """``"1e-4, 3e-4"`` → ``(1e-4, 3e-4)``; integer lists go through ``diffusion.commands.int_list``."""
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise AtomtuneError(f"not a comma-separated list of {kind.__name__}: {text!r}") from err
