"""Diffusion transformers as the workflows see them: loading, the model-specific spec, the methods.

- ``pipeline``: ``load_pipeline`` (hub id, folder, or a registered name such as ``tiny``) and
  ``PixArtSpec``, everything model-specific (encode prompts, latents, noise prediction, sampler).
- ``methods``: atoms, LoRA, DoRA and OFT behind one interface (``Tuned``), their adapter files.
- ``data``, ``images``: training images and captions; image grids and files.

Another diffusion transformer needs its own spec, nothing else.
"""
