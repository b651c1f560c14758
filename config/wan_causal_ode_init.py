# Stage 1 of the causal student (README "A causal student"): regression on teacher ODE trajectories (CausVid, arXiv
# 2412.07772 §4.3; Self-Forcing, arXiv 2506.08009, starts DMD from such a checkpoint). First the trajectories, then
# the regression:
#   python data.py config/wan_causal_ode_init.py --make_ode_pairs=prompts/wan_dmd_starter.txt --teacher_out=cache/wan_causal_ode \
#       --teacher_steps=48 --teacher_guidance=6.0 --teacher_shift=8.0
#   torchrun --nproc_per_node=8 train_dmd.py config/wan_causal_ode_init.py
# Self-Forcing's generate_ode_pairs.py: the 1.3B teacher, 48 steps at shift 8, CFG 6, 21 latent frames, states
# kept at the (warped) student steps; ours samples with UniPC on a 48-step schedule snapped onto those steps
# (data.ode_schedule). lr/steps: Self-Forcing ships its ODE checkpoint without the config that made it; the values
# below are CausVid-like assumptions (lr 2e-6, full fine-tune), not read from a reference file.
output_dir = "out/wan_causal_ode_init"
objective = "ode_init"
datasets = [dict(dataset_type="latents", cache_dir="cache/wan_causal_ode")]
causal = True
num_frame_per_block = 3                 # Self-Forcing / CausVid
dmd_denoising_steps = "1000,750,500,250"
warp_denoising_step = True              # -> 1000, 937.5, 833.3, 625 with timestep_shift 5 (Self-Forcing)
timestep_shift = 5.0
validation_num_inference_steps = 4      # = the number of dmd_denoising_steps
lora_rank = 0                           # full fine-tune of a separate fp32 generator (the references train all weights)
fake_score_lora_rank = 8                # the critic is unused by ode_init: a small adapter keeps it cheap
fake_score_lora_alpha = 8
learning_rate = 2e-6
adam_beta1 = 0.0                        # Self-Forcing's betas (0, 0.999)
max_grad_norm = 10.0
max_train_steps = 3000                  # batch 1 per GPU (x 64 GPUs in the references)
use_ema = False
