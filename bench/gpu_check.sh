#!/usr/bin/env bash
# The device checks of the lent GPU, in one run: CUDA tests, the benchmark at 1.3B/480p, the CPU suite on
# that machine's torch. Wheels not on the machine (diffusers and its needs) travel in .whl/ (see bench/README.md).
#   bash bench/gpu_check.sh [OUTDIR]
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
echo "== CUDA tests"; timeout 150 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider
echo "== bench 1.3B 480x832x81, bf16, checkpointing, + compile"; timeout 300 python3 bench/bench_dit.py --preset t2v-1.3B --repeats 3 --compile
echo "== CPU suite on this torch"; timeout 120 python3 -m pytest -q -m "not gpu and not slow" tests/ -p no:cacheprovider -x
} 2>&1 | tee "$OUT/gpu_check.log"
