"""
Sample videos to mp4 from a Wan 2.1 teacher (flow UniPC or Euler, classifier-free guidance) or from a
few-step DMD student (the sampler of shared/design/dmd.md §3: predict x0, re-noise, no CFG).

  python sample.py --prompt="a red fox running through snow"                          # teacher, 50 steps
  python sample.py --ckpt=out/wan_dmd_3step --prompt="a red fox running through snow"  # 3-step student
  python sample.py --model=/path/to/Wan2.1-T2V-1.3B --prompts_file=prompts.txt --num_frames=33
  python sample.py --ckpt=out/wan_causal_dmd --stream=True --num_frames=161  # causal student, streamed, rolled
  python sample.py --help

A causal student (its folder's config.json has "causal": true, written by train_dmd.py) is generated block by
block with the KV cache (causal_sample); --stream=True decodes and appends each block's frames to the mp4 as soon
as the block is done; num_frames beyond the training length rolls the cache window (num_training_frames latents).

Seeds follow diffusers' WanPipeline with a CPU generator: the same seed and settings give the same
initial noise, so teacher samples match diffusers' (tests/test_sample.py checks the latents).
"""
import math
import os
import re
import time

import torch
from tqdm import tqdm

import model_wan as mw

# -----------------------------------------------------------------------------
# defaults; override with config files (python sample.py CONFIG.py) and --key=value
model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # diffusers pipeline root or hub id, or an original-layout folder
ckpt = ""                    # student: adapter or full DiT .safetensors, or a train_dmd.py output folder
prompt = "A cat walks on the grass, realistic style."
prompts_file = ""            # one prompt per line; replaces `prompt`
negative_prompt = None       # None: Wan's default (Chinese) negative prompt; "": the empty prompt
height = 480                 # rounded down to a multiple of 16
width = 832                  # rounded down to a multiple of 16
num_frames = 81              # rounded to 4k+1
num_inference_steps = 50     # teacher steps
guidance_scale = 5.0         # teacher CFG scale, standard form: uncond + g*(cond - uncond); <= 1 disables CFG
flow_shift = None            # None: the layout's reference (diffusers: scheduler_config.json; original: 5.0)
sampler = "unipc"            # teacher sampler: "unipc" (the reference) or "euler"
denoising_steps = ""         # student timesteps, e.g. "1000,757,522"; given (or ckpt given) -> student mode
seed = 0                     # batch i uses seed + i
batch_size = 1               # prompts per DiT batch
out = "out/samples"          # folder for the mp4s (and latents)
save_latents = False         # also write the final normalised latents as safetensors
stream = False               # causal student: decode and write each block's frames as soon as it is generated
fps = 16
device = "auto"              # auto: cuda if available, else cpu
dtype = "auto"               # DiT and text-encoder dtype; auto: bfloat16 on cuda, float32 on cpu (the VAE stays fp32)
# -----------------------------------------------------------------------------

STUDENT_STEPS = "1000,757,522"   # the FastWan / seed 3-step schedule, when the ckpt has no train_dmd config.json

# -----------------------------------------------------------------------------
# schedules and samplers: pure functions over a velocity function v(x, t) -> (B,16,F,H,W)

