"""``atomtune testbed edit-bench``: the paper's editing claim, measured on the testbed.

Fine-tune on one image with its source prompt, then ask for an edit with a target prompt: with the
whole adapter the model sticks to the source; each method's knob moves it back towards the
pretrained model, trading identity (the source glyph kept) for alignment (the edit done). Atoms'
knob is removal of the unimportant atoms (top-k by contribution; the same count at random as the
control), LoRA's and DoRA's the adapter scale and the rank of the weight update, OFT's the
rotation's scale (``edit_knobs``). Every method trains through the one trainer with the paper's
editing recipe (60 epochs of the single image, CAME); each gets its learning rate from the same
grid, chosen on selection sources the report never uses (``edit_sources``), and every method also
runs at every other rate of the grid on the report sources: at the strong rates the full adapters
stick to the source, so that removal has something to restore. ``edit_report`` draws the curves, the
table at matched identity and the verdicts per strength.

Each run writes ``result.json`` in its own folder; a rerun skips the runs already done (resume).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from atomtune.errors import AtomtuneError
from atomtune.io import check_same_settings, read_json, save_json, save_png, save_text
from atomtune.progress import progress_bar
from atomtune.testbed import customize as cz
from atomtune.testbed import edit_knobs as kn
from atomtune.testbed import edit_report as er
from atomtune.testbed.digit_pipeline import digit_pipeline, to_pil
from atomtune.testbed.edit_sources import Source, draw_targets, judge, make_sources, reconstruction
from atomtune.testbed.judges import load_classifier

METHODS = ("atoms", "lora", "dora", "oft")
REPORT_DIGITS = (9, 2, 9, 5, 9, 7)  # the held-out digit and pretrained ones, alternating
SELECTION_DIGITS = (9, 4)


@dataclass
class EditBenchSettings:
    methods: tuple[str, ...] = METHODS
    digits: tuple[int, ...] = REPORT_DIGITS  # one report source per entry
    selection_digits: tuple[int, ...] = SELECTION_DIGITS  # sources that choose the learning rates
    seeds: tuple[int, ...] = (0, 1, 2)  # training and sampling seed of each report run
    select_seed: int = 100
    learning_rates: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    steps: int = 60  # 60 epochs of the single image
    num_atoms: int = cz.RECIPE_NUM_ATOMS  # per projection (to_q, to_k, to_v, to_out.0)
    atom_budget: int = cz.RECIPE_BUDGET  # atoms kept per module during training; top-k runs k from it to 1
    scales: tuple[float, ...] = (0.75, 0.5, 0.25)  # LoRA/DoRA adapter scale, OFT rotation scale
    ranks: tuple[int, ...] = (8, 4, 2, 1)  # LoRA/DoRA: the weight update truncated to these ranks
    sample_steps: int = 10

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS))
        if unknown:
            raise AtomtuneError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        for name in ("methods", "digits", "selection_digits", "seeds", "learning_rates"):
            if not getattr(self, name):
                raise AtomtuneError(f"{name.replace('_', ' ')} must not be empty")
        bad = [d for d in (*self.digits, *self.selection_digits) if not 0 <= d <= 9]
        if bad:
            raise AtomtuneError(f"digits must be in 0..9, got {bad[0]}")
        if min(self.learning_rates) <= 0:
            raise AtomtuneError(f"learning rates must be positive, got {min(self.learning_rates):g}")
        for name in ("steps", "num_atoms", "sample_steps"):
            if getattr(self, name) < 1:
                raise AtomtuneError(f"{name.replace('_', ' ')} must be ≥ 1, got {getattr(self, name)}")
        if not 0 < self.atom_budget <= self.num_atoms:
            raise AtomtuneError(f"atom budget must be in 1..{self.num_atoms}, got {self.atom_budget}")
        if any(not 0 < s < 1 for s in self.scales):
            raise AtomtuneError(f"scales must lie strictly between 0 and 1, got {list(self.scales)}")
        if any(r < 1 for r in self.ranks):
            raise AtomtuneError(f"ranks must be ≥ 1, got {list(self.ranks)}")
        if self.select_seed in self.seeds:
            raise AtomtuneError(f"the selection seed {self.select_seed} must not be a report seed")

    def atom_ks(self) -> list[int]:
        """k for the top-k curve, below the budget: every k for small budgets, else a few fractions."""
        b = self.atom_budget
        if b <= 8:
            return list(range(b - 1, 0, -1))
        return sorted({max(1, round(b * f)) for f in (0.75, 0.5, 0.25, 0.125)} | {1}, reverse=True)


def run_edit_bench(
    settings: EditBenchSettings, out_dir: str | Path, weights: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Run (or resume) the edit benchmark; write edit_bench.json/.md, edit_curves.png and
    edit_grid.png under ``out_dir``."""
    out = Path(out_dir).expanduser()
    pipe = digit_pipeline(weights)  # bad weights fail here, before anything is written
    _check_settings(out, settings, weights)
    classifier = load_classifier()
    report_sources, selection_sources = make_sources(settings.digits, settings.selection_digits)
    for source in report_sources + selection_sources:
        cz.write_images(source.image[None], out / "sources" / source.name)
    bench = _Bench(pipe, settings, classifier, out)
    n_methods = len(settings.methods)
    total = n_methods * len(settings.learning_rates) * len(selection_sources)
    total += (n_methods * len(settings.learning_rates) + 1) * len(report_sources) * len(settings.seeds)
    bar = progress_bar(total=total, desc="edit-bench", disable=not progress)
    selection: dict[str, list[dict[str, Any]]] = {}
    chosen: dict[str, float] = {}
    for method in settings.methods:
        selection[method] = []
        for lr in settings.learning_rates:
            rows = []
            for source in selection_sources:
                rows.append(bench.select(method, lr, source))
                bar.update(1)
            score = sum(r["score"] for r in rows) / len(rows)
            selection[method].append({"learning_rate": lr, "score": score, "sources": rows})
        chosen[method] = max(selection[method], key=lambda r: r["score"])["learning_rate"]
    # every rate of the grid on the report sources, not only the kept one: the strong rates are where
    # a full adapter sticks to its source, so that removal has something to restore
    by_rate = {lr: {"pretrained": [], **{m: [] for m in settings.methods}} for lr in settings.learning_rates}
    for source in report_sources:
        for seed in settings.seeds:
            base = bench.base(source, seed)
            bar.update(1)
            for lr in settings.learning_rates:
                by_rate[lr]["pretrained"].append(base)
                for method in settings.methods:
                    by_rate[lr][method].append(bench.run(method, lr, source, seed))
                    bar.update(1)
    bar.close()
    first = by_rate[settings.learning_rates[0]]["pretrained"]
    runs = {"pretrained": first, **{m: by_rate[chosen[m]][m] for m in settings.methods}}
    report: dict[str, Any] = {
        "settings": asdict(settings),
        "weights": weights,
        "sources": [_describe(s) for s in report_sources],
        "selection_sources": [_describe(s) for s in selection_sources],
        "selection": selection,
        "chosen_learning_rate": chosen,
        "runs": runs,
    }
    records = first + [r for rates in by_rate.values() for m in settings.methods for r in rates[m]]
    records += [r for rows in selection.values() for lr in rows for r in lr["sources"]]
    report["cpu_seconds"] = sum(r["cpu_seconds"] for r in records)
    report.update(er.summarise(runs))
    report["strengths"] = [{"learning_rate": lr, **er.strength(rates)} for lr, rates in by_rate.items()]
    er.curves_figure(report, out / "edit_curves.png")
    save_png(er.image_grid(out, report_sources[0], settings, chosen), out / "edit_grid.png")
    save_json(report, out / "edit_bench.json")
    save_text(er.markdown(report), out / "edit_bench.md")
    return report


