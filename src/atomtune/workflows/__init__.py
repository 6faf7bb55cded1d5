"""What a user runs: each command of the ``atomtune`` CLI is one function here, callable from Python.

- ``train.train`` (``atomtune train``): DreamBooth-style customization with atoms, LoRA, DoRA or OFT.
- ``generate.generate`` (``atomtune generate``): images from a pipeline with adapters, masks and gains.
- ``analyze.analyze`` (``atomtune atoms``): atom importance over prompts and timesteps, heatmap, sweep.
- ``edit.edit`` (``atomtune edit``): fine-tune on one image, generate edits with the top-k atoms.
- ``merge.merge`` (``atomtune merge``): a concept adapter and a style adapter into one.
- ``selfcheck`` (``atomtune selfcheck``): the method's numerics on a tiny model, in seconds.
"""
