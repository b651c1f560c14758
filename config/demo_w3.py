# The demo's student at the seed's guidance, one of demo.py's more_students (out/demo/dmd_w3, the table's row
# "student-3 w3" beside teacher rows at CFG 4): goes on top of config/demo_dmd.py and trains 4x dmd_steps (demo.py's
# more_students_steps "w3=4": 2400 DMD steps). Alone:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_w3.py --dmd_steps=2400 --guidance_scale=4 --more_students= --out_dir=out/demo_w3
# Measured on this world (bench/README.md "The w = 3 student that meets issue 15's goal"), DMD seeds 0 / 1 / 2 at 192
# samples per caption: precision 0.963x / 0.952x / 0.952x teacher-50, coverage 1.000, caption x band cells under half
# their teacher share 0 / 0 / 1 (smallest 0.69 / 0.71 / 0.43; a teacher-like student has one in 18% of evaluations). What each key bought there: without the bound (or at 875) and at the demo's
# lr the rarest bands fall under half their share; at 1200 steps the same settings reach only 0.944x precision.
real_score_guidance_scale = 3.0        # DMD2 form: x_c + 3(x_c - x_u), standard CFG 4 (the seed's value)
real_score_guidance_max_timestep = 650.0   # guidance only at score t <= 650 (where a sample's band is already
                                           # chosen): at 875 the rarest bands fall to 0.32-0.45 of their share
learning_rate = 2e-5                   # generator lr 0.4x demo_dmd.py's: mode TV 0.19 -> 0.07-0.08
use_ema = True                         # the exported student is the EMA of the second half of the run
ema_update_interval = 1
ema_decay = 0.99
ema_start_step = 1200                  # generator steps: the EMA follows the weights before it