def shift_sigmas(sigmas, shift):
    """σ -> s·σ / (1 + (s−1)·σ), the flow shift toward high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_schedule(n, shift, layout="diffusers"):
    """Teacher schedule (wan21.md §7.2) -> sigmas (n+1,) float32 ending in 0, timesteps (n,) int64 = int(1000σ).
    diffusers: linspace(1, 1/1000, n+1)[:-1], shifted, σ0 nudged below 1 by 1e-6; original: linspace(0.999, 0, n+1)[:-1]."""
    import numpy as np
    base = np.linspace(1, 1 / 1000, n + 1)[:-1] if layout == "diffusers" else np.linspace(0.999, 0, n + 1)[:-1]
    sig = shift_sigmas(base, shift)
    if abs(sig[0] - 1) < 1e-6:
        sig[0] -= 1e-6
    timesteps = torch.from_numpy(sig * 1000).to(torch.int64)
    return torch.from_numpy(np.append(sig, 0.0).astype(np.float32)), timesteps


def unipc_sample(velocity, x, sigmas, timesteps, progress=None):
    """Flow UniPC multistep, order 2, bh2, x0-prediction, lower order at the last step, final σ = 0
    (the corrector UniC at every step after the first). Scalars in fp32 as the references compute them.
    x (B,C,F,H,W) fp32 initial noise -> x0 (B,C,F,H,W)."""
    n, sigmas = len(timesteps), sigmas.cpu()             # scalars on the host, whatever device x is on
    lam = torch.log(1 - sigmas) - torch.log(sigmas)     # λ = log α − log σ (+inf at σ = 0)
    ms, x_prev, order_prev = [], None, 0                 # x0 predictions, last sample, last predictor order
    for k in range(n):
        s = sigmas[k]
        m = x - s * velocity(x, timesteps[k].float().expand(x.shape[0]))   # x0 prediction
        if k > 0:   # UniC: correct x_k with the new m, using the previous step's order
            h = lam[k] - lam[k - 1]
            hh = -h
            h_phi_1 = B_h = torch.expm1(hh)
            x_ = s / sigmas[k - 1] * x_prev - (1 - s) * h_phi_1 * ms[-1]
            if order_prev == 1:
                x = x_ - (1 - s) * B_h * 0.5 * (m - ms[-1])
            else:
                rk = (lam[k - 2] - lam[k - 1]) / h
                D1 = (ms[-2] - ms[-1]) / rk
                h_phi_k = h_phi_1 / hh - 1
                b = torch.stack([h_phi_k / B_h, (h_phi_k / hh - 0.5) * 2 / B_h])
                R = torch.stack([torch.ones(2), torch.stack([rk, torch.ones(())])])
                rho = torch.linalg.solve(R, b)
                x = x_ - (1 - s) * B_h * (rho[0] * D1 + rho[1] * (m - ms[-1]))
        ms = (ms + [m])[-2:]
        order = min(2, n - k, k + 1)
        x_prev, order_prev = x, order
        # UniP: predict x_{k+1}
        s_next = sigmas[k + 1]
        h = lam[k + 1] - lam[k]
        h_phi_1 = B_h = torch.expm1(-h)
        x_next = s_next / s * x - (1 - s_next) * h_phi_1 * m
        if order == 2:
            rk = (lam[k - 1] - lam[k]) / h
            x_next = x_next - (1 - s_next) * B_h * 0.5 * (ms[-2] - m) / rk
        x = x_next
        if progress is not None:
            progress.update(1)
    return x


def euler_sample(velocity, x, sigmas, progress=None):
    """Plain flow Euler: x ← x + (σ_next − σ)·v(x, 1000σ)."""
    for k in range(len(sigmas) - 1):
        x = x + (sigmas[k + 1] - sigmas[k]) * velocity(x, (1000 * sigmas[k]).expand(x.shape[0]))
        if progress is not None:
            progress.update(1)
    return x


def student_sample(velocity, x, steps, generator=None, progress=None):
    """DMD few-step sampler (dmd.md §3): x0 = x − σ_k·v(x, t_k); re-noise x0 to σ_{k+1} with fresh noise;
    return the last x0. steps: timesteps on the 0-1000 scale, σ_k = t_k/1000. x (B,C,F,H,W) fp32 noise."""
    x0 = x
    for k, t in enumerate(steps):
        s = t / 1000
        x0 = x - s * velocity(x, torch.full((x.shape[0],), float(t), device=x.device))
        if k + 1 < len(steps):
            s_next = steps[k + 1] / 1000
            eps = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
            x = (1 - s_next) * x0 + s_next * eps
        if progress is not None:
            progress.update(1)
    return x0


def causal_sample(dit, ctx, x, steps, causal, context_noise=0.0, window=None, generator=None, on_block=None,
                  progress=None):
    """Causal student, block by block (dmd.md §9): each block of latent frames runs the student sampler above
    with the KV cache (attending to itself and the cached earlier frames), then one more pass on its x0
    (re-noised to σ = context_noise/1000 with fresh noise; clean at 0) at t = context_noise writes the block's
    cache entries. causal = (num_frame_per_block, independent_first_frame); window: latent frames the cache
    holds (None: all), older ones roll out. on_block(start_frame, x0_block) is called as each block finishes.
    x (B,C,F,h,w) fp32 noise -> x0 (B,C,F,h,w)."""
    B, _, Fn, h, w = x.shape
    ph, pw = dit.cfg.patch_size[1:]
    starts = mw.block_starts(Fn, *causal) + [Fn]
    cache = dit.new_kv_cache(B, window or Fn, (h // ph) * (w // pw), device=x.device)
    out = torch.empty_like(x)
    for s, e in zip(starts[:-1], starts[1:]):
        def velocity(x_, t_, s=s):
            return dit(x_, t_, ctx, causal=causal, kv_cache=cache, start_frame=s)
        x0 = student_sample(velocity, x[:, :, s:e], steps, generator, progress)
        out[:, :, s:e] = x0
        if on_block is not None:
            on_block(s, x0)
        if e < Fn:   # the context pass: cache the block as the next blocks will see it
            sc = context_noise / 1000   # (the noise is drawn at 0 too: the same generator stream as train_dmd's)
            xc = (1 - sc) * x0 + sc * torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(x0.device)
            velocity(xc, torch.full((B,), float(context_noise), device=x.device))
    return out


def guided(dit, ctx, neg_ctx, scale):
    """Velocity function with classifier-free guidance: two passes (cond, uncond), uncond + g·(cond − uncond)."""
    def velocity(x, t):
        v = dit(x, t, ctx)
        if neg_ctx is None:
            return v
        v_u = dit(x, t, neg_ctx)
        return v_u + scale * (v - v_u)
    return velocity


def initial_noise(batch, num_frames, height, width, seed, device):
    """diffusers' WanPipeline convention with a CPU generator -> (noise (B,16,1+(F−1)//4,H/8,W/8) fp32, generator)."""
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, 16, 1 + (num_frames - 1) // 4, height // 8, width // 8)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device), g