class _Bench:
    """The runs of one benchmark folder: each trains (or reads its ``result.json``) and judges."""

    def __init__(self, pipe, settings: EditBenchSettings, classifier, out: Path) -> None:
        self.pipe, self.settings, self.classifier, self.out = pipe, settings, classifier, out
        self.fingerprint = _fingerprint(pipe.transformer)

    def _train(self, method: str, source: Source, lr: float, seed: int, run_dir: Path):
        """One run of the project's trainer on the source image and its exact caption (no rare
        token: the caption is the prompt), at the testbed's settings (``customize.train_adapter``)."""
        from atomtune.workflows.train import TrainSettings, train

        s = self.settings
        train_settings = TrainSettings(
            instance_data=str(self.out / "sources" / source.name),
            instance_prompt=source.prompt,
            token=None,
            output_dir=str(run_dir),
            pretrained="digits",
            method=method,
            num_atoms=s.num_atoms,
            atom_budget=s.atom_budget,
            learning_rate=lr,
            epochs=s.steps,
            max_steps=s.steps,
            batch_size=1,
            seed=seed,
            sample_steps=cz.SAMPLE_STEPS,
            guidance_scale=cz.GUIDANCE,
        )
        return train(train_settings, pipe=self.pipe, progress=False).tuned

    def _unload(self, tuned, method: str) -> None:
        tuned.unload()
        if _fingerprint(self.pipe.transformer) != self.fingerprint:
            raise AtomtuneError(f"unloading {method} did not restore the pretrained model")

    def select(self, method: str, lr: float, source: Source) -> dict[str, Any]:
        """A selection run: how well the full adapter redraws its source from the source prompt."""
        run_dir = self.out / "selection" / method / f"lr-{lr:g}" / source.name
        if (run_dir / "result.json").is_file():
            return read_json(run_dir / "result.json", "run result")
        seed, start = self.settings.select_seed, time.process_time()
        tuned = self._train(method, source, lr, seed, run_dir)
        try:
            record = {
                "source": source.name,
                **reconstruction(self.pipe, source, seed, self.settings.sample_steps, self.classifier),
            }
        finally:
            self._unload(tuned, method)
        record["cpu_seconds"] = time.process_time() - start
        save_json(record, run_dir / "result.json")
        return record

    def base(self, source: Source, seed: int) -> dict[str, Any]:
        """The pretrained model on the targets: the end point every knob reaches at zero."""
        run_dir = self.out / "runs" / "pretrained" / source.name / f"seed-{seed}"
        if (run_dir / "result.json").is_file():
            return read_json(run_dir / "result.json", "run result")
        start = time.process_time()
        record = {"source": source.name, "seed": seed, **self._point(source, seed, run_dir, "base")}
        record["cpu_seconds"] = time.process_time() - start
        save_json(record, run_dir / "result.json")
        return record

    def _point(self, source: Source, seed: int, run_dir: Path, label: str) -> dict[str, float]:
        images = draw_targets(self.pipe, source, seed, self.settings.sample_steps)
        _save_images(images, run_dir / "images" / f"{label}.png")
        return judge(images, source, self.classifier)

    def run(self, method: str, lr: float, source: Source, seed: int) -> dict[str, Any]:
        """A report run: train, then judge the full adapter and every point of the method's knobs."""
        run_dir = self.out / "runs" / method / f"lr-{lr:g}" / source.name / f"seed-{seed}"
        if (run_dir / "result.json").is_file():
            return read_json(run_dir / "result.json", "run result")
        start = time.process_time()
        tuned = self._train(method, source, lr, seed, run_dir)
        record: dict[str, Any] = {"source": source.name, "seed": seed, "learning_rate": lr}
        try:
            record["source_prompt"] = reconstruction(
                self.pipe, source, seed, self.settings.sample_steps, self.classifier
            )
            record["full"] = self._point(source, seed, run_dir, "full")
            if not all(bool(p.detach().isfinite().all()) for p in tuned.trainable_parameters()):
                record["diverged"], record["curves"] = True, {}  # no knob of a NaN adapter means anything
            elif method == "atoms":
                record["curves"] = self._atom_curves(tuned, source, seed, run_dir)
            else:
                _, points = kn.peft_points(tuned, method, self.settings.scales, self.settings.ranks)
        finally:
            self._unload(tuned, method)
        if method != "atoms" and not record.get("diverged"):  # PEFT's knob points: weights loaded
            record["curves"] = {}  # into the plain model
            for knob, value, weights in points:
                with kn.loaded(self.pipe.transformer, weights()):
                    scores = self._point(source, seed, run_dir, f"{knob}-{value:g}")
                record["curves"].setdefault(knob, []).append({"value": value, **scores})
        record["cpu_seconds"] = time.process_time() - start
        save_json(record, run_dir / "result.json")
        return record

    def _atom_curves(self, tuned, source: Source, seed: int, run_dir: Path) -> dict[str, list]:
        """Top-k atoms per module by contribution while drawing the source prompt (as ``atomtune
        edit`` ranks them), and the same count at random."""
        from atomtune.diffusion.spec import spec_for
        from atomtune.workflows.analyze import calibrate

        handle = tuned.handle
        live = kn.live_atoms(handle)
        stats, _ = calibrate(
            spec_for(self.pipe),
            tuned,
            [source.prompt],
            [seed],
            self.settings.sample_steps,
            cz.GUIDANCE,
            24,
            24,
        )
        contribution = stats.contribution()
        generator = torch.Generator().manual_seed(seed)
        curves: dict[str, list[dict[str, Any]]] = {"top-k": [], "random-k": []}
        for k in self.settings.atom_ks():
            for knob, masks in (
                ("top-k", kn.topk_masks(contribution, live, k)),
                ("random-k", kn.random_masks(live, k, generator)),
            ):
                handle.set_masks(masks)
                scores = self._point(source, seed, run_dir, f"{knob}-{k}")
                curves[knob].append({"value": k, "kept": [int(m.sum()) for m in masks.values()], **scores})
        handle.set_masks(live)
        return curves


