"""
Quality of a teacher/student pair: samples of every prompt over many seeds from three samplers — teacher 50 steps
(flow UniPC + CFG), teacher with the student's step count (the same UniPC + CFG), the DMD student (its steps) —
and a table of
  precision  share of samples that show a valid mode of their caption (detector on decoded pixels: colour,
             direction, start band; the shape is reported apart, see demo.detect),
  coverage   share of each caption's modes produced over the seeds (mean over captions),
  mode TV    total variation between the sampler's caption x mode weights and a second teacher-50 set's (other
             seeds): does the student keep the teacher's balance of modes; teacher-50's own row is the noise floor,
  MMD        squared MMD (RBF kernel, median bandwidth) of the latents to that second teacher-50 set (its floor too).
Precision and coverage need captions the detector knows (demo.py's synthetic world: "a red circle moving left");
for any other prompt file only MMD is reported.

  python bench/bench_quality.py --teacher=out/demo/teacher --student=out/demo/dmd --prompts_file=out/demo/prompts.txt
  python bench/bench_quality.py --teacher=Wan-AI/Wan2.1-T2V-1.3B-Diffusers --student=out/wan_dmd_3step \
      --prompts_file=prompts.txt --height=480 --width=832 --num_frames=81 --seeds=4 --guidance=5 --negative_prompt=None
"""
import argparse
import copy
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import demo  # noqa: E402
import model_wan as mw  # noqa: E402
import sample  # noqa: E402
import train_dmd  # noqa: E402

SAMPLERS = ("teacher-50", "teacher-3", "student-3")


def load_pair(teacher, student, negative_prompt="", device="cpu"):
    """teacher: a pipeline folder / hub id; student: a train_dmd output folder (its merged transformer/) or an adapter
    / full-weights file -> dict(teacher, student DiTs, vae, text encoder, negative context, the student's causal
    settings or None)."""
    base = mw.load_dit(teacher).eval()
    vae = mw.load_vae(teacher).eval()
    te = train_dmd.text_encoder(teacher, torch.float32, "cpu", base)
    if os.path.isdir(os.path.join(student, "transformer")):
        stud = mw.load_dit(os.path.join(student, "transformer")).eval()
    else:
        stud = copy.deepcopy(base)
        sample.load_student(stud, student)
    neg = mw.WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    return dict(teacher=base.to(device), student=stud.to(device), vae=vae.to(device), te=te,
                neg=te.encode([neg]).to(device), device=device, causal=sample.read_causal_config(student))


@torch.no_grad()
def sample_videos(pair, name, prompts, seeds, shape, steps, guidance, shift, batch=48):
    """Every prompt x seed through sampler `name` -> (latents (N,16,T,h,w), videos (N,3,F,H,W) in [-1,1]),
    prompt-major. Sample (prompt i, seed s) starts from sample.initial_noise(seed s): the same noise for every sampler."""
    Fn, H, W = shape
    jobs = [(p, s) for p in prompts for s in seeds]
    lats, vids = [], []
    for i in range(0, len(jobs), batch):
        part = jobs[i:i + batch]
        ctx = pair["te"].encode([p for p, _ in part]).to(pair["device"])
        x = torch.cat([sample.initial_noise(1, Fn, H, W, s, pair["device"])[0] for _, s in part])
        if name == "student-3":
            gen = torch.Generator().manual_seed(part[0][1] + 7919 * i)
            cz = pair.get("causal")
            if cz:   # a causal student: block by block with the KV cache, as sample.py generates it
                lat = sample.causal_sample(pair["student"], ctx, x, steps, (cz["num_frame_per_block"],
                                           cz["independent_first_frame"]), cz["context_noise"], cz["window"], gen)
            else:
                lat = sample.student_sample(lambda x_, t_: pair["student"](x_, t_, ctx), x, steps, gen)
        else:
            n = 50 if name == "teacher-50" else len(steps)
            sig, ts = sample.flow_schedule(n, shift)
            ts = ts.to(x.device)
            lat = sample.unipc_sample(sample.guided(pair["teacher"], ctx, pair["neg"].expand(len(part), -1, -1), guidance), x, sig, ts)
        lats.append(lat.cpu())
        vids.append(pair["vae"].decode(lat).cpu())
    return torch.cat(lats), torch.cat(vids)


