"""
Sample quality against a world with known modes: demo.py's synthetic captioned videos and a detector on decoded
pixels, and the metrics of a teacher/student pair over many seeds (bench/bench_quality.py is its command line).

The world: "a <colour> <shape> moving <direction>" (3 colours x 2 shapes x 4 directions = 24 captions). Each
caption has 3 modes: the band (of 3) across the motion axis the shape travels in. Clips jitter within the band,
so a detector on decoded pixels (`detect`) tells colour, shape, direction and mode, and coverage is measurable.

The samplers (SAMPLERS): teacher 50 steps (flow UniPC + CFG), teacher with the student's step count (the same
UniPC + CFG), the DMD student (its steps, sample.sample_student). The table (`evaluate`):
  precision  share of samples that show a valid mode of their caption (detector on decoded pixels: colour,
             direction, start band; the shape is reported apart, see `detect`),
  coverage   share of each caption's modes produced over the seeds (mean over captions),
  mode TV    total variation between the sampler's caption x mode weights and a second teacher-50 set's (other
             seeds): does the student keep the teacher's balance of modes; teacher-50's own row is the noise floor,
  mode share the smallest ratio of a caption's mode share to that set's, and how many modes are under half of it,
  MMD        squared MMD (RBF kernel, median bandwidth) of the latents to that second teacher-50 set (its floor too).
Precision and coverage need captions the detector knows; for any other prompt file only MMD is reported.
"""
import copy
import os
import time

import numpy as np
import torch

import flow
import media
import model_wan as mw
import progress
import sample
import text_encoders
import vae_wan

# -----------------------------------------------------------------------------
# the world: captions, clips, and a detector that reads them back

COLOURS = {"red": (220, 50, 50), "green": (50, 200, 60), "blue": (60, 90, 235)}
SHAPES = ("circle", "square")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}   # (dx, dy), y down
BACKGROUND = (30, 30, 30)
NUM_BANDS = 3


def captions():
    return [f"a {c} {s} moving {d}" for s in SHAPES for c in COLOURS for d in DIRECTIONS]


def parse_caption(caption):
    """"a red circle moving left" -> ("red", "circle", "left"), or None for any other prompt."""
    w = caption.lower().split()
    if len(w) == 5 and w[0] == "a" and w[1] in COLOURS and w[2] in SHAPES and w[3] == "moving" and w[4] in DIRECTIONS:
        return w[1], w[2], w[4]
    return None


def geometry(size, num_frames):
    """Radius, speed (px/frame) and band centres, all scaled with the frame size."""
    r = size * 5 / 32
    speed = size * 12 / 32 / (num_frames - 1)          # 12 px over the clip at 32 px
    bands = [size * (i + 1) / (NUM_BANDS + 1) for i in range(NUM_BANDS)]
    return r, speed, bands


def render(caption, band, size, num_frames, jitter=(0.0, 0.0)):
    """One clip -> uint8 (F, size, size, 3): the shape crosses the frame centre along its direction, in `band`
    across it; jitter (along, across) in pixels."""
    colour, shape, direction = parse_caption(caption)
    r, speed, bands = geometry(size, num_frames)
    dx, dy = DIRECTIONS[direction]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    out = np.empty((num_frames, size, size, 3), np.uint8)
    out[:] = BACKGROUND
    half = speed * (num_frames - 1) / 2
    for f in range(num_frames):
        along = size / 2 - half + speed * f + jitter[0]
        across = bands[band] + jitter[1]
        cx, cy = (along if dx > 0 else size - along, across) if dx else (across, along if dy > 0 else size - along)
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        else:
            mask = np.maximum(abs(xx - cx), abs(yy - cy)) <= 0.9 * r
        out[f][mask] = COLOURS[colour]
    return out


