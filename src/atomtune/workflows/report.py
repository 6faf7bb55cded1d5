"""``atomtune report``: one self-contained page that shows what an atoms adapter changed, and where.

For every prompt (one seed), the sampler runs once with the full adapter while ``AtomStatistics``
ranks atoms and ``AtomActivationMaps`` keeps each atom's ``E|s|`` per image token (its map over the
picture, averaged over the sampler's steps and per band of steps). Then the same prompt and seed are
drawn with only the top-k atoms of every module kept, for each k (k = 0 is the pretrained model),
and, for the ``atoms_shown`` most important atoms over all modules, with that atom removed
(``set_masks``) and with its gain doubled (``set_gains``). Images drawn: prompts x (k values + 2 x
atoms shown), the full adapter's image being the last k.

Written: ``report.html`` (images and data inline; it opens from disk with no network) and
``report.json`` (the same data without the images).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from atomtune.core.maps import AtomActivationMaps
from atomtune.core.stats import AtomStatistics, weight_importance
from atomtune.diffusion.adapters import load_adapters, read_adapter_info
from atomtune.diffusion.pipeline import DEFAULT_PRETRAINED, pipeline_name, resolve_pipe
from atomtune.diffusion.spec import spec_for
from atomtune.diffusion.tuned import AtomTuned
from atomtune.errors import AtomtuneError
from atomtune.io import atomic_write
from atomtune.progress import progress_bar
from atomtune.validation import check_output_not_input
from atomtune.workflows.analyze import _training_prompts, sweep_ks
from atomtune.workflows.report_page import png_data_uri, render_page

MAX_MAP_SIDE = 32  # maps of larger grids are average-pooled down to this many cells a side
MAPPED_PER_MODULE = 16  # atoms per module whose maps the page carries (the most important ones)


@dataclass
class ReportSettings:
    """What ``atomtune report`` draws (its flags map one to one)."""

    adapter: str | Path
    out_dir: str | Path
    pretrained: Any = DEFAULT_PRETRAINED
    prompts: list[str] | None = None  # default: the adapter's instance prompt
    seed: int = 0
    steps: int = 20
    guidance_scale: float = 4.5
    height: int | None = None
    width: int | None = None
    ks: list[int] | None = None  # default: 0, 1, 2, 4, … live atoms
    atoms_shown: int = 6  # atoms drawn removed and doubled (the most important over all modules)
    bands: int = 3  # bands of sampler steps the maps are also shown for
    dtype: str = "auto"
    variant: str | None = None
    device: str | None = None
    local_files_only: bool = False

    def __post_init__(self) -> None:  # fail before any model loads
        if self.atoms_shown < 0 or self.bands < 1 or self.steps < 1 or self.seed < 0:
            raise AtomtuneError("report: atoms shown must be >= 0, bands and steps >= 1, seed >= 0")
        if self.ks is not None and (not self.ks or min(self.ks) < 0):
            raise AtomtuneError(f"report: k values must be >= 0, got {self.ks}")


@dataclass
class ReportResult:
    page: Path
    data_path: Path
    data: dict[str, Any]
    images: dict[str, Any] = field(default_factory=dict)  # key -> PIL image, as on the page


def report(settings: ReportSettings, pipe=None, progress: bool = True) -> ReportResult:
    """Draw and write the report of ``settings.adapter``; ``pipe``: a loaded pipeline to use."""
    s = settings
    check_output_not_input(s.out_dir, (s.adapter,))
    info = read_adapter_info(s.adapter)
    if info["method"] != "atoms":
        raise AtomtuneError(f"the report shows atoms; {s.adapter} is a {info['method']} adapter")
    prompts = list(s.prompts or []) or _training_prompts(s.adapter)
    pipe = resolve_pipe(pipe or s.pretrained, s.dtype, s.variant, s.device, s.local_files_only)
    spec = spec_for(pipe)
    height = s.height or spec.native_resolution
    width = s.width or height
    spec.check_resolution(height, width)
    tuned = load_adapters(pipe.transformer, [s.adapter], pipeline_name(pipe))
    assert isinstance(tuned, AtomTuned)
    handle = tuned.handle
    saved = {n: (a.mask.clone(), a.gain.clone()) for n, a in handle.atoms().items()}
    live = {n: m != 0 for n, (m, _) in saved.items()}
    draw = _Drawer(spec, prompts, s, height, width)
    try:
        most = max(int(v.sum()) for v in live.values())
        ks = list(s.ks) if s.ks else [0, *sweep_ks(most)]
        shown_count = s.atoms_shown
        per_prompt = 1 + sum(k < most for k in ks) + 2 * shown_count  # k >= most: the full image again
        bar = progress_bar(total=len(prompts) * per_prompt, desc="report", disable=not progress)
        grid = spec.token_grid(height, width)
        full, maps = [], []
        with AtomStatistics(handle) as stats:
            for i in range(len(prompts)):
                with AtomActivationMaps(handle, grid, s.steps, s.bands) as recorder:
                    full.append(draw(i))
                maps.append(recorder.maps())
                bar.update(1)
        contribution = {n: c * live[n] for n, c in stats.contribution().items()}
        images: dict[str, Any] = {f"p{i}-full": image for i, image in enumerate(full)}
        steer = _Steering(handle, tuned, saved, live, draw, images, bar)
        slider = [steer.slider(i, ks, most, contribution) for i in range(len(prompts))]
        shown_rows = [
            steer.one_atom(module, j, full) for module, j in _choose_shown(contribution, shown_count)
        ]
        bar.close()
        data = {
            "card": _card(s, info, tuned, pipeline_name(pipe), stats),
            "prompts": prompts,
            "seed": s.seed,
            "steps": s.steps,
            "size": [height, width],
            "timesteps": spec.timesteps(),
            "bands": _band_labels(s.steps, s.bands),
            "ks": ks,
            "slider": slider,
            "full": [f"p{i}-full" for i in range(len(prompts))],
            "layers": _layers(handle, stats, contribution, live, _merge_sources(handle, info)),
            "shown": shown_rows,
            "maps": _maps_data(handle, maps, contribution),
        }
    finally:
        _restore(handle, saved)
        tuned.unload()
    out = Path(s.out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    data_path = out / "report.json"  # compact: the maps are most of it
    text = json.dumps(data, separators=(",", ":")) + "\n"
    atomic_write(data_path, lambda p: p.write_text(text))
    page = out / "report.html"
    html = render_page(data, {key: png_data_uri(img) for key, img in images.items()})
    atomic_write(page, lambda p: p.write_text(html, encoding="utf-8"))
    return ReportResult(page, data_path, data, images)


class _Drawer:
    """Draws prompt ``i`` with the adapter as it is steered now (same seed and sampler every time)."""

    def __init__(self, spec, prompts: list[str], s: ReportSettings, height: int, width: int) -> None:
        self.spec, self.s, self.height, self.width = spec, s, height, width
        self.encoded, self.negative = spec.encode_prompts(prompts), spec.encode_prompts([""])

    def __call__(self, i: int):
        s = self.s
        with torch.no_grad():
            return self.spec.generate(
                self.encoded.select([i]),
                self.negative,
                s.seed,
                s.steps,
                s.guidance_scale,
                self.height,
                self.width,
            )


class _Steering:
    """The images of the slider and of single atoms: each steers the adapter, draws, and restores it."""

    def __init__(self, handle, tuned: AtomTuned, saved, live, draw: _Drawer, images: dict, bar) -> None:
        self.handle, self.tuned, self.saved, self.live = handle, tuned, saved, live
        self.draw, self.images, self.bar = draw, images, bar

    def _draw(self, key: str, i: int) -> str:
        self.images[key] = self.draw(i)
        _restore(self.handle, self.saved)
        self.bar.update(1)
        return key

    def slider(self, i: int, ks: list[int], most: int, contribution) -> list[str]:
        """Prompt ``i`` with the top-k live atoms of every module, per k (0: the adapter off)."""
        keys = []
        for k in ks:
            if k >= most:
                keys.append(f"p{i}-full")  # every live atom kept: the full adapter, drawn already
            elif k == 0:
                with self.tuned.disable():
                    keys.append(self._draw(f"p{i}-k0", i))
            else:
                self.handle.set_masks(_top_k(contribution, self.live, k))
                keys.append(self._draw(f"p{i}-k{k}", i))
        return keys

    def one_atom(self, module: str, position: int, full: list) -> dict[str, Any]:
        """Every prompt with the atom at ``position`` of ``module`` removed, then with its gain doubled."""
        atom_id = int(self.handle.atoms()[module].atom_ids[position])
        row: dict[str, Any] = {"module": module, "id": atom_id, "removed": [], "doubled": []}
        for what in ("removed", "doubled"):
            for i in range(len(full)):
                if what == "removed":
                    mask = self.live[module].clone()
                    mask[position] = False
                    self.handle.set_masks({module: mask})
                else:
                    gain = 2.0 * float(self.saved[module][1][position])
                    self.handle.set_gains({module: {atom_id: gain}})
                key = self._draw(f"p{i}-{module}-{atom_id}-{what}", i)
                row[what].append({"image": key, "change": image_change(self.images[key], full[i])})
        return row


def _restore(handle, saved: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """The adapter's own masks and gains again (a budget's cut atoms stay cut)."""
    for name, atoms in handle.atoms().items():
        atoms.mask.copy_(saved[name][0])
        atoms.gain.copy_(saved[name][1])


def _top_k(contribution: dict[str, torch.Tensor], live: dict[str, torch.Tensor], k: int) -> dict:
    """The k most important live atoms of each module."""
    masks = {}
    for name, imp in contribution.items():
        order = [int(j) for j in imp.argsort(descending=True) if live[name][j]][:k]
        mask = torch.zeros(len(imp), dtype=torch.bool)
        mask[order] = True
        masks[name] = mask
    return masks


def _choose_shown(contribution: dict[str, torch.Tensor], count: int) -> list[tuple[str, int]]:
    """The ``count`` (module, position) pairs of the largest contribution over all modules."""
    pairs = [(float(v), name, j) for name, imp in contribution.items() for j, v in enumerate(imp) if v > 0]
    pairs.sort(key=lambda t: -t[0])
    return [(name, j) for _, name, j in pairs[:count]]


def image_change(image, reference) -> float:
    """Mean absolute pixel difference, as a share of the full range (0: identical, 1: inverted)."""
    import numpy as np

    a = np.asarray(image.convert("RGB"), dtype=np.float64)
    b = np.asarray(reference.convert("RGB"), dtype=np.float64)
    return float(np.abs(a - b).mean() / 255.0)


def _band_labels(steps: int, bands: int) -> list[str]:
    bands = min(bands, steps)
    labels = []
    for b in range(bands):
        members = [i + 1 for i in range(steps) if min(i * bands // steps, bands - 1) == b]
        labels.append(f"steps {members[0]}-{members[-1]}" if len(members) > 1 else f"step {members[0]}")
    return [*labels, "all steps"]


def _card(s: ReportSettings, info: dict, tuned: AtomTuned, base: str, stats: AtomStatistics) -> dict:
    config = tuned.handle.configs[tuned.handle.active_adapter]
    return {
        "adapter": str(s.adapter),
        "method": info["method"],
        "base_model": base,
        "settings": {
            k: v for k, v in asdict(config).items() if not isinstance(v, (list, tuple)) or len(v) < 40
        },
        "trainable_params": tuned.num_trainable_parameters(),
        "sparsity": stats.sparsity()["mean"],
        "merged_from": info.get("merged_from"),
    }


def _layers(handle, stats: AtomStatistics, contribution, live, sources) -> list[dict[str, Any]]:
    """Per module: its live atoms by id with contribution, frequency and (for a merge) their input."""
    freq = stats.frequency()
    rows = []
    for name, atoms in handle.atoms().items():
        if name not in contribution:
            continue
        total = float(contribution[name].sum()) or 1.0
        entries = []
        for j in range(atoms.num_atoms):
            if not live[name][j]:
                continue
            entry = {
                "id": int(atoms.atom_ids[j]),
                "contribution": float(contribution[name][j]),
                "share": float(contribution[name][j]) / total,
                "frequency": float(freq[name][j]),
            }
            if sources is not None:
                entry["source"] = sources.get(name, {}).get(entry["id"], "unknown")
            entries.append(entry)
        entries.sort(key=lambda e: -e["contribution"])
        rows.append({"module": name, "atoms": entries})
    return rows


def _merge_sources(handle, info: dict) -> dict[str, dict[int, str]] | None:
    """For a merged adapter, which input each atom id came from.

    ``concat`` keeps the concept's ids and shifts the style's by the concept's atom count; ``sum``
    adds atom m of both, so each atom says which input carries more of it (``‖w_s‖·‖d‖`` of each,
    read from the input folders when they are still there)."""
    merged = info.get("merged_from")
    if not merged:
        return None
    how, concept, style = merged.get("how"), merged.get("concept"), merged.get("style")
    atoms = handle.atoms()
    if how == "concat":
        offset = merged.get("offset")
        if offset is None:
            try:
                offset = json.loads((Path(concept) / "adapter_config.json").read_text())["num_atoms"]
            except (OSError, KeyError, ValueError, TypeError):
                return {}
        return {
            n: {int(i): ("concept" if int(i) < offset else "style") for i in a.atom_ids if int(i) >= 0}
            for n, a in atoms.items()
        }
    shares = {}
    active = handle.active_adapter
    try:
        for role, directory in (("concept", concept), ("style", style)):
            handle.load_adapter(directory, f"_report_{role}")
            shares[role] = {
                n: dict(zip(handle.atoms(f"_report_{role}")[n].atom_ids.tolist(), v.tolist(), strict=True))
                for n, v in weight_importance(handle, f"_report_{role}").items()
            }
    except (AtomtuneError, OSError, TypeError):
        return {
            n: {int(i): "both (inputs not found)" for i in a.atom_ids if int(i) >= 0}
            for n, a in atoms.items()
        }
    finally:
        for role in ("concept", "style"):
            if f"_report_{role}" in handle.configs:
                handle.delete_adapter(f"_report_{role}")
        handle.set_adapter(active)
    out = {}
    for n, a in atoms.items():
        out[n] = {}
        for i in a.atom_ids.tolist():
            if i < 0:
                continue
            c, st = shares["concept"].get(n, {}).get(i, 0.0), shares["style"].get(n, {}).get(i, 0.0)
            out[n][i] = f"both ({c / (c + st):.0%} concept)" if c + st > 0 else "both"
    return out


def _maps_data(handle, maps: list[dict[str, torch.Tensor]], contribution) -> dict[str, Any]:
    """Per mapped module: the grid and, per atom id (its ``MAPPED_PER_MODULE`` most important live
    atoms), per prompt, one map per band and the all-steps map, as rows of numbers."""
    out: dict[str, Any] = {}
    atoms = handle.atoms()
    for name in maps[0] if maps else []:
        top = [int(j) for j in contribution[name].argsort(descending=True) if contribution[name][j] > 0]
        top = top[:MAPPED_PER_MODULE]
        per_atom = {}
        for j in top:
            grids = [pool_map(m[name][:, j]) for m in maps]  # per prompt: (bands + 1, rows, cols)
            per_atom[str(int(atoms[name].atom_ids[j]))] = [
                [[[float(f"{v:.6g}") for v in row] for row in band.tolist()] for band in g] for g in grids
            ]
        if per_atom:
            out[name] = per_atom
    return out


def pool_map(maps: torch.Tensor, side: int = MAX_MAP_SIDE) -> torch.Tensor:
    """(..., rows, cols) average-pooled so that no side exceeds ``side`` cells (exact divisors only)."""
    rows, cols = maps.shape[-2:]
    factor = 1
    while max(rows, cols) // factor > side and rows % (factor * 2) == 0 and cols % (factor * 2) == 0:
        factor *= 2
    if factor == 1:
        return maps
    return torch.nn.functional.avg_pool2d(maps.reshape(-1, 1, rows, cols), factor).reshape(
        *maps.shape[:-2], rows // factor, cols // factor
    )
