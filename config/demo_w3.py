# The demo's w = 3 student without the regression term (bench/HISTORY.md, "The w = 3 student that meets the mode-keeping goal"), on top of
# config/demo_dmd.py:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_w3.py --dmd_steps=2400 --guidance_scale=4 --out_dir=out/demo_w3
real_score_guidance_scale = 3.0        # DMD2 form: x_c + 3(x_c - x_u), standard CFG 4 (train_dmd.py's default)
real_score_guidance_max_timestep = 650.0   # guidance only at sigma <= 0.65: keeps the rarest bands (docs/recipe.md)
learning_rate = 2e-5                   # 0.4x config/demo_dmd.py's generator lr: balances the bands at w = 3
use_ema = True                         # the exported student is the EMA of the second half of the run
ema_update_interval = 1
ema_start_step = 1200                  # generator steps: the EMA follows the weights before it
