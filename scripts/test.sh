#!/usr/bin/env bash
# Sets everything up and runs the checks CI runs: format + lint, the CUDA compile check, the test suite with coverage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
source .venv/bin/activate

echo "== build"
poisonguard info
if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then
  # nvcc is here, so the CUDA kernels must have been compiled and linked into the module.
  python -c "import poisonguard, sys; sys.exit(0 if poisonguard.build_info()['cuda'] else 'nvcc found but the CUDA kernels were not built')"
fi

echo "== lint"
ruff check python tests bench examples
ruff format --check python tests bench examples
find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu' -o -name '*.cuh' | xargs clang-format --dry-run --Werror

echo "== tests"
python -m pytest -q --cov=poisonguard --cov-report=term --cov-fail-under=90 tests
