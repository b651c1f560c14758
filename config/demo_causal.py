# A causal (block-wise) student of the demo's teacher, one of demo.py's more_students (out/demo/dmd_causal, the table's
# row "student-3 causal"): goes on top of config/demo_dmd.py with the keys demo.py fills in (teacher, prompts, 32x32,
# 3 latent frames). Each latent frame is a block of its own (3 blocks), clean context. As the headline student:
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_causal.py --more_students= --out_dir=out/demo_causal
# (teacher trajectories -> ODE-init regression -> causal DMD -> the same samples and quality table)
causal = True
num_frame_per_block = 1
independent_first_frame = False
same_step_across_blocks = False
context_noise = 0
real_score_guidance_max_timestep = 750.0   # guidance only at score t <= 750: coverage 0.819 -> 0.958 at precision
                                           # 0.932 -> 0.924 (bench/README.md "The causal student", issue 15)