def detect(video, caption):
    """video uint8 (F,H,W,3) -> dict(valid, mode, colour, shape, direction, shape_ok): what the decoded pixels show.
    valid: one object of the caption's colour and direction, centred in one of its bands (a mode). The shape is
    judged apart (shape_ok): the demo's 4x4-latent VAE renders colour, place and motion but rounds the squares'
    corners (circle/square is at chance on its own reconstructions), so it cannot be part of a sampler's score."""
    want = parse_caption(caption)
    size, Fn = video.shape[1], video.shape[0]
    r, speed, bands = geometry(size, Fn)
    v = video.astype(np.float32)
    diff = np.abs(v - np.array(BACKGROUND, np.float32)).sum(-1)                # (F,H,W) L1 distance to the background
    res = dict(valid=False, mode=None, colour=None, shape=None, direction=None, shape_ok=False)
    loose = diff > 100
    if loose.sum() == 0:
        return res
    cols = v[loose].mean(0)
    res["colour"] = min(COLOURS, key=lambda k: np.abs(cols - np.array(COLOURS[k])).sum())
    contrast = np.abs(np.array(COLOURS[res["colour"]]) - np.array(BACKGROUND)).sum()
    fg = diff > 0.5 * contrast                                                 # the object's edge at half contrast
    areas = fg.sum((1, 2))
    expect = np.pi * r * r
    if (areas < 0.4 * expect).any() or (areas > 2.0 * expect).any():
        return res                                                             # missing in a frame, or a smear
    fills, cent = [], []
    for m in fg:
        ys, xs = np.nonzero(m)
        fills.append(len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1)))
        cent.append((xs.mean() + 0.5, ys.mean() + 0.5))
    res["shape"] = "square" if np.median(fills) > 0.9 else "circle"
    cent = np.array(cent)
    d = cent[-1] - cent[0]
    axis = int(abs(d[1]) > abs(d[0]))                                          # 0: x, 1: y
    if abs(d[axis]) < 0.5 * speed * (Fn - 1) or abs(d[1 - axis]) > 0.5 * abs(d[axis]):
        return res                                                             # not moving straight
    res["direction"] = {(0, 1): "right", (0, -1): "left", (1, 1): "down", (1, -1): "up"}[(axis, int(np.sign(d[axis])))]
    across = cent[:, 1 - axis].mean()
    band = int(np.argmin([abs(across - b) for b in bands]))
    if abs(across - bands[band]) <= 0.3 * size / (NUM_BANDS + 1):          # within the band, not between two
        res["mode"] = band
    res["valid"] = res["mode"] is not None and (res["colour"], res["direction"]) == (want[0], want[2])
    res["shape_ok"] = res["shape"] == want[1]
    return res

# -----------------------------------------------------------------------------
# a teacher/student pair and its samples

SAMPLERS = ("teacher-50", "teacher-3", "student-3")


def load_student(student, base=None):
    """A train_dmd output folder (its merged transformer/) or an adapter / full-weights file on a copy of `base` ->
    dict(dit, causal settings or None, steps as trained or None for a bare file)."""
    if os.path.isdir(os.path.join(student, "transformer")) and not sample.student_sparsity(student)[0]:   # VSA: gates
        dit = mw.load_dit(os.path.join(student, "transformer")).eval()
    else:
        dit = copy.deepcopy(base)
        sample.load_student(dit, student)
    steps = sample.student_steps(student) if os.path.isdir(student) else None
    return dict(dit=dit, causal=sample.read_causal_config(student),
                steps=[float(s) for s in steps.split(",")] if steps else None)


def load_pair(teacher, student, negative_prompt="", device="cpu"):
    """teacher: a pipeline folder / hub id; student: see load_student; negative_prompt None: Wan's default -> dict(
    teacher DiT, vae, text encoder, negative context, students {"student-3": load_student(student)}). More students
    join under other names (add_student) and become rows of the same table."""
    base = mw.load_dit(teacher).eval()
    vae = vae_wan.load_vae(teacher).eval()
    te = text_encoders.text_encoder(teacher, torch.float32, "cpu", base)
    neg = text_encoders.negative_prompt(negative_prompt)
    pair = dict(teacher=base.to(device), vae=vae.to(device), te=te, neg=te.encode([neg]).to(device), device=device,
                students={})
    add_student(pair, "student-3", student)
    return pair


def add_student(pair, name, student):
    """One more student (see load_student) in the pair, sampled as row `name` of evaluate's table."""
    s = load_student(student, pair["teacher"])
    pair["students"][name] = {**s, "dit": s["dit"].to(pair["device"])}


