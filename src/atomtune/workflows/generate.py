"""``atomtune generate``: images from a pipeline with one or more adapters, atom masks and gains.

Images are named ``p{prompt:02d}-s{seed}.png``; ``grid.png`` has one row per prompt and one column
per seed; ``images.json`` lists prompts, seeds, files and the adapters and steering used.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atomtune.core.hosts.diffusers import compile_blocks
from atomtune.core.merge import MERGES
from atomtune.core.selection import top_k_masks
from atomtune.diffusion.adapters import load_adapters
from atomtune.diffusion.images import grid
from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED, pipeline_name, resolve_pipe
from atomtune.diffusion.spec import PixArtSpec, spec_for
from atomtune.diffusion.tuned import AtomTuned, Tuned
from atomtune.errors import AtomtuneError
from atomtune.io import read_json, save_json, save_png
from atomtune.progress import progress_bar
from atomtune.validation import check_number, check_output_not_input
from atomtune.workflows.manifest import ImageRecord, write_manifest
from atomtune.workflows.rankings import read_rankings

_GAIN = re.compile(r"^(?P<module>[\w.]+):(?P<atom>-?\d+)=(?P<gain>[-+0-9.eE]+)$")


@dataclass
class GenerateResult:
    out_dir: Path
    images: list[Path]
    grid: Path
    prompts: list[str]
    seeds: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_gains(specs: list[str] | dict | None) -> dict[str, dict[int, float]]:
    """``["transformer_blocks.1.attn2:3=2.0", ...]`` → ``{"transformer_blocks.1.attn2": {3: 2.0}}``."""
    if specs is None:
        return {}
    if isinstance(specs, dict):
        return specs
    gains: dict[str, dict[int, float]] = {}
    for spec in specs:
        match = _GAIN.match(spec.strip())
        if match is None:
            raise AtomtuneError(
                f"gain {spec!r} is not MODULE:ATOM=GAIN (e.g. transformer_blocks.1.attn2:3=2.0)"
            )
        try:
            value = float(match["gain"])
        except ValueError as exc:
            raise AtomtuneError(f"gain {spec!r}: {match['gain']!r} is not a number") from exc
        check_number(f"gain {spec!r}", value)  # 1e999 is inf: it would draw NaN images
        gains.setdefault(match["module"], {})[int(match["atom"])] = value
    return gains


def read_masks(source: str | Path | dict | None) -> dict[str, torch.Tensor] | None:
    """Masks from a JSON file ``{module: [0/1 per atom]}`` (or such a dict)."""
    if source is None:
        return None
    data = source if isinstance(source, dict) else read_json(source, "masks file")
    where = "masks" if isinstance(source, dict) else f"masks file {source}"
    if not isinstance(data, dict):
        raise AtomtuneError(f"{where} must map module names to lists of 0/1 per atom")
    for name, value in data.items():
        if not isinstance(value, list) or not all(v in (0, 1) and not isinstance(v, str) for v in value):
            raise AtomtuneError(f"{where}: {name} must be a list of 0/1 per atom, got {str(value)[:40]}")
    return {name: torch.as_tensor(value, dtype=torch.float32) for name, value in data.items()}


def masks_from_rankings(rankings: str | Path | dict, tuned: AtomTuned, k: int) -> dict[str, torch.Tensor]:
    """Keep each module's ``k`` highest-ranked atoms of a rankings file written by ``atomtune atoms``."""
    modules = read_rankings(rankings)["modules"]
    atoms = tuned.handle.atoms()
    missing = sorted(set(atoms) - set(modules))
    if missing:
        raise AtomtuneError(f"the rankings have no entry for module {missing[0]} of this adapter")
    masks = {}
    for name, atoms_m in atoms.items():
        keep = set(modules[name]["atom_ids"][:k])
        masks[name] = torch.tensor([float(int(i) in keep) for i in atoms_m.atom_ids.tolist()])
    return masks