# -----------------------------------------------------------------------------
# student weights, video files

def load_student(dit, path):
    """Put a student into `dit`: a LoRA adapter file (diffusers/PEFT keys or ours) becomes adapter "student"
    (and is selected); a full-weights file (either layout) replaces the base weights. A folder is searched for
    student_ema.safetensors, then student.safetensors (EMA weights preferred)."""
    from safetensors.torch import load_file
    if os.path.isdir(path):
        names = [n for n in ("student_ema.safetensors", "student.safetensors") if os.path.exists(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"{path}: no student_ema.safetensors or student.safetensors")
        path = os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"student checkpoint not found: {path!r}")
    sd = load_file(path)
    if any(".lora_A" in k for k in sd):
        try:
            mw.load_adapter(dit, "student", sd)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        mw.set_adapter(dit, "student")
        return "adapter"
    sd = {mw.diffusers_to_original_key(k.removeprefix("model.diffusion_model.")): v for k, v in sd.items()}
    own = dit.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path} does not fit the DiT: missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"wrong shapes {bad[:10]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return "full"


class Mp4Writer:
    """An H.264 mp4 (yuv420p, crf 17) kept open: write(video) appends frames as they come (streaming),
    close() flushes the encoder. video (3,F,H,W) in [−1,1]."""

    def __init__(self, path, fps=16):
        import av
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.path, self.container, self.stream = path, av.open(path, mode="w"), None
        self.fps = fps

    def write(self, video):
        import av
        frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
        if self.stream is None:
            self.stream = self.container.add_stream("libx264", rate=self.fps)
            self.stream.height, self.stream.width = frames.shape[1:3]
            self.stream.pix_fmt = "yuv420p"
            self.stream.options = {"crf": "17"}
        for fr in frames:
            self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(fr, format="rgb24")))

    def close(self):
        if self.stream is not None:
            self.container.mux(self.stream.encode())
        self.container.close()
        return self.path


def write_mp4(path, video, fps=16):
    """video (3,F,H,W) in [−1,1] -> H.264 mp4 (yuv420p) at fps, written with PyAV."""
    w = Mp4Writer(path, fps)
    w.write(video)
    return w.close()


def read_mp4(path):
    """-> (uint8 frames (F,H,W,3), fps)."""
    import av
    import numpy as np
    with av.open(path) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return frames, float(stream.average_rate)


def slug(text, n=40):
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_")[:n] or "prompt"

# -----------------------------------------------------------------------------

def student_config(ckpt):
    """The train_dmd config.json beside a student (its output folder, or the folder of a .safetensors file) -> dict,
    or {} when there is none."""
    import json
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def student_steps(ckpt):
    """The student's timesteps as trained: dmd_denoising_steps of its config.json, warped when warp_denoising_step
    was set (train_dmd.rollout_steps); STUDENT_STEPS when the folder has no such config -> "t1,t2,..."."""
    from train_dmd import rollout_steps
    cfg = student_config(ckpt)
    steps = cfg.get("dmd_denoising_steps", STUDENT_STEPS)
    steps = [float(t) for t in (steps if isinstance(steps, list) else str(steps).split(","))]
    return ",".join(map(str, rollout_steps(steps, cfg.get("warp_denoising_step"), float(cfg.get("timestep_shift", 1.0)))))


