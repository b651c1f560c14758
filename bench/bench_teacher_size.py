"""
A larger teacher for a smaller student, on the demo's world: does the real score from a bigger teacher lift a
demo-size student? Every stage reuses demo.py's own functions (dataset, VAE, flow-matching teacher, DMD student,
quality table); nothing of demo.py is changed.

  python bench/bench_teacher_size.py                                   # out/teacher_size/, stages skipped when done
  python bench/bench_teacher_size.py --stage=teachers                  # only the dataset, VAE and both teachers
  python bench/bench_teacher_size.py --dmd_seeds=0,1,2 --dmd_steps=600 --bench_seeds=16

- the small teacher: demo.py's (PRESETS["demo"], its training as demo.py does it) in OUT/small/teacher;
- the large teacher: the same with `--scale`: "depth" doubles num_layers (4 -> 8), "width" doubles dim and
  ffn_dim (128 -> 256, 512 -> 1024); the same data, steps, batch and lr, in OUT/large/teacher;
- students: the demo's DMD student (config/demo_dmd.py, full fine-tune of the small teacher's weights) per DMD seed,
  once with the small teacher as the real score (OUT/small/dmd_s<seed>) and once with
  `teacher_model_name_or_path` = the large teacher (OUT/large/dmd_s<seed>): the student's base stays the small one;
- the table: every row scored against ONE reference, the dataset itself (its latents for MMD², its caption x band
  counts for mode TV: 3 bands per caption, equally many clips each), so the two teachers' rows and every student
  are measured on the same scale; precision and coverage are the detector's (quality.py).
"""
import argparse
import dataclasses
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import demo  # noqa: E402
import model_wan as mw  # noqa: E402
import quality  # noqa: E402
from configurator import pick_threads  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--out", default="out/teacher_size")
    ap.add_argument("--stage", default="all", choices=("teachers", "students", "all"))
    ap.add_argument("--scale", default="depth", choices=("depth", "width"), help="what the large teacher doubles")
    ap.add_argument("--students", default="small,large", help="which teachers' students to train (stage students)")
    ap.add_argument("--dmd_seeds", default="0,1,2", help="DMD seeds (network init, noise, timesteps) per teacher")
    ap.add_argument("--dmd_steps", type=int, default=600, help="DMD trainer steps per student (demo.py: 600)")
    ap.add_argument("--bench_seeds", type=int, default=16, help="samples per caption and row")
    ap.add_argument("--threads", type=int, default=1)
    return ap.parse_args(argv)


def large_preset(scale):
    """The large teacher's WanConfig, registered as PRESETS["demo_large"]: twice the demo teacher's depth or width."""
    base = mw.PRESETS["demo"]
    cfg = dataclasses.replace(base, num_layers=2 * base.num_layers) if scale == "depth" else \
        dataclasses.replace(base, dim=2 * base.dim, ffn_dim=2 * base.ffn_dim, num_heads=2 * base.num_heads)
    mw.PRESETS["demo_large"] = cfg
    return cfg


def demo_config(a, out):
    """demo.py's defaults (its module globals, as its configure reads them) with this bench's out_dir and threads."""
    keys = {k: v for k, v in vars(demo).items() if not k.startswith("_") and isinstance(v, (int, float, str, bool))
            and not isinstance(v, type)}
    return dict(keys, out_dir=out, threads=a.threads, dmd_steps=a.dmd_steps, more_students="")


def teachers(a):
    """The small world (small_world), then the large teacher: the same data, VAE and training in its own folder."""
    c, latents = small_world(a)
    videos, caps, bands = demo.read_dataset(os.path.join(c["out_dir"], "data"))
    large, times = dict(c, out_dir=os.path.join(a.out, "large"), teacher_preset="demo_large"), {}
    demo.make_dataset(large, large["out_dir"], times)   # its own prompts.txt and copy of the VAE (same data)
    demo.make_vae(large, large["out_dir"], videos, caps, bands, times)
    demo.make_teacher(large, large["out_dir"], latents, caps, times)
    return c, latents


