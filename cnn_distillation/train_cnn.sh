#!/usr/bin/env bash
# ResNet-50 -> ResNet-34 -> ResNet-18. Usage: bash cnn_distillation/train_cnn.sh [--config FILE] [--output-dir DIR] [--help]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m cnn_distillation.train_cnn "$@"