def read_causal_config(ckpt):
    """The causal keys of a student folder's config.json (train_dmd.py writes them) -> dict, or None for a
    bidirectional student (no config.json, or "causal" false). window: latent frames of the KV cache
    (num_training_frames; more frames than that roll it); dmd_denoising_steps as trained (student_steps)."""
    cfg = student_config(ckpt)
    if not cfg.get("causal"):
        return None
    keys = ("num_frame_per_block", "independent_first_frame", "context_noise", "num_training_frames")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"the config.json beside {ckpt} has \"causal\": true but lacks {missing}")
    return {"num_frame_per_block": int(cfg["num_frame_per_block"]),
            "independent_first_frame": bool(cfg["independent_first_frame"]),
            "context_noise": float(cfg["context_noise"]), "window": int(cfg["num_training_frames"]),
            "dmd_denoising_steps": student_steps(ckpt)}


def resolve_model_dir(source):
    """Local folder for `model` (a hub id downloads nothing here; each loader fetches its own files) and its layout."""
    src = str(source)
    if not os.path.exists(src):
        src = mw.resolve_hub(src, ["model_index.json", "config.json", "scheduler/*"])
    layout = "diffusers" if os.path.exists(os.path.join(src, "model_index.json")) else "original"
    return src, layout


def reference_shift(src, layout):
    if layout == "original":
        return 5.0    # W generate.py: sample_shift 5.0 for t2v
    path = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.exists(path):
        import json
        with open(path) as f:
            sc = json.load(f)
        for k in ("flow_shift", "shift"):
            if sc.get(k) is not None:
                return float(sc[k])
    print("notice: no flow_shift in scheduler/scheduler_config.json; using 3.0 (the Wan 2.1 diffusers value)")
    return 3.0


