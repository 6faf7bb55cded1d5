"""What the testbed benchmark measures of the atoms themselves, beyond the scores every method gets:

- **few atoms carry the concept**: the recipe's adapters (a dictionary cut to its budget during
  training) scored with only their top-k atoms kept, beside two controls trained the same way at the
  same learning rate and seeds: the same count of atoms cut at *random*, and the full dictionary
  with no cut (scored whole, and with only its top ``budget`` atoms kept afterwards);
- **true sparsity** while sampling: live atoms, share of zero coefficients, atoms active per token,
  atoms carrying 90% of a module's contribution;
- **merging** a concept adapter with a style adapter by ``sum`` (the paper's) and ``concat``,
  beside LoRA's direct sum of its own pair, with the share of atom ids the two atom adapters share
  per module (what a sum adds onto each other);
- the **frontier**: every learning rate of every method, fidelity against prior kept and alignment.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from atomtune.core.selection import global_top_k_masks, top_k_masks
from atomtune.io import save_png
from atomtune.testbed import customize as cz


def topk_rows(
    pipe,
    adapters: list[Path],
    ks: list[int],
    ranking: list[str],
    prompts,
    seeds,
    target,
    references,
    classifier,
):
    """Per adapter (one per report seed): sparsity while sampling, the scores with only the top-k
    atoms of every module kept and with k random ones (the control), and the top half of all live
    atoms ranked over the modules together against a random half (``across``).

    Atoms are ranked by their contribution while sampling the ``ranking`` prompts (the training
    captions and the selection prompts; never the report prompts, which only judge)."""
    from atomtune.diffusion.adapters import load_adapters
    from atomtune.diffusion.pipeline import pipeline_name
    from atomtune.diffusion.spec import spec_for
    from atomtune.workflows.analyze import calibrate

    def judge() -> dict[str, float]:
        return cz.score_concept(pipe, prompts, seeds, target, references, classifier)[0]

    per_adapter = []
    for adapter in adapters:
        tuned = load_adapters(pipe.transformer, [adapter], pipeline_name(pipe))
        try:
            stats, _ = calibrate(
                spec_for(pipe), tuned, ranking, seeds[:1], cz.SAMPLE_STEPS, cz.GUIDANCE, 24, 24
            )
            live = {n: (a.mask != 0).cpu() for n, a in tuned.handle.atoms().items()}
            contribution = {n: c * live[n] for n, c in stats.contribution().items()}  # pads rank last
            sparsity = stats.sparsity()["mean"]  # before the top-k masks below change what is live
            rows, chance = {}, {}
            generator = torch.Generator().manual_seed(0)
            for k in ks:
                tuned.handle.set_masks({n: m & live[n] for n, m in top_k_masks(contribution, k).items()})
                rows[k] = judge()
                if k < max(int(m.sum()) for m in live.values()):
                    noise = random_importance(live, generator)
                    tuned.handle.set_masks({n: m & live[n] for n, m in top_k_masks(noise, k).items()})
                    chance[k] = judge()
            across = _halves_across_modules(tuned, live, contribution, generator, judge)
            per_adapter.append({"sparsity": sparsity, "topk": rows, "random": chance, "across": across})
        finally:
            tuned.unload()
    return per_adapter


def random_importance(live: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A random ranking of the live atoms (the control): every live atom above every cut one, even
    where a uniform draw lands on 0."""
    return {
        n: (torch.rand(len(m), generator=generator, dtype=torch.float64) + 1e-9) * m for n, m in live.items()
    }


def _halves_across_modules(tuned, live, contribution, generator, judge) -> dict[str, Any]:
    """The top half of all live atoms ranked over every module together, against a random half
    drawn over every module: a module whose atoms carry more keeps more of them."""
    half = sum(int(m.sum()) for m in live.values()) // 2
    out = {"atoms": half}
    for key, importance in (("top", contribution), ("random", random_importance(live, generator))):
        tuned.handle.set_masks({n: m & live[n] for n, m in global_top_k_masks(importance, half).items()})
        out[key] = judge()
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.pstdev(values)}


