# python demo.py --dmd_config=config/demo_dmd.py,config/demo_sparse.py --dmd_steps=600 --guidance_scale=2 --out_dir=out/demo_sparse
# The demo's w = 1 student with video sparse attention (README "Sparse attention and an 8-bit base"). The demo's latent
# is 3x4x4 (9 frames of 32x32 pixels), i.e. 3x2x2 = 12 patch tokens: cubes of 1x1x2 tokens make 6 cubes, and
# sparsity 0.8 keeps ceil(0.2 * 6) = 2 of them per query cube (the coarse stage sees all 6 cube means). A geometry
# with more cubes: config/demo_vsa.py (the teacher on 1x1x1 patches, 48 tokens, 12 cubes, 3 kept).
attention_sparsity = 0.8               # the fraction of key cubes each query cube skips
sparse_cube = (1, 1, 2)                # cube in patch tokens (latent frames, height/2, width/2)
