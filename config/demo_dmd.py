# The demo's DMD settings for its tiny teacher on CPU (demo.py fills in the teacher, prompts, size and steps). The
# headline student adds config/demo_recipe.py; this file alone is plain DMD at w = 1 (standard CFG 2):
#   python demo.py --dmd_config=config/demo_dmd.py --dmd_steps=600 --guidance_scale=2 --out_dir=out/demo_w1
device = "cpu"
mixed_precision = "no"                 # fp32 on CPU
negative_prompt = ""                   # the teacher's unconditional branch is the empty caption (caption dropout)
lora_rank = 0                          # full fine-tunes: the tiny DiT has no large base to share
fake_score_lora_rank = 0
gradient_checkpointing = False         # tiny activations
learning_rate = 5e-5                   # generator lr
adam_beta1 = 0.0                       # betas (0, 0.999) for both networks, as DMD2
fake_score_lr = 1e-4                   # the critic learns faster than the generator
fake_score_betas = (0.0, 0.999)
real_score_guidance_scale = 1.0        # w = 1 (standard CFG 2); config/demo_recipe.py sets w = 3
train_batch_size = 16                  # samples per step: the tiny model is cheap, the gradient less noisy
use_ema = False                        # the last weights are exported
log_interval = 25                      # a log line every 25 trainer steps
