# The demo's student at the seed's guidance, one of demo.py's more_students (out/demo/dmd_w3, the table's row
# "student-3 w3" beside teacher rows at CFG 4): goes on top of config/demo_dmd.py. Alone:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_w3.py --guidance_scale=4 --more_students= --out_dir=out/demo_w3
real_score_guidance_scale = 3.0        # DMD2 form: x_c + 3(x_c - x_u), standard CFG 4 (the seed's value)
real_score_guidance_max_timestep = 875.0   # guidance only at score t <= 875: coverage 0.861 -> 0.972 at the same
                                           # precision (0.919 -> 0.922) on this world (bench/README.md, issue 15)
