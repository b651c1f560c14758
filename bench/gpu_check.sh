#!/usr/bin/env bash
# The device checks of the lent GPU, in one run. Wheels the machine lacks (diffusers and its needs) travel
# in .whl/ (see bench/README.md).
#   bash bench/gpu_check.sh OUTDIR [tests] [dit] [sample] [vae] [cpu] [train] [quant]   (none named: all but train, quant)
set -uo pipefail
OUT=${1:-${OUT:-/tmp/gpu_check}}; mkdir -p "$OUT"; shift || true
SECTIONS=${*:-tests dit sample vae cpu}
# train_dmd.py itself at real size with random weights (random:<preset>), prompts = the validation prompt
TRAIN="config/wan_dmd_3step.py --prompts_file= --validation_resolution=832x480 --validation_num_video_frames=81 --checkpoint_step_interval=1000 --validation_step_interval=1000"
first_step() {   # run "$@" until its first log record, print it, kill it (no export of a 28 GB merged 14B)
  rm -rf "$1"; mkdir -p "$1"; local dir=$1; shift
  "$@" > "$dir/stdout" 2>&1 & local pid=$!
  for _ in $(seq 400); do grep -q '"step": 1,' "$dir/log.jsonl" 2>/dev/null && break; kill -0 $pid 2>/dev/null || break; sleep 1; done
  kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; grep -E "process|teacher|Error|error" "$dir/stdout" | tail -5; cat "$dir/log.jsonl" 2>/dev/null
}
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
has train && {
  echo "== train_dmd.py, random 1.3B, LoRA r128, 480x832x81, one process, 4 steps + validation + export"
  timeout 240 python3 train_dmd.py $TRAIN --pretrained_model_name_or_path=random:t2v-1.3B --output_dir=/tmp/t13 --max_train_steps=4 2>&1 | tr '\r' '\n' | grep -E "process|step |valid|export|Error"
  python3 -c "import json; [print({k: r[k] for k in ('step', 's_per_step', 'peak_mem_gb', 'peak_reserved_gb', 'dmd_loss', 'fake_score_loss')}) for r in map(json.loads, open('/tmp/t13/log.jsonl'))]"
  echo "== the same through torchrun (NCCL) with FSDP2, one process, 3 steps"
  timeout 240 torchrun --standalone --nproc_per_node=1 train_dmd.py $TRAIN --pretrained_model_name_or_path=random:t2v-1.3B --output_dir=/tmp/t13f --max_train_steps=3 --fsdp=True 2>&1 | tr '\r' '\n' | grep -E "process|step |valid|export|Error"
  python3 -c "import json; [print({k: r[k] for k in ('step', 's_per_step', 'peak_mem_gb', 'peak_reserved_gb')}) for r in map(json.loads, open('/tmp/t13f/log.jsonl'))]"; ls /tmp/t13f/checkpoint-*
  echo "== random 14B, LoRA r128, 480x832x81, one process: first step"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True first_step /tmp/t14 python3 train_dmd.py $TRAIN --pretrained_model_name_or_path=random:t2v-14B --output_dir=/tmp/t14 --max_train_steps=2
}
has quant && {   # issue 19: the one-GPU memory of bench/memory_table.py's 8-bit / bf16-residual / offload rows, measured
  for v in "--base_model_precision=int8" "--base_model_precision=int8 --residual_dtype=bf16" \
           "--base_model_precision=int8 --activation_offload=True" "--base_model_precision=fp8-matmul"; do
    echo "== random 1.3B, LoRA r128, 480x832x81, $v: first step"
    first_step /tmp/tq python3 train_dmd.py $TRAIN --pretrained_model_name_or_path=random:t2v-1.3B --output_dir=/tmp/tq --max_train_steps=2 $v
  done
  echo "== random 14B, LoRA r128, 480x832x81, int8 + activation offload: first step (target 48 GB)"
  PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True first_step /tmp/t14q python3 train_dmd.py $TRAIN --pretrained_model_name_or_path=random:t2v-14B --output_dir=/tmp/t14q --max_train_steps=2 --base_model_precision=int8 --activation_offload=True
}
has cpu && { echo "== CPU suite on this torch"; timeout 120 python3 -m pytest -q -m "not gpu and not slow" tests/ -p no:cacheprovider -x; }
true; } 2>&1 | tee "$OUT/gpu_check.log"
