"""``atomtune edit``: the paper's image editing by atom removal.

Fine-tune atoms on one image with its source prompt (60 epochs by default), rank the atoms by their
contribution while generating the source prompt, then generate the target prompt(s) keeping only the
top-k atoms of every module for several k. All atoms reproduce the source image and resist the edit;
fewer atoms let the target prompt through; none is the base model. ``edit_grid.png`` shows that
trade-off: one row per prompt (the source prompt first), one column per k.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from atomtune.core.selection import top_k_masks
from atomtune.diffusion.images import grid
from atomtune.diffusion.pipeline import pipeline_name, resolve_pipe
from atomtune.diffusion.spec import spec_for
from atomtune.diffusion.tuned import AtomTuned
from atomtune.errors import AtomtuneError
from atomtune.io import list_images, save_json, save_png
from atomtune.workflows.analyze import calibrate, heatmap
from atomtune.workflows.train import TrainSettings, train


@dataclass
class EditResult:
    out_dir: Path
    adapter_dir: Path
    grid: Path
    ks: list[int]
    images: list[Path] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)


def default_ks(num_atoms: int) -> list[int]:
    return [k for k in (64, 16, 4, 1) if k < num_atoms]


def edit(
    pretrained,
    image: str | Path,
    source_prompt: str,
    target_prompts: list[str],
    out_dir: str | Path,
    ks: list[int] | None = None,
    epochs: int = 60,
    num_atoms: int = 64,
    learning_rate: float = 1e-4,
    resolution: int | None = None,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 4.5,
    atoms: dict[str, Any] | None = None,
    mixed_precision: str = "no",
    dtype: str = "auto",
    variant: str | None = None,
    device: str | None = None,
    local_files_only: bool = False,
    progress: bool = True,
) -> EditResult:
    """Train on ``image``, then generate each target prompt with the top-k atoms for each k."""
    if len(list_images(image, "edit image")) != 1:
        raise AtomtuneError(f"edit takes one image; {image} holds several (pass the file)")
    if not target_prompts:
        raise AtomtuneError("no target prompt given (--target-prompt)")
    ks = sorted({int(k) for k in ks}, reverse=True) if ks else default_ks(num_atoms)
    if any(k < 0 for k in ks):
        raise AtomtuneError(f"k must be >= 0, got {min(ks)}")
    out = Path(out_dir).expanduser()
    pipe = resolve_pipe(pretrained, dtype, variant, device, local_files_only)
    settings = TrainSettings(
        instance_data=str(image),
        instance_prompt=source_prompt,
        token=None,
        output_dir=str(out / "train"),
        pretrained=pipeline_name(pipe),
        method="atoms",
        num_atoms=num_atoms,
        atom_budget=0,  # every atom trains: the edit removes the unimportant ones afterwards
        atoms=dict(atoms or {}),
        epochs=epochs,
        learning_rate=learning_rate,
        resolution=resolution,
        seed=seed,
        mixed_precision=mixed_precision,
    )
    result = train(settings, pipe=pipe, progress=progress)
    tuned = result.tuned
    assert isinstance(tuned, AtomTuned)
    spec = spec_for(pipe)
    size = resolution or spec.native_resolution
    try:
        stats, _ = calibrate(spec, tuned, [source_prompt], [seed], steps, guidance_scale, size, size)
        contribution = stats.contribution()
        stats.save_json(out / "rankings.json")
        heatmap(contribution, out / "heatmap.png", "atom contribution on the source image")
        num = max(len(v) for v in contribution.values())
        columns: list[tuple[str, int | None]] = [(f"all {num}", None)]
        columns += [(f"k={k}", k) for k in ks if k < num]
        columns.append(("base", -1))
        prompts = [source_prompt, *target_prompts]
        encoded, negative = spec.encode_prompts(prompts), spec.encode_prompts([""])
        rows: list[list[Any]] = [[] for _ in prompts]
        files = []
        for label, k in columns:
            tuned.handle.reset_steering()
            if k is not None and k >= 0:
                tuned.handle.set_masks(top_k_masks(contribution, k))
            for i in range(len(prompts)):
                if k == -1:
                    with tuned.disable():
                        img = spec.generate(
                            encoded.select([i]), negative, seed, steps, guidance_scale, size, size
                        )
                else:
                    img = spec.generate(
                        encoded.select([i]), negative, seed, steps, guidance_scale, size, size
                    )
                rows[i].append(img)
                name = "source" if i == 0 else f"target{i:02d}"
                files.append(
                    save_png(img, out / "images" / f"{name}-{label.replace(' ', '').replace('=', '')}.png")
                )
        tuned.handle.reset_steering()
        grid_path = save_png(
            grid(
                rows,
                [label for label, _ in columns],
                ["source", *[f"target {i}" for i in range(1, len(prompts))]],
            ),
            out / "edit_grid.png",
        )
        save_json(
            {
                "base_model": pipeline_name(pipe),
                "image": str(image),
                "source_prompt": source_prompt,
                "target_prompts": list(target_prompts),
                "columns": [label for label, _ in columns],
                "seed": seed,
                "steps": steps,
                "guidance_scale": guidance_scale,
                "epochs": epochs,
                "adapter": str(result.adapter_dir),
                "grid": grid_path.name,
                "images": [str(p.relative_to(out)) for p in files],
            },
            out / "edit.json",
        )
    finally:
        tuned.unload()
    return EditResult(
        out, result.adapter_dir, grid_path, [k for _, k in columns[1:-1]], files, result.history
    )
