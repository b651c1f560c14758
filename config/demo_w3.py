# The demo's student at the seed's guidance: goes on top of config/demo_dmd.py; the table's teacher rows then use
# the same target (standard CFG 4 = DMD2 w 3), so give demo.py --guidance_scale=4 too:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_w3.py --guidance_scale=4 --out_dir=out/demo_w3
real_score_guidance_scale = 3.0        # DMD2 form: x_c + 3(x_c - x_u), standard CFG 4 (the seed's value)
