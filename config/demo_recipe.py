# The demo's headline student (python demo.py): config/wan_dmd_3step.py's recipe at the demo's size, on top of
# config/demo_dmd.py, at train_dmd.py's default guidance (w = 3, standard CFG 4), trained for 1200 DMD steps.
# config/demo_w3.py + config/demo_w3_reg.py measure the same student with 2x the pairs and 2x their solver steps
# (bench/HISTORY.md "DMD's regression term on the demo world"); this file halves both to keep the demo's time.
real_score_guidance_scale = 3.0        # DMD2 form: x_c + 3(x_c - x_u), standard CFG 4 (train_dmd.py's default)
real_score_guidance_max_timestep = 650.0   # guidance only at sigma <= 0.65 (docs/recipe.md "The guidance interval")
ode_regression_weight = 0.25           # the regression term (docs/recipe.md "The regression term")
teacher_data_samples = 32              # its ODE pairs per caption (768), made once at the start of the run
teacher_data_steps = 24                # UniPC steps of those pairs
learning_rate = 2e-5                   # generator lr 0.4x demo_dmd.py's: balances the modes at w = 3
use_ema = True                         # the exported student is the EMA of the second half of the run
ema_update_interval = 1
ema_decay = 0.99
ema_start_step = 600                   # generator steps: the EMA follows the weights before it