def apply_steering(
    tuned: Tuned,
    masks: dict[str, torch.Tensor] | None = None,
    gains: dict[str, dict[int, float]] | None = None,
    top_k: int | None = None,
    rankings: str | Path | dict | None = None,
) -> dict[str, Any]:
    """Set atom masks (explicit, or the top-k by rankings / by weight importance) and gains."""
    if masks is None and not gains and top_k is None:
        return {}
    if not isinstance(tuned, AtomTuned):
        raise AtomtuneError(f"atom masks, top-k and gains need an atoms adapter, not {tuned.method}")
    used: dict[str, Any] = {}
    if top_k is not None:
        if masks is not None:
            raise AtomtuneError("give either masks or top-k, not both")
        most = max(a.num_atoms for a in tuned.handle.atoms().values())
        if not 0 <= top_k <= most:
            raise AtomtuneError(f"top-k must be in 0..{most} (the adapter's atoms per module), got {top_k}")
        if rankings is not None:
            masks = masks_from_rankings(rankings, tuned, top_k)
            used["importance"] = "rankings"
        else:
            from atomtune.core.stats import weight_importance

            masks = top_k_masks(weight_importance(tuned.handle), top_k)
            used["importance"] = "weights (no rankings given)"
        used["top_k"] = top_k
    if masks is not None:
        tuned.handle.set_masks(masks)
        used["kept_atoms"] = int(sum(float((m != 0).sum()) for m in masks.values()))
    if gains:
        tuned.handle.set_gains(gains)
        used["gains"] = {m: {str(a): g for a, g in v.items()} for m, v in gains.items()}
    return used


def draw(
    spec: PixArtSpec,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    negative_prompt: str = "",
    progress: bool = False,
    desc: str = "generate",
) -> Iterator[tuple[int, int, Any]]:
    """``(prompt index, seed, image)`` for every prompt and seed, in that order, one at a time (so a
    caller can write each image as it comes: ``generate`` and the DreamBooth benchmark both do)."""
    spec.check_resolution(height, width)
    encoded, negative = spec.encode_prompts(prompts), spec.encode_prompts([negative_prompt])
    bar = progress_bar(total=len(prompts) * len(seeds), desc=desc, disable=not progress, leave=False)
    try:
        for i in range(len(prompts)):
            for seed in seeds:
                yield (
                    i,
                    seed,
                    spec.generate(encoded.select([i]), negative, seed, steps, guidance_scale, height, width),
                )
                bar.update(1)
    finally:
        bar.close()


def render(
    spec: PixArtSpec,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[Any]]:
    """Images for every prompt (rows) and seed (columns)."""
    rows: list[list[Any]] = [[] for _ in prompts]
    for i, _, image in draw(spec, prompts, seeds, steps, guidance_scale, height, width, "", progress, desc):
        rows[i].append(image)
    return rows


@dataclass
class GenerateSettings:
    """What ``atomtune generate`` draws (its flags map one to one): prompts x seeds, with adapters and
    the atoms' steering (masks, top-k, gains), from a pipeline loaded by name unless one is given."""

    prompts: list[str]
    out_dir: str | Path
    pretrained: str = DEFAULT_PRETRAINED
    adapters: list[str | Path] | None = None
    num_images: int = 1
    seed: int = 0
    seeds: list[int] | None = None  # explicit seeds; default: seed, seed + 1, ... (num_images of them)
    steps: int = 20
    guidance_scale: float = 4.5
    height: int | None = None
    width: int | None = None
    masks: str | Path | dict | None = None
    top_k: int | None = None
    rankings: str | Path | dict | None = None
    gains: list[str] | dict | None = None
    combine: str = "concat"
    first_only: list[str] | None = None  # with several adapters: modules where the first acts alone
    subject: str | None = None  # the manifest's subject (default: the output folder's name)
    token: str = "sks"
    dtype: str = "auto"
    variant: str | None = None
    device: str | None = None
    local_files_only: bool = False
    compile: bool = False


