"""``python -m atomtune.speed``: speed and memory of the bare model, atoms and PEFT's LoRA, DoRA and OFT.

    python -m atomtune.speed --preset sigma-1024 --device cuda --dtype bfloat16 --batch 4 \\
        --methods bare,atoms,lora,dora,oft --atoms parity,256 --compile bare,lora,atoms \\
        --memory-resolutions 512,2048
    python -m atomtune.speed --preset flux-dev-1024 --device cuda --dtype bfloat16 \\
        --methods bare,lora,atoms --atoms parity
    python -m atomtune.speed --preset cpu-tiny          # CI-sized smoke run
"""

from atomtune.speed.cli import main

main()
