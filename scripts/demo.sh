#!/usr/bin/env bash
# The main job on its built-in default (sets up .venv on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/poisonguard ]; then
  bash scripts/setup.sh test
fi
.venv/bin/poisonguard info
.venv/bin/poisonguard demo "$@"
