#!/usr/bin/env bash
# The engine's GPU checks as one command for a machine with a CUDA device (the device
# tool's `run`, when a session is lent one):
#
#   run(command="bash scripts/device_check.sh", timeout_s=540)
#
# It uses that machine's own python3 (PyTorch, numpy, Pillow and safetensors are
# there; nothing can be installed), writes its logs under $OUT (or /tmp/device-check)
# and prints: the GPU, the CUDA tests (known answers, CPU == CUDA, host syncs per
# batch, the rank-one ablation), the core suite, bench_dissect on the GPU and on that
# machine's CPU, and the ablation sweep on the GPU (where that machine has torchvision).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/device-check}
PY=${PYTHON:-python3}
DEMO=${DEMO:-/tmp/device-check-demo}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
status=0

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
$PY -c "import torch; print('torch', torch.__version__, 'cuda available:', torch.cuda.is_available())" \
  | tee -a "$OUT/gpu.txt"

echo "== CUDA tests"
$PY -m pytest -q -p no:cacheprovider -rs tests/core/test_cuda.py 2>&1 | tee "$OUT/pytest_cuda.log" || status=1
echo "== core suite (CPU and GPU torch of that machine)"
timeout 240 $PY -m pytest -q -p no:cacheprovider tests/core 2>&1 | tail -15 | tee "$OUT/pytest_core.log" || status=1
echo "== demo data and classifier for the benchmark (built once into \$DEMO)"
timeout 300 $PY bench/bench_dissect.py --child setup --images 4000 --demo "$DEMO" 2>&1 | tail -3 || status=1
echo "== bench_dissect on cuda"
timeout 180 $PY bench/bench_dissect.py --device cuda --images 1000 --demo "$DEMO" 2>&1 \
  | tee "$OUT/bench_cuda.log" || status=1
echo "== bench_dissect on that machine's CPU (sketch inline, then on a second thread)"
timeout 100 $PY bench/bench_dissect.py --device cpu --images 1000 --demo "$DEMO" 2>&1 \
  | tee "$OUT/bench_cpu.log" || status=1
timeout 100 $PY bench/bench_dissect.py --device cpu --images 1000 --demo "$DEMO" --sketch-thread 2>&1 \
  | tee "$OUT/bench_cpu_thread.log" || status=1
echo "== ablation sweep on cuda (resnet18 layer4 and layer3, 112 and 224 px)"
if $PY -c "import torchvision" 2>/dev/null; then
  timeout 150 $PY bench/bench_ablation_sweep.py --device cuda --only resnet18 --data /tmp/device-check-scenes112 2>&1 \
    | tee "$OUT/bench_ablation_cuda.log" || status=1
else
  echo "no torchvision on this machine: skipped" | tee "$OUT/bench_ablation_cuda.log"
fi
exit $status
