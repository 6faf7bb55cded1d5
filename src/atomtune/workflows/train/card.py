"""``training.json`` and ``README.md`` next to a trained adapter: what was trained, on what, how,
and how sparse the atoms came out."""

from __future__ import annotations

from typing import Any

from atomtune.diffusion.tuned import Tuned
from atomtune.version import __version__


def training_record(
    settings, pretrained, resolution, steps, history, n_instance, n_class, tuned, seconds, captioned=False
):
    return {
        "atomtune_version": __version__,
        "base_model": pretrained,
        "method": settings.method,
        "method_description": settings.method_config().describe(tuned.target_modules),
        "trainable_parameters": tuned.num_trainable_parameters(),
        "instance_data": str(settings.instance_data),
        "instance_images": n_instance,
        "instance_prompt": settings.instance_prompt,
        "instance_captions": captioned,  # each instance image trained under its own metadata.jsonl caption
        "token": settings.token,
        "class_prompt": settings.class_prompt,
        "class_images": n_class,
        "resolution": resolution,
        "steps": steps,
        "final_loss": history[-1]["loss"] if history else None,
        "sparsity": _final_sparsity(history, tuned),
        "seconds": round(seconds, 2),
        "settings": settings.to_dict(),
    }


def _final_sparsity(history: list[dict[str, float]], tuned: Tuned) -> dict[str, float] | None:
    """Atoms: true sparsity over the last tenth of training (share of zero coefficients, live atoms
    active per token) and the live atoms per module the saved adapter keeps."""
    tail = [h for h in history[-max(1, len(history) // 10) :] if "zero_share" in h]
    live = tuned.live_atoms()
    if not tail or not live:
        return None
    return {
        "zero_share": sum(h["zero_share"] for h in tail) / len(tail),
        "active_per_token": sum(h["active_per_token"] for h in tail) / len(tail),
        "live_atoms_per_module": sum(live.values()) / len(live),
    }


def _instance_prompt(record: dict[str, Any]) -> str:
    if record.get("instance_captions"):
        return "each under its own caption (metadata.jsonl)"
    return f'prompt "{record["instance_prompt"]}"'


def model_card(record: dict[str, Any], tuned: Tuned) -> str:
    s = record["settings"]
    if record["class_images"]:
        of = f'"{record["class_prompt"]}"' if record["class_prompt"] else "their own captions"
        prior = (
            f"prior preservation with {record['class_images']} class images of "
            f"{of} (weight {s['prior_loss_weight']})"
        )
    else:
        prior = "no prior preservation"
    return f"""# {record["method"]} adapter for {record["base_model"]}

Trained with atomtune {record["atomtune_version"]}: DreamBooth-style concept customization.

- Base model: `{record["base_model"]}` ({type(tuned.model).__name__})
- Method: {record["method_description"]}
- Trainable parameters: {record["trainable_parameters"]:,}
- Data: {record["instance_images"]} images from `{record["instance_data"]}`, {_instance_prompt(record)}
- Prior: {prior}
- Optimizer: {s["optimizer"].upper()}, lr {s["learning_rate"]}, weight decay {s["weight_decay"]}
- Schedule: {record["steps"]} steps ({s["epochs"]} epochs, batch {s["batch_size"]}), seed {s["seed"]}
- Resolution {record["resolution"]}, mixed precision {s["mixed_precision"]}
- Final diffusion loss: {_fmt(record["final_loss"])}{_sparsity_line(record.get("sparsity"))}

Use it:

```
atomtune generate --pretrained {record["base_model"]} --adapter ADAPTER_DIR --prompt "{record["instance_prompt"]}"
```

All settings are in `training.json`. The adapter's files: `adapter_config.json` and
`adapter_model.safetensors` ({"atomtune's format" if record["method"] == "atoms" else "PEFT's format"}),
`atomtune.json` (method, base model and the shapes the adapter needs).
"""


def _sparsity_line(sparsity: dict[str, float] | None) -> str:
    if not sparsity:
        return ""
    return (
        f"\n- Atoms: {sparsity['live_atoms_per_module']:.1f} live per module; "
        f"{sparsity['zero_share']:.0%} of the coefficients are zero, "
        f"{sparsity['active_per_token']:.1f} atoms active per token (last tenth of training)"
    )


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"