def small_world(a):
    """The dataset, VAE and small teacher alone (stages 1-3 of demo.py): its students need nothing of the large one."""
    c, times = demo_config(a, os.path.join(a.out, "small")), {}
    videos, caps, bands = demo.make_dataset(c, c["out_dir"], times)
    latents = demo.make_vae(c, c["out_dir"], videos, caps, bands, times)
    demo.make_teacher(c, c["out_dir"], latents, caps, times)
    return c, latents


def students(a, c, latents):
    """Per DMD seed: the demo student from the small teacher and from the large one (teacher_model_name_or_path in a
    config file written beside it; pretrained_model_name_or_path stays the small teacher, demo.make_student's)."""
    extra = os.path.join(a.out, "large_teacher.py")
    with open(extra, "w") as f:
        f.write(f"teacher_model_name_or_path = {os.path.abspath(os.path.join(a.out, 'large', 'teacher'))!r}\n")
    names = []
    for s in [int(x) for x in a.dmd_seeds.split(",")]:
        for who, more in (("small", ""), ("large", extra)):
            name = f"dmd_{who}_s{s}"
            if who in a.students.split(","):
                demo.make_student(dict(c, seed=s), c["out_dir"], latents, {}, more, name)
            names.append(name)
    return names


def data_reference(c, latents):
    """The dataset as the reference set: its latents (prompt-major like the samples: equal counts per caption) and
    its band counts per caption."""
    return dict(latents=latents, modes={p: [c["clips_per_mode"]] * quality.NUM_BANDS for p in quality.captions()})


def table(a, c, latents, names):
    """Rows: both teachers at 50 steps, then every student, all against the dataset."""
    out, shape = c["out_dir"], (c["num_frames"], c["size"], c["size"])
    ref, seeds = data_reference(c, latents), list(range(a.bench_seeds))
    small = quality.load_pair(os.path.join(out, "teacher"), os.path.join(out, names[0]))
    steps = small["students"]["student-3"]["steps"]
    for n in names:
        quality.add_student(small, n, os.path.join(out, n))
    args = (quality.captions(), seeds, shape, steps, c["guidance_scale"], c["flow_shift"])
    rows = {f"teacher-50 small ({demo_nparams(small['teacher'])})": None}
    rows.update(quality.evaluate(small, *args, samplers=("teacher-50", *names), reference=ref))
    rows[next(iter(rows))] = rows.pop("teacher-50")
    large = quality.load_pair(os.path.join(a.out, "large", "teacher"), os.path.join(out, names[0]))
    big = quality.evaluate(large, *args, samplers=("teacher-50",), reference=ref)["teacher-50"]
    rows = {f"teacher-50 large ({demo_nparams(large['teacher'])})": big, **rows}
    print(quality.format_table(rows).replace("teacher-50 |", "the dataset |"))
    for who in ("small", "large"):
        sel = [r for k, r in rows.items() if k.startswith(f"dmd_{who}_")]
        if sel:
            mean = {m: float(np.mean([r[m] for r in sel])) for m in ("precision", "coverage", "mode_tv", "mmd")}
            print(f"student from the {who} teacher, mean of {len(sel)} DMD seed(s): " +
                  ", ".join(f"{k} {v:.4f}" for k, v in mean.items()))
    with open(os.path.join(a.out, "quality.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def demo_nparams(dit):
    return f"{mw.num_params(dit) / 1e6:.2f}M params"


def main(argv=None):
    a = parse_args(argv)
    n, why = pick_threads(a.threads)
    torch.set_num_threads(n)
    print(f"torch threads: {n} ({why}); large teacher: {large_preset(a.scale)}")
    c, latents = teachers(a) if a.stage != "students" or "large" in a.students else small_world(a)
    if a.stage == "teachers":
        return None
    names = students(a, c, latents)
    if a.stage == "students":
        return None
    return table(a, c, latents, names)


if __name__ == "__main__":
    main()
