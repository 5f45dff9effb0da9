#!/usr/bin/env bash
# Every GPU-only test and benchmark of fm in one command (about 8 minutes on one H100/H200); rows go to
# docs/BENCHMARKS.md through the benchmarks' own writers. Run it whenever a GPU is available:
#
#     bash bench/gpu_check.sh            # NO_WRITE=1 bash bench/gpu_check.sh: print only
#
# Steps (each under its own timeout, so one hang does not eat the rest; the exit status is the first failure's):
# 1. the tests marked `gpu` (flex/flash parity with sdpa in bf16, flash refusing fp32, ...);
# 2. the attention benchmark: sdpa / flex / flash fwd+bwd at 2,048 genes per modality, bf16;
# 3. a `base` train step (bf16, activation checkpointing on, flex and flash) at batch 32 and 64: MFU, peak memory;
# 4. `fm predict` cells/s on a simulated file.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
WRITE=$([ "${NO_WRITE:-0}" = 1 ] && echo --no-write)
status=0
step() {  # step SECONDS command...
  local limit=$1; shift
  echo "== $*"
  timeout "$limit" "$@" || { rc=$?; echo "!! failed ($rc): $*"; [ $status -ne 0 ] || status=$rc; }
}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: no CUDA device')" || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
step 150 "$PY" -m pytest -q -m gpu tests/unit tests/integration
step 90 "$PY" -m bench.attention --genes 2048 --batch 8 --heads 12 --head-dim 64 --reps 5 $WRITE
for attn in flex flash; do
  step 120 "$PY" bench/train_step.py --presets base --genes 2048 --batch 32 64 --attention $attn \
    --activation-checkpointing --peak-tflops "${PEAK_TFLOPS:-989}" $WRITE
done
step 60 "$PY" bench/predict.py --presets small --device cuda --batch-size 256 $WRITE
exit $status
