#!/usr/bin/env bash
# ViT-Base -> ViT-Small -> ViT-Tiny. Usage: bash vit_distillation/train_vit.sh [--config FILE] [--output-dir DIR] [--help]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" -m vit_distillation.train_vit "$@"
