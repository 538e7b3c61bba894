#!/usr/bin/env bash
# The GPU checks, in one short script for the lent device machine (about 15 minutes of device time in all):
#   bash benchmarks/gpu_check.sh            # run from the repository root; writes $OUT (or /tmp/gpu_check)
# 1. installs the project (CUDA wheel of the pinned torch when the index serves it, else whatever pip finds),
# 2. the GPU-marked tests, 3. every method on LLaMA-7B shapes against torch.linalg.svd and the two-GEMM
# floor, 4. a streamed LLaMA-7B-shaped model (peak GPU memory per block), 5. one sweep point on cuda.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LRSWEEP_CACHE="$OUT/cache"
step() { echo "== $1"; shift; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$OUT/gpu_check.log" | tail -40; }
nvidia-smi -L | tee "$OUT/gpu_check.log"
python -c "import lrsweep" 2>/dev/null || \
  { pip install -q -e '.[dev]' && pip install -q --no-deps -r requirements-assets.txt; } >"$OUT/install.log" 2>&1
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu_check.log"
step "gpu tests" python -m pytest -m gpu -n 0 -q -p no:cacheprovider
step "methods, LLaMA-7B shapes" python benchmarks/methods.py --device cuda
step "streamed LLaMA-7B-shaped model" python benchmarks/stream_gpu.py --layers 4 --method svd --rank 1024
step "one sweep point on cuda" python -m lrsweep model=smollm2 method=svdllm param_ratio=0.8 device=cuda \
  logger=none results_dir="$OUT/results"