def _save_images(images: torch.Tensor, path: Path) -> None:
    """The drawings of one point side by side, no padding (``edit_report`` cuts them apart again)."""
    from PIL import Image

    pil = to_pil(images)
    strip = Image.new("RGB", (sum(p.width for p in pil), pil[0].height))
    for i, picture in enumerate(pil):
        strip.paste(picture, (i * picture.width, 0))
    save_png(strip, path)


def _describe(source: Source) -> dict[str, Any]:
    return {
        "name": source.name,
        "digit": source.digit,
        "prompt": source.prompt,
        "targets": [
            {"kind": t.kind, "prompt": t.attributes.caption(), "seed_offset": t.seed_offset}
            for t in source.targets
        ],
    }


def _fingerprint(model: torch.nn.Module) -> tuple[int, float]:
    with torch.no_grad():
        params = list(model.parameters())
        return len(params), float(sum(p.double().abs().sum() for p in params))


def _check_settings(out: Path, settings: EditBenchSettings, weights: str | None) -> None:
    """Resuming with other settings or weights would mix two benchmarks in one table."""
    path = out / "edit_bench_settings.json"
    current = json.loads(json.dumps({**asdict(settings), "weights": weights}))
    if path.is_file():
        check_same_settings(out, read_json(path, "benchmark settings"), current)
    else:
        save_json(current, path)
