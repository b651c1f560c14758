# config/demo_w3.py plus DMD's regression term, as measured in bench/HISTORY.md ("DMD's regression term on the
# demo world"); config/demo_recipe.py is the same student with half the pairs and half their solver steps:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_w3.py,config/demo_w3_reg.py --dmd_steps=2400 --guidance_scale=4 --out_dir=out/demo_w3_reg
ode_regression_weight = 0.25           # a light term: heavier ones cost the rarest bands (docs/recipe.md)
teacher_data_samples = 64              # ODE pairs per caption (1536), made once at the start at the real score's guidance
teacher_data_steps = 48                # UniPC steps of those pairs
