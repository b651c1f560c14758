"""
Quality of a teacher/student pair: samples of every prompt over many seeds from three samplers — teacher 50 steps
(flow UniPC + CFG), teacher with the student's step count (the same UniPC + CFG), the DMD student (its steps) —
and a table of precision, coverage, mode TV and MMD to a second teacher-50 set (quality.py says what each
measures). Precision and coverage need captions the detector knows (the demo's synthetic world: "a red circle
moving left"); for any other prompt file only MMD is reported.

  python bench/bench_quality.py --teacher=out/demo/teacher --student=out/demo/dmd --prompts_file=out/demo/prompts.txt
  python bench/bench_quality.py --teacher=out/demo/teacher --student=out/demo/dmd,out/demo/dmd_vsa --labels=dense,vsa \
      --prompts_file=out/demo/prompts.txt --seeds=16 --guidance=2   # several students: one row each, one teacher set
  python bench/bench_quality.py --teacher=Wan-AI/Wan2.1-T2V-1.3B-Diffusers --student=out/wan_dmd_3step \
      --prompts_file=prompts.txt --height=480 --width=832 --num_frames=81 --seeds=4 --guidance=5 --negative_prompt=None
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import quality  # noqa: E402
import readers  # noqa: E402
import sample  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True, help="train_dmd output folder, or an adapter / full-weights file; "
                    "several, comma-separated: one row each against the same teacher samples")
    ap.add_argument("--labels", default="", help="comma-separated row names of the students (rows 'student-3 LABEL'); "
                    "default: the paths given")
    ap.add_argument("--teacher_rows", type=int, default=1, help="0: leave out the teacher-50 / teacher-3 rows (the "
                    "teacher-50 reference set of mode TV and MMD is sampled either way)")
    ap.add_argument("--prompts_file", required=True)
    ap.add_argument("--seeds", type=int, default=8, help="samples per prompt and sampler")
    ap.add_argument("--height", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    ap.add_argument("--num_frames", type=int, default=9)
    ap.add_argument("--steps", default="", help="student timesteps; default: the student folder's config.json")
    ap.add_argument("--guidance", type=float, default=3.0, help="teacher CFG, standard form")
    ap.add_argument("--shift", type=float, default=3.0, help="teacher schedule shift")
    ap.add_argument("--negative_prompt", default="", help="'None': Wan's default negative prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="", help="also write the table as JSON here")
    return ap.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    students = a.student.split(",")
    labels = a.labels.split(",") if a.labels else students
    if len(labels) != len(students):
        raise SystemExit(f"--labels: {len(labels)} names for {len(students)} students")
    steps = a.steps or sample.student_steps(students[0])   # as trained (warped when warp_denoising_step was set)
    steps = [float(s) for s in steps.split(",")]
    prompts = readers.read_lines(a.prompts_file)
    pair = quality.load_pair(a.teacher, students[0], None if a.negative_prompt == "None" else a.negative_prompt, a.device)
    names = ["student-3"] if len(students) == 1 else [f"student-3 {x}" for x in labels]
    pair["students"] = {names[0]: pair["students"]["student-3"]}
    for name, student in zip(names[1:], students[1:]):
        quality.add_student(pair, name, student)
    for s in pair["students"].values():
        s["steps"] = steps if a.steps else s["steps"] or steps     # --steps wins over the folders'
    rows = (("teacher-50", "teacher-3") if a.teacher_rows else ()) + tuple(names)
    table = quality.evaluate(pair, prompts, list(range(a.seeds)), (a.num_frames, a.height, a.width), steps, a.guidance,
                             a.shift, samplers=rows)
    print(quality.format_table(table))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(table, fh, indent=1)
    return table


if __name__ == "__main__":
    main()
