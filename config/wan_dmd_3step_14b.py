# python train_dmd.py config/wan_dmd_3step_14b.py
# The seed recipe of config/wan_dmd_3step.py on Wan2.1-T2V-14B-Diffusers: LoRA on one shared frozen bf16 base
# (about 72 GiB before a block's recompute working set at 480x832x81 by bench/README.md's arithmetic; FSDP for more).
import os
exec(open(os.path.join(os.path.dirname(__file__), "wan_dmd_3step.py")).read())
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-14B-Diffusers"
output_dir = "out/wan_dmd_3step_14b"
validation_resolution = "832x480"
validation_num_video_frames = 81
