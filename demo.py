"""
The whole story offline on a CPU in minutes: a synthetic captioned video dataset (real mp4s) -> a tiny Wan VAE
and a tiny Wan DiT teacher trained on it by flow matching (both committed in assets/, made by this file:
--vae_path= and --teacher_path= train them here) -> DMD distillation to a 3-step student with the
recipe of config/wan_dmd_3step.py at guidance w = 3, standard CFG 4 (train_dmd.train; docs/recipe.md) ->
side-by-side samples (teacher 50 steps, teacher 3 steps, student 3 steps) as mp4s and one contact-sheet PNG ->
the quality table of quality.py (precision, coverage, mode TV, MMD).

  python demo.py                                  # out/demo/; a rerun reuses each stage made with the same keys
  python demo.py --dmd_steps=100 --out_dir=out/d2 # override any key below; python demo.py --help
  python demo.py --more_students=config/demo_causal.py   # a causal student beside it (more rows, more minutes)
  python demo.py --dmd_config=config/demo_dmd.py --dmd_steps=600 --guidance_scale=2 --out_dir=out/demo_w1
                                                  # plain DMD at low guidance (w = 1), no recipe

The world and the detector are quality.py's: "a <colour> <shape> moving <direction>" (24 captions), 3 modes per
caption (the band the shape travels in), read back from decoded pixels by quality.detect.
The real model: skip the first three stages (teacher = a Wan 2.1 folder, your video folder as data) and point
train_dmd at config/wan_dmd_3step.py; bench/bench_quality.py then takes the pair and a prompt file.
"""
import hashlib
import json
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

import flow
import media
import model_wan as mw
import progress
import quality
import run_dir
import sample
import text_encoders
import train_dmd
import vae_wan
from configurator import fail, pick_threads

# -----------------------------------------------------------------------------
# defaults; override with a config file (python demo.py CONFIG.py) and --key=value
out_dir = "out/demo"           # every stage's output (dataset, vae, teacher, dmd, samples, quality.json)
seed = 0                       # dataset jitter, network init and sampling noise
threads = 0                    # torch CPU threads; 0: OMP_NUM_THREADS, else the free cores (cores - load): on a busy
                               # 2-core machine 2 threads ran 30x slower than 1
device = "cpu"                 # teacher training, DMD and sampling ("cuda": the same flow in seconds)
# (1) synthetic dataset
size = 32                      # frame height = width (pixels)
num_frames = 9                 # 1 + 4k video frames (9 -> 3 latent frames)
clips_per_mode = 4             # clips per (caption, band), start jittered within the band
# (2) VAE: the tiny WanVAE, trained as an autoencoder on the clips (a random VAE's latents decode to noise). That
# takes ~20 min on one core, so the demo copies the committed one (made by: python demo.py --vae_path= --vae_steps=2500)
vae_path = "assets/demo_vae"   # a WanVAE folder (diffusers vae/ layout) to use; "" = train one here
vae_base_dim = 16              # width of the tiny VAE trained here (vae_path="")
vae_steps = 2500               # its autoencoder training steps
vae_batch_size = 4             # clips per VAE training step
vae_lr = 5e-4                  # VAE AdamW learning rate
# (3) teacher: a Wan DiT (PRESETS[teacher_preset]) trained by flow matching on the clips' latents. That takes 2-3
# min on one core, so the demo copies the committed one when the keys below (and seed, size, num_frames,
# clips_per_mode, vae_path) are those it was made with (its made_with.json; made by: python demo.py --teacher_path=)
teacher_path = "assets/demo_teacher"   # a transformer folder (diffusers layout) to use; "" = train one here
teacher_preset = "demo"        # model_wan.PRESETS name of the teacher DiT
teacher_steps = 2000           # flow-matching training steps of the teacher
teacher_batch_size = 32        # clips per teacher training step
teacher_lr = 1e-3              # teacher AdamW learning rate
caption_dropout = 0.2          # caption -> "" with this probability: the unconditional branch for CFG
flow_shift = 3.0               # shift of the training timesteps and of the teacher's sampling schedule
# (4) DMD: train_dmd.py's config file(s, comma-separated) plus the keys the demo fills in (teacher, prompts, size,
# steps). A causal student ("config/demo_dmd.py,config/demo_causal.py") first gets the ODE init of README "A causal
# student": teacher trajectories (ode_seeds per caption, ode_teacher_steps UniPC steps with CFG), then ode_steps of
# regression, then DMD from there
dmd_config = "config/demo_dmd.py,config/demo_recipe.py"  # the headline student's config file(s)
dmd_steps = 1200               # its DMD trainer steps (max_train_steps)
dmd_pairs = 0                  # > 0: the ODE pairs per caption of the regression term (teacher_data_samples) instead
                               # of dmd_config's (32); they are made before DMD and take part of its time
