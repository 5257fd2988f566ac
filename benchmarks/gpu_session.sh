#!/usr/bin/env bash
# Everything that needs a GPU, in steps that each fit one device call:
#   bash benchmarks/gpu_session.sh smoke     # FIRST, every time a GPU is at hand: every CUDA path, ~5 min
#   bash benchmarks/gpu_session.sh tests     # CUDA-only tests (pytest -m gpu)
#   bash benchmarks/gpu_session.sh stages    # bench_stages.py: memory, img/s, engine vs bare loop, speed-up, MFU
#   bash benchmarks/gpu_session.sh profile   # profile_stage.py: where the time of R18<-R34 and ViT-Tiny<-ViT-Small goes
#   bash benchmarks/gpu_session.sh cnn|vit   # bench_accuracy.py for one chain on the CIFAR-10 JPEG tree
#   bash benchmarks/gpu_session.sh share     # bench_executors.py --gpu: eight small students on one GPU, serial vs --jobs 8
# The tarball is read from $CIFAR_TAR (default .gpu_carry/cifar10-jpeg.tar.gz, a git-ignored folder).
# Logs and result files are copied to $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
step=${1:-}
case "$step" in
  -h|--help|help) usage; exit 0 ;;
  smoke|tests|stages|profile|cnn|vit|share) ;;
  *) echo "unknown step '${step}'" >&2; usage >&2; exit 2 ;;
esac
shift
tar=${CIFAR_TAR:-.gpu_carry/cifar10-jpeg.tar.gz}
dest=${OUT:-benchmarks/results}
mkdir -p "$dest" benchmarks/results
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$dest/gpu.txt"
python -c "import torch, timm, transformers; print('torch', torch.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)" | tee -a "$dest/gpu.txt"
case "$step" in
  smoke)  python benchmarks/gpu_smoke.py --data-root "$tar" --out "$dest/smoke" --record benchmarks/RESULTS.md "$@"
          rc=$?
          cp benchmarks/RESULTS.md "$dest/" 2>/dev/null
          exit $rc ;;
  tests)  python -m pytest -q -rs -m gpu tests/ 2>&1 | tee "$dest/gpu_tests.log"; exit "${PIPESTATUS[0]}" ;;
  stages) python benchmarks/bench_stages.py "$@" 2>&1 | tee "$dest/bench_stages.log"
          cp benchmarks/results/stages.csv benchmarks/RESULTS.md "$dest/" 2>/dev/null ;;
  profile) rc=0
          for chain in cnn vit; do
            python benchmarks/profile_stage.py --chain "$chain" --stage student --out "$dest/profile" "$@" 2>&1 \
              | tee "$dest/profile_$chain.log" || rc=1
          done
          exit $rc ;;
  share)  python benchmarks/bench_executors.py --gpu --data-root "$tar" --work /tmp/bench_share \
            --csv "$dest/executors_gpu.csv" "$@" 2>&1 | tee "$dest/bench_executors_gpu.log"; exit "${PIPESTATUS[0]}" ;;
  cnn|vit) python benchmarks/bench_accuracy.py --chains "$step" --data-root "$tar" --runs /tmp/bench_runs "$@" 2>&1 \
             | tee "$dest/bench_accuracy_$step.log"
          cp benchmarks/results/accuracy.csv "$dest/" 2>/dev/null ;;
esac
