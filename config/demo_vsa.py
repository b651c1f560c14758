# python demo.py --teacher_preset=demo_p1 --dmd_config=config/demo_dmd.py --dmd_steps=600 --guidance_scale=2 --more_students=config/demo_vsa.py --out_dir=out/demo_p1
# The demo's w = 1 student with video sparse attention at a geometry where cube selection means something
# (bench/HISTORY.md "A sparse-attention (VSA) student on the same world"): the demo's clips and VAE (9 frames of 32x32
# pixels, latent 3x4x4) with the teacher preset demo_p1, the demo teacher on 1x1x1 patches, i.e. 3x4x4 = 48 tokens
# (4x the default demo's 12; a larger frame would need a new VAE: the committed one is blind beyond 32x32 pixels and
# 9 frames). Cubes of 1x1x2 tokens (one latent frame, a 1x2 strip of its 4x4) make 3x4x2 = 24 cubes, and sparsity 0.8
# keeps ceil(0.2 * 24) = 5 of them per query cube (about a fifth of the keys; every query cube still sees all 24 cube
# means through the gated coarse branch and, with train_dmd's default sparse_remainder, the unselected ones in its
# fine softmax). With the default demo teacher (12 tokens) use config/demo_sparse.py instead.
attention_sparsity = 0.8               # the fraction of key cubes each query cube skips
sparse_cube = (1, 1, 2)                # cube in patch tokens (latent frames, height/2, width/2)