# more students, each a config file on top of dmd_config, trained into <out_dir>/dmd_<name> (name: the file's stem
# without "demo_") and scored in the table beside the teachers at its own guidance (standard CFG = its
# real_score_guidance_scale + 1), e.g. config/demo_causal.py. "" = the headline only (the README's command)
more_students = ""             # config files of the students trained beside it, comma-separated
more_students_steps = ""       # NAME=FACTOR,...: such a student trains FACTOR x dmd_steps
ode_seeds = 16                 # causal student's ODE init: teacher trajectories per caption
ode_teacher_steps = 48         # UniPC steps of those trajectories
ode_steps = 600                # regression steps on them before DMD
# (5) samples and (6) the quality benchmark
guidance_scale = 4.0           # teacher CFG (standard form) of the samples and the table: the headline student's
                               # real_score_guidance_scale + 1 (set in dmd_config)
sample_prompts = 4             # captions shown in the contact sheet (rows: prompt x sampler)
bench_seeds = 16               # samples per caption and sampler in the quality table
# -----------------------------------------------------------------------------

# -----------------------------------------------------------------------------
# files: the clips as mp4s with sidecar captions (data.py reads them)

def write_dataset(root, size, num_frames, per_mode, seed):
    """Every caption x band x per_mode clips (quality.render) as mp4 + sidecar .txt caption (data.py reads them)."""
    rng = np.random.default_rng(seed)
    for i, cap in enumerate(quality.captions()):
        for band in range(quality.NUM_BANDS):
            for k in range(per_mode):
                stem = os.path.join(root, f"{i:02d}_b{band}_{k}")
                video = torch.from_numpy(quality.render(cap, band, size, num_frames, rng.uniform(-1, 1, 2)))
                media.write_mp4(stem + ".mp4", video.permute(3, 0, 1, 2).float() / 127.5 - 1)
                with open(stem + ".txt", "w") as f:
                    f.write(cap + "\n")