def generate(settings: GenerateSettings, pipe=None, progress: bool = True) -> GenerateResult:
    """Generate ``num_images`` per prompt (seeds ``seed, seed+1, ...`` unless ``seeds``), write a grid.

    ``pipe``: a loaded pipeline to use (it comes back unchanged), else ``settings.pretrained`` is loaded.
    Besides ``images.json`` the folder gets the ``manifest.json`` that ``atomtune eval`` reads:
    ``subject`` (default: the output folder's name) and the unique ``token`` to strip from prompts.
    ``compile`` runs the transformer's blocks through ``torch.compile`` (regional compilation, adapters
    and steering included): the first image pays the compile time, the rest run faster.
    """
    s = settings
    prompts, out_dir, adapters, combine, top_k, rankings = (
        s.prompts, s.out_dir, s.adapters, s.combine, s.top_k, s.rankings
    )  # fmt: skip
    steps, guidance_scale, height, width = s.steps, s.guidance_scale, s.height, s.width
    if not prompts:
        raise AtomtuneError("no prompt given (--prompt or --prompts-file)")
    check_output_not_input(out_dir, adapters or [])
    if s.num_images < 1:
        raise AtomtuneError(f"num-images must be >= 1, got {s.num_images}")
    if combine not in MERGES:
        raise AtomtuneError(f"combine must be one of {', '.join(MERGES)}; got {combine!r}")
    first_only = list(s.first_only or [])
    if first_only and len(adapters or []) < 2:
        raise AtomtuneError("first-only modules need two or more adapters")
    seeds = list(s.seeds) if s.seeds else [s.seed + i for i in range(s.num_images)]
    gains = parse_gains(s.gains)
    mask_values = read_masks(s.masks)
    pipe = resolve_pipe(pipe or s.pretrained, s.dtype, s.variant, s.device, s.local_files_only)
    spec = spec_for(pipe)
    height = height or spec.native_resolution
    width = width or height
    spec.check_resolution(height, width)
    tuned = None
    if adapters:
        tuned = load_adapters(pipe.transformer, list(adapters), pipeline_name(pipe), combine, first_only)
    elif mask_values is not None or gains or top_k is not None:
        raise AtomtuneError("masks, top-k and gains need an --adapter")
    restore = None
    try:
        steering = apply_steering(tuned, mask_values, gains, top_k, rankings) if tuned else {}
        if s.compile:
            restore = compile_blocks(pipe.transformer)
        rows = render(spec, prompts, seeds, steps, guidance_scale, height, width, progress)
    finally:
        if restore is not None:
            restore()
        if tuned is not None:
            tuned.unload()  # a pipeline passed in comes back as it was
    out = Path(out_dir).expanduser()
    files, records = [], []
    method = tuned.method if tuned is not None else "base"
    adapter = ",".join(str(a) for a in adapters) if adapters else None
    for i, row in enumerate(rows):
        for seed, image in zip(seeds, row, strict=True):
            files.append(save_png(image, out / f"p{i:02d}-s{seed}.png"))
            records.append(
                ImageRecord(files[-1].name, s.subject or out.name, prompts[i], seed, method, adapter)
            )
    grid_path = save_png(grid(rows, [f"seed {seed}" for seed in seeds]), out / "grid.png")
    metadata = {
        "base_model": pipeline_name(pipe),
        "adapters": [str(a) for a in adapters or []],
        "combine": combine if adapters and len(adapters) > 1 else None,
        "first_only": first_only,
        "prompts": prompts,
        "seeds": seeds,
        "steps": steps,
        "guidance_scale": guidance_scale,
        "size": [height, width],
        "steering": steering,
        "compiled": s.compile,
        "images": [p.name for p in files],
        "grid": grid_path.name,
    }
    save_json(metadata, out / "images.json")
    write_manifest(out, records, {"unique_token": s.token, "base_model": metadata["base_model"]})
    return GenerateResult(out, files, grid_path, prompts, seeds, metadata)
