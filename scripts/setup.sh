#!/usr/bin/env bash
# Creates .venv and installs poisonguard into it with the extras named in $1 (default: test).
# torch is pinned to 2.13.0: a CPU build that pip takes from local files here (other specs download several GB).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install -q torch==2.13.0
# POISONGUARD_CUDA=AUTO (the default) compiles the CUDA kernels when nvcc is found; the module imports either way.
.venv/bin/python -m pip install -q ".[${extras}]"
# The build requirements as well, so that `pip install --no-build-isolation .` rebuilds in place after a change.
.venv/bin/python -c 'import sys, tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' \
  | xargs -r .venv/bin/python -m pip install -q
