"""``atomtune testbed bench``: the mini-DreamBooth benchmark, atoms against LoRA, DoRA and OFT.

Every method goes through the same trainer, optimizer (CAME), steps and learning-rate budget: each
learning rate of the grid is tried on a selection seed and on selection prompts the report does not
use; the kept one draws the concept best (P(target)) while keeping alignment and the other digits
(both ≥ 0.8), and it is rerun on every report seed and judged on the report prompts. Atoms run the
recipe (a dictionary at LoRA r=16's parameter count, cut by contribution to ``atom_budget`` atoms
per module during training); at their kept rate two controls run on the report seeds as well: the
same cuts made at random, and no cut at all. Then ``behaviour``: top-k curves, sparsity, merges,
and the frontier of every rate tried.

Each run writes its result next to its adapter; a rerun skips runs already done (resume).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError
from atomtune.io import check_same_settings, read_json, save_json, save_png, save_text
from atomtune.progress import progress_bar
from atomtune.testbed import behaviour as bh
from atomtune.testbed import customize as cz
from atomtune.testbed.digit_pipeline import digit_pipeline
from atomtune.testbed.judges import load_classifier

METHODS = ("atoms", "lora", "dora", "oft")
CONTROLS = {"atoms-random": {"prune_by": "random"}, "atoms-dense": None}  # at atoms' kept rate


@dataclass
class BenchSettings:
    methods: tuple[str, ...] = METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    learning_rates: tuple[float, ...] = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
    select_seed: int = 100
    steps: int = 600
    num_atoms: int = cz.RECIPE_NUM_ATOMS  # per projection (to_q, to_k, to_v, to_out.0)
    atom_budget: int = cz.RECIPE_BUDGET  # atoms kept per module by the recipe (10% of the dictionary)
    holdout_digit: int = 9
    instances: int = 5
    captions: bool = True  # each instance image under its own caption (its color, size, place + token)
    eval_seeds: tuple[int, ...] = (0, 1)
    prompts: str | None = None  # a file of prompts ("{}" = the concept); default: the 25 report prompts
    prior_per_digit: int = 4  # prior preservation: the model's own drawings of each other digit (0: off)
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
        if self.prior_per_digit < 0:
            raise AtomtuneError(f"prior images per digit must be ≥ 0, got {self.prior_per_digit}")
        if not 0 < self.atom_budget <= self.num_atoms:
            raise AtomtuneError(f"atom budget must be in 1..{self.num_atoms}, got {self.atom_budget}")
        if self.select_seed in self.seeds:
            raise AtomtuneError(f"the selection seed {self.select_seed} must not be a report seed")


def run_bench(
    settings: BenchSettings, out_dir: str | Path, weights: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the benchmark; write bench.json, bench.md and figures under ``out_dir``."""

    out = Path(out_dir).expanduser()
    prompts = cz.read_digit_prompts(settings.prompts) if settings.prompts else cz.report_prompts()
    chooser = cz.selection_prompts()
    pipe = digit_pipeline(weights)  # bad input fails here, before anything is written
    _check_settings(out, settings, [p.text for p in prompts], weights)
    classifier = load_classifier()
    target = settings.holdout_digit
    references = cz.instance_images(target, settings.instances)
    captions = cz.instance_captions(target, settings.instances) if settings.captions else None
    instance_dir = cz.write_images(references, out / "instance_images", captions)
    class_dir = None  # prior preservation: DreamBooth's class images, the pretrained model's own digits
    if settings.prior_per_digit:
        class_dir = cz.prior_images(pipe, target, out / "prior_images", settings.prior_per_digit)
    fingerprint = _fingerprint(pipe.transformer)
    eval_seeds = list(settings.eval_seeds)

    def evaluate(run_dir: Path, judged: list) -> dict[str, Any]:
        scores, images = cz.score_concept(pipe, judged, eval_seeds, target, references, classifier)
        scores["prior"] = cz.score_prior(pipe, target, eval_seeds, classifier)
        save_png(cz.sheet(images, len(judged), len(eval_seeds)), run_dir / "images.png")
        return scores

    def run(method: str, lr: float, seed: int, judged: list) -> dict[str, Any]:
        run_dir = out / "runs" / method / f"lr-{lr:g}" / f"seed-{seed}"
        done = run_dir / "result.json"
        if done.is_file():
            return read_json(done, "run result")
        control = CONTROLS.get(method, {})
        result = cz.train_adapter(
            pipe, method.split("-")[0], instance_dir, cz.INSTANCE_PROMPT,
            run_dir, lr, settings.steps, seed, settings.num_atoms,
            atom_budget=0 if control is None else settings.atom_budget, atoms=control or {},
            class_dir=class_dir,
        )  # fmt: skip
        try:
            record = {"method": method, "learning_rate": lr, "seed": seed, **evaluate(run_dir, judged)}
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
        base = {"method": "pretrained (no tuning)", **evaluate(out / "base", prompts)}
        save_json(base, base_file)
    controls = list(CONTROLS) if "atoms" in settings.methods else []
    runs = len(settings.methods) * len(settings.learning_rates)
    runs += (len(settings.methods) + len(controls)) * len(settings.seeds)
    bar = progress_bar(total=runs, desc="bench", disable=not progress)
    selection: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}
    results: dict[str, list[dict[str, Any]]] = {}
    for method in settings.methods:  # method by method: its rates on the selection seed, then the report
        selection[method] = []
        for lr in settings.learning_rates:
            selection[method].append(run(method, lr, settings.select_seed, chooser))
            bar.update(1)
        chosen[method] = _choose(selection[method])["learning_rate"]
        for name in [method, *(controls if method == "atoms" else [])]:
            chosen[name] = chosen[method]
            results[name] = []
            for seed in settings.seeds:
                results[name].append(run(name, chosen[method], seed, prompts))
                bar.update(1)
    bar.close()
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "prompts": [p.text for p in prompts],
        "selection_prompts": [p.text for p in chooser],
        "base": base,
        "chosen_learning_rate": chosen,
        "selection": selection,
        "results": results,
        "summary": {m: _summary(rows) for m, rows in results.items()},
    }
    bh.frontier_figure(selection, out / "frontier.png")
    if "atoms" in settings.methods:
        adapters = {
            m: [out / "runs" / m / f"lr-{chosen[m]:g}" / f"seed-{s}" / "adapter" for s in settings.seeds]
            for m in ("atoms", "atoms-dense")
        }
        if settings.topk:
            report["topk"] = _topk(pipe, settings, adapters, prompts, references, classifier, base, results)
        if settings.merge:
            pairs = {
                "atoms": (
                    adapters["atoms"][0],
                    _style_adapter(pipe, settings, "atoms", chosen, out, class_dir),
                )
            }
            if "lora" in settings.methods:  # the baseline merging papers start from: LoRA's direct sum
                concept = (
                    out / "runs" / "lora" / f"lr-{chosen['lora']:g}" / f"seed-{settings.seeds[0]}" / "adapter"
                )
                pairs["lora"] = (concept, _style_adapter(pipe, settings, "lora", chosen, out, class_dir))
            report["merge"] = bh.merge_rows(pipe, pairs, target, references, classifier, out / "merge")
    save_json(report, out / "bench.json")
    save_text(markdown(report), out / "bench.md")
    return report


