"""
The DMD objective (docs/method.md, arXiv:2311.18828, arXiv:2405.14867): small pure functions over networks passed in as velocity
functions f(x, t, ctx) -> v. train_dmd.py's loop calls them; tests and bench/bench_gmm.py check them against closed
forms. The student's few-step rollout itself is flow.rollout (bidirectional) and flow.causal_rollout (block-wise),
the same code sample.py runs.
"""
import torch
import torch.nn.functional as F

import flow


def data_rollout(gen, x0, ctx, steps, k_exit):
    """The "data latent" mode (FastWan): noise a dataset latent x0 to t_k* and run the one student forward
    with gradient -> (x_g, t_from, t_to) as flow.rollout returns them."""
    s = steps[k_exit] / 1000
    x = (1 - s) * x0 + s * torch.randn_like(x0)
    x_g = x - s * gen(x, torch.full((x.shape[0],), steps[k_exit], device=x.device), ctx)
    return x_g, steps[k_exit], steps[k_exit + 1] if k_exit + 1 < len(steps) else 0.0


def exit_steps(seed, step, salt, n_steps, n_blocks, same=True, last_only=False):
    """The rollout's exit step per block (docs/method.md#the-rollout), identical on every rank without a broadcast: drawn from
    a generator seeded by (seed, trainer step, salt: 0 generator / 1 critic). same: one draw shared by all blocks
    (the bidirectional student is one block: the same draw as before the causal mode); last_only: the last step."""
    if last_only:
        return [n_steps - 1] * n_blocks
    g = torch.Generator().manual_seed((seed * 100003 + step) * 2 + salt)
    ks = torch.randint(n_steps, (1 if same else n_blocks,), generator=g).tolist()
    return ks * n_blocks if same else ks


def keep_last_frames(x_g, n, vae=None):
    """The last n latent frames of a longer rollout (Self-Forcing's num_training_frames > 21). With a VAE the first
    kept frame is re-encoded as an image latent (decode up to it, encode its last pixel frame alone) so the clip
    starts as a real clip does; that frame carries no gradient. x_g (B,C,F,H,W) -> (B,C,n,H,W)."""
    Fr = x_g.shape[2]
    if n >= Fr:
        return x_g
    if vae is None:
        return x_g[:, :, Fr - n:]
    with torch.no_grad():
        pixels = vae.decode(x_g[:, :, :Fr - n + 1].detach().float())         # (B,3,1+4(F-n),8H,8W)
        first = vae.encode(pixels[:, :, -1:]).to(x_g.dtype)                    # (B,C,1,H,W)
    return torch.cat([first, x_g[:, :, Fr - n + 1:]], 2)


def ode_regression_loss(gen, traj, x0, ctx, steps, starts):
    """ODE-init regression (CausVid, arXiv:2412.07772; Self-Forcing's initialisation): per sample and block a random index i of
    the student's steps; the block's frames are the teacher trajectory's state at steps[i] and its t is steps[i]
    (teacher forcing: one whole-clip causal pass with per-frame t); loss mean (x̂0 − x0_teacher)².
    traj (B,K,C,F,H,W) states at the K student timesteps; x0 (B,C,F,H,W) the teacher's final sample."""
    B, K, C, Fr, H, W = traj.shape
    blk = torch.tensor([sum(s <= f for s in starts) - 1 for f in range(Fr)])  # (F,) block of each frame
    idx = torch.randint(K, (B, len(starts)))[:, blk].to(traj.device)          # (B,F) trajectory index per frame
    x = traj.gather(1, idx[:, None, None, :, None, None].expand(B, 1, C, Fr, H, W)).squeeze(1)   # (B,C,F,H,W)
    t = torch.tensor(steps, dtype=torch.float32, device=traj.device)[idx]     # (B,F)
    v = gen(x, t if len(starts) > 1 else t[:, 0], ctx)
    pred = x - (t / 1000)[:, None, :, None, None] * v
    return F.mse_loss(pred.float(), x0.float()), t


