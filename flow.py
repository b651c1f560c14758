"""
Flow-matching math and samplers, apart from any network (minRF's idea): the model is a velocity function
v(x, t) -> (B,16,F,H,W) with t on the 0-1000 scale and σ = t/1000, x_σ = (1 − σ)·x0 + σ·ε, v = ε − x0, so
x0 = x_σ − σ·v. Everything here is a pure function of v, used alike by training (train_dmd.py), inference
(sample.py), teacher-made data (data.py) and the benchmarks:

- schedules: the shift, the warp of the student's steps, the teacher's n-step schedule (docs/wan21.md#the-scheduler);
- the teacher's samplers: flow UniPC (the reference) and Euler, classifier-free guidance;
- THE few-step rollout of the DMD student (docs/method.md#the-rollout), and its block-wise form for the causal student:
  training exits at a drawn step with the gradient there only; inference is the same rollout exiting at the
  last step. There is no second copy of it anywhere.
"""
import json
import os

import numpy as np
import torch

import model_wan as mw

# -----------------------------------------------------------------------------
# schedules

def shift_sigmas(sigmas, shift):
    """σ -> s·σ / (1 + (s−1)·σ), the flow shift toward high noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def shift_timestep(t, s):
    """1000·shift_s(t/1000) on the 0-1000 timestep scale."""
    return 1000 * shift_sigmas(t / 1000, s)


def parse_steps(text, name="denoising steps"):
    """"1000,757,522" (or a list) -> [1000.0, 757.0, 522.0]; an error naming `name` unless they decrease within
    (0, 1000]."""
    try:
        steps = [float(s) for s in (text if isinstance(text, (list, tuple)) else str(text).split(","))]
    except ValueError:
        steps = []
    if not steps or steps != sorted(steps, reverse=True) or not all(0 < s <= 1000 for s in steps):
        raise ValueError(f"{name} must decrease within (0, 1000], got {text!r}: the student's timesteps from the first "
                         "step to the last, e.g. 1000,757,522")
    return steps


def rollout_steps(steps, warp, shift):
    """The student's timesteps as trained and sampled: dmd_denoising_steps, warped (Self-Forcing's
    warp_denoising_step: t_k <- 1000·shift(t_k/1000)) when `warp`."""
    return [float(shift_timestep(torch.tensor(t), shift)) if warp else float(t) for t in steps]


def flow_schedule(n, shift, layout="diffusers"):
    """Teacher schedule (docs/wan21.md#the-scheduler) -> sigmas (n+1,) float32 ending in 0, timesteps (n,) int64 = int(1000σ).
    diffusers: linspace(1, 1/1000, n+1)[:-1], shifted, σ0 nudged below 1 by 1e-6; original: linspace(0.999, 0, n+1)[:-1]."""
    base = np.linspace(1, 1 / 1000, n + 1)[:-1] if layout == "diffusers" else np.linspace(0.999, 0, n + 1)[:-1]
    sig = shift_sigmas(base, shift)
    if abs(sig[0] - 1) < 1e-6:
        sig[0] -= 1e-6
    timesteps = torch.from_numpy(sig * 1000).to(torch.int64)
    return torch.from_numpy(np.append(sig, 0.0).astype(np.float32)), timesteps


def resolve_model_dir(source):
    """A teacher folder or hub id -> (local folder, layout "diffusers" | "original"). A hub id fetches only the
    small files here (model_index.json, config.json, scheduler/); each loader fetches its own weights."""
    src = str(source)
    if not os.path.exists(src):
        src = mw.resolve_hub(src, ["model_index.json", "config.json", "scheduler/*"])
    layout = "diffusers" if os.path.exists(os.path.join(src, "model_index.json")) else "original"
    return src, layout


def teacher_layout_shift(src):
    """A train_dmd teacher source -> (schedule layout, its reference shift). The built teachers ("tiny",
    "random:<preset>") have no folder: diffusers' layout and Wan 2.1's diffusers shift 3.0."""
    if src == "tiny" or src.startswith("random:"):
        return "diffusers", 3.0
    folder, layout = resolve_model_dir(src)
    return layout, reference_shift(folder, layout)


def reference_shift(src, layout):
    """The teacher's own sampling shift: the original repo's 5.0 for t2v, or diffusers' scheduler_config.json."""
    if layout == "original":
        return 5.0    # W generate.py: sample_shift 5.0 for t2v
    path = os.path.join(src, "scheduler", "scheduler_config.json")
    if os.path.exists(path):
        with open(path) as f:
            sc = json.load(f)
        for k in ("flow_shift", "shift"):
            if sc.get(k) is not None:
                return float(sc[k])
    print("notice: no flow_shift in scheduler/scheduler_config.json; using 3.0 (the Wan 2.1 diffusers value)")
    return 3.0


def initial_noise(batch, num_frames, height, width, seed, device):
    """diffusers' WanPipeline convention with a CPU generator -> (noise (B,16,1+(F−1)//4,H/8,W/8) fp32, generator)."""
    g = torch.Generator("cpu").manual_seed(seed)
    shape = (batch, 16, 1 + (num_frames - 1) // 4, height // 8, width // 8)
    return torch.randn(shape, generator=g, dtype=torch.float32).to(device), g

def flow_matching_loss(net, x0, ctx, shift):
    """Plain flow-matching loss on data latents (the demo's teacher; DMD's optional real-data term, docs/method.md#the-regression-term):
    σ = shift(u), u ~ U(0,1), mean (net(x_σ, 1000σ, ctx) − (ε − x0))²."""
    sig = shift_sigmas(torch.rand(x0.shape[0], device=x0.device), shift)
    eps = torch.randn_like(x0)
    s = sig.view(-1, 1, 1, 1, 1)
    return (net((1 - s) * x0 + s * eps, 1000 * sig, ctx).float() - (eps - x0)).square().mean()

# -----------------------------------------------------------------------------
# the teacher's samplers

def guided(dit, ctx, neg_ctx, scale, max_t=1000.0):
    """Velocity function with classifier-free guidance: two passes (cond, uncond), uncond + g·(cond − uncond).
    Guidance only at timesteps t <= max_t (0-1000; Kynkäänniemi et al. 2024), the conditional pass alone above it:
    the sampler's form of train_dmd's real_score_guidance_max_timestep. t (B,) holds one timestep (the samplers')."""
    def velocity(x, t):
        v = dit(x, t, ctx)
        if neg_ctx is None or (max_t < 1000 and float(t.max()) > max_t):
            return v
        v_u = dit(x, t, neg_ctx)
        return v_u + scale * (v - v_u)
    return velocity


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

# -----------------------------------------------------------------------------
# the few-step student: one rollout for training and inference

def randn_as(x, generator=None):
    """Fresh noise shaped as x: from `generator` (a CPU generator, then moved to x's device) or the global stream."""
    return torch.randn_like(x) if generator is None else torch.randn(x.shape, generator=generator).to(x.device)


def rollout(velocity, noise, steps, k_exit=None, generator=None, progress=None):
    """The DMD student's few-step rollout (docs/method.md#the-rollout, backward simulation). At each timestep t_k: predict
    x̂0 = x − σ_k·v(x, t_k), then re-noise x̂0 to σ_{k+1} with fresh noise. The steps before k_exit run without
    gradient; the step at k_exit is the only forward with gradient (as the caller's grad mode allows) and ends the
    rollout. Inference: k_exit None = the last step, every step with the pipeline's CPU generator.
    noise (B,C,F,H,W) -> (x̂0 (B,C,F,H,W), t_exit, t_next) with t_next = 0 after the last step."""
    k_exit = len(steps) - 1 if k_exit is None else k_exit
    x = noise
    with torch.no_grad():
        for k in range(k_exit):
            s, s_next = steps[k] / 1000, steps[k + 1] / 1000
            x0 = x - s * velocity(x, torch.full((x.shape[0],), steps[k], device=x.device))
            x = (1 - s_next) * x0 + s_next * randn_as(x0, generator)
            if progress is not None:
                progress.update(1)
    s = steps[k_exit] / 1000
    x0 = x - s * velocity(x, torch.full((x.shape[0],), steps[k_exit], device=x.device))
    if progress is not None:
        progress.update(1)
    return x0, steps[k_exit], steps[k_exit + 1] if k_exit + 1 < len(steps) else 0.0


def causal_rollout(block, noise, steps, exits, starts, context_noise=0.0, grad_from=0, generator=None,
                   on_block=None, progress=None):
    """The causal student's rollout, block by block (docs/method.md#the-causal-student, Self-Forcing). block(x, t, start_frame) runs one
    block of latent frames against the caller's KV cache (fresh or reset: it attends to itself and the cached
    earlier frames). Per block b (frames [starts[b], starts[b+1])): `rollout` exiting at exits[b] (with gradient
    there, none for blocks starting before grad_from), on_block(start_frame, x̂0) when given, then one no-grad
    pass on x̂0 noised to t = context_noise (fresh noise; clean at 0) that rewrites the block's cache entries for
    the later blocks (the cache holds detached k/v: no gradient crosses blocks; the last block's pass is skipped,
    nothing reads it). Inference: every exit at the last step, no grad.
    noise (B,C,F,H,W) -> (x̂0 (B,C,F,H,W), t_from, t_to): the score window (docs/method.md#the-score-window) spans every block's exit,
    t_from = the largest exit timestep, t_to = the smallest next timestep."""
    B, Fr = noise.shape[0], noise.shape[2]
    out, windows = [], []
    for b, (s, e) in enumerate(zip(starts, list(starts[1:]) + [Fr])):
        def velocity(x, t, s=s):
            return block(x, t, s)
        with torch.set_grad_enabled(torch.is_grad_enabled() and s >= grad_from):
            x0, t_from, t_to = rollout(velocity, noise[:, :, s:e], steps, exits[b], generator, progress)
        out.append(x0)
        windows.append((t_from, t_to))
        if on_block is not None:
            on_block(s, x0)
        if e < Fr:
            with torch.no_grad():
                sc = context_noise / 1000   # (the noise is drawn at 0 too: one generator stream for both uses)
                velocity((1 - sc) * x0.detach() + sc * randn_as(x0, generator), torch.full((B,), float(context_noise),
                                                                                        device=noise.device))
    return torch.cat(out, 2), max(w[0] for w in windows), min(w[1] for w in windows)
