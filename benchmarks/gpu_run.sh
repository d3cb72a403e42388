#!/usr/bin/env bash
# The device check, as one script: GPU throughput and FCT speed at full width, then the CPU-scale
# reproduction suite on the real subset (benchmarks/suite.py), with results packed into $OUT.
#   bash benchmarks/gpu_run.sh DATA_FILE SUITE_BUDGET_SECONDS
set -uo pipefail
DATA=${1:-gpu_data/cifar10_subset.npz}; BUDGET=${2:-420}
OUT=${OUT:-./gpu_out}; mkdir -p "$OUT"
export TQDM_DISABLE=1 PYTHONUNBUFFERED=1
PY=python3
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
  timeout 120 $PY benchmarks/throughput.py --data_file "$DATA" --dataset cifar10 --width 64 --device cuda --epochs 3
  timeout 120 $PY benchmarks/throughput.py --data_file "$DATA" --dataset cifar10 --width 16 --device cuda --epochs 3
  timeout 60 $PY -m benchmarks.fct_speed --n 50000 --width 64 --device cuda --data_file "$DATA"
  timeout 60 $PY -m benchmarks.fct_speed --n 5170 --width 16 --device cuda --data_file "$DATA"
} 2>&1 | tee "$OUT/speed.txt"
timeout $((BUDGET + 60)) $PY -m benchmarks.suite --data_file "$DATA" --save_root ./saved/suite --out "$OUT" \
    --budget "$BUDGET" --device cuda "${@:3}" > "$OUT/suite.log" 2>&1
tail -n 30 "$OUT/suite.log"
tar czf "$OUT/results.tgz" --exclude='*.tar' --exclude='*.pth' --exclude='*_samples.npy' saved/suite ST/save 2>/dev/null
ls -la "$OUT"
