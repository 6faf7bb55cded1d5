"""``atomtune demo``: the main job. Teach the shipped digit model the digit it never saw, with atoms,
on a CPU in a few minutes, and show what the fine-tuning changed.

Writes to ``--out``: the instance images (with their captions), the prior-preservation images, the 25
report prompts drawn before and after
(``images.png``), which atoms matter in which layer (``heatmap.png``, ``rankings.json``), one prompt
drawn with only the top-k atoms of every module kept (``sweep.png``), ``report/report.html`` (where
each atom acts, each top atom removed and doubled, the slider over k: ``atomtune report``), the
adapter, and ``summary.md`` / ``summary.json`` with the judges' scores before and after.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atomtune.diffusion.images import grid
from atomtune.errors import AtomtuneError
from atomtune.io import save_json, save_png, save_text
from atomtune.testbed import customize as cz
from atomtune.testbed.customize import RECIPE_LR
from atomtune.testbed.digit_pipeline import digit_pipeline, to_pil
from atomtune.testbed.judges import load_classifier

SWEEP_PROMPT = f"a small red {cz.SUBJECT} in the top right corner"


@dataclass
class DemoSettings:
    steps: int = 300
    learning_rate: float = RECIPE_LR
    # The demo's short run keeps a smaller budget than the default 150 per projection (to_q, to_k,
    # to_v, to_out.0) cut to 15, which at 300 steps and 3e-4 broke the other digits (prior kept 0.56;
    # benchmarks/results/demo/summary-150-cut-15.json). On the selection split, 5 training seeds
    # (benchmarks/demo_recipe_probe.py, results in benchmarks/results/demo/recipe-selection.jsonl),
    # 64 cut to 6 reached P(target) 0.943 ± 0.046 and 32 cut to 8 0.970 ± 0.041, a gap inside the
    # spread, at a third more parameters; 200 steps or a higher rate lost the concept or the other
    # digits. 0 keeps all.
    num_atoms: int = 64
    atom_budget: int = 6
    seed: int = 0
    holdout_digit: int = 9
    prior_per_digit: int = 2  # prior preservation: the model's own drawings of each other digit (0: off)

    def __post_init__(self) -> None:  # fail before the model loads and anything is written
        if self.steps < 1 or self.learning_rate <= 0 or self.num_atoms < 1 or self.seed < 0:
            raise AtomtuneError("demo: steps and num_atoms must be >= 1, learning_rate > 0, seed >= 0")
        if self.prior_per_digit < 0:
            raise AtomtuneError(f"demo: prior images per digit must be >= 0, got {self.prior_per_digit}")
        if not 0 <= self.atom_budget <= self.num_atoms:
            raise AtomtuneError(f"demo: atom budget must be in 0..{self.num_atoms}, got {self.atom_budget}")


def run_demo(
    out_dir: str | Path, settings: DemoSettings | None = None, progress: bool = True
) -> dict[str, Any]:
    from atomtune.core.stats import AtomStatistics
    from atomtune.workflows.analyze import heatmap
    from atomtune.workflows.report import ReportSettings, report

    settings = settings or DemoSettings()
    began = time.perf_counter()
    out = Path(out_dir).expanduser()
    pipe = digit_pipeline()
    classifier = load_classifier()
    target, seeds = settings.holdout_digit, [settings.seed]
    references = cz.instance_images(target)
    instance_dir = cz.write_images(references, out / "instance_images", cz.instance_captions(target))
    prompts = cz.report_prompts()

    before, images_before = cz.score_concept(pipe, prompts, seeds, target, references, classifier)
    before["prior"] = cz.score_prior(pipe, target, seeds, classifier)
    class_dir = None  # prior preservation keeps the other digits (the pretrained model's own drawings)
    if settings.prior_per_digit:
        class_dir = cz.prior_images(pipe, target, out / "prior_images", settings.prior_per_digit)
    result = cz.train_adapter(
        pipe, "atoms", instance_dir, cz.INSTANCE_PROMPT, out / "run", settings.learning_rate,
        settings.steps, settings.seed, settings.num_atoms, progress=progress,
        atom_budget=settings.atom_budget, class_dir=class_dir,
    )  # fmt: skip
    try:
        # the atoms' statistics come from the same sampling that the judges score (one pass, batched)
        with AtomStatistics(result.tuned.handle) as stats:
            after, images_after = cz.score_concept(pipe, prompts, seeds, target, references, classifier)
        after["prior"] = cz.score_prior(pipe, target, seeds, classifier)
        contribution = stats.contribution()
        sparsity = stats.sparsity()
        stats.save_json(out / "rankings.json")
        heatmap(contribution, out / "heatmap.png", f"which atoms draw the {cz.word(target)}: E|s|·‖d‖")
        trainable = result.tuned.num_trainable_parameters()
    finally:
        result.tuned.unload()
    page = report(
        ReportSettings(
            result.adapter_dir, out / "report", prompts=[SWEEP_PROMPT], seed=settings.seed,
            steps=cz.SAMPLE_STEPS, guidance_scale=cz.GUIDANCE, height=24, width=24,
        ),
        pipe=pipe, progress=False,
    )  # fmt: skip
    ks = page.data["ks"]
    strip = [page.images[key] for key in page.data["slider"][0]]
    save_png(grid([_enlarge_all(strip)], [f"k={k}" for k in ks]), out / "sweep.png")
    pil_before, pil_after = _enlarge_all(to_pil(images_before)), _enlarge_all(to_pil(images_after))
    rows = [pil_before[i * 5 : (i + 1) * 5] + pil_after[i * 5 : (i + 1) * 5] for i in range(5)]
    save_png(grid(rows, ["before"] + [""] * 4 + ["after"] + [""] * 4), out / "images.png")
    summary = {
        "concept": f"the digit {target} ({cz.word(target)}), never seen in pretraining",
        "instance_captions": cz.instance_captions(target),
        "settings": settings.__dict__,
        "before": before,
        "after": after,
        "sparsity": sparsity["mean"],  # over the 25 prompts' sampling, per module
        "l1_penalty_last_step": result.history[-1].get("l1"),
        "trainable_params": trainable,
        "adapter": str(result.adapter_dir),
        "seconds": time.perf_counter() - began,
        "train_seconds": result.seconds,
        "sweep_prompt": SWEEP_PROMPT,
        "sweep_ks": ks,
        "report": str(page.page),
        "report_top_atom": page.data["shown"][0] if page.data["shown"] else None,
    }
    save_json(summary, out / "summary.json")
    save_text(_markdown(summary), out / "summary.md")
    return summary


def _enlarge_all(images: list, factor: int = 3) -> list:
    """24x24 images are too small to see; nearest-neighbour keeps their pixels honest."""
    return [im.resize((im.width * factor, im.height * factor), 0) for im in images]


def _atoms_sentence(s: dict[str, Any]) -> str:
    """How few atoms carry the concept, in numbers measured while sampling the 25 prompts."""
    sp, m = s["sparsity"], s["settings"]["num_atoms"]
    return (
        f"The concept lives in {sp['live_atoms']:.1f} atoms per projection on average "
        f"({sp['live_atoms'] / m:.0%} of the {m} each module started with); "
        f"{sp['atoms_for_share']:.1f} of them carry 90% of a projection's contribution. Per token, "
        f"{sp['active_per_token']:.1f} atoms are active ({sp['active_per_token'] / m:.0%} of the dictionary; "
        f"{sp['zero_share']:.0%} of the kept atoms' coefficients are zero)."
    )


def _prior_words(settings: dict[str, Any]) -> str:
    n = settings.get("prior_per_digit", 0)
    return f"{n} of the model's own drawings of each other digit" if n else "off"


def _markdown(s: dict[str, Any]) -> str:
    b, a = s["before"], s["after"]
    rows = [
        ("the digit is the concept: P(target) by the judge", "p_target"),
        ("looks like the instance images: feature cosine", "feature_cosine"),
        ("color, place and size as asked: alignment", "alignment"),
        ("other digits still drawn right: prior kept", "prior"),
    ]
    lines = [
        f"# atomtune demo: {s['concept']}",
        "",
        f"Atoms ({s['settings']['num_atoms']} on each attention projection, cut to {s['settings']['atom_budget']}) trained for {s['settings']['steps']} "
        f'steps on 5 real handwritten samples, each under its own caption ("{s["instance_captions"][0]}", …), '
        f"with prior preservation ({_prior_words(s['settings'])}), in {s['train_seconds']:.0f} s; "
        f"whole demo {s['seconds']:.0f} s. Scores over the 25 report prompts (5 colors x 6 places/sizes, less 5 kept for choosing settings):",
        "",
        "| measured | before | after |",
        "|---|---|---|",
        *[f"| {label} | {b[key]:.3f} | {a[key]:.3f} |" for label, key in rows],
        "",
        _atoms_sentence(s),
        "",
        "`heatmap.png` and `rankings.json` show which atoms matter in which layer; `sweep.png` draws "
        f'"{s["sweep_prompt"]}" with only the top-k atoms of every module kept, k = '
        f"{', '.join(map(str, s['sweep_ks']))}. `images.png`: the 25 prompts before (left) and after.",
        "",
        _report_sentences(s),
    ]
    return "\n".join(lines) + "\n"


def _report_sentences(s: dict[str, Any]) -> str:
    """What to look at in ``report/report.html``, in two sentences."""
    top = s.get("report_top_atom")
    lead = (
        f"start with atom {top['id']} of `{top['module']}`, the most important one: its map shows which "
        f"patches of the digit it draws, and removing it changes the image by "
        f"{top['removed'][0]['change']:.2%} of the pixel range"
        if top
        else "its atoms table ranks every live atom"
    )
    return (
        f"Open `report/report.html` in a browser and {lead}. "
        "Then drag the slider from k = 0 (the pretrained model) to the full adapter to see how few atoms "
        "per projection it takes before the new digit appears."
    )
