# python train_dmd.py config/tiny.py
# A tiny random-weight Wan teacher on CPU, no downloads, well under a second per step: the tests' config.
pretrained_model_name_or_path = "tiny"
output_dir = "out/tiny_dmd"
device = "cpu"
mixed_precision = "no"
height = 64
width = 64
num_training_frames = 3          # latent frames (9 video frames)
lora_rank = 8
lora_alpha = 8
fake_score_lora_rank = 8
fake_score_lora_alpha = 8
gradient_checkpointing = True           # exercised by the tests (LoRA + checkpointing)
learning_rate = 1e-4
fake_score_lr = 1e-4
max_train_steps = 20
checkpoint_step_interval = 10
validation_step_interval = 10
validation_prompt = "a red circle moving left"
validation_resolution = "64x64"
validation_num_video_frames = 9
ema_update_interval = 1
