#!/usr/bin/env bash
# Between runs: empty the CUDA cache and reset peak-memory statistics; report free GPU memory.
# Optionally delete this chain's run outputs:  bash vit_distillation/clean.sh --remove [--yes]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m src.utils.clean --runs "$ROOT/runs/vit" "$@"