def mmd2(a, b):
    """Unbiased squared MMD between sample sets a (n,d) and b (m,d), RBF kernel with the median pairwise distance."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    z = torch.cat([a, b])
    d2 = torch.cdist(z, z).square()
    k = torch.exp(-d2 / d2[d2 > 0].median())
    n, m = len(a), len(b)
    kaa, kbb, kab = k[:n, :n], k[n:, n:], k[:n, n:]
    return float((kaa.sum() - kaa.trace()) / (n * (n - 1)) + (kbb.sum() - kbb.trace()) / (m * (m - 1)) - 2 * kab.mean())


def precision_coverage(videos, prompts, seeds):
    """Detector on every decoded sample -> (precision, coverage, per-caption mode counts, shape accuracy) or Nones
    when a prompt is not one of demo.py's synthetic captions (demo.detect says why the shape is kept apart)."""
    if not all(demo.parse_caption(p) for p in prompts):
        return None, None, None, None
    found = {p: [0] * demo.NUM_BANDS for p in prompts}
    valid = shape = 0
    for v, (p, _) in zip(videos, [(p, s) for p in prompts for s in seeds]):
        r = demo.detect(demo.to_uint8(v), p)
        shape += r["shape_ok"]
        if r["valid"]:
            valid += 1
            found[p][r["mode"]] += 1
    cov = np.mean([sum(n > 0 for n in modes) / demo.NUM_BANDS for modes in found.values()])
    return valid / len(videos), float(cov), found, shape / len(videos)


def mode_tv(found, ref):
    """Total variation between two {caption: [count per mode]} tables, each normalised over all its valid samples:
    0 = the same caption x mode weights, 1 = disjoint. Sensitive to mode balance, which precision and coverage are not."""
    a, b = (np.array([f[p] for p in ref], np.float64) for f in (found, ref))
    return float(0.5 * np.abs(a / max(a.sum(), 1) - b / max(b.sum(), 1)).sum())


def evaluate(pair, prompts, seeds, shape, steps, guidance, shift):
    """-> {sampler: {precision, coverage, mmd, mode_tv, seconds}} (+ the mode counts per caption). The reference
    is a second teacher-50 set (other seeds): teacher-50's own row is the noise floor of MMD and mode TV."""
    ref_seeds = [s + 100000 for s in seeds]
    ref, ref_vids = sample_videos(pair, "teacher-50", prompts, ref_seeds, shape, steps, guidance, shift)
    ref_found = precision_coverage(ref_vids, prompts, ref_seeds)[2]
    table = {}
    for name in SAMPLERS:
        t0 = time.perf_counter()
        lat, vids = sample_videos(pair, name, prompts, seeds, shape, steps, guidance, shift)
        prec, cov, found, shape_acc = precision_coverage(vids, prompts, seeds)
        table[name] = dict(precision=prec, coverage=cov, mmd=mmd2(lat, ref), shape=shape_acc,
                           mode_tv=None if found is None else mode_tv(found, ref_found),
                           seconds=time.perf_counter() - t0, modes=found)
    return table


def format_table(table):
    f = lambda v: "n/a" if v is None else f"{v:.3f}"
    lines = ["| sampler | precision | coverage | mode TV to teacher-50 | MMD² to teacher-50 | shape right | sampling + decode s |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {f(r['precision'])} | {f(r['coverage'])} | {f(r.get('mode_tv'))} | {r['mmd']:.4f} | {f(r['shape'])} "
              f"| {r['seconds']:.1f} |" for k, r in table.items()]
    return "\n".join(lines)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--teacher", required=True)
    ap.add_argument("--student", required=True, help="train_dmd output folder, or an adapter / full-weights file")
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
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    steps = a.steps or sample.student_steps(a.student)   # as trained (warped when warp_denoising_step was set)
    steps = [float(s) for s in steps.split(",")]
    with open(a.prompts_file) as fh:
        prompts = [line.strip() for line in fh if line.strip()]
    pair = load_pair(a.teacher, a.student, None if a.negative_prompt == "None" else a.negative_prompt, a.device)
    table = evaluate(pair, prompts, list(range(a.seeds)), (a.num_frames, a.height, a.width), steps, a.guidance, a.shift)
    print(format_table(table))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(table, fh, indent=1)