@torch.no_grad()
def sample_videos(pair, name, prompts, seeds, shape, steps, guidance, shift, batch=48, bar=None):
    """Every prompt x seed through sampler `name` -> (latents (N,16,T,h,w), videos (N,3,F,H,W) in [-1,1]),
    prompt-major. Sample (prompt i, seed s) starts from flow.initial_noise(seed s): the same noise for every sampler.
    bar: a tqdm bar, advanced by the samples done."""
    Fn, H, W = shape
    jobs = [(p, s) for p in prompts for s in seeds]
    lats, vids = [], []
    for i in range(0, len(jobs), batch):
        part = jobs[i:i + batch]
        ctx = pair["te"].encode([p for p, _ in part]).to(pair["device"])
        x = torch.cat([flow.initial_noise(1, Fn, H, W, s, pair["device"])[0] for _, s in part])
        if name in pair["students"]:   # a causal student runs block by block with the KV cache, as sample.py does
            s, gen = pair["students"][name], torch.Generator().manual_seed(part[0][1] + 7919 * i)
            lat = sample.sample_student(s["dit"], ctx, x, s["steps"] or steps, s["causal"], gen)
        else:
            n = 50 if name == "teacher-50" else len(steps)
            sig, ts = flow.flow_schedule(n, shift)
            ts = ts.to(x.device)
            lat = flow.unipc_sample(flow.guided(pair["teacher"], ctx, pair["neg"].expand(len(part), -1, -1), guidance), x, sig, ts)
        lats.append(lat.cpu())
        vids.append(pair["vae"].decode(lat).cpu())
        if bar is not None:
            bar.update(len(part))
    return torch.cat(lats), torch.cat(vids)

# -----------------------------------------------------------------------------
# the metrics and the table

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
    when a prompt is not one of the world's captions (`detect` says why the shape is kept apart)."""
    if not all(parse_caption(p) for p in prompts):
        return None, None, None, None
    found = {p: [0] * NUM_BANDS for p in prompts}
    valid = shape = 0
    for v, (p, _) in zip(videos, [(p, s) for p in prompts for s in seeds]):
        r = detect(media.to_uint8(v), p)
        shape += r["shape_ok"]
        if r["valid"]:
            valid += 1
            found[p][r["mode"]] += 1
    cov = np.mean([sum(n > 0 for n in modes) / NUM_BANDS for modes in found.values()])
    return valid / len(videos), float(cov), found, shape / len(videos)


def mode_tv(found, ref):
    """Total variation between two {caption: [count per mode]} tables, each normalised over all its valid samples:
    0 = the same caption x mode weights, 1 = disjoint. Sensitive to mode balance, which precision and coverage are not."""
    a, b = (np.array([f[p] for p in ref], np.float64) for f in (found, ref))
    return float(0.5 * np.abs(a / max(a.sum(), 1) - b / max(b.sum(), 1)).sum())


def mode_share_ratios(found, ref):
    """Over captions and their modes (those the reference produced): the mode's share of the caption's valid
    samples divided by its share in the reference (teacher-50, other seeds). 1 = as the teacher, 0 = a mode lost."""
    ratios = []
    for p, ref_counts in ref.items():
        n, n_ref = max(sum(found[p]), 1), max(sum(ref_counts), 1)
        ratios += [(c / n) / (r / n_ref) for c, r in zip(found[p], ref_counts) if r > 0]
    return ratios


def min_mode_share(found, ref):
    """The worst-kept mode: the smallest of mode_share_ratios; the goal is every mode at least half its
    teacher share (>= 0.5). One cell decides it, so it is noise-bound: teacher-50's own row is its floor."""
    ratios = mode_share_ratios(found, ref)
    return float(min(ratios)) if ratios else None


def modes_under_half(found, ref):
    """How many caption x mode cells hold less than half their reference share (a lost mode included): the goal
    is none; less noise-bound than the minimum, and teacher-50's own row is its floor too."""
    return sum(r < 0.5 for r in mode_share_ratios(found, ref))


