"""
Quality of a teacher/student pair: samples of every prompt over many seeds from three samplers — teacher 50 steps
(flow UniPC + CFG), teacher with the student's step count (the same UniPC + CFG), the DMD student (its steps) —
and a table of precision, coverage, mode TV and MMD to a second teacher-50 set (quality.py says what each
measures). Precision and coverage need captions the detector knows (the demo's synthetic world: "a red circle
moving left"); for any other prompt file only MMD is reported.

  python bench/bench_quality.py --teacher=out/demo/teacher --student=out/demo/dmd --prompts_file=out/demo/prompts.txt
  python bench/bench_quality.py --teacher=out/demo_w3/teacher --student=out/demo_w3/dmd --guidance=4 \
      --more_students=s1=out/demo_w3_s1/dmd --prompts_file=out/demo_w3/prompts.txt --seeds=96 --ref_seeds=128 \
      --reference=out/ref_cfg4_128.pt   # the mode columns at a size where they mean something (bench/README.md)
  python bench/bench_quality.py --teacher=Wan-AI/Wan2.1-T2V-1.3B-Diffusers --student=out/wan_dmd_3step \
      --prompts_file=prompts.txt --height=480 --width=832 --num_frames=81 --seeds=4 --guidance=5 --negative_prompt=None
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import progress  # noqa: E402
import quality  # noqa: E402
import readers  # noqa: E402
import sample  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True, help="train_dmd output folder, or an adapter / full-weights file")
    ap.add_argument("--prompts_file", required=True)
    ap.add_argument("--more_students", default="", help="NAME=PATH,...: more students (as --student), rows "
                    "'student-3 NAME' of the same table, on the same teacher-50 reference")
    ap.add_argument("--seeds", type=int, default=8, help="samples per prompt and sampler")
    ap.add_argument("--ref_seeds", type=int, default=0, help="samples per prompt of the teacher-50 reference set "
                    "(mode TV, mode shares, MMD); default: --seeds. Teacher-50's row is the floor at either size")
    ap.add_argument("--reference", default="", help="a file for the teacher-50 reference set: made and saved when "
                    "missing, read when its settings match (score more students later without resampling it)")
    ap.add_argument("--teacher_rows", default="teacher-50,teacher-3", help="teacher rows of the table ('' for none: "
                    "students only, e.g. beside an earlier table of the same --reference)")
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


def more_students(spec):
    """"gm875=/tmp/a/dmd,s1=/tmp/b/dmd" -> [("gm875", "/tmp/a/dmd"), ("s1", "/tmp/b/dmd")]; a path that does not
    exist is one line naming it."""
    out = []
    for item in filter(None, spec.split(",")):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--more_students: '{item}' is not NAME=PATH")
        if not os.path.exists(path):
            raise SystemExit(f"--more_students: {path} does not exist")
        out.append((name, path))
    return out


def load_reference(a, prompts, ref_seeds, pair, shape, steps):
    """--reference: the saved teacher-50 reference set when it was made with these settings, else made (quality.
    reference_set) and saved; a file made with other settings is one line saying so."""
    key = dict(teacher=a.teacher, prompts=prompts, ref_seeds=len(ref_seeds), shape=list(shape), guidance=a.guidance,
               shift=a.shift, negative_prompt=a.negative_prompt)
    if os.path.exists(a.reference):
        saved = torch.load(a.reference, weights_only=True)
        other = [k for k in key if saved["key"].get(k) != key[k]]
        if other:
            raise SystemExit(f"--reference: {a.reference} was made with another {', '.join(other)}; give a new file")
        print(f"teacher-50 reference: {a.reference} ({len(ref_seeds)} seeds per prompt)")
        return saved
    print(f"teacher-50 reference: sampling {len(ref_seeds)} seeds per prompt -> {a.reference}")
    with progress.bar(total=len(prompts) * len(ref_seeds), desc="teacher-50 reference", unit="sample") as bar:
        reference = quality.reference_set(pair, prompts, ref_seeds, shape, steps, a.guidance, a.shift, bar)
    torch.save(dict(reference, key=key), a.reference)
    return reference


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = a.steps or sample.student_steps(a.student)   # as trained (warped when warp_denoising_step was set)
    steps = [float(s) for s in steps.split(",")]
    prompts = readers.read_lines(a.prompts_file)
    pair = quality.load_pair(a.teacher, a.student, None if a.negative_prompt == "None" else a.negative_prompt, a.device)
    pair["students"]["student-3"]["steps"] = steps                   # --steps wins over the folder's
    for name, path in more_students(a.more_students):
        quality.add_student(pair, f"student-3 {name}", path)          # each at its own steps as trained
    seeds, shape = list(range(a.seeds)), (a.num_frames, a.height, a.width)
    ref_seeds = list(range(100000, 100000 + (a.ref_seeds or a.seeds)))   # the default's seeds, maybe more of them
    reference = load_reference(a, prompts, ref_seeds, pair, shape, steps) if a.reference else None
    rows = [r for r in a.teacher_rows.split(",") if r] + list(pair["students"])
    table = quality.evaluate(pair, prompts, seeds, shape, steps, a.guidance, a.shift, samplers=rows,
                             ref_seeds=ref_seeds, reference=reference)
    print(quality.format_table(table))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(table, fh, indent=1)
    return table


if __name__ == "__main__":
    main()