def generate(cfg):
    """Run sampling for a resolved config dict -> list of written mp4 paths (latents too when asked)."""
    c = dict(cfg)
    dev = torch.device(c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dt = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
          "float16": torch.float16, "float32": torch.float32}[c["dtype"]]
    H, W = c["height"] // 16 * 16, c["width"] // 16 * 16
    Fn = (max(c["num_frames"], 1) - 1) // 4 * 4 + 1
    if (H, W, Fn) != (c["height"], c["width"], c["num_frames"]):
        print(f"notice: size {c['num_frames']}x{c['height']}x{c['width']} -> {Fn}x{H}x{W} (frames 4k+1, sides multiples of 16)")
    if H < 16 or W < 16:
        raise ValueError(f"height and width must be at least 16, got {c['height']}x{c['width']}")
    if c["sampler"] not in ("unipc", "euler"):
        raise ValueError(f"sampler must be 'unipc' or 'euler', got {c['sampler']!r}")
    if c["prompts_file"]:
        with open(c["prompts_file"]) as f:
            prompts = [line.strip() for line in f if line.strip()]
    else:
        prompts = [c["prompt"]]
    student = bool(c["ckpt"] or c["denoising_steps"])
    causal = read_causal_config(c["ckpt"]) if c["ckpt"] else None
    stream = bool(c.get("stream", False))
    if causal is None and stream:
        raise ValueError("stream=True needs a causal student (ckpt folder whose config.json has \"causal\": true)")
    if causal is not None:
        T = 1 + (Fn - 1) // 4
        try:
            mw.block_starts(T, causal["num_frame_per_block"], causal["independent_first_frame"])
        except ValueError as e:
            raise ValueError(f"num_frames={Fn} ({T} latent frames) does not fit the causal student's blocks: {e}") from None
        if T > causal["window"]:
            print(f"notice: {T} latent frames > the {causal['window']} trained: the KV cache window rolls")
    default_steps = student_steps(c["ckpt"]) if c["ckpt"] else STUDENT_STEPS   # the steps it was trained on
    steps = [float(s) for s in (c["denoising_steps"] or default_steps).split(",")] if student else None
    if steps and (any(not 0 < s <= 1000 for s in steps) or steps != sorted(steps, reverse=True)):
        raise ValueError(f"denoising_steps must decrease within (0, 1000], got {c['denoising_steps']!r}")
    cfg_on = not student and c["guidance_scale"] > 1
    src, layout = resolve_model_dir(c["model"])
    shift = c["flow_shift"] if c["flow_shift"] is not None else reference_shift(src, layout)
    neg = mw.WAN_NEGATIVE_PROMPT if c["negative_prompt"] is None else c["negative_prompt"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    t0 = time.perf_counter()   # text encoding first, then free the encoder before the DiT comes in
    import train_dmd   # (UMT5, or a demo.py teacher's TinyTextEncoder)
    te = train_dmd.text_encoder(src, dt, dev)
    ctxs = [te.encode(prompts[i:i + c["batch_size"]]).to(dev, dt) for i in range(0, len(prompts), c["batch_size"])]
    neg_ctx = te.encode([neg]).to(dev, dt) if cfg_on else None
    del te
    sync()
    t_text = time.perf_counter() - t0

    dit = mw.load_dit(src, dtype=dt, device=dev)
    if c["ckpt"]:
        print(f"student: {load_student(dit, c['ckpt'])} weights from {c['ckpt']}")
    vae = mw.load_vae(src, dtype=torch.float32, device=dev)
    mode = (f"student {len(steps)} steps {','.join(f'{t:g}' for t in steps)}" if student else
            f"teacher {c['sampler']} {c['num_inference_steps']} steps, guidance {c['guidance_scale']}, shift {shift}")
    print(f"{len(prompts)} prompt(s), {Fn}x{H}x{W}, {mode}, {dev} {dt}")
    paths, t_dit, t_vae, t_first = [], 0.0, 0.0, None
    n_steps = len(steps) if student else c["num_inference_steps"]
    bar = tqdm(total=n_steps * len(ctxs), desc="denoising")
    for bi, ctx in enumerate(ctxs):
        B = ctx.shape[0]
        x, gen = initial_noise(B, Fn, H, W, c["seed"] + bi, dev)
        t0 = time.perf_counter()
        stems = [os.path.join(c["out"], f"{bi * c['batch_size'] + j:03d}_{slug(prompts[bi * c['batch_size'] + j])}"
                              f"_seed{c['seed'] + bi}") for j in range(B)]
        with torch.no_grad():
            if causal is not None:
                writers = [Mp4Writer(st + ".mp4", c["fps"]) for st in stems] if stream else None
                vae_cache = {}

                def on_block(s, x0):   # streaming: decode this block (continuing the VAE's causal cache), append
                    nonlocal t_first
                    video = vae.decode_stream(x0, vae_cache)
                    for j, wr in enumerate(writers):
                        wr.write(video[j])
                    if t_first is None:
                        sync()
                        t_first = time.perf_counter() - t0
                lat = causal_sample(dit, ctx, x, steps, (causal["num_frame_per_block"], causal["independent_first_frame"]),
                                    causal["context_noise"], causal["window"], gen, on_block if writers else None, bar)
            elif student:
                lat = student_sample(lambda x_, t_: dit(x_, t_, ctx), x, steps, gen, bar)
            else:
                velocity = guided(dit, ctx, None if neg_ctx is None else neg_ctx.expand(B, -1, -1), c["guidance_scale"])
                sigmas, timesteps = flow_schedule(c["num_inference_steps"], shift, layout)
                sigmas = sigmas.to(dev)
                lat = (unipc_sample(velocity, x, sigmas, timesteps.to(dev), bar) if c["sampler"] == "unipc"
                       else euler_sample(velocity, x, sigmas, bar))
            sync()
            t_dit += time.perf_counter() - t0   # streaming: DiT and VAE together
            t0 = time.perf_counter()
            video = None if stream else vae.decode(lat.float())   # (B,3,F,H,W) in [-1,1]
            sync()
            t_vae += time.perf_counter() - t0
        for j, stem in enumerate(stems):
            paths.append(writers[j].close() if stream else write_mp4(stem + ".mp4", video[j], c["fps"]))
            if c["save_latents"]:
                from safetensors.torch import save_file
                save_file({"latents": lat[j:j + 1].float().contiguous().cpu()}, stem + ".latents.safetensors")
    bar.close()
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    else:
        import resource
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    first = f" | first frames after {t_first:.2f}s" if t_first is not None else ""
    dit_vae = "DiT+VAE (streamed)" if stream else "DiT"
    print(f"done: text {t_text:.1f}s | {dit_vae} {t_dit:.1f}s | VAE decode {t_vae:.1f}s{first} | peak {peak} | "
          + ", ".join(paths))
    return paths


if __name__ == "__main__":
    from configurator import configure
    generate(configure(globals(), __file__))