def gain_share(p: float, base: float, reference: float) -> float:
    """The share of ``reference``'s P(target) gain over the pretrained model that ``p`` keeps."""
    return (p - base) / (reference - base) if reference > base else float("nan")


MERGE_CASES = {  # per method: (row name, which adapters, how atoms combine)
    "atoms": [
        ("concept only", ("concept",), "concat"),
        ("style only", ("style",), "concat"),
        ("merge: sum", ("concept", "style"), "sum"),
        ("merge: concat", ("concept", "style"), "concat"),
    ],
    "lora": [
        ("lora: concept only", ("concept",), "concat"),
        ("lora: style only", ("style",), "concat"),
        ("lora: direct sum", ("concept", "style"), "concat"),  # both active: ΔW₁ + ΔW₂
    ],
}


def merge_rows(pipe, pairs: dict[str, tuple[Path, Path]], holdout: int, references, classifier, out: Path):
    """Concept + style, alone and merged, on "a large/small sks digit, zwx style" (8 seeds each).

    ``pairs`` maps a method ("atoms", and "lora" for the baseline merging papers start from, LoRA's
    direct sum) to its (concept, style) adapter folders. Each merge row says the share of its
    method's concept-only P(target) it keeps."""
    from atomtune.core.serialization import read_adapter_tensors
    from atomtune.diffusion.adapters import load_adapters
    from atomtune.diffusion.pipeline import pipeline_name
    from atomtune.testbed.judges import fidelity

    prompts = [f"a {size} {cz.SUBJECT}, {cz.STYLE_TOKEN} style" for size in ("large", "small")]
    seeds = list(range(8))
    rows = {}
    for method, (concept, style) in pairs.items():
        folders = {"concept": concept, "style": style}
        alone = None
        for name, which, how in MERGE_CASES[method]:
            tuned = load_adapters(
                pipe.transformer, [folders[w] for w in which], pipeline_name(pipe), combine=how
            )
            try:
                images = cz.draw(pipe, prompts, seeds)
                fid = fidelity(classifier, images, holdout, (references + 1) / 2)
                row = {"p_target": fid["p_target"].mean().item(), "style": cz.style_share(images)}
                sheet = cz.sheet(images, len(prompts), len(seeds))
                save_png(sheet, out / f"{name.replace(': ', '-').replace(' ', '-')}.png")
            finally:
                tuned.unload()
            if which == ("concept",):
                alone = row["p_target"]
            if len(which) == 2:
                row["concept_kept"] = row["p_target"] / alone if alone else None
            rows[name] = row
    ids = [read_adapter_tensors(d) for d in pairs["atoms"]]
    overlap = {}
    for key in (k for k in ids[0] if k.endswith(".atom_ids")):
        a = {int(i) for i in ids[0][key].tolist() if i >= 0}
        b = {int(i) for i in ids[1].get(key, torch.empty(0)).tolist() if i >= 0}
        overlap[key.removesuffix(".atom_ids")] = len(a & b) / max(min(len(a), len(b)), 1)
    return {
        "prompts": prompts,
        "seeds": seeds,
        "rows": rows,
        "shared_atom_ids": statistics.fmean(overlap.values()) if overlap else float("nan"),
        "shared_atom_ids_per_module": overlap,
    }


def frontier_figure(selection: dict[str, list[dict[str, Any]]], path: Path) -> Path:
    """One curve per method over its learning rates: P(target) against prior kept and alignment."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from atomtune.io import atomic_write

    fig = Figure(figsize=(10, 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for method, rows in selection.items():
        rows = sorted(rows, key=lambda r: r["learning_rate"])
        for ax, key in zip(axes, ("prior", "alignment"), strict=True):
            xs, ys = [r.get(key, float("nan")) for r in rows], [r["p_target"] for r in rows]
            ax.plot(xs, ys, marker="o", label=method)
            for x, y, r in zip(xs, ys, rows, strict=True):
                ax.annotate(f"{r['learning_rate']:g}", (x, y), fontsize=6, alpha=0.7)
    for ax, key in zip(axes, ("prior kept (other digits)", "alignment (color, size, place)"), strict=True):
        ax.set_xlabel(key)
        ax.set_ylabel("P(target)")
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("every learning rate tried (selection seed, selection prompts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path
