"""``atomtune atoms``: which atoms matter, measured while the sampler runs, and what they do.

Calibration generates every prompt with every seed inside ``AtomStatistics``: each atom's
contribution ``E|s|·‖d‖`` and frequency ``P(s≠0)`` are averaged over tokens, heads, the sampler's
timesteps, both halves of classifier-free guidance, and prompts. Written: ``rankings.json`` (per
module, atom ids ranked by contribution), ``heatmap.png`` (modules x atoms) and, with the sweep, the
same prompt and seed generated with the top 1, 2, 4 … M atoms of every module active (``sweep.png``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from atomtune.core.selection import top_k_masks
from atomtune.core.stats import AtomStatistics
from atomtune.diffusion.adapters import load_adapters, read_adapter_info
from atomtune.diffusion.images import grid
from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED, pipeline_name, resolve_pipe
from atomtune.diffusion.spec import PixArtSpec, spec_for
from atomtune.diffusion.tuned import AtomTuned
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write, save_json, save_png
from atomtune.progress import progress_bar
from atomtune.validation import check_output_not_input

IMPORTANCE = (
    "contribution E|s|*||d|| averaged over tokens, heads, sampler timesteps, guidance halves and prompts"
)


@dataclass
class AnalysisResult:
    out_dir: Path
    rankings: Path
    heatmap: Path
    contribution: dict[str, torch.Tensor]
    sparsity: dict[str, Any] = field(default_factory=dict)
    sweep: Path | None = None
    sweep_images: list[Path] = field(default_factory=list)
    ks: list[int] = field(default_factory=list)


def calibrate(
    spec: PixArtSpec,
    tuned: AtomTuned,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    progress: bool = False,
) -> tuple[AtomStatistics, list[int]]:
    """Run the sampler for every prompt and seed while collecting atom statistics."""
    encoded, negative = spec.encode_prompts(prompts), spec.encode_prompts([""])
    timesteps: list[int] = []
    bar = progress_bar(total=len(prompts) * len(seeds), desc="calibrate", disable=not progress)
    with torch.no_grad(), AtomStatistics(tuned.handle) as stats:
        for i in range(len(prompts)):
            for seed in seeds:
                spec.generate(encoded.select([i]), negative, seed, steps, guidance_scale, height, width)
                timesteps = spec.timesteps()
                bar.update(1)
    bar.close()
    if not stats.tokens:
        raise AtomtuneError("calibration saw no atom activity (is the adapter active?)")
    return stats, timesteps


def short_name(module: str) -> str:
    """``transformer_blocks.12.attn1`` → ``12.attn1``."""
    return module.removeprefix("transformer_blocks.")


def heatmap(contribution: dict[str, torch.Tensor], path: str | Path, title: str = "") -> Path:
    """Layers (rows) x atoms (columns) of contribution, log scale, four decades below the maximum."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(contribution)
    width = max(len(v) for v in contribution.values())
    matrix = torch.full((len(names), width), float("nan"), dtype=torch.float64)
    for i, name in enumerate(names):
        values = contribution[name].double()
        matrix[i, : len(values)] = values
    top = float(torch.nan_to_num(matrix, nan=0.0).max())
    floor = top * 1e-4 if top > 0 else 1e-12
    logged = torch.log10(matrix.clamp(min=floor)).numpy()
    fig = Figure(figsize=(min(4 + width / 16, 24), min(2 + 0.28 * len(names), 30)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(logged, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(names)), [short_name(n) for n in names], fontsize=7)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("atom (position in the module's dictionary)")
    ax.set_ylabel("module")
    ax.set_title(title or "atom contribution E|s|·‖d‖")
    fig.colorbar(image, ax=ax, label="log10 contribution")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    return path


def sweep_ks(num_atoms: int) -> list[int]:
    """1, 2, 4, … up to ``num_atoms``, which is always last."""
    ks = [2**i for i in range(int(math.log2(num_atoms)) + 1) if 2**i < num_atoms]
    return [*ks, num_atoms]


def sweep(
    spec: PixArtSpec,
    tuned: AtomTuned,
    contribution: dict[str, torch.Tensor],
    prompt: str,
    seed: int,
    steps: int,
    guidance_scale: float,
    height: int,
    width: int,
    ks: list[int] | None = None,
    progress: bool = False,
) -> tuple[list[int], list[Any]]:
    """The same prompt and seed with only the top-k atoms of every module active, for each k."""
    ks = ks or sweep_ks(max(tuned.live_atoms().values()))  # pads of a pruned adapter are no atoms
    encoded, negative = spec.encode_prompts([prompt]), spec.encode_prompts([""])
    images = []
    try:
        for k in progress_bar(ks, desc="sweep", disable=not progress):
            tuned.handle.set_masks(top_k_masks(contribution, k))
            images.append(spec.generate(encoded, negative, seed, steps, guidance_scale, height, width))
    finally:
        tuned.handle.reset_steering()
    return ks, images


@dataclass
class AnalyzeSettings:
    """What ``atomtune atoms`` measures (its flags map one to one): an atoms adapter's importance over
    prompts, seeds and the sampler's timesteps, and optionally the top-k sweep."""

    adapter: str | Path
    out_dir: str | Path
    pretrained: str = DEFAULT_PRETRAINED
    prompts: list[str] | None = None  # default: the adapter's instance prompt
    seeds: list[int] | None = None  # default: [0]
    steps: int = 20
    guidance_scale: float = 4.5
    height: int | None = None
    width: int | None = None
    sweep: bool = False
    sweep_prompt: str | None = None
    sweep_seed: int | None = None
    dtype: str = "auto"
    variant: str | None = None
    device: str | None = None
    local_files_only: bool = False


def analyze(settings: AnalyzeSettings, pipe=None, progress: bool = True) -> AnalysisResult:
    """Calibrate an atoms adapter over prompts and timesteps; write rankings, heatmap and the sweep.

    ``pipe``: a loaded pipeline to use (it comes back unchanged), else ``settings.pretrained`` is loaded.
    """
    s = settings
    adapter, out_dir, steps, guidance_scale, height, width = (
        s.adapter, s.out_dir, s.steps, s.guidance_scale, s.height, s.width
    )  # fmt: skip
    check_output_not_input(out_dir, (adapter,))
    info = read_adapter_info(adapter)
    if info["method"] != "atoms":
        raise AtomtuneError(f"atom analysis needs an atoms adapter; {adapter} is {info['method']}")
    prompts = list(s.prompts or []) or _training_prompts(adapter)
    seeds = list(s.seeds) if s.seeds else [0]
    pipe = resolve_pipe(pipe or s.pretrained, s.dtype, s.variant, s.device, s.local_files_only)
    spec = spec_for(pipe)
    height = height or spec.native_resolution
    width = width or height
    spec.check_resolution(height, width)
    tuned = load_adapters(pipe.transformer, [adapter], pipeline_name(pipe))
    assert isinstance(tuned, AtomTuned)
    out = Path(out_dir).expanduser()
    try:
        stats, timesteps = calibrate(
            spec, tuned, prompts, seeds, steps, guidance_scale, height, width, progress
        )
        contribution = stats.contribution()
        document = {
            "adapter": str(adapter),
            "base_model": pipeline_name(pipe),
            "importance": IMPORTANCE,
            "prompts": prompts,
            "seeds": seeds,
            "steps": steps,
            "timesteps": timesteps,
            "guidance_scale": guidance_scale,
            "size": [height, width],
            "sparsity": stats.sparsity(),
            "modules": stats.report(),
        }
        rankings = save_json(document, out / "rankings.json")
        heat = heatmap(
            contribution,
            out / "heatmap.png",
            f"atom contribution: {'/'.join(Path(adapter).resolve().parts[-2:])}",
        )
        result = AnalysisResult(out, rankings, heat, contribution, document["sparsity"])
        if s.sweep:
            prompt = s.sweep_prompt or prompts[0]
            seed = seeds[0] if s.sweep_seed is None else s.sweep_seed
            ks, images = sweep(
                spec,
                tuned,
                contribution,
                prompt,
                seed,
                steps,
                guidance_scale,
                height,
                width,
                progress=progress,
            )
            result.ks = ks
            result.sweep_images = [
                save_png(img, out / "sweep" / f"k-{k:04d}.png") for k, img in zip(ks, images, strict=True)
            ]
            result.sweep = save_png(grid([images], [f"k={k}" for k in ks]), out / "sweep.png")
            save_json(
                {"prompt": prompt, "seed": seed, "ks": ks, "images": [p.name for p in result.sweep_images]},
                out / "sweep" / "sweep.json",
            )
    finally:
        tuned.unload()
    return result


def _training_prompts(adapter: str | Path) -> list[str]:
    path = Path(adapter).expanduser() / "training.json"
    if path.is_file():
        prompt = json.loads(path.read_text()).get("instance_prompt")
        if prompt:
            return [prompt]
    raise AtomtuneError(
        f"no prompt given, and {adapter} has no training.json to take its instance prompt from"
    )
