"""Checkpoints of a training run: the trained tensors, optimizer and RNG states, so that a stopped
run resumes exactly where it stopped (``--resume latest``) and only the newest few stay on disk."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from atomtune.diffusion.tuned import Tuned
from atomtune.errors import AtomtuneError
from atomtune.validation import check_tensor
from atomtune.version import __version__
from atomtune.workflows.train.settings import TrainSettings

GENERATOR = "loop_generator"  # the loop's RNG state, kept with the trained tensors in a checkpoint


def find_resume_folder(resume: str | None, out: Path) -> Path | None:
    from atomtune.checkpoint import STATE_JSON, latest_checkpoint

    if not resume:
        return None
    if resume == "latest":
        found = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
        if found is None:
            print(
                f"atomtune: note: no checkpoint in {out / 'checkpoints'}; starting at step 0", file=sys.stderr
            )
        return found
    path = Path(resume).expanduser()
    if not (path / STATE_JSON).is_file():
        raise AtomtuneError(f"not a checkpoint folder (no {STATE_JSON}): {path}")
    return path


def generator_states(accelerator, generator: torch.Generator) -> list[torch.Tensor]:
    state = generator.get_state()
    if accelerator.num_processes == 1:
        return [state]
    gathered = accelerator.gather(state.to(accelerator.device)[None]).cpu()
    return list(gathered.unbind(0))


def save_checkpoint(out, step, settings, tuned, optimizer, generator_states, history) -> Path:
    """Trained tensors, optimizer and RNG states, step (``atomtune.checkpoint``, safetensors), plus a
    copy of the adapter as it stands, usable with ``generate``."""
    from atomtune.checkpoint import prune_checkpoints, save_training_state

    folder = out / "checkpoints" / f"checkpoint-{step:06d}"
    tensors = {**trainable_tensors(tuned), **tuned.training_state()}
    tensors.update({f"{GENERATOR}.{rank}": state for rank, state in enumerate(generator_states)})
    extra = {"structure": settings.structure(), "atomtune_version": __version__, "history": history}
    save_training_state(folder, tensors, optimizer, step, extra)
    tuned.save(folder / "adapter")
    prune_checkpoints(folder.parent, settings.checkpoints_total_limit, newest=folder)  # after it is whole
    return folder


def load_checkpoint(
    path: Path, settings: TrainSettings, tuned: Tuned, optimizer, generator, rank: int, total: int
):
    """Restore a checkpoint into this run, after checking it is one of this run's: the adapter's
    structure, its tensors, its step (not past this run's ``total``) and one history record per step."""
    import json

    from atomtune.checkpoint import STATE_JSON, load_training_state

    try:
        structure = json.loads((path / STATE_JSON).read_text())["extra"]["structure"]
        if not isinstance(structure, dict):
            raise TypeError(f"extra.structure is a {type(structure).__name__}")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise AtomtuneError(f"{path} is not a checkpoint of atomtune train ({exc})") from exc
    for key, value in structure.items():
        if getattr(settings, key, None) != value:
            raise AtomtuneError(
                f"checkpoint {path} was made with {key}={value!r}; this run asks for {getattr(settings, key)!r}"
            )
    trainable = trainable_tensors(tuned)
    tensors, step, extra = load_training_state(path, optimizer)
    states = {k: v for k, v in tensors.items() if k.startswith(GENERATOR + ".")}
    if not set(trainable) <= set(tensors):
        raise AtomtuneError(f"checkpoint {path} does not hold this adapter's tensors")
    try:  # the rest belongs to the method (an atom budget's masks); it refuses what it does not know
        tuned.load_training_state(
            {k: v for k, v in tensors.items() if k not in trainable and k not in states}
        )
    except AtomtuneError as exc:
        raise AtomtuneError(f"checkpoint {path}: {exc}") from exc
    if f"{GENERATOR}.{rank}" not in states:
        raise AtomtuneError(
            f"checkpoint {path} was written by {len(states)} process(es); this is process {rank}"
        )
    for name, p in trainable.items():
        check_tensor(tensors[name], f"checkpoint {path}: model.{name}", tuple(p.shape), (p.dtype,))
    state = tensors[f"{GENERATOR}.{rank}"]
    check_tensor(state, f"checkpoint {path}: {GENERATOR}.{rank}", generator.get_state().shape, (torch.uint8,))
    history = extra.get("history")
    if not isinstance(history, list) or not all(isinstance(r, dict) for r in history):
        raise AtomtuneError(f"checkpoint {path}: extra.history must be a list of records")
    if step > total:
        raise AtomtuneError(
            f"checkpoint {path} is at step {step}, past this run's {total} steps; "
            "raise --max-steps (or --epochs), or train without --resume"
        )
    if len(history) != step:
        raise AtomtuneError(
            f"checkpoint {path} says step {step} but holds {len(history)} steps of history: it is corrupt"
        )
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name])
    generator.set_state(state)
    return int(step), list(history)


# -- what is written with the adapter -----------------------------------------------------------


def trainable_tensors(tuned: Tuned) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in tuned.model.named_parameters() if p.requires_grad}