def _topk(pipe, settings, adapters, prompts, references, classifier, base, results) -> dict[str, Any]:
    """The recipe's adapters with only their top-k atoms kept, and the no-cut control's top-budget."""
    budget, seeds = settings.atom_budget, list(settings.eval_seeds)
    half = max(budget // 2, 1)
    ks = sorted({k for k in (1, 2, half, 4, budget) if k <= budget})
    captions = cz.instance_captions(settings.holdout_digit, settings.instances) if settings.captions else []
    ranking = list(dict.fromkeys(captions or [cz.INSTANCE_PROMPT])) + [p.text for p in cz.selection_prompts()]
    args = (ranking, prompts, seeds, settings.holdout_digit, references, classifier)
    recipe = bh.topk_rows(pipe, adapters["atoms"], ks, *args)
    dense = bh.topk_rows(pipe, adapters["atoms-dense"], [budget], *args)
    dense_p = statistics.fmean(r["p_target"] for r in results["atoms-dense"])
    rows = []
    for k in ks:
        ps = [a["topk"][k]["p_target"] for a in recipe]
        rows.append({"atoms": f"recipe, top {k}", "k": k, "p_target": bh.mean_std(ps)})
        if all(k in a["random"] for a in recipe):
            ps = [a["random"][k]["p_target"] for a in recipe]
            rows.append({"atoms": f"recipe, {k} at random", "k": k, "p_target": bh.mean_std(ps)})
    rows.append(
        {"atoms": f"random cuts to {budget}", "k": budget, "p_target": _stat(results["atoms-random"])}
    )
    rows.append(
        {"atoms": f"no cut, top {budget} kept after training", "k": budget,
         "p_target": bh.mean_std([a["topk"][budget]["p_target"] for a in dense])}
    )  # fmt: skip
    rows.append(
        {
            "atoms": f"no cut, all {settings.num_atoms}",
            "k": settings.num_atoms,
            "p_target": _stat(results["atoms-dense"]),
        }
    )
    for row in rows:
        row["share_of_no_cut_gain"] = bh.gain_share(row["p_target"]["mean"], base["p_target"], dense_p)
    sparsity = {key: bh.mean_std([a["sparsity"][key] for a in recipe]) for key in recipe[0]["sparsity"]}
    dense_sparsity = {key: bh.mean_std([a["sparsity"][key] for a in dense]) for key in dense[0]["sparsity"]}
    halves = _halves(recipe, half, base["p_target"]) if half < budget else None
    return {"rows": rows, "halves": halves, "sparsity": sparsity, "no_cut_sparsity": dense_sparsity}


def _halves(recipe: list[dict[str, Any]], half: int, base: float) -> dict[str, Any]:
    """Inside the shipped adapters: the gain over the pretrained model that their top half of live
    atoms keeps, against a random half (the claim that the coefficients rank atoms)."""
    top = statistics.fmean(a["topk"][half]["p_target"] for a in recipe) - base
    chance = statistics.fmean(a["random"][half]["p_target"] for a in recipe) - base
    ratio = top / chance if chance > 0 else None  # None: the random half keeps no gain at all
    across_top = statistics.fmean(a["across"]["top"]["p_target"] for a in recipe) - base
    across_random = statistics.fmean(a["across"]["random"]["p_target"] for a in recipe) - base
    across = {
        "atoms": statistics.fmean(a["across"]["atoms"] for a in recipe),
        "top_gain": across_top,
        "random_gain": across_random,
        "ratio": across_top / across_random if across_random > 0 else None,
    }
    return {"k": half, "top_gain": top, "random_gain": chance, "ratio": ratio, "across_modules": across}


def _stat(rows: list[dict[str, Any]], key: str = "p_target") -> dict[str, float]:
    return bh.mean_std([r[key] for r in rows])


def _style_adapter(pipe, settings, method: str, chosen: dict[str, float], out: Path, class_dir) -> Path:
    """The magenta style, trained by ``method`` with the recipe and rate of its concept adapter
    (first report seed)."""
    style_dir = cz.write_images(
        cz.style_images(settings.holdout_digit, settings.instances), out / "style_images"
    )
    run = out / "merge" / ("style" if method == "atoms" else f"style-{method}")
    if not (run / "adapter").is_dir():
        cz.train_adapter(
            pipe, method, style_dir, cz.STYLE_PROMPT, run, chosen[method], settings.steps,
            settings.seeds[0], settings.num_atoms, atom_budget=settings.atom_budget, class_dir=class_dir,
        ).tuned.unload()  # fmt: skip
    return run / "adapter"


PRIOR_KEEP, ALIGNMENT_KEEP = 0.9, 0.95  # what a learning rate must leave of the other digits and alignment


def _choose(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The strongest concept (P(target)) among the runs that keep the other digits (prior ≥ 0.9)
    and alignment (≥ 0.95): what a user tunes for. If no run keeps both, the best mean of the three."""
    kept = [r for r in rows if r["prior"] >= PRIOR_KEEP and r.get("alignment", 1.0) >= ALIGNMENT_KEEP]
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
        check_same_settings(out, read_json(path, "benchmark settings"), current)
    else:
        save_json(current, path)


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


def _pm(stat: dict[str, float] | None, digits: int = 3) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    base = report["base"]
    lines = [
        f"Held-out digit {s['holdout_digit']} from {s['instances']} real samples, {_instance_text(s)}; "
        f"{s['steps']} steps, CAME; {_prior_text(s)}; learning rate chosen from {', '.join(f'{x:g}' for x in s['learning_rates'])} "
        f"on seed {s['select_seed']} and {len(report['selection_prompts'])} selection prompts (one per color, each in another place or size; never reported) "
        f"(highest P(target) with prior kept ≥ {PRIOR_KEEP} and alignment ≥ {ALIGNMENT_KEEP}); mean ± std over seeds {', '.join(map(str, s['seeds']))}; "
        f"{len(report['prompts'])} report prompts x {len(s['eval_seeds'])} samples each. Atoms: {s['num_atoms']} per module, "
        f"cut to {s['atom_budget']} by contribution during training; atoms-random: cut at random; atoms-dense: no cut "
        "(both at atoms' rate).",
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
        tk = report["topk"]
        lines += ["", "Atoms kept per module → P(target) (report seeds; share of the no-cut adapter's gain "
                  "over the pretrained model):", ""]  # fmt: skip
        lines += ["| atoms per module | P(target) | share of the no-cut gain |", "|---|---|---|"]
        for r in tk["rows"]:
            lines.append(f"| {r['atoms']} | {_pm(r['p_target'])} | {r['share_of_no_cut_gain']:.2f} |")
        if tk.get("halves"):
            h = tk["halves"]
            ratio = "∞ (the random half keeps none)" if h["ratio"] is None else f"{h['ratio']:.2f}x"
            lines += [
                "",
                f"Top half ({h['k']} live atoms per module) against a random half: P(target) gain over the "
                f"pretrained model {h['top_gain']:+.3f} vs {h['random_gain']:+.3f}, ratio {ratio}.",
            ]
            if "across_modules" in h:  # bench.json files written before the measure existed lack it
                a = h["across_modules"]
                ratio = "∞ (the random half keeps none)" if a["ratio"] is None else f"{a['ratio']:.2f}x"
                lines[-1] += (
                    f" Ranked over all modules together (the top {a['atoms']:.0f} of all live atoms against "
                    f"{a['atoms']:.0f} drawn at random over all modules): {a['top_gain']:+.3f} vs "
                    f"{a['random_gain']:+.3f}, ratio {ratio}."
                )
        sp, dense = tk["sparsity"], tk["no_cut_sparsity"]
        lines += [
            "",
            "While sampling the training and selection prompts (per module, mean over modules; recipe vs no cut): "
            f"live atoms {_pm(sp['live_atoms'], 1)} vs {_pm(dense['live_atoms'], 1)}; zero coefficients "
            f"{_pm(sp['zero_share'])} vs {_pm(dense['zero_share'])}; atoms active per token "
            f"{_pm(sp['active_per_token'], 1)} vs {_pm(dense['active_per_token'], 1)}; atoms carrying 90% "
            f"of the contribution {_pm(sp['atoms_for_share'], 1)} vs {_pm(dense['atoms_for_share'], 1)}.",
        ]
    if "merge" in report:
        mg = report["merge"]
        lines += ["", f"Concept + style ({'; '.join(mg['prompts'])}; {len(mg['seeds'])} seeds each):", ""]
        lines += [
            "| adapters | P(target) | style share | share of its concept-only P(target) |",
            "|---|---|---|---|",
        ]
        for name, r in mg["rows"].items():
            kept = "—" if r.get("concept_kept") is None else f"{r['concept_kept']:.2f}"
            lines.append(f"| {name} | {r['p_target']:.3f} | {r['style']:.3f} | {kept} |")
        lines += ["", f"Atom ids the two adapters share, per module (mean): {mg['shared_atom_ids']:.2f}."]
    return "\n".join(lines) + "\n"


def _instance_text(s: dict[str, Any]) -> str:
    if s.get("captions"):
        return f'each under its own caption ("{cz.instance_captions(s["holdout_digit"], 1)[0]}", …)'
    return f'"{cz.INSTANCE_PROMPT}"'


def _prior_text(s: dict[str, Any]) -> str:
    per_digit = s.get("prior_per_digit", 0)
    if not per_digit:
        return "no prior preservation"
    return (
        f"prior preservation on the pretrained model's own drawings ({per_digit} of each other digit, "
        "under their captions)"
    )


def parse_list(text: str, kind: type = float) -> tuple:
    """``"1e-4, 3e-4"`` → ``(1e-4, 3e-4)``; integer lists go through ``cli.options.int_list``."""
    try:
        return tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError as err:
        raise AtomtuneError(f"not a comma-separated list of {kind.__name__}: {text!r}") from err
