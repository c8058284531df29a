#!/usr/bin/env bash
# The engine's GPU checks as one command for a machine with a CUDA device (the device
# tool's `run`, when a session is lent one):
#
#   run(command="bash scripts/device_check.sh", timeout_s=600)
#
# It uses that machine's own python3 (PyTorch, torchvision, numpy, numba, Pillow and
# pytest are there; nothing can be installed), writes its logs under $OUT (or
# /tmp/device-check) and prints, most important first, each step under its own time
# limit so that the whole stays under about 8 minutes:
#   1. the GPU and torch;
#   2. the CUDA tests: known answers, CPU == CUDA, host syncs per batch;
#   3. bench_dissect_large on the GPU: resnet18 layer4, then layer3, at 224 px on
#      $LARGE_IMAGES (10,000) synthetic scenes: images/s and the ratio to a bare forward;
#   4. the ablation sweep on the GPU (every case of bench_ablation_sweep, and the job);
#   5. the core suite under that machine's torch, as far as its time limit allows.
# DEVICE=cpu LARGE_IMAGES=64 SWEEP_IMAGES=100 PYTHON=.venv/bin/python runs the same steps
# on a CPU (a dry run of this script).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-check}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
LARGE_IMAGES=${LARGE_IMAGES:-10000}
SWEEP_IMAGES=${SWEEP_IMAGES:-2000}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0
begin=$SECONDS

step() { echo; echo "== [$((SECONDS - begin)) s] $*"; }

step "GPU and torch"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'cuda available:', torch.cuda.is_available(), 'cpus', __import__('os').cpu_count())" \
  | tee -a "$OUT/gpu.txt"

step "CUDA tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider -rs -s tests/core/test_cuda.py 2>&1 | tail -25 | tee "$OUT/pytest_cuda.log" || status=1

step "bench_dissect_large on $DEVICE: resnet18 layer4, then layer3, $LARGE_IMAGES images at 224 px"
timeout 200 $PY bench/bench_dissect_large.py --device "$DEVICE" --images "$LARGE_IMAGES" --batch-size 128 --repeat 2 \
  --layers layer4 --layers layer3 2>&1 | tee "$OUT/bench_large.log" || status=1

step "ablation sweep on $DEVICE ($SWEEP_IMAGES scenes at 112 px)"
timeout 120 $PY bench/bench_ablation_sweep.py --device "$DEVICE" --images "$SWEEP_IMAGES" --data "/tmp/device-check-scenes112-$SWEEP_IMAGES" 2>&1 \
  | tee "$OUT/bench_ablation.log" || status=1

step "core suite under this machine's torch (time-limited)"
workers=$($PY -c "import xdist" 2>/dev/null && echo "-n 12" || echo "")
timeout 60 $PY -m pytest -v --tb=line -p no:cacheprovider $workers tests/core 2>&1 | tee "$OUT/pytest_core.log" \
  | grep -E "FAILED|ERROR|passed|failed" | head -40 || status=1

step "done, status $status"
exit $status
