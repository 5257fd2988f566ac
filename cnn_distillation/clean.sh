#!/usr/bin/env bash
# Between runs: report free GPU memory and who holds it, reset peak statistics.
# Remove run folders:  bash cnn_distillation/clean.sh --remove RUN_DIR [--yes]   (or --remove-all; --data-cache: unpacked data)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m src.runs.clean --runs "$ROOT/runs" "$@"
