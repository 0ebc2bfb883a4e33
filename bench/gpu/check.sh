#!/usr/bin/env bash
# One prepared run for a GPU machine (one H200, CUDA 13, torch; no internet): build with the CUDA kernels for sm_90,
# run the CUDA tests, then check and time the CUDA kernels (bench/gpu/check_cuda.py). Logs and the result table go
# to $OUT when it is set. Exit status: 0 when the build, the tests and the check all pass.
set -uo pipefail
cd "$(dirname "$0")/../.."
LOG_DIR="${OUT:-/tmp/poisonguard_gpu_check}"
mkdir -p "$LOG_DIR"
T0=$SECONDS
step() { echo "== [+$((SECONDS - T0))s] $*"; }

# No internet: wheels/ (if the checkout has one) is the only package source besides what is installed.
pip_local() {
  if [ -d wheels ]; then pip install --no-deps --no-index --find-links wheels/ "$@"; else pip install --no-deps "$@"; fi
}

step "environment"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
nvcc --version | tail -n 2
python -c "import scipy_openblas32" 2>/dev/null || pip_local scipy-openblas32
python -c "import pytest" 2>/dev/null || pip_local pytest

step "build (POISONGUARD_CUDA=ON, sm_90)"
export POISONGUARD_CUDA=ON
if ! pip install --no-build-isolation --no-deps -v . -Ccmake.define.POISONGUARD_CUDA=ON \
    -Ccmake.define.POISONGUARD_CUDA_ARCHITECTURES=90 >"$LOG_DIR/build.log" 2>&1; then
  tail -n 60 "$LOG_DIR/build.log"
  echo "BUILD FAILED (full log: $LOG_DIR/build.log)"
  exit 1
fi
grep -iE "warning|CUDA kernels" "$LOG_DIR/build.log" | grep -v "^--.*Looking" | head -n 20 || true
# Import from the installed package, not from the source tree's python/ folder.
python -c "import json, poisonguard as pg; print(json.dumps(pg.build_info())); assert pg.has_cuda(), 'has_cuda() is False'" \
  || { echo "IMPORT/CUDA CHECK FAILED"; exit 1; }

step "pytest -m cuda"
# Other test modules may need extras missing here; a collection error there must not hide the CUDA results.
python -m pytest -m cuda -q --continue-on-collection-errors tests/ 2>&1 | tee "$LOG_DIR/pytest_cuda.txt"
tests_rc=${PIPESTATUS[0]}

step "check + timing"
python bench/gpu/check_cuda.py
bench_rc=$?

step "done: pytest rc=$tests_rc, check rc=$bench_rc"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
