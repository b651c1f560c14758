# PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True python train_dmd.py config/wan_dmd_3step_14b.py    # one 80 GB GPU
# torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step_14b.py --fsdp=True                   # 8 GPUs, sharded
# The recipe of config/wan_dmd_3step.py (guidance interval, regression term and its pairs: docs/recipe.md) on
# Wan2.1-T2V-14B-Diffusers: LoRA on one shared frozen bf16 base. Its 640 ODE pairs cost about 47 H100-hours, about
# as much as the DMD run (docs/recipe.md "What the pairs cost"): fewer with --teacher_data_samples=4. The regression
# term keeps a second generator pass's activations (+25 GiB at this size, computed): on one GPU add
# --residual_dtype=bf16, which halves both (back to about the measured peak below; not yet measured with the term).
# Measured on one H100 at 480x832x81 (random weights): 73.1 GiB peak allocated, 74.1 GiB reserved. With FSDP2 over
# 8 GPUs: about 38 GiB per GPU (computed, bench/memory_table.py); add --sp_size for longer videos. On one 48 GB card:
# --base_model_precision=int8 --activation_offload=True (38.8 GiB computed, not yet measured: README "Sparse attention and an 8-bit base").
import os
exec(open(os.path.join(os.path.dirname(__file__), "wan_dmd_3step.py")).read())
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
output_dir = "out/wan_dmd_3step_14b"
