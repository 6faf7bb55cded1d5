"""The method: atoms, their shrinkage, the layers that carry them and the model that places them.

- ``config``: ``AtomConfig``, every knob of the method and its default.
- ``shrinkage``, ``functional``, ``losses``: σ_λ, the attention-side computation, the penalties.
- ``layer``: ``Atoms`` and the layers that wrap a host's attention or linear module.
- ``targets``, ``model``: which modules get atoms; ``AtomModel`` puts them there and takes them off.
- ``budget``: the atom-budget schedule (dense, then cut to a few atoms per module while training).
- ``stats``, ``selection``, ``merge``: importance, top-k masks and pruning, merging two adapters.
- ``serialization``: the adapter format (safetensors + JSON).
- ``hosts``: what the method needs to know about diffusers' and transformers' modules.

Nothing here imports the diffusion workflows, the testbed or the CLI.
"""
