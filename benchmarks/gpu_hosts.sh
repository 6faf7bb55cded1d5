#!/usr/bin/env bash
# The speed benchmark on today's DiT hosts as one GPU run: SD3.5-Medium and Flux.1-dev (random
# weights, their published configs), 1024 px, batch 1, bf16. Per host: the bare model, LoRA r=16 on
# the host's LoRA targets (SD3: both streams' attention projections; Flux: also the double blocks'
# feed-forward layers) and atoms at LoRA r=16's parameter count (83 per module on SD3.5-M, 128 on
# Flux.1-dev): training step time (forward + backward + AdamW), peak training memory, inference
# forward time and peak memory, atoms also pruned to 32 per module. DoRA and OFT are left out here
# (the harness runs them on these hosts too, but they would not fit the time below).
#
#   bash benchmarks/gpu_hosts.sh           # on the GPU (one H100/H200)
#   bash benchmarks/gpu_hosts.sh --tiny    # rehearsal of every step on the CPU, tiny presets, bf16
#
# Results go to $OUT/<preset>-b1-speed/ when $OUT is set, else to benchmarks/results/<preset>-b1-speed/,
# each written as soon as a row is measured: environment.txt, speed.json, speed.md, benchmark.log
# (--tiny: rehearsal-<tiny preset>-b1-speed/).
# Needs torch with CUDA, diffusers, peft, safetensors; atomtune is taken from src/ (no install needed).
# PYTHON picks the interpreter (default: python3).
#
# Why it fits 8 minutes (estimates, not measurements: no GPU has run it yet). Each host has its own
# time limit (150 s + 270 s, plus ~20 s for the environment line), and a host cut short keeps the
# rows it measured. Each row builds its transformer afresh, initialised in place on the GPU
# (``with torch.device("cuda")``): PyTorch's default initialisers then run as GPU kernels (12 B
# parameters drawn in float32, 48 GB, then cast to bf16: well under a second of device time, a
# few seconds of Python for the modules). The same build on the CPU took 11.5 s per billion
# parameters on one thread (a 1.03 B slice of Flux: 2 double + 2 single blocks), i.e. about two
# minutes per Flux build: that is why the build must happen on the device. Step costs at 1024 px:
# Flux.1-dev, 4608 tokens, ≈ 2 x 11.9 B x 4608 ≈ 110 TFLOP of projections + ≈ 15 TFLOP of
# attention per forward ≈ 0.25 s at ~500 TFLOP/s; a training step (activation gradients through
# every layer) ≈ 3 forwards ≈ 0.8 s. Per row: 9 training steps + 9 forwards (+ 9 pruned for atoms)
# + build + adapter save ≈ 25 s; 3 rows ≈ 1.5 min. SD3.5-M (2.24 B, 4429 tokens) ≈ 5x cheaper:
# under a minute. Expected total ≈ 3 minutes; the limits allow 2x slower steps before cutting.
# Peak memory: Flux's bf16 weights 24 GB, its float32 build 48 GB (transient), training
# activations at 4608 tokens without checkpointing well under the H200's 141 GB; a step that runs
# out of memory is reported as such in the table and the other figures are still measured.
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-python3}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if [ "${1:-}" = "--tiny" ]; then
    export OMP_NUM_THREADS=1  # proves every step runs, not how fast: one thread copes with a busy CPU
    presets=(cpu-tiny-sd3 cpu-tiny-flux) prefix=rehearsal-
    bench=(--device cpu --dtype bfloat16 --batch 1 --warmup 0 --repeats 1 --prune-to 8)
    limits=(150 150)
else
    presets=(sd35-medium-1024 flux-dev-1024) prefix=
    bench=(--device cuda --dtype bfloat16 --batch 1 --warmup 2 --repeats 7 --prune-to 32)
    limits=(150 270)
fi
root="${OUT:-benchmarks/results}"
environment=$("$py" - <<'EOF'
import torch
import diffusers, peft
print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__, "peft", peft.__version__)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
EOF
)
echo "$environment"

status=0
for i in "${!presets[@]}"; do
    preset=${presets[$i]}
    dest="$root/$prefix$preset-b1-speed"
    mkdir -p "$dest"
    echo "$environment" > "$dest/environment.txt"
    echo "== $((i + 1))/${#presets[@]} $preset: bare, LoRA r=16, atoms at parity (limit ${limits[$i]} s)"
    start=$(date +%s)
    timeout "${limits[$i]}" "$py" -m atomtune.speed --preset "$preset" "${bench[@]}" \
        --methods bare,lora,atoms --atoms parity --out "$dest" 2>&1 | tee "$dest/benchmark.log"
    code=${PIPESTATUS[0]}
    echo "$preset: exit $code after $(($(date +%s) - start)) s" | tee -a "$dest/benchmark.log"
    [ "$code" -ne 0 ] && status=$code
    ls -l "$dest"
done
exit "$status"