def read_dataset(root):
    """-> (videos (N,3,F,H,W) in [-1,1], captions [N], bands [N]) read back from the mp4s."""
    names = sorted(n[:-4] for n in os.listdir(root) if n.endswith(".mp4"))
    videos = [torch.from_numpy(media.read_mp4(os.path.join(root, n + ".mp4"))[0]) for n in names]
    caps = [open(os.path.join(root, n + ".txt")).read().strip() for n in names]
    bands = [int(n.split("_b")[1].split("_")[0]) for n in names]
    return torch.stack(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1, caps, bands

# -----------------------------------------------------------------------------
# the VAE and the teacher, trained here

def train_vae(videos, c, progress_png=None):
    """The tiny WanVAE as an autoencoder on the clips: MSE weighted 10x on object pixels (they are ~8% of the
    frame), noise on the latents so the decoder tolerates a DiT's imperfect samples, an L2 pull on them. The latent
    normalisation (latents_mean/std) is then set to the clips' statistics: the DiT sees unit-scale latents."""
    torch.manual_seed(c["seed"])
    vae = vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=c["vae_base_dim"], dim_mult=(1, 1, 1, 1), num_res_blocks=1))
    opt = torch.optim.Adam(vae.parameters(), lr=c["vae_lr"])
    bg = torch.tensor(quality.BACKGROUND).view(1, 3, 1, 1, 1) / 127.5 - 1
    t0 = time.perf_counter()
    for step in range(c["vae_steps"]):
        for g in opt.param_groups:   # cosine decay
            g["lr"] = c["vae_lr"] * 0.5 * (1 + np.cos(np.pi * step / c["vae_steps"]))
        x = videos[torch.randint(len(videos), (c["vae_batch_size"],))]             # (B,3,F,H,W)
        z = vae.encode(x)                                                          # (B,16,T,h,w)
        y = vae.decode(z + 0.05 * torch.randn_like(z))
        w = 1 + 9 * ((x - bg).abs().sum(1, keepdim=True) > 0.3).float()           # object pixels count 10x
        loss = (w * (y - x).square()).mean() + 1e-4 * z.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == c["vae_steps"] - 1:
            print(f"vae step {step:5d} | loss {loss.item():.4f} | {time.perf_counter() - t0:.0f}s", flush=True)
        if step % 500 == 0 and progress_png:   # reconstructions so far: rows clip, reconstruction
            with torch.no_grad():
                y = vae.decode(vae.encode(videos[:: len(videos) // 4][:4]))
            media.write_png(progress_png, media.contact_sheet(
                [media.to_uint8(v) for p in zip(videos[:: len(videos) // 4][:4], y) for v in p]))
    vae.eval()
    with torch.no_grad():
        z = torch.cat([vae.encode(videos[i:i + 16]) for i in range(0, len(videos), 16)])
    m, s = z.mean((0, 2, 3, 4)), z.std((0, 2, 3, 4))
    old_m, old_s = vae.latent_stats("cpu")
    vae.cfg.latents_mean = tuple((old_m.flatten() + old_s.flatten() * m).tolist())
    vae.cfg.latents_std = tuple((old_s.flatten() * s).tolist())
    return vae


def train_teacher(latents, caps, c):
    """Flow matching (flow.flow_matching_loss) of a Wan DiT on the clips' latents, TinyTextEncoder contexts,
    caption dropout to the empty prompt (the unconditional branch of CFG); AdamW, warmup + cosine."""
    torch.manual_seed(c["seed"])
    dev = c["device"]
    dit = mw.WanDiT(mw.PRESETS[c["teacher_preset"]]).to(dev)
    te = text_encoders.TinyTextEncoder(dit.cfg.text_dim)
    ctx, empty = te.encode(caps).to(dev), te.encode([""]).to(dev)                 # (N,512,D), (1,512,D)
    latents = latents.to(dev)
    opt = torch.optim.AdamW(dit.parameters(), lr=c["teacher_lr"], weight_decay=0.0)
    n, warm = c["teacher_steps"], 100
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * s / n)))
    t0 = time.perf_counter()
    bar = progress.bar(range(n), desc="teacher (flow matching)", unit="step")
    for step in bar:
        idx = torch.randint(len(latents), (c["teacher_batch_size"],)).to(dev)
        drop = (torch.rand(len(idx)) < c["caption_dropout"]).view(-1, 1, 1).to(dev)
        cb = torch.where(drop, empty, ctx[idx])
        loss = flow.flow_matching_loss(dit, latents[idx], cb, c["flow_shift"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if step % 500 == 0 or step == n - 1:
            tqdm.write(f"teacher step {step:5d} | flow loss {loss.item():.4f} | {time.perf_counter() - t0:.0f}s")
    return dit.cpu().eval()


def ode_init(dc, c, out, keys):
    """The causal student's first stage (README "A causal student"): teacher ODE trajectories at the student's steps
    (data.make_teacher_data with ode_pairs), then train_dmd's ode_init regression on them -> the init's folder
    (reused when made with `keys`, stage_keys' "ode_init")."""
    import data
    init_dir, pairs = os.path.join(out, "ode_init"), os.path.join(out, "ode_pairs")
    if fresh(init_dir, keys, "transformer", "the ODE init", old="aside") != "reuse":
        write_made_with(init_dir, keys)
        prompts = os.path.join(out, "ode_prompts.txt")
        with open(prompts, "w") as f:   # line i is sampled from seed + i: ode_seeds different noises per caption
            f.write("\n".join(quality.captions() * c["ode_seeds"]) + "\n")
        data.make_teacher_data(dc, prompts, pairs, c["ode_teacher_steps"], c["guidance_scale"], c["flow_shift"], ode_pairs=True)
        n = c["ode_steps"]
        train_dmd.train({**dc, "objective": "ode_init", "datasets": [dict(dataset_type="latents", cache_dir=pairs)],
                         "output_dir": init_dir, "max_train_steps": n, "checkpoint_step_interval": n,
                         "validation_step_interval": n, "ode_regression_weight": 0.0, "real_data_loss_weight": 0.0,
                         "teacher_data_samples": 0})   # the DMD terms and their data are the DMD stage's
    return init_dir

# -----------------------------------------------------------------------------
# the command line's mistakes, before stage 1 writes anything

COUNTS = ("clips_per_mode", "vae_steps", "vae_batch_size", "teacher_steps", "teacher_batch_size", "dmd_steps",
          "ode_seeds", "ode_teacher_steps", "ode_steps", "sample_prompts", "bench_seeds")


def check(c):
    """Every mistake of the keys, one line (exit status 2) before any stage runs: the size the VAE (8x) and the DiT
    (2x2 patches) take, 4k+1 frames, counts >= 1, config files that exist, more_students_steps' form."""
    if c["size"] < 16 or c["size"] % 16:
        fail("demo.py", f"--size={c['size']}: frame height = width must be a multiple of 16 (the VAE's 8x times the "
                        f"DiT's 2x2 patches), at least 16: give e.g. --size={max(16, c['size'] // 16 * 16)}")
    if c["num_frames"] < 5 or (c["num_frames"] - 1) % 4:
        k = max(1, round((c["num_frames"] - 1) / 4))
        fail("demo.py", f"--num_frames={c['num_frames']}: the VAE takes 4k+1 frames, k >= 1: give e.g. "
                        f"--num_frames={4 * k + 1}")
    for key in COUNTS:
        if c[key] < 1:
            fail("demo.py", f"--{key}={c[key]}: a count, at least 1: give a positive --{key} (default {globals()[key]})")
    here = os.path.dirname(os.path.abspath(__file__))
    for key in ("dmd_config", "more_students"):
        for f in filter(None, c[key].split(",")):
            if not os.path.isfile(os.path.join(here, f)):
                fail("demo.py", f"--{key}: {f}: no such file (paths are relative to the repository, e.g. "
                                f"{'config/demo_dmd.py' if key == 'dmd_config' else 'config/demo_causal.py'})")
    for name, _ in extra_students(c):   # a malformed more_students_steps fails here
        dmd_steps_of(c, name)

# -----------------------------------------------------------------------------
# a stage's output is reused on a rerun only when made with the same keys: its folder's made_with.json

MADE_WITH = "made_with.json"
VAE_KEYS = ("vae_base_dim", "vae_steps", "vae_batch_size", "vae_lr")   # the VAE trained here (vae_path="")
ODE_KEYS = ("ode_seeds", "ode_teacher_steps", "ode_steps", "guidance_scale")   # a causal student's ODE init


def stage_keys(c, stage, name="dmd", extra="", causal=False):
    """The keys that define `stage`'s output ("data", "vae", "teacher", "ode_init", "student"), with those of the
    stages it builds on (a new teacher remakes its students) and the config files' contents -> a JSON-ready dict."""
    keys = {k: c[k] for k in ("seed", "size", "num_frames", "clips_per_mode")}
    if stage != "data":
        keys.update(vae_path=c["vae_path"], **({} if c["vae_path"] else {k: c[k] for k in VAE_KEYS}))
    if stage not in ("data", "vae"):
        keys.update({k: c[k] for k in (*TEACHER_KEYS, "teacher_path")})
    if stage in ("ode_init", "student"):
        here = os.path.dirname(os.path.abspath(__file__))
        files = c["dmd_config"].split(",") + ([extra] if extra else [])
        keys.update(dmd_config=files, config_sha256=[hashlib.sha256(open(os.path.join(here, f), "rb").read())
                                                     .hexdigest()[:16] for f in files])
    if stage == "ode_init" or causal:
        keys.update({k: c[k] for k in ODE_KEYS})
    if stage == "student":
        keys.update(dmd_steps=dmd_steps_of(c, name), dmd_pairs=c["dmd_pairs"])
    return json.loads(json.dumps(keys))


def fresh(folder, keys, done, what, old="clear"):
    """-> "reuse" when folder's made_with.json holds `keys` and `done` (a path in it) exists, "resume" when only the
    keys match (training stopped half way), else "make": a folder made otherwise is named in one notice line and
    its old content cleared (old="clear"), overwritten (old="keep": a folder shared with other stages) or moved into
    a sibling folder (old="aside": a trained student; the teacher pairs stay, named by what made them)."""
    try:
        with open(os.path.join(folder, MADE_WITH)) as f:
            made = json.load(f)
    except (OSError, ValueError):
        made = None
    if made == keys:
        return "reuse" if os.path.exists(os.path.join(folder, done)) else "resume"
    held = os.path.isdir(folder) and (os.listdir(folder) if old != "keep" else  # "keep": a folder other stages share
                                      made is not None or os.path.exists(os.path.join(folder, done)))
    if held:
        why = ("it has no made_with.json (an older demo.py made it)" if not isinstance(made, dict) else "it was made "
               "with " + ", ".join("other config file contents" if k == "config_sha256" else f"{k}={made.get(k)!r} "
                                   f"(now {keys.get(k)!r})" for k in {**made, **keys} if made.get(k) != keys.get(k)))
        if old == "aside":
            why += f"; the old one moved to {run_dir.move_aside(folder)}"
        elif old == "clear":
            shutil.rmtree(folder)
        print(f"notice: remaking {what} in {folder}: {why}")
    os.makedirs(folder, exist_ok=True)
    return "make"


def write_made_with(folder, keys):
    with open(os.path.join(folder, MADE_WITH), "w") as f:
        json.dump(keys, f, indent=1)

# -----------------------------------------------------------------------------
# the six stages in order; each reuses its output when made with the same keys (fresh), and adds its seconds to `times`

def make_dataset(c, out, times):
    """(1) The clips in out/data (written when missing) and out/prompts.txt -> (videos (N,3,F,H,W), captions,
    bands)."""
    t0 = time.perf_counter()
    data_dir, keys = os.path.join(out, "data"), stage_keys(c, "data")
    n_clips = len(quality.captions()) * quality.NUM_BANDS * c["clips_per_mode"]
    if fresh(data_dir, keys, MADE_WITH, "the dataset") != "reuse" or \
            sum(n.endswith(".mp4") for n in os.listdir(data_dir)) != n_clips:
        write_dataset(data_dir, c["size"], c["num_frames"], c["clips_per_mode"], c["seed"])
        write_made_with(data_dir, keys)
    videos, caps, bands = read_dataset(data_dir)
    with open(os.path.join(out, "prompts.txt"), "w") as f:
        f.write("\n".join(quality.captions()) + "\n")
    times["data"] = time.perf_counter() - t0
    print(f"(1) dataset: {len(videos)} clips {tuple(videos.shape[1:])} of {len(quality.captions())} captions in {data_dir} "
          f"[{times['data']:.0f}s]")
    return videos, caps, bands


def make_vae(c, out, videos, caps, bands, times):
    """(2) The VAE in out/teacher/vae (a copy of vae_path, or trained here), its reconstructions of one clip per
    caption and band, and the detector on them (the ceiling of any sampler) -> the clips' latents (N,16,T,h,w)."""
    t0 = time.perf_counter()
    vae_dir, keys = os.path.join(out, "teacher", "vae"), stage_keys(c, "vae")
    if fresh(vae_dir, keys, MADE_WITH, "the VAE") != "reuse":
        if c["vae_path"]:
            vae_wan.save_vae(vae_wan.load_vae(os.path.join(os.path.dirname(os.path.abspath(__file__)), c["vae_path"])), vae_dir)
        else:
            vae_wan.save_vae(train_vae(videos, c, os.path.join(out, "vae_progress.png")), vae_dir)
        write_made_with(vae_dir, keys)
    vae = vae_wan.load_vae(vae_dir)
    with torch.no_grad():
        latents = torch.cat([vae.encode(videos[i:i + 16]) for i in range(0, len(videos), 16)])   # (N,16,T,h,w)
        pick = list(range(0, len(videos), c["clips_per_mode"]))                  # one clip per caption and band
        rec = torch.cat([vae.decode(latents[pick[i:i + 16]]) for i in range(0, len(pick), 16)])
    show = pick[:: max(1, len(pick) // 6)][:6]
    media.write_png(os.path.join(out, "vae_reconstruction.png"),
                    media.contact_sheet([media.to_uint8(v) for i in show for v in (videos[i], rec[pick.index(i)])],
                                        labels=[t for i in show for t in (f"clip: {caps[i]}", "vae reconstruction")]))
    ok = [quality.detect(media.to_uint8(r), caps[i]) for r, i in zip(rec, pick)]
    ceiling = np.mean([o["valid"] and o["mode"] == bands[i] for o, i in zip(ok, pick)])
    shape_acc = np.mean([o["shape_ok"] for o in ok])
    times["vae"] = time.perf_counter() - t0
    print(f"(2) VAE: latents {tuple(latents.shape[1:])}, reconstruction |err| {(rec - videos[pick]).abs().mean():.3f}, "
          f"detector on reconstructions: precision {ceiling:.3f}, shape {shape_acc:.3f} (ceilings for any sampler); "
          f"{out}/vae_reconstruction.png: rows clip, reconstruction [{times['vae']:.0f}s]")
    return latents


# the keys that define the teacher trained here: a committed teacher (teacher_path) stands in for it only when they match
TEACHER_KEYS = ("seed", "size", "num_frames", "clips_per_mode", "vae_path", "teacher_preset", "teacher_steps",
                "teacher_batch_size", "teacher_lr", "caption_dropout", "flow_shift")


def committed_teacher(c):
    """-> teacher_path's folder when it stands for the teacher c would train (its made_with.json holds c's
    TEACHER_KEYS; a folder without one is the user's choice, used as given), else None (with a notice)."""
    if not c["teacher_path"]:
        return None
    folder = os.path.join(os.path.dirname(os.path.abspath(__file__)), c["teacher_path"])
    try:
        with open(os.path.join(folder, "made_with.json")) as f:
            made = json.load(f)
    except FileNotFoundError:
        return folder
    differ = [f"{k}={c[k]!r} (it has {made.get(k)!r})" for k in TEACHER_KEYS if made.get(k) != c[k]]
    if differ:
        print(f"notice: training the teacher here: {c['teacher_path']} was made with other keys: {', '.join(differ)}")
        return None
    return folder


def make_teacher(c, out, latents, caps, times):
    """(3) The teacher DiT (the committed one, or trained here), saved as a diffusers-layout pipeline folder
    out/teacher whose prompts TinyTextEncoder embeds (text_encoders.TINY_TEXT_MARKER)."""
    t0 = time.perf_counter()
    teacher_dir, src, keys = os.path.join(out, "teacher"), None, stage_keys(c, "teacher")
    if fresh(teacher_dir, keys, os.path.join("transformer", "config.json"), "the teacher", old="keep") != "reuse":
        src = committed_teacher(c)
        dit = mw.load_dit(src, dtype=torch.float32) if src else train_teacher(latents, caps, c)
        mw.save_dit(dit, os.path.join(teacher_dir, "transformer"), layout="diffusers")
        asset = os.path.join(teacher_dir, "transformer", MADE_WITH)   # what a teacher_path= of this folder compares
        if src is None or os.path.exists(os.path.join(src, MADE_WITH)):   # (a match: the asset's own keys)
            with open(asset, "w") as f:
                json.dump({k: c[k] for k in TEACHER_KEYS}, f, indent=1)
        elif os.path.exists(asset):   # the user's own teacher: made with no keys of ours
            os.remove(asset)
        for name, text in (("model_index.json", json.dumps({"_class_name": "WanPipeline (demo.py)"})),
                           (text_encoders.TINY_TEXT_MARKER, "prompts are embedded by text_encoders.TinyTextEncoder\n")):
            with open(os.path.join(teacher_dir, name), "w") as f:
                f.write(text)
        write_made_with(teacher_dir, keys)
    times["teacher"] = time.perf_counter() - t0
    print(f"(3) teacher: {teacher_dir}" + (f" (a copy of {c['teacher_path']})" if src else "") + f" [{times['teacher']:.0f}s]")


def make_student(c, out, latents, times, extra="", name="dmd"):
    """(4) DMD: train_dmd.train on dmd_config (+ the `extra` config file) with the demo's teacher, prompts and sizes
    -> <out_dir>/<name>; a causal student first gets its ODE init (ode_init). A student made with other keys is
    moved aside and trained again; one stopped half way resumes."""
    t0 = time.perf_counter()
    dmd_dir = os.path.join(out, name)
    dc = student_config(c, out, latents.shape[2], extra, name)
    keys = stage_keys(c, "student", name, extra, dc["causal"])
    if fresh(dmd_dir, keys, "transformer", f"the student {name}", old="aside") != "reuse":
        write_made_with(dmd_dir, keys)
        if dc["causal"]:
            dc["generator_init"] = ode_init(dc, c, out, stage_keys(c, "ode_init", extra=extra))
        dc["overwrite_output_dir"] = not run_dir.checkpoints(dmd_dir)   # a start stopped before its checkpoint: aside
        train_dmd.train(dc)
        write_made_with(dmd_dir, keys)   # again: a stopped start's folder moved aside with its copy
    times[name] = time.perf_counter() - t0
    print(f"(4) DMD student: {dmd_dir}/transformer [{times[name]:.0f}s]")


def student_config(c, out, T, extra, name):
    """train_dmd's config of student `name`: dmd_config's files (+ `extra`) with the demo's teacher, prompts, size,
    T latent frames and steps."""
    here = os.path.dirname(os.path.abspath(__file__))
    files = c["dmd_config"].split(",") + ([extra] if extra else [])
    steps = dmd_steps_of(c, name)
    return train_dmd.config([os.path.join(here, f) for f in files] + [
        f"--{k}={v}" for k, v in dict(pretrained_model_name_or_path=os.path.join(out, "teacher"),
                                      output_dir=os.path.join(out, name), prompts_file=os.path.join(out, "prompts.txt"),
                                      height=c["size"], width=c["size"], num_training_frames=T, max_train_steps=steps,
                                      seed=c["seed"], device=c["device"], threads=c["threads"],
                                      validation_resolution=f"{c['size']}x{c['size']}",
                                      validation_num_video_frames=c["num_frames"], validation_prompt=quality.captions()[0],
                                      checkpoint_step_interval=steps, validation_step_interval=steps).items()]
        + ([f"--teacher_data_samples={c['dmd_pairs']}"] if c["dmd_pairs"] > 0 else []))


def dmd_steps_of(c, name):
    """A student's DMD trainer steps: dmd_steps times its more_students_steps factor (default 1); a malformed
    more_students_steps is one line (main checks it before any work)."""
    factors = {}
    for item in filter(None, c["more_students_steps"].split(",")):
        key, _, val = item.partition("=")
        try:
            factors[key] = float(val)
        except ValueError:
            factors[key] = 0.0
        if factors[key] <= 0:
            raise SystemExit(f"more_students_steps: '{item}' is not NAME=FACTOR with a factor > 0")
    return max(1, round(c["dmd_steps"] * factors.get(name.removeprefix("dmd_"), 1.0)))


def extra_students(c):
    """more_students -> [(name, config file)]: <out_dir>/dmd_<name>, the row "student-3 <name>"."""
    files = [f for f in c["more_students"].split(",") if f]
    return [(os.path.splitext(os.path.basename(f))[0].removeprefix("demo_"), f) for f in files]


def make_samples(c, out, times):
    """(5) The pair (quality.load_pair) on sample_prompts captions, one seed: out/samples/*.mp4 (the samplers side
    by side) and out/contact_sheet.png -> (the pair, the student's steps as trained), for the table."""
    t0 = time.perf_counter()
    pair = quality.load_pair(os.path.join(out, "teacher"), os.path.join(out, "dmd"), device=c["device"])
    steps = [float(s) for s in sample.student_steps(os.path.join(out, "dmd")).split(",")]   # as trained
    caps = quality.captions()
    prompts = [caps[(7 * i) % len(caps)] for i in range(c["sample_prompts"])]   # 7: every colour, shape, direction
    shape = (c["num_frames"], c["size"], c["size"])
    rows = []
    for i, p in enumerate(prompts):
        vids = {name: quality.sample_videos(pair, name, [p], [c["seed"]], shape, steps, c["guidance_scale"],
                                            c["flow_shift"])[1][0] for name in quality.SAMPLERS}
        media.write_mp4(os.path.join(out, "samples", f"{i}_{media.slug(p)}.mp4"), torch.cat(list(vids.values()), dim=-1))
        rows += [media.to_uint8(v) for v in vids.values()]
    labels = [f"{name}: {p}" for p in prompts for name in quality.SAMPLERS]   # rows: prompt x sampler
    sheet = media.write_png(os.path.join(out, "contact_sheet.png"), media.contact_sheet(rows, labels=labels))
    times["samples"] = time.perf_counter() - t0
    names = ", ".join(quality.SAMPLERS)
    print(f"(5) samples: {out}/samples/*.mp4 (left to right: {names}); contact sheet {sheet}: rows = "
          f"{' / '.join(prompts)}, each as {names}; columns = frames [{times['samples']:.0f}s]")
    return pair, steps


def make_table(c, out, pair, steps, times):
    """(6) quality.evaluate over every caption and bench_seeds seeds, printed and written to out/quality.json: the
    headline pair at guidance_scale, then every more_students student at its own guidance, beside teacher rows at
    that guidance (their names end in "CFG <g>" where it differs from guidance_scale)."""
    t0 = time.perf_counter()
    shape = (c["num_frames"], c["size"], c["size"])
    groups = {c["guidance_scale"]: ["student-3"]}
    for name, _ in extra_students(c):
        quality.add_student(pair, f"student-3 {name}", os.path.join(out, f"dmd_{name}"))
        with open(os.path.join(out, f"dmd_{name}", "config.json")) as f:
            groups.setdefault(json.load(f)["real_score_guidance_scale"] + 1.0, []).append(f"student-3 {name}")
    table = {}
    for cfg, students in groups.items():
        rows = quality.evaluate(pair, quality.captions(), list(range(c["bench_seeds"])), shape, steps, cfg,
                                c["flow_shift"], samplers=("teacher-50", "teacher-3", *students))
        tag = "" if cfg == c["guidance_scale"] else f" CFG {cfg:g}"
        table.update({k + (tag if k.startswith("teacher") else ""): v for k, v in rows.items()})
    print(quality.format_table(table))
    with open(os.path.join(out, "quality.json"), "w") as f:
        json.dump(table, f, indent=1)
    times["bench"] = time.perf_counter() - t0
    print(f"(6) quality table -> {out}/quality.json [{times['bench']:.0f}s]; stage times " +
          ", ".join(f"{k} {v:.0f}s" for k, v in times.items()))
    return table


def main(c):
    check(c)   # every mistake of the keys: one line, before any work
    n, why = pick_threads(c["threads"])
    torch.set_num_threads(n)
    print(f"torch threads: {n} ({why})")
    c = dict(c, threads=n)   # train_dmd gets the same count
    out, times = c["out_dir"], {}
    videos, caps, bands = make_dataset(c, out, times)
    latents = make_vae(c, out, videos, caps, bands, times)
    make_teacher(c, out, latents, caps, times)
    make_student(c, out, latents, times)
    for name, extra in extra_students(c):
        make_student(c, out, latents, times, extra, f"dmd_{name}")
    pair, steps = make_samples(c, out, times)
    return make_table(c, out, pair, steps, times)


if __name__ == "__main__":
    from configurator import configure
    main(configure(globals(), __file__))
