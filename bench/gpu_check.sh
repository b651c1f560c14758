#!/usr/bin/env bash
# The device checks of the lent GPU, in one run. Wheels the machine lacks (diffusers and its needs) travel
# in .whl/ (see bench/README.md).
#   bash bench/gpu_check.sh OUTDIR [tests] [dit] [sample] [vae] [cpu]     (no section named: all of them)
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}; mkdir -p "$OUT"; shift || true
SECTIONS=${*:-tests dit sample vae cpu}
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
has() { [[ " $SECTIONS " == *" $1 "* ]]; }
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
has tests && { echo "== CUDA tests"; timeout 150 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider; }
has dit && { echo "== DiT fwd+bwd, 1.3B 480x832x81, bf16, checkpointing, + compile"; timeout 300 python3 bench/bench_dit.py --preset t2v-1.3B --repeats 3 --compile; }
has sample && { echo "== 3-step student, 1.3B 480x832x81"; timeout 240 python3 bench/bench_sample.py --compile; }
has vae && { echo "== VAE decode, ours vs diffusers"; timeout 200 python3 bench/bench_vae.py; }
has cpu && { echo "== CPU suite on this torch"; timeout 120 python3 -m pytest -q -m "not gpu and not slow" tests/ -p no:cacheprovider -x; }
true; } 2>&1 | tee "$OUT/gpu_check.log"
