# A causal (block-wise) student of the demo's teacher (bench/HISTORY.md, "The causal student on the same world"): on top of
# config/demo_dmd.py, each latent frame a block of its own (3 blocks), clean context. As the headline student:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_causal.py --dmd_steps=600 --guidance_scale=2 --out_dir=out/demo_causal
# (teacher trajectories -> ODE-init regression -> causal DMD -> the same samples and quality table); beside the
# recipe's student: python demo.py --more_students=config/demo_causal.py
causal = True
num_frame_per_block = 1
same_step_across_blocks = False        # each block draws its own exit step
real_score_guidance_scale = 1.0        # w = 1 (standard CFG 2), as measured
real_score_guidance_max_timestep = 750.0   # guidance only at sigma <= 0.75: keeps the bands (docs/recipe.md)
