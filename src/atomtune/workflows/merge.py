"""``atomtune merge``: a concept adapter and a style adapter into one, with their atom overlap.

``sum`` is the paper's merge (add the fine-tuned parameters); it works when the two adapters'
important atoms rarely share an index, which the per-module overlap of their top-k atoms measures.
``concat`` stacks both dictionaries: exactly the sum of both updates, at twice the atoms. Importance
is calibrated over prompts when some are given, otherwise it is the data-free ``‖w_s‖·‖d‖``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atomtune.core.merge import MERGES, atom_overlap
from atomtune.core.model import AtomModel
from atomtune.core.stats import weight_importance
from atomtune.diffusion.adapters import check_base, read_adapter_info
from atomtune.diffusion.pipeline import load_transformer, pipeline_name
from atomtune.diffusion.tuned import AtomTuned
from atomtune.errors import AtomtuneError
from atomtune.io import save_json, save_text
from atomtune.validation import check_output_not_input


@dataclass
class MergeResult:
    adapter_dir: Path
    overlap_path: Path
    overlap: dict[str, dict[str, Any]]
    mean_overlap: float
    table: str


def merge(
    pretrained,
    concept: str | Path,
    style: str | Path,
    out_dir: str | Path,
    how: str = "sum",
    concept_only: list[str] | None = None,
    k: int | None = None,
    prompts: list[str] | None = None,
    seeds: list[int] | None = None,
    steps: int = 20,
    guidance_scale: float = 4.5,
    dtype: str = "auto",
    variant: str | None = None,
    device: str | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> MergeResult:
    """Merge ``concept`` and ``style`` (atoms adapters of the same model) into ``out_dir``.

    The overlap compares each module's top-``k`` atoms of both (default: an eighth of the atoms).
    In the ``concept_only`` modules the merge is the concept adapter alone (``merge_adapters``'
    ``first_only``).
    """
    if how not in MERGES:
        raise AtomtuneError(f"merge must be one of {', '.join(MERGES)}; got {how!r}")
    if k is not None and k < 1:
        raise AtomtuneError(f"top-k for the overlap must be >= 1, got {k}")
    check_output_not_input(out_dir, (concept, style))  # the merge would overwrite an input
    infos = {}
    for role, directory in (("concept", concept), ("style", style)):
        infos[role] = read_adapter_info(directory)
        if infos[role]["method"] != "atoms":
            raise AtomtuneError(
                f"merge takes atoms adapters; the {role} adapter {directory} is {infos[role]['method']}"
            )
    pipe = None
    if prompts:
        from atomtune.diffusion.pipeline import resolve_pipe

        pipe = resolve_pipe(pretrained, dtype, variant, device, local_files_only)
        transformer, name = pipe.transformer, pipeline_name(pipe)
    elif isinstance(pretrained, str):
        transformer, name = load_transformer(pretrained, dtype, variant, device, local_files_only), pretrained
    else:
        transformer, name = getattr(pretrained, "transformer", pretrained), pipeline_name(pretrained)
    check_base(transformer, infos["concept"], concept, name)
    check_base(transformer, infos["style"], style, name)
    handle = AtomModel(transformer)
    try:
        handle.load_adapter(concept, "concept")
        handle.load_adapter(style, "style")
        importance, source = _importance(handle, pipe, prompts, seeds, steps, guidance_scale, progress)
        smallest = min(len(v) for v in importance["concept"].values())
        if k is not None and k > smallest:
            raise AtomtuneError(f"top-k for the overlap must be <= {smallest} (the adapter's atoms), got {k}")
        k_used = k if k is not None else max(1, smallest // 8)
        ids = {role: {m: a.atom_ids for m, a in handle.atoms(role).items()} for role in ("concept", "style")}
        overlap = atom_overlap(
            importance["concept"], importance["style"], k_used, ids["concept"], ids["style"]
        )
        handle.merge("concept", "style", "merged", how=how, first_only=concept_only or ())
        out = Path(out_dir).expanduser()
        tuned = AtomTuned(handle, name)
        record = {"concept": str(concept), "style": str(style), "how": how}
        if concept_only:
            record["concept_only"] = list(concept_only)
        if how == "concat":  # the style's atom ids are shifted by the concept's count
            record["offset"] = handle.configs["concept"].num_atoms
        tuned.save(out, extra={"merged_from": record})
        mean = sum(v["overlap"] for v in overlap.values()) / max(len(overlap), 1)
        document = {
            "concept": str(concept),
            "style": str(style),
            "how": how,
            "concept_only": list(concept_only or []),
            "k": k_used,
            "importance": source,
            "mean_overlap": mean,
            "modules": overlap,
        }
        overlap_path = save_json(document, out / "overlap.json")
        table = overlap_table(overlap, k_used, mean)
        save_text(_card(name, concept, style, how, concept_only, k_used, mean, source), out / "README.md")
    finally:
        handle.unload()
    return MergeResult(out, overlap_path, overlap, mean, table)


def _importance(handle, pipe, prompts, seeds, steps, guidance_scale, progress):
    if not prompts:
        return {role: weight_importance(handle, role) for role in ("concept", "style")}, "weights |w_s|*|d|"
    from atomtune.diffusion.spec import spec_for
    from atomtune.workflows.analyze import calibrate

    spec = spec_for(pipe)
    size = spec.native_resolution
    result = {}
    tuned = AtomTuned(handle, pipeline_name(pipe))
    for role in ("concept", "style"):
        handle.set_adapter(role)
        stats, _ = calibrate(
            spec, tuned, prompts, list(seeds or [0]), steps, guidance_scale, size, size, progress
        )
        result[role] = {n: v.to(torch.float64) for n, v in stats.contribution().items()}
    return result, "calibrated over prompts: " + json.dumps(prompts)


def overlap_table(overlap: dict[str, dict[str, Any]], k: int, mean: float) -> str:
    width = max(len(n) for n in overlap)
    lines = [f"{'module':<{width}}  overlap  jaccard  shared atoms (of the top {k} of each)"]
    for name, row in overlap.items():
        shared = ", ".join(map(str, row["shared"])) or "-"
        lines.append(f"{name:<{width}}  {row['overlap']:7.2f}  {row['jaccard']:7.2f}  {shared}")
    lines.append(f"{'mean':<{width}}  {mean:7.2f}")
    return "\n".join(lines)


def _card(base, concept, style, how, concept_only, k, mean, source) -> str:
    alone = f"; the concept alone in {', '.join(f'`{m}`' for m in concept_only)}" if concept_only else ""
    return f"""# merged atoms adapter for {base}

- Concept adapter: `{concept}`
- Style adapter: `{style}`
- Merge: `{how}` ({"parameters added, as in the paper" if how == "sum" else "dictionaries stacked: the exact sum of both updates"}){alone}
- Overlap of the two adapters' top-{k} atoms per module: mean {mean:.2f} (importance: {source});
  per module in `overlap.json`

Use it: `atomtune generate --pretrained {base} --adapter MERGED_DIR --prompt "..."`
"""
