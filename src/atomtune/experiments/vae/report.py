"""The VAE experiment's report: ``vae.md`` (the tables) and ``vae.png`` (samples, and samples with a top
component removed).

Built from the result dict the run writes to ``vae.json``, so the tables and the figure can never show
a number the JSON does not hold; the figure's rows are decoded again under the same removals.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from atomtune.core.model import AtomModel
from atomtune.experiments.vae.lora_components import LoraStatistics, lora_component_removed
from atomtune.experiments.vae.measures import atom_removed
from atomtune.experiments.vae.model import TransformerVAE
from atomtune.experiments.vae.settings import VaeSettings

METHOD_LABELS = {
    "atoms": "atoms",
    "atoms_budget": "atoms, budget",
    "lora": "LoRA",
    "lora_budget": "LoRA, small rank",
}


def method_label(r: dict[str, Any], key: str) -> str:
    """A row's name in the tables: the budget's size and the small LoRA's rank written out."""
    if key == "atoms_budget":
        where = "projection" if r["settings"].get("form", "attention") == "projections" else "module"
        return f"atoms cut to {r['settings']['atom_budget']} per {where}"
    if key == "lora_budget":
        return f"LoRA rank {r['settings']['budget_lora_rank']}"
    return METHOD_LABELS[key]


def figure_png(rows: list[tuple[str, torch.Tensor]]) -> bytes:
    """One row of decoded samples per (label, images (n, 1, 28, 28))."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = rows[0][1].shape[0]
    fig = Figure(figsize=(2.6 + 0.9 * n, 0.95 * len(rows) + 0.3), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(rows), 1)
    for r, (label, images) in enumerate(rows):
        ax = fig.add_subplot(grid[r, 0])
        strip = torch.cat([F.pad(img[0], (1, 1, 1, 1), value=0.5) for img in images], dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def markdown_report(r: dict[str, Any]) -> str:
    """``vae.md``: the models' table and the removals' table, from the result dict."""
    s = r["settings"]
    new, old = s["new_digit"], s["old_digit"]
    share = f"{s['share']:.0%}"
    lines = [
        f"# Transformer VAE: {old} → {new} (data: {r['data']['source']}, seed {s['seed']})",
        "",
        f"Judge: held-out accuracy {r['judge']['held_out_accuracy']:.3f} on {r['data']['held_out']} real digits.",
        f"Samples judged per model: {s['samples']} (z ~ N(0, I), the same z for every model).",
        "",
        f"| model | trainable params | P({new}) | judged {new} | P({old}) | zero coefficients | "
        f"components for {share} per layer (of per layer) |",
        "|---|---|---|---|---|---|---|",
    ]
    p = r["pretrained"]
    lines.append(
        f"| pretrained on {old} | 0 | {p['p_new']:.3f} | {p['share_judged_new']:.2f} | {p['p_old']:.3f} | – | – |"
    )
    methods = [key for key in METHOD_LABELS if key in r]
    for key in methods:
        m, label = r[key], method_label(r, key)
        counts = ", ".join(f"{n.replace('.attn', '')} {c}" for n, c in m["components_for_share"].items())
        per = sorted(set(m["components_per_layer"].values()))
        zero = f"{m['zero_coefficient_share']:.3f}" if "zero_coefficient_share" in m else "– (dense)"
        lines.append(
            f"| {label} | {m.get('live_parameters', m['trainable_parameters'])} | {m['p_new']:.3f} | {m['share_judged_new']:.2f} | "
            f"{m['p_old']:.3f} | {zero} | {counts} (of {'/'.join(map(str, per))}) |"
        )
    lines += [
        "",
        f"Removing one top component from a decoder layer (P({new}) with it removed; mean |Δpixel|):",
        "",
    ]
    lines += ["| method | removed | P(" + str(new) + ") | judged " + str(new) + " | mean abs pixel change |"]
    lines += ["|---|---|---|---|---|"]
    for key in methods:
        label = method_label(r, key)
        for e in r[key]["removal"]:
            lines.append(
                f"| {label} | {e['removed']} | {e['p_new']:.3f} | {e['share_judged_new']:.2f} | "
                f"{e['pixel_change']:.4f} |"
            )
    sec = r["seconds"]
    lines += [
        "",
        f"Run time: {sec['total']:.0f} s wall, {sec['cpu_total']:.0f} s CPU ({r['environment']['threads']} threads).",
        "",
    ]
    return "\n".join(lines)


def _removal_label(e: dict[str, Any], s: VaeSettings) -> str:
    return f"− {e['removed'].replace('.attn', '')}\nP({s.new_digit}) {e['p_new']:.2f}"


@torch.no_grad()
def atom_removal_rows(
    decode: Callable[[], torch.Tensor], atoms: AtomModel, m: dict[str, Any], s: VaeSettings
) -> list[tuple[str, torch.Tensor]]:
    """The figure's rows for the single-atom removals in ``m["removal"]``, decoded with that atom off."""
    rows = []
    all_atoms = atoms.atoms()
    for e in m["removal"]:
        if " atom " not in e["removed"]:
            continue
        name, _, atom_id = e["removed"].partition(" atom ")
        position = int((all_atoms[name].atom_ids == int(atom_id)).nonzero()[0])
        with atom_removed(atoms, name, position):
            rows.append((_removal_label(e, s), decode()))
    return rows


@torch.no_grad()
def lora_removal_rows(
    vae: TransformerVAE, decode: Callable[[], torch.Tensor], m: dict[str, Any], s: VaeSettings
) -> list[tuple[str, torch.Tensor]]:
    """The figure's rows for the LoRA component removals in ``m["removal"]``, decoded with it off."""
    rows = []
    for e in m["removal"]:
        name, _, component = e["removed"].partition(" LoRA ")
        stats = LoraStatistics(vae, per_projection=s.form == "projections")
        index = stats.component_names(name).index(component)
        with lora_component_removed(vae, name, index):
            rows.append((_removal_label(e, s), decode()))
    return rows
