# python train_dmd.py config/wan_dmd_3step.py
# Wan2.1-T2V-1.3B-Diffusers distilled into a 3-step student (1000, 757, 522) at 480x832x81. SimpleTuner's DMD
# quickstart is train_dmd.py's defaults (generator step every trainer step, LoRA rank 128 on a shared frozen base,
# lr 2e-5 / 1e-5, 4000 steps, EMA), its guidance 3.0 read in the DMD2 form: w = 3, standard CFG 4, as Self-Forcing.
# This file adds the two settings that kept every mode at that guidance on the worlds we can measure (docs/recipe.md).
output_dir = "out/wan_dmd_3step"
prompts_file = "prompts/wan_dmd_starter.txt"   # 80 starter prompts; a real run wants 10k+ (README "Data, prompts, anchors")
real_score_guidance_max_timestep = 650.0   # guidance only at sigma <= 0.65, where a sample's mode is already
                                           # chosen: keeps the rare modes; the rule at the teacher's shift 3 (756
                                           # at shift 5: docs/recipe.md "The guidance interval")
ode_regression_weight = 0.25           # DMD's regression term on the teacher's ODE pairs: sharper, every mode kept
                                       # (docs/recipe.md "The regression term"); 1 and more cost modes
teacher_data_samples = 8               # ODE pairs per training prompt, made once at the start (640 here: about 8
                                       # H100-hours, as much as the DMD run; docs/recipe.md "What the pairs cost")
