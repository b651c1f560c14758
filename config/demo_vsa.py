# python demo.py --teacher_preset=demo_p1 --more_students=config/demo_vsa.py --out_dir=out/demo_p1
# The demo's student with video sparse attention at a geometry where cube selection means something (bench/README.md
# "A sparse-attention (VSA) student on the same world"): the demo's clips and VAE (9 frames of 32x32 pixels, latent
# 3x4x4) with the teacher preset demo_p1, the demo teacher on 1x1x1 patches, i.e. 3x4x4 = 48 tokens (4x the default
# demo's 12; a larger frame would need a new VAE: the committed one is blind beyond 32x32 pixels and 9 frames).
# Cubes of 1x1x2 tokens (one latent frame, a 1x2 strip of its 4x4) make 3x4x2 = 24 cubes, and sparsity 0.8 keeps
# ceil(0.2 * 24) = 5 of them per query cube (about a fifth of the keys; every query cube still sees all 24 cube means
# through the gated coarse branch and, with train_dmd's default sparse_remainder, the unselected ones in its fine
# softmax). With the default demo teacher (12 tokens) use config/demo_sparse.py instead. Measured (three DMD seeds
# of 600 steps, 32 samples per caption, bench/README.md "At 48 tokens"): precision 0.91 / coverage 0.995 against the
# dense student's 0.906 / 1.000: within noise. Cubes of 1x2x2 (12, 3 kept): 0.88 / 0.97 with the remainder, 0.81 /
# 0.92 as VSA is published (sparse_remainder=False).
attention_sparsity = 0.8
sparse_cube = (1, 1, 2)
