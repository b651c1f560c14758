# python train_dmd.py config/wan_dmd_3step_14b_teacher.py                        # one 80 GB GPU
# torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step_14b_teacher.py --fsdp=True   # 8 GPUs, sharded
# A larger teacher for a smaller student, as Self-Forcing distils its 1.3B student: the real score comes from
# Wan2.1-T2V-14B, stored in 8 bits; the generator and the critic are LoRA adapters of the frozen 1.3B base (they
# share it, as in config/wan_dmd_3step.py). The student, its export and its sampling are the 1.3B's: the 14B is
# only read during training. Memory (bench/memory_table.py, computed, not yet measured on a GPU): 34.5 GiB on one
# GPU at 480x832x81 (the 1.3B LoRA run alone: 16.2), 15.7 GiB per GPU with FSDP over 8. docs/teacher.md says more.
import os
exec(open(os.path.join(os.path.dirname(__file__), "wan_dmd_3step.py")).read())
output_dir = "out/wan_dmd_3step_14b_teacher"
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"   # the student's base: generator, critic, export
teacher_model_name_or_path = "Wan-AI/Wan2.1-T2V-14B-Diffusers"      # the real score; same VAE and UMT5 as the 1.3B
teacher_model_precision = "int8"        # 14B in int8 weight-only: 13.9 GiB instead of 27.0 in bf16; the error is
                                        # bench/bench_quant.py's (int8 on the DiT: ~1e-2 relative L2); "fp8" the same bytes
base_model_precision = "no"             # the 1.3B base the adapters train on stays bf16 (2.7 GiB: 8 bits save little)
# Self-Forcing's DMD settings that apply to a bidirectional LoRA student (its own student is causal, full weights,
# from an ODE init: config/wan_causal_dmd.py with --teacher_model_name_or_path and --teacher_model_precision set):
real_score_guidance_scale = 3.0         # its guidance_scale 3.0, the same DMD2 form (standard CFG 4)
generator_update_interval = 5           # its dfake_gen_update_ratio: the critic tracks the student 5x as often; the
                                        # seed's 1 collapsed modes on the demo world (README "Distillation settings")
adam_beta1 = 0.0                        # its beta1 0 for the generator and the critic
fake_score_betas = (0.0, 0.999)
ema_decay = 0.99                        # its EMA 0.99, updated at every generator step, started at its step 200 (here:
ema_update_interval = 1                 # generator steps)
ema_start_step = 200
# kept from config/wan_dmd_3step.py: 3 steps 1000,757,522 (Self-Forcing: 4 warped steps with timestep_shift 5), and
# the LoRA learning rates 2e-5 / 1e-5 (its 2e-6 / 4e-7 are for full weights over 64 GPUs)
