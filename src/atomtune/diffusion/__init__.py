"""Diffusion-transformer workflows: concept customization, generation, atom analysis, editing, merging.

Each command of the ``atomtune`` CLI is one function here, callable from Python:

- ``trainer.train`` (``atomtune train``): DreamBooth-style customization with atoms, LoRA, DoRA or OFT.
- ``generate.generate`` (``atomtune generate``): images from a pipeline with adapters, masks and gains.
- ``analysis.analyze`` (``atomtune atoms``): atom importance over prompts and timesteps, heatmap, sweep.
- ``edit.edit`` (``atomtune edit``): fine-tune on one image, generate edits with the top-k atoms.
- ``merging.merge`` (``atomtune merge``): a concept adapter and a style adapter into one.

The model-specific part (how to encode prompts, call the transformer, run the sampler) is the small
``pipeline.PixArtSpec``; another diffusion transformer needs its own spec, nothing else.
"""
