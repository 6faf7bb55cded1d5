#!/usr/bin/env bash
# The speed benchmark as one GPU run: PixArt-Σ XL-2 (random weights), 1024 px, batch 4, bf16.
# Under 8 minutes on one H100/H200; every step has its own time limit, and every result is
# written as soon as it is measured, so a run cut short keeps what it measured.
#
#   bash benchmarks/gpu_speed.sh           # on the GPU
#   bash benchmarks/gpu_speed.sh --tiny    # rehearsal of every step on the CPU at tiny sizes
#
# Results go to $OUT/<name>/ when $OUT is set, else to benchmarks/results/<name>/:
#   gpu_tests.txt       the bf16 equality tests of the attention paths (tests/test_gpu.py)
#   profile-atoms-N.txt where atoms' training step and inference spend their time (operators)
#   speed.json, .md     bare, atoms at LoRA r=16's parameters and at 256 atoms (heads from the
#                       projections, and atoms_padcat: padded and concatenated per call, the path
#                       before), LoRA r=16, DoRA, OFT: eager; inference through regional
#                       torch.compile for bare, LoRA and atoms at parity; peak training memory at
#                       512 and 2048 px for bare, LoRA and atoms at parity
# Needs torch with CUDA, diffusers, peft, safetensors, pytest; atomtune is taken from src/ (no
# install needed). PYTHON picks the interpreter (default: python3).
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "${1:-}" = "--tiny" ]; then
    export OMP_NUM_THREADS=1  # proves every step runs, not how fast: one thread copes with a busy CPU
    name=rehearsal-cpu-tiny
    bench=(--preset cpu-tiny --device cpu --dtype float32 --batch 2 --warmup 0 --repeats 1 --prune-to 8)
    bench+=(--memory-resolutions 64,256)
    limits=(120 600)
else
    name=sigma-1024-b4-speed
    bench=(--preset sigma-1024 --device cuda --dtype bfloat16 --batch 4 --warmup 2 --repeats 7 --prune-to 32)
    bench+=(--memory-resolutions 512,2048)
    limits=(90 390)
fi
dest="${OUT:-benchmarks/results}/$name"
mkdir -p "$dest"
"$py" - <<'EOF' | tee "$dest/environment.txt"
import torch
import diffusers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF

echo "== 1/2 equality tests of the fused attention paths in bf16 (skipped without a GPU)"
timeout "${limits[0]}" "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$dest/gpu_tests.txt"

echo "== 2/2 profile, eager table, compiled inference, memory against resolution"
start=$(date +%s)
timeout "${limits[1]}" "$py" -m atomtune.speed "${bench[@]}" \
    --methods bare,atoms,atoms_padcat,lora,dora,oft --atoms parity,256 --compile bare,lora,atoms \
    --profile --out "$dest" 2>&1 | tee "$dest/benchmark.log"
status=${PIPESTATUS[0]}
echo "benchmark: exit $status after $(($(date +%s) - start)) s" | tee -a "$dest/benchmark.log"
ls -l "$dest"
exit "$status"
