# python train_dmd.py config/tiny.py config/tiny_causal.py
# The tiny teacher with a causal (block-wise) student on CPU: the tests' config for the causal mode. Goes on top of
# config/tiny.py. 4 latent frames (13 video frames) in 2 blocks of 2.
causal = True
num_frame_per_block = 2
independent_first_frame = False
same_step_across_blocks = False
context_noise = 0
num_training_frames = 4
validation_num_video_frames = 13
output_dir = "out/tiny_causal_dmd"
