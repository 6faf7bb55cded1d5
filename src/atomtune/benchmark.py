"""``python -m atomtune.benchmark``: speed and memory of the bare model, atoms and PEFT's LoRA, DoRA
and OFT. The command's home; the benchmark itself is the ``atomtune.speed`` package.

    python -m atomtune.benchmark --preset sigma-1024 --device cuda --dtype bfloat16 --batch 4 \\
        --methods bare,atoms,lora,dora,oft --atoms parity,256 --compile bare,lora,atoms \\
        --memory-resolutions 512,2048
    python -m atomtune.benchmark --preset cpu-tiny          # CI-sized smoke run
"""

from __future__ import annotations

from .speed.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    main()
