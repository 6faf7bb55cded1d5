"""The toy's figure: one held-out signal, both reconstructions, and the sparse atoms it needs.

Drawn from the numbers already measured (``example_signal`` and the result dict), so the figure can
never show something the JSON does not hold.
"""

from __future__ import annotations

import io
from typing import Any

import torch

from atomtune.experiments.fourier.block import FourierBlock
from atomtune.experiments.fourier.measures import atoms_needed, partial_sum_errors, spectra
from atomtune.experiments.fourier.settings import FourierSettings


def figure_png(example: dict[str, Any], result: dict[str, Any]) -> bytes:
    """Figure 9 in spirit: a signal, its observations, both reconstructions, the sparse atoms it uses."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 3, height_ratios=[1.0, 1.4])
    t = list(range(len(example["signal"])))
    obs = [i for i, v in enumerate(example["mask"]) if v > 0]
    dense, sparse = result["dense"], result["sparse"]

    ax = fig.add_subplot(grid[0, :])
    ax.plot(t, example["signal"], color="black", lw=2, label="signal")
    ax.plot(obs, [example["signal"][i] for i in obs], "o", color="black", ms=6, label="16 observations")
    ax.plot(
        t, example["dense"], color="tab:blue", lw=1.5, label=f"dense A·X·W_v ({example['dense_atoms']} atoms)"
    )
    ax.plot(
        t,
        example["sparse"],
        color="tab:red",
        lw=1.5,
        label=f"sparse σ(A·X·W_s)·D ({example['sparse_atoms']} atoms)",
    )
    ax.set_title(
        f"{result['settings']['layout']} layout, a held-out signal; masked NMSE over "
        f"{result['settings']['eval_signals']} held-out signals: dense {dense['masked_nmse']:.3f}, "
        f"sparse {sparse['masked_nmse']:.3f}, best linear map {result['linear_nmse']:.3f}"
    )
    ax.set_xlabel("position")
    ax.legend(loc="upper right", fontsize=8, ncol=2)

    ax = fig.add_subplot(grid[1, 0])
    for kind, color in (("dense", "tab:blue"), ("sparse", "tab:red")):
        curve = result[kind]["partial_sum_error_mean"]
        ax.plot(
            range(1, len(curve) + 1),
            curve,
            color=color,
            label=f"{kind}: {result[kind]['atoms_needed_mean']:.1f} atoms",
        )
    ax.axhline(result["settings"]["tolerance"], color="gray", ls="--", lw=1)
    ax.set_yscale("log")
    ax.set_xlabel("top atoms kept (by contribution)")
    ax.set_ylabel("relative error of the partial sum")
    ax.set_title("atoms needed (mean over held-out signals)")
    ax.legend(fontsize=8)

    top = example["sparse_top_contributions"]
    ax = fig.add_subplot(grid[1, 1])
    for i, curve in enumerate(top):
        peak = max(abs(v) for v in curve) or 1.0
        ax.plot(t, [v / peak - 2.2 * i for v in curve], color="tab:red", lw=1)
    ax.set_yticks([])
    ax.set_xlabel("position")
    ax.set_title(f"its top {len(top)} sparse atoms' contributions (scaled)")

    ax = fig.add_subplot(grid[1, 2])
    for i, spec in enumerate(example["sparse_top_spectra"]):
        peak = max(spec) or 1.0
        ax.bar(range(len(spec)), [v / peak for v in spec], bottom=-1.2 * i, color="tab:red", width=0.8)
    for f in result.get("bases") or []:
        ax.axvline(f, color="black", lw=0.6, ls=":")
    ax.set_yticks([])
    ax.set_xlabel("frequency (cycles / 64 samples)")
    ax.set_title("their spectra (dotted: generating frequencies)")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


@torch.no_grad()
def example_signal(
    blocks: dict[str, FourierBlock], test: tuple[torch.Tensor, torch.Tensor], settings: FourierSettings
) -> dict[str, Any]:
    """The held-out signal shown in the figure (the first one) and the sparse atoms it needs."""
    x, m = test[0][:1], test[1][:1]
    out: dict[str, Any] = {"signal": x[0].tolist(), "mask": m[0].tolist()}
    for kind, block in blocks.items():
        y, _, S = block(x, m)
        contrib = block.contributions(S)
        err, order = partial_sum_errors(contrib, y)
        k = int(atoms_needed(err, settings.tolerance)[0])
        out[kind] = y[0].tolist()
        out[f"{kind}_atoms"] = k
        if kind == "sparse":
            top = order[0, : min(k, 12)]
            out["sparse_top_atom_ids"] = top.tolist()
            out["sparse_top_contributions"] = contrib[0, top].tolist()
            out["sparse_top_spectra"] = spectra(contrib[0, top]).tolist()
    return out
