#!/usr/bin/env bash
# The speed benchmarks on a CUDA machine (AMP on: the adapters autocast on CUDA): embedding and AEA
# throughput against the core-time bound, and training speed of every model. Run from the repository root:
#   bash bench/gpu.sh [records]
# It prints the device first and stops when torch sees no CUDA device.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RECORDS=${1:-20000}
export PYTHONPATH=$PWD
$PY -c "import torch, sys; ok = torch.cuda.is_available(); print('cuda:', torch.cuda.get_device_name(0) if ok else None); sys.exit(0 if ok else 1)"
$PY bench/embeddings.py --records "$RECORDS" --batch-size 512
$PY bench/training.py
