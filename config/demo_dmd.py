# python demo.py  (stage 4 runs train_dmd with this file; demo.py fills in the teacher, prompts, size and steps)
# DMD of the demo's tiny teacher into a 3-step student on CPU. Settings from shared/design/dmd.md §11: full
# fine-tune, generator lr 1e-5 / critic lr 1e-4, betas (0, 0.999), teacher guidance low (the seed's w = 3 with
# update interval 1 collapsed every caption to one mode there).
device = "cpu"
mixed_precision = "no"
negative_prompt = ""                   # the teacher's unconditional branch is the empty caption (caption dropout)
lora_rank = 0
fake_score_lora_rank = 0
gradient_checkpointing = False
learning_rate = 5e-5
adam_beta1 = 0.0
fake_score_lr = 1e-4
fake_score_betas = (0.0, 0.999)
generator_update_interval = 1
real_score_guidance_scale = 1.0             # = standard CFG 2, demo.py's guidance_scale
train_batch_size = 16
min_timestep_ratio = 0.02
max_timestep_ratio = 0.98
use_ema = False
log_interval = 25
resume_from_checkpoint = "latest"