def sparsity(c, step):
    """The generator's VSA sparsity at a trainer step: attention_sparsity, reached over sparsity_warmup_steps in 10
    equal stages from 0 (every cube selected: dense attention plus the gated coarse term, where a student starts;
    FastVideo decays VSA's sparsity in stages too). Stages, not a smooth ramp: a compiled model recompiles 10 times."""
    n = c["sparsity_warmup_steps"]
    return c["attention_sparsity"] * (min(10, step * 10 // n) / 10 if n > 0 else 1.0)


def guidance(c, step, t=None):
    """The teacher's guidance w at a trainer step: real_score_guidance_scale, ramped from 0 over guidance_warmup_steps.
    With the score timesteps t (B,): 0 where t > real_score_guidance_max_timestep (guidance in a limited interval,
    Kynkäänniemi et al. 2024: no guidance at the high noise levels where the modes are chosen) -> float or (B,1,1,1,1)."""
    n = c["guidance_warmup_steps"]
    w = c["real_score_guidance_scale"] * (min(1.0, (step + 1) / n) if n > 0 else 1.0)
    hi = c["real_score_guidance_max_timestep"]
    return w if t is None or hi >= 1000 or w == 0 else w * (t <= hi).float().view(-1, 1, 1, 1, 1)


def score_timesteps(batch, t_from, t_to, c, device):
    """Score timesteps (docs/method.md#the-score-window): uniform in the window, then shift, then the min/max ratio clamp -> (B,) float."""
    lo = t_to if c["ts_schedule"] else c["min_score_timestep"]
    hi = t_from if c["ts_schedule_max"] else 1000.0
    t = lo + (hi - lo) * torch.rand(batch, device=device)
    if c["timestep_shift"] > 1:
        t = flow.shift_timestep(t, c["timestep_shift"])
    return t.clamp(1000 * c["min_timestep_ratio"], 1000 * c["max_timestep_ratio"])


def guided_x0(net, x_t, t, ctx, neg_ctx, w):
    """x0 of a flow net with guidance in the DMD2 form: x̂_c + w(x̂_c − x̂_u); w = 0: conditional only; w a float or
    per sample (B,1,1,1,1)."""
    sig = (t / 1000).view(-1, 1, 1, 1, 1)
    x0 = x_t - sig * net(x_t, t, ctx)
    if torch.is_tensor(w) or w != 0:   # a per-sample w always runs both: skipping on w.any() would sync, and would let
                                       # FSDP ranks (their own t) run different numbers of sharded forwards
        x0 = x0 + w * (x0 - (x_t - sig * net(x_t, t, neg_ctx)))
    return x0


def dmd_loss(x_g, t, real, fake, ctx, neg_ctx, w_real, w_fake):
    """Generator loss (docs/method.md#the-generators-loss). Everything but x_g is no-grad; ∂L/∂x_g = g / numel exactly.
    -> (loss, g, stats) with g = nan_to_num((x̂_fake − x̂_real) / mean|x_g − x̂_real|) per sample."""
    with torch.no_grad():
        xg = x_g.detach().float()
        sig = (t / 1000).view(-1, 1, 1, 1, 1)
        x_t = (1 - sig) * xg + sig * torch.randn_like(xg)
        x_fake = guided_x0(fake, x_t, t, ctx, neg_ctx, w_fake).float()
        x_real = guided_x0(real, x_t, t, ctx, neg_ctx, w_real).float()
        norm = (xg - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        g = torch.nan_to_num((x_fake - x_real) / norm)
    loss = 0.5 * F.mse_loss(x_g.float(), (xg - g), reduction="mean")
    stats = {"x_g": xg, "x_real": x_real, "x_fake": x_fake}
    return loss, g, stats


def critic_loss(fake, x_g, t, ctx):
    """Flow matching on the student's samples (docs/method.md#the-critic): mean (F(x_t, t) − (ε − x_g))², x_g detached."""
    x_g = x_g.detach().float()
    sig = (t / 1000).view(-1, 1, 1, 1, 1)
    eps = torch.randn_like(x_g)
    pred = fake((1 - sig) * x_g + sig * eps, t, ctx)
    per_sample = (pred.float() - (eps - x_g)).square().mean(dim=(1, 2, 3, 4))
    return per_sample.mean(), per_sample.detach()
