"""Speed and memory, side by side: the bare model, atoms, and PEFT's LoRA, DoRA and OFT.

One process, one method after the other, on a host transformer (PixArt, SD3.5 or Flux.1) built
from its published config with random weights (cost does not depend on weight values). Per method: training step time
(forward + backward + AdamW step), peak memory, trainable parameters and their ratio to LoRA r=16's,
inference forward time with the adapter active, adapter file size; for atoms also inference after
pruning to the important atoms. The bare model is always measured first: it is the reference of the
"vs bare" columns. The baselines are put on exactly as ``atomtune train`` puts them on
(``diffusion.methods``, on the host's LoRA targets), so what is timed is what is trained.

The run is ``python -m atomtune.speed`` (``cli``). The modules, in the order a run uses them:

- ``settings``: presets, methods, and the rows one run measures;
- ``hosts``: per host its diffusers class and config, its inputs, the modules its LoRA adapts;
- ``models``: the host transformer and its inputs, LoRA r=16's parameter count, atoms at parity;
- ``adapt``: a method put on the host through ``diffusion.methods``, and the attention path;
- ``measure``: the timings and peak memory of one method (eager, compiled, per resolution, profile);
- ``runner``: every phase in turn, the report rewritten after each measurement;
- ``report``: the markdown tables and the report files;
- ``cli``: the command's flags.

A workflow-level tool: it may import the core, the integrations and ``diffusion``; nothing in
atomtune below it imports it.
"""
