# Stage 2 of the causal student (README "A causal student"): Self-Forcing DMD (arXiv 2506.08009) from the ODE-init
# student (config/wan_causal_ode_init.py first):
#   torchrun --nproc_per_node=8 train_dmd.py config/wan_causal_dmd.py
#   python sample.py --ckpt=out/wan_causal_dmd --stream=True --num_frames=81 --prompt="..."
# Self-Forcing's values except: the teacher is the 1.3B model (theirs: 14B), the critic is a LoRA adapter on the
# frozen teacher (theirs: a full copy), and the recipe's guidance interval and regression term (docs/recipe.md).
generator_init = "out/wan_causal_ode_init"   # the stage-1 export (full weights: needs lora_rank = 0)
output_dir = "out/wan_causal_dmd"
prompts_file = "prompts/wan_dmd_starter.txt"   # a start; Self-Forcing trains on its VidProM set (README "Data, prompts, anchors")
causal = True
num_frame_per_block = 3                 # latent frames per block (Self-Forcing)
dmd_denoising_steps = "1000,750,500,250"
warp_denoising_step = True              # -> 1000, 937.5, 833.3, 625 with timestep_shift 5 (Self-Forcing)
timestep_shift = 5.0                    # also shifts the score timesteps
validation_num_inference_steps = 4      # = the number of dmd_denoising_steps
ts_schedule = False                     # score timesteps over the whole window (Self-Forcing)
real_score_guidance_max_timestep = 650.0   # guidance only at sigma <= 0.65 (docs/recipe.md "The guidance interval")
ode_regression_weight = 0.25           # the regression term (docs/recipe.md "The regression term")
teacher_data_samples = 8               # its ODE pairs per prompt, at this run's guidance (stage 1's are at CFG 6)
generator_update_interval = 5           # Self-Forcing's
lora_rank = 0                           # full generator, initialised from the ODE-init student
learning_rate = 2e-6                    # Self-Forcing's lrs and betas (0, 0.999)
adam_beta1 = 0.0
fake_score_lr = 4e-7
fake_score_betas = (0.0, 0.999)
max_grad_norm = 10.0                    # Self-Forcing's clips
fake_score_grad_clip = 10.0
max_train_steps = 600                   # batch 1 per GPU (x 64 GPUs in Self-Forcing)
ema_update_interval = 1
ema_start_step = 40                     # generator steps: Self-Forcing starts at trainer step 200 (interval 5)
checkpoint_step_interval = 100
validation_step_interval = 100
