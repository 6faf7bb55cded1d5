"""Diffusion transformers as the workflows see them: loading, the model-specific spec, the methods.

- ``pipeline``: ``load_pipeline`` (hub id, folder, or a registered name such as ``tiny``).
- ``spec``: ``PixArtSpec``, everything model-specific (encode prompts, latents, the training
  objective, noise prediction, sampler), and the registry ``spec_for`` picks a spec from.
- ``flow``, ``sd3``, ``flux``, ``sana``: the flow-matching hosts' specs; ``tiny_hosts``: tiny random
  SD3, Flux and Sana pipelines (``tiny-sd3``, ``tiny-flux``, ``tiny-sana``).
- ``methods``: atoms, LoRA, DoRA and OFT behind one interface (``Tuned``), their adapter files.
- ``data``, ``images``: training images and captions; image grids and files.

Another diffusion transformer needs its own spec, registered with ``register_spec``, nothing else.
"""

# the hosts register their specs and tiny pipelines on import
from atomtune.diffusion import flux, sana, sd3, tiny_hosts  # noqa: F401
