# python train_dmd.py config/wan_dmd_3step.py
# The seed's run: Wan2.1-T2V-1.3B-Diffusers distilled into a 3-step student (1000, 757, 522) with the seed's
# values. Where our meaning differs from SimpleTuner's, the comment says so (shared/design/dmd.md §7-§8).
# Note dmd.md §11: these exact settings (update interval 1, guidance 3) collapsed modes on a toy problem;
# watch coverage in validation, and consider generator_update_interval = 5 or a lower guidance.
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
output_dir = "out/wan_dmd_3step"
prompts_file = "prompts/wan_dmd_starter.txt"   # 80 starter prompts; for a real run 10k+ (README "Prompts"),
                                        # e.g. "hf://gdhe17/Self-Forcing/vidprom_filtered_extended.txt"
height = 480
width = 832
num_training_frames = 21                # latent frames = 81 video frames (the seed's 121 frames -> 31 latent, not used)
dmd_denoising_steps = "1000,757,522"
generator_update_interval = 1
real_score_guidance_scale = 3.0         # DMD2 form: x_c + 3(x_c - x_u), i.e. standard CFG 4.0 (SimpleTuner reads it as CFG 3)
fake_score_guidance_scale = 0.0         # off
min_timestep_ratio = 0.02
max_timestep_ratio = 0.98
ts_schedule = True
ts_schedule_max = False
min_score_timestep = 0
timestep_shift = 1.0                    # applied here (SimpleTuner reads and ignores it)
last_step_only = False
num_frame_per_block = 0                 # seed: 3 (causal blocks); this bidirectional run keeps one block (causal: config/wan_causal_dmd.py)
independent_first_frame = False
same_step_across_blocks = True
context_noise = 0
fake_score_lr = 1e-5
fake_score_weight_decay = 0.01
fake_score_betas = (0.9, 0.999)
fake_score_eps = 1e-8
fake_score_grad_clip = 1.0
lora_rank = 128
lora_alpha = 128
fake_score_lora_rank = 128              # the critic is a second adapter on the SAME frozen base (SimpleTuner clones the model)
fake_score_lora_alpha = 128
learning_rate = 2e-5
lr_scheduler = "constant"
lr_warmup_steps = 0
max_grad_norm = 1.0
optimizer = "adamw_bf16"                # mapped to AdamW with fp32 master weights
mixed_precision = "bf16"
base_model_precision = "no"             # seed: "int8-quanto" (= "int8" here, weight-only; README "An 8-bit base": -1.2 GiB,
text_encoder_1_precision = "no"         # demo student within noise); bf16 until measured on a GPU at this size. Seed: "int8-quanto"
quantize_via = "accelerator"            # seed: "cpu" (both work: tensor by tensor as the weights load)
gradient_checkpointing = True
train_batch_size = 1
gradient_accumulation_steps = 1
max_train_steps = 4000
use_ema = True
ema_update_interval = 5
ema_validation = "ema_only"
checkpoint_step_interval = 200
checkpoints_total_limit = 3
resume_from_checkpoint = "latest"
flow_schedule_shift = 5.0
validation_step_interval = 200
validation_num_inference_steps = 3
validation_guidance = 1.0
validation_resolution = "1280x704"
validation_num_video_frames = 121       # any 4k+1 works at inference
