"""What one speed run can measure: the presets (model sizes), the methods, and the rows of a run.

Kept apart from the measuring so the command can check every option before the first, possibly
minutes-long, measurement.
"""

from __future__ import annotations

from typing import Any

from atomtune.errors import AtomtuneError

PRESETS: dict[str, dict[str, Any]] = {
    "cpu-tiny": dict(host="pixart", heads=2, head_dim=16, layers=2, sample=16, text=8, caption=32),
    "cpu-small": dict(host="pixart", heads=4, head_dim=64, layers=8, sample=32, text=32, caption=256),
    # PixArt-Σ XL-2: 16 heads x 72, 28 blocks, T5-XXL captions (4096 features, 300 tokens)
    "sigma-512": dict(host="pixart", heads=16, head_dim=72, layers=28, sample=64, text=300, caption=4096),
    "sigma-1024": dict(host="pixart", heads=16, head_dim=72, layers=28, sample=128, text=300, caption=4096),
    # SD3.5-Medium (2.24 B): 24 joint blocks of 24 heads x 64, the first 13 with the image-only attn2,
    # RMS QK-norm; 333 text tokens (77 CLIP + 256 T5) of 4096 features, pooled CLIP 2048
    "sd35-medium-1024": dict(
        host="sd3",
        heads=24,
        head_dim=64,
        layers=24,
        dual_layers=13,
        sample=128,
        text=333,
        caption=4096,
        pooled=2048,
        pos_embed=384,
    ),
    # Flux.1-dev (11.90 B): 19 double and 38 single blocks of 24 heads x 128, guidance input; 512 T5
    # tokens of 4096 features, pooled CLIP 768
    "flux-dev-1024": dict(
        host="flux",
        heads=24,
        head_dim=128,
        layers=19,
        single_layers=38,
        sample=128,
        text=512,
        caption=4096,
        pooled=768,
        guidance=True,
        rope=(16, 56, 56),
    ),
    "cpu-tiny-sd3": dict(
        host="sd3",
        heads=2,
        head_dim=16,
        layers=2,
        dual_layers=1,
        sample=16,
        text=8,
        caption=32,
        pooled=16,
        pos_embed=16,
    ),
    "cpu-tiny-flux": dict(
        host="flux",
        heads=2,
        head_dim=16,
        layers=1,
        single_layers=2,
        sample=16,
        text=8,
        caption=32,
        pooled=16,
        guidance=True,
        rope=(4, 6, 6),
    ),
}
METHODS = ("bare", "atoms", "atoms_padcat", "atoms_separate", "lora", "dora", "oft")
# atoms: one attention call, widened heads from the projections where the device gains from it
# (integrations.diffusers.PADDED_PROJECTION_DEVICES); atoms_padcat: one call, heads padded and
# concatenated per call (the path before); atoms_separate: a second attention call
ATOM_METHODS = ("atoms", "atoms_padcat", "atoms_separate")
# The hosts' own processors (SD3, Flux) always pad and concatenate per call: there ``atoms`` is the
# path ``atoms_padcat`` forces on PixArt, so that row would measure the same thing twice.
HOST_METHODS = {
    "pixart": METHODS,
    "sd3": tuple(m for m in METHODS if m != "atoms_padcat"),
    "flux": tuple(m for m in METHODS if m != "atoms_padcat"),
}
# regional compilation (``compile_blocks``) compiles ``transformer_blocks``: all of PixArt's blocks;
# the atom processors of the other hosts have not been run through torch.compile
COMPILED_HOSTS = ("pixart",)
LATENT_SCALE = 8  # pixels per latent cell (the VAE's downsampling)


def host_of(preset: str) -> str:
    """The host a preset measures (``pixart``, ``sd3`` or ``flux``)."""
    if preset not in PRESETS:
        raise AtomtuneError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[preset]["host"]


def check_methods(methods: tuple[str, ...], host: str = "pixart") -> None:
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise AtomtuneError(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    foreign = [m for m in methods if m not in HOST_METHODS[host]]
    if foreign:
        raise AtomtuneError(
            f"{foreign[0]} does not apply to {host}: its processor always pads and concatenates per "
            f"call, which the atoms row measures; choose from {', '.join(HOST_METHODS[host])}"
        )


def method_specs(
    methods: tuple[str, ...], atoms: tuple[int, ...], host: str = "pixart"
) -> list[dict[str, Any]]:
    """One row per method, atoms once per entry of ``atoms``; the bare model first, always."""
    check_methods(methods, host)
    specs = [{"method": "bare", "label": "bare"}]
    for m in methods:
        if m == "bare":
            continue
        if m in ATOM_METHODS:
            specs += [{"method": m, "label": f"{m} {n}", "num_atoms": n} for n in atoms]
        else:
            specs.append({"method": m, "label": m})
    return specs


def check_atom_count(entry: str | int, multiple: int) -> int:
    """A number given to ``--atoms``: positive, and a multiple of the heads where the host's atoms
    split evenly over them (``multiple``: PixArt's head count; 1 on hosts whose processors pad)."""
    try:
        count = int(entry)
    except ValueError:
        raise AtomtuneError(f"--atoms takes numbers or 'parity', got {entry!r}") from None
    if count < 1:
        raise AtomtuneError(f"--atoms {entry}: must be positive")
    if count % multiple:
        raise AtomtuneError(f"--atoms {entry}: must be a positive multiple of the {multiple} heads")
    return count


def check_memory_resolutions(resolutions: tuple[int, ...]) -> None:
    """Pixels that make whole 2x2 patches of latent cells."""
    for resolution in resolutions:
        if resolution < 2 * LATENT_SCALE or resolution % (2 * LATENT_SCALE):
            raise AtomtuneError(f"memory resolution {resolution} is not a multiple of {2 * LATENT_SCALE}")
