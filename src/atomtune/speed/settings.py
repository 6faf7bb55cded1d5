"""What one speed run can measure: the presets (model sizes), the methods, and the rows of a run.

Kept apart from the measuring so the command can check every option before the first, possibly
minutes-long, measurement.
"""

from __future__ import annotations

from typing import Any

from atomtune.errors import AtomtuneError

PRESETS: dict[str, dict[str, int]] = {
    "cpu-tiny": dict(heads=2, head_dim=16, layers=2, sample=16, text=8, caption=32),
    "cpu-small": dict(heads=4, head_dim=64, layers=8, sample=32, text=32, caption=256),
    # PixArt-Σ XL-2: 16 heads x 72, 28 blocks, T5-XXL captions (4096 features, 300 tokens)
    "sigma-512": dict(heads=16, head_dim=72, layers=28, sample=64, text=300, caption=4096),
    "sigma-1024": dict(heads=16, head_dim=72, layers=28, sample=128, text=300, caption=4096),
}
METHODS = ("bare", "atoms", "atoms_padcat", "atoms_separate", "lora", "dora", "oft")
# atoms: one attention call, widened heads from the projections where the device gains from it
# (integrations.diffusers.PADDED_PROJECTION_DEVICES); atoms_padcat: one call, heads padded and
# concatenated per call (the path before); atoms_separate: a second attention call
ATOM_METHODS = ("atoms", "atoms_padcat", "atoms_separate")
LATENT_SCALE = 8  # pixels per latent cell (the VAE's downsampling)


def check_methods(methods: tuple[str, ...]) -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AtomtuneError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")


def method_specs(methods: tuple[str, ...], atoms: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per method, atoms once per entry of ``atoms``; the bare model first, always."""
    check_methods(methods)
    specs = [{"method": "bare", "label": "bare"}]
    for m in methods:
        if m == "bare":
            continue
        if m in ATOM_METHODS:
            specs += [{"method": m, "label": f"{m} {n}", "num_atoms": n} for n in atoms]
        else:
            specs.append({"method": m, "label": m})
    return specs


def check_atom_count(entry: str | int, preset: str) -> int:
    """A number given to ``--atoms``: a positive multiple of the preset's heads (atoms split over them)."""
    try:
        count = int(entry)
    except ValueError:
        raise AtomtuneError(f"--atoms takes numbers or 'parity', got {entry!r}") from None
    heads = PRESETS[preset]["heads"]
    if count < 1 or count % heads:
        raise AtomtuneError(f"--atoms {entry}: must be a positive multiple of the {heads} heads")
    return count


def check_memory_resolutions(resolutions: tuple[int, ...]) -> None:
    """Pixels that make whole 2x2 patches of latent cells."""
    for resolution in resolutions:
        if resolution < 2 * LATENT_SCALE or resolution % (2 * LATENT_SCALE):
            raise AtomtuneError(f"memory resolution {resolution} is not a multiple of {2 * LATENT_SCALE}")
