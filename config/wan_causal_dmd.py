# Stage 2 of the causal student (README "Causal student"): Self-Forcing DMD from the ODE-init student
# (config/wan_causal_ode_init.py first):
#   torchrun --nproc_per_node=8 train_dmd.py config/wan_causal_dmd.py
#   python sample.py --ckpt=out/wan_causal_dmd --stream=True --num_frames=81 --prompt="..."
# Values of Self-Forcing's configs/self_forcing_dmd.yaml (dmd.md §10) except: the teacher is the 1.3B model here
# (theirs: 14B), and the critic is a LoRA adapter on the frozen teacher (theirs: a full copy).
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
generator_init = "out/wan_causal_ode_init"   # the stage-1 export (full weights: needs lora_rank = 0)
output_dir = "out/wan_causal_dmd"
prompts_file = "prompts/wan_dmd_starter.txt"   # a start; Self-Forcing trains on its VidProM set (README "Prompts")
height = 480
width = 832
num_training_frames = 21                # latent frames; > 21 rolls out longer and dmd_loss_frames = 21 keeps the last
dmd_loss_frames = 0
causal = True
num_frame_per_block = 3
independent_first_frame = False
same_step_across_blocks = True          # Self-Forcing's default
context_noise = 0
last_step_only = False
dmd_denoising_steps = "1000,750,500,250"
warp_denoising_step = True
timestep_shift = 5.0                    # also shifts the score timesteps
validation_num_inference_steps = 4
ts_schedule = False
ts_schedule_max = False
min_timestep_ratio = 0.02
max_timestep_ratio = 0.98
real_score_guidance_scale = 3.0         # DMD2 form (standard CFG 4)
fake_score_guidance_scale = 0.0
generator_update_interval = 5
lora_rank = 0                           # full generator, initialised from the ODE-init student
fake_score_lora_rank = 128
fake_score_lora_alpha = 128
learning_rate = 2e-6
adam_beta1 = 0.0
adam_beta2 = 0.999
fake_score_lr = 4e-7
fake_score_betas = (0.0, 0.999)
max_grad_norm = 10.0
fake_score_grad_clip = 10.0
train_batch_size = 1                    # x 64 GPUs in Self-Forcing
max_train_steps = 600
use_ema = True
ema_decay = 0.99
ema_update_interval = 1
ema_start_step = 40                     # generator steps: Self-Forcing starts at trainer step 200 (interval 5)
mixed_precision = "bf16"
gradient_checkpointing = True           # the whole-clip passes; cached block calls run without it
checkpoint_step_interval = 100
validation_step_interval = 100
validation_resolution = "832x480"
validation_num_video_frames = 81