def under_half_floor(found, ref, draws=2000, seed=0):
    """What modes_under_half reads for a student as good as the teacher: the student's and the reference's mode counts
    redrawn `draws` times from the reference's own shares, at their sizes (valid samples per caption) -> (mean count,
    share of draws with none). The column's floor: at 96 student seeds against 128 reference seeds even such a
    student has none only half the time (one rare mode of ~8 samples decides it), at 192 against 128 in 82-84%."""
    rng, counts = np.random.default_rng(seed), np.zeros(draws)
    for p, r in ref.items():
        r = np.asarray(r, np.float64)
        n_s, n_r = int(sum(found[p])), int(r.sum())
        if n_s == 0 or n_r == 0:
            continue
        a, b = rng.multinomial(n_s, r / n_r, size=draws), rng.multinomial(n_r, r / n_r, size=draws)
        ratio = (a / n_s) / np.maximum(b / n_r, 1e-12)
        counts += ((ratio < 0.5) & (b > 0)).sum(1)   # b > 0: a band this redraw of the reference has
    return float(counts.mean()), float((counts == 0).mean())


def reference_set(pair, prompts, ref_seeds, shape, steps, guidance, shift, bar=None):
    """The second teacher-50 set every row is measured against -> dict(latents, modes: its per-caption mode counts
    or None). A plain dict of a tensor and lists: bench_quality --reference saves it to score more students later."""
    lat, vids = sample_videos(pair, "teacher-50", prompts, ref_seeds, shape, steps, guidance, shift, bar=bar)
    return dict(latents=lat, modes=precision_coverage(vids, prompts, ref_seeds)[2])


def evaluate(pair, prompts, seeds, shape, steps, guidance, shift, samplers=SAMPLERS, ref_seeds=None, reference=None):
    """-> {sampler: {precision, coverage, mmd, mode_tv, min_mode_share, modes_under_half, under_half_floor, seconds}}
    (+ the mode counts per caption). The reference is a second teacher-50 set (ref_seeds, default: seeds + 100000,
    as many; or `reference`, a reference_set made before): teacher-50's own row is the noise floor of MMD, mode TV
    and the mode shares for rows of len(seeds) samples per caption. samplers: the rows, teacher-50 / teacher-3 (at `steps`)
    and names of pair's students (each at its own steps as trained, else `steps`)."""
    ref_seeds = [s + 100000 for s in seeds] if ref_seeds is None else list(ref_seeds)
    n_ref = 0 if reference is not None else len(ref_seeds)
    bar = progress.bar(total=len(prompts) * (n_ref + len(samplers) * len(seeds)), desc="quality table", unit="sample")
    if reference is None:
        reference = reference_set(pair, prompts, ref_seeds, shape, steps, guidance, shift, bar)
    ref, ref_found = reference["latents"], reference["modes"]
    table = {}
    for name in samplers:
        t0 = time.perf_counter()
        lat, vids = sample_videos(pair, name, prompts, seeds, shape, steps, guidance, shift, bar=bar)
        prec, cov, found, shape_acc = precision_coverage(vids, prompts, seeds)
        table[name] = dict(precision=prec, coverage=cov, mmd=mmd2(lat, ref), shape=shape_acc,
                           mode_tv=None if found is None else mode_tv(found, ref_found),
                           min_mode_share=None if found is None else min_mode_share(found, ref_found),
                           modes_under_half=None if found is None else modes_under_half(found, ref_found),
                           under_half_floor=None if found is None else under_half_floor(found, ref_found),
                           seconds=time.perf_counter() - t0, modes=found)
    bar.close()
    return table


def format_table(table):
    f = lambda v: "n/a" if v is None else f"{v:.3f}"   # noqa: E731
    count = lambda v, fl: "n/a" if v is None else f"{v} ({fl[0]:.2f}, {fl[1]:.0%})" if fl else str(v)   # noqa: E731
    lines = ["| sampler | precision | coverage | mode TV to teacher-50 | smallest mode share / teacher's "
             "| modes under half (floor: mean, P(none)) | MMD² to teacher-50 | shape right | sampling + decode s |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {k} | {f(r['precision'])} | {f(r['coverage'])} | {f(r.get('mode_tv'))} "
              f"| {f(r.get('min_mode_share'))} | {count(r.get('modes_under_half'), r.get('under_half_floor'))} "
              f"| {r['mmd']:.4f} | {f(r['shape'])} | {r['seconds']:.1f} |" for k, r in table.items()]
    return "\n".join(lines)
