# The w = 3 demo student with DMD's regression term (README "Distillation settings", `ode_regression_weight`): on top
# of config/demo_dmd.py and config/demo_w3.py the student also regresses on the teacher's ODE pairs, 64 per caption,
# made once at the start of the run into OUT/dmd/teacher_ode with the real score's CFG 4 and its guidance bound 650
# (about 5 min on one CPU thread, half the DMD run; not in the demo's more_students for that reason):
#   python demo.py --dmd_config=config/demo_dmd.py,config/demo_w3.py,config/demo_w3_reg.py --dmd_steps=2400 --guidance_scale=4 --more_students= --out_dir=out/demo_w3_reg
# Measured (bench/README.md "DMD's regression term on the demo world"), DMD seeds 0 / 1 / 2 at 192 samples per
# caption: precision 0.967x / 0.970x / 0.971x teacher-50, coverage 1.000, no caption x band under half its teacher
# share (smallest 0.66 / 0.63 / 0.66); config/demo_w3.py alone 0.963x / 0.952x / 0.952x with 0 / 0 / 1 under half.
ode_regression_weight = 0.25           # 1 and 4 put caption bands under half their share (pairs at full CFG: 2 and 4)
teacher_data_samples = 64              # ODE pairs per caption (1536): 300 gave the mixture 1.85x, 1500 1.47x
teacher_data_steps = 48                # UniPC steps of the teacher's pairs (the causal stage's ode_teacher_steps)
