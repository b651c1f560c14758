"""
DMD against a closed form. A class-conditional Gaussian mixture whose exact flow-matching
velocity is known is the real score R; the trainer's own pure functions (flow.rollout, train_dmd's
score_timesteps, dmd_loss, critic_loss) distil a small MLP generator into a 3-step sampler (steps 1000,757,522).
Its samples are scored against exact samples of the target beside the exact 50-step sampler and plain 3-step
sampling.

  python bench/bench_gmm.py                        # w = 0 and w = 2 at interval 5, and w = 3 at the quickstart's interval 1
  python bench/bench_gmm.py --guidance 0 1 --interval 1 --steps 6000 --log
  python bench/bench_gmm.py --ablate --guidance 0    # ours -> plain DMD2 one change at a time, 3 seeds
  # DMD alone at its best (2.59x the exact 50-step MMD over 3 seeds; the default 3.31x):
  python bench/bench_gmm.py --guidance 0 --no-seed-setting --batch 512 --interval 2 --steps 6000 --lr-scheduler cosine --fake-hidden 256 --critic-error
  # every mode kept: DMD plus DMD's regression term (train_dmd's ode_regression_weight) on exact ODE pairs
  python bench/bench_gmm.py --guidance 0 --no-seed-setting --steps 15000 --ode-regression 4

The mixture: 3 classes x 4 isotropic modes (std 0.2) on a circle of radius 3 in 2 channels, the classes
interleaved around the circle, weights 4:3:2:1 within a class. Latents are (B, 2, 1, 1, 1), so train_dmd's
5-D functions run unchanged; the context is (B, 1, 3): a one-hot class row, zeros for "unconditional" (the
marginal over all classes, the negative context of guidance). Guidance is the DMD2 form x_c + w(x_c − x_u)
(standard CFG w + 1). CFG of a mixture is not a mixture: for w > 0 the target is the exact 50-step guided
sampler on twice as many samples with another seed (50 and 100 steps give the same metrics).

Metrics (per class, then averaged): MMD (biased, RBF kernels of bandwidth 0.5, 1.5 and 5 mode std) to the
target samples; precision = share of samples within 3 std of a mode of their own class (0.989 for exact
samples in 2-D); mode weights = shares of the in-mode samples per own-class mode: the largest absolute error
and the smallest ratio to the target's weight; coverage = share of modes holding >= 1/4 of their weight.
"""
import argparse
import copy
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow  # noqa: E402
import dmd  # noqa: E402

STEPS = [1000.0, 757.0, 522.0]   # SimpleTuner's DMD quickstart's dmd_denoising_steps
SCORE_T = dict(ts_schedule=True, ts_schedule_max=False, min_score_timestep=0, timestep_shift=1.0,
               min_timestep_ratio=0.02, max_timestep_ratio=0.98)   # train_dmd's defaults for the score timesteps

# -----------------------------------------------------------------------------
# the mixture, its exact velocity, exact samplers

def make_mixture(classes=3, modes=4, dim=2, radius=3.0, std=0.2, repeat=1, shift=3.0):
    """classes x modes isotropic Gaussians N(mu_i, std² I) in `dim` channels. The means sit on a circle in the first
    two channels (repeated in the next pairs of channels when repeat > 1: the same picture at a higher resolution,
    its modes sqrt(repeat) x farther apart), component i in class i % classes, so each class spans the whole circle;
    within a class the weights fall linearly (4:3:2:1 for 4 modes) so that wrong weights show. shift: the world's
    sampling shift (the exact samplers' flow shift; Wan 2.1's diffusers scheduler: 3).
    -> dict mu (N, dim) float64, weights (K, N) p(component | class), cls (N,), std, classes, shift."""
    n, dim = classes * modes, max(dim, 2 * repeat)
    ang = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    mu = torch.zeros(n, dim, dtype=torch.float64)
    for j in range(repeat):
        mu[:, 2 * j], mu[:, 2 * j + 1] = radius * ang.cos(), radius * ang.sin()
    cls = torch.arange(n) % classes
    within = torch.arange(modes, 0, -1, dtype=torch.float64)
    weights = torch.zeros(classes, n, dtype=torch.float64)
    for k in range(classes):
        weights[k, cls == k] = within / within.sum()
    return {"mu": mu, "weights": weights, "cls": cls, "std": std, "classes": classes, "shift": shift}


def context(mix, labels):
    """labels (B,) int, -1 = unconditional -> ctx (B, 1, K) float32: one-hot rows, zeros for -1."""
    ctx = torch.zeros(len(labels), 1, mix["classes"])
    on = labels >= 0
    ctx[on, 0, labels[on]] = 1.0
    return ctx


def component_prior(mix, ctx):
    """ctx (B, L, K) -> p(component) (B, N). The class distribution is the context summed over rows, normalised;
    an all-zero context is the uniform class distribution, i.e. the marginal mixture."""
    p = ctx.double().sum(1).clamp_min(0)                           # (B, K)
    tot = p.sum(1, keepdim=True)
    p = torch.where(tot > 0, p / tot.clamp_min(1e-30), torch.full_like(p, 1 / mix["classes"]))
    return p @ mix["weights"]                                      # (B, N)


def exact_velocity(mix, x, t, ctx):
    """E[eps − x0 | x_t], the exact flow-matching velocity of the mixture. x (B,C,1,1,1), t (B,) on 0-1000,
    ctx (B,L,K) -> v like x. Per component i: x_t | i ~ N((1−s)mu_i, var I), var = (1−s)²std² + s²; posterior
    r_i ∝ π_i N(x_t; (1−s)mu_i, var); with d = x_t − (1−s)mu_i, E[x0 | x_t, i] = mu_i + (1−s)std²/var·d and
    E[eps | x_t, i] = s/var·d. No division by s, so t = 0 and t = 1000 are exact. float64 inside."""
    B, C = x.shape[:2]
    xf = x.reshape(B, C).double()
    s = (t.double() / 1000).view(B, 1, 1)                          # (B,1,1)
    var = (1 - s) ** 2 * mix["std"] ** 2 + s ** 2                  # (B,1,1)
    d = xf[:, None, :] - (1 - s) * mix["mu"][None]                 # (B,N,C)
    logp = component_prior(mix, ctx).clamp_min(1e-300).log() - 0.5 * d.square().sum(-1) / var[..., 0]
    r = torch.softmax(logp, dim=1)[..., None]                      # (B,N,1); the shared normaliser cancels
    x0 = mix["mu"][None] + (1 - s) * mix["std"] ** 2 / var * d     # (B,N,C)
    eps = s / var * d
    return (r * (eps - x0)).sum(1).to(x.dtype).view(x.shape)


def real_score(mix):
    """The teacher R as train_dmd's networks look: f(x, t, ctx) -> v."""
    return lambda x, t, ctx: exact_velocity(mix, x, t, ctx)


def sample_mixture(mix, labels, gen):
    """Exact data samples: labels (B,) -> x0 (B,C,1,1,1) float32 (label -1: a class drawn uniformly)."""
    comp = torch.multinomial(component_prior(mix, context(mix, labels)), 1, generator=gen)[:, 0]
    C = mix["mu"].shape[1]
    x = mix["mu"][comp] + mix["std"] * torch.randn(len(labels), C, generator=gen, dtype=torch.float64)
    return x.float().view(-1, C, 1, 1, 1)


def guided(vel, ctx, w, max_t=1000.0):
    """f(x, t, ctx) -> the samplers' v(x, t) for fixed ctx with DMD2-form guidance v_c + w(v_c − v_u)
    (x0 = x − σv is linear in v, so this is dmd_loss's x̂_c + w(x̂_c − x̂_u) too), only at t <= max_t (train_dmd's
    real_score_guidance_max_timestep)."""
    neg = torch.zeros_like(ctx)
    def f(x, t):
        vc = vel(x, t, ctx)
        if w == 0 or float(t.reshape(-1)[0]) > max_t:
            return vc
        return vc + w * (vc - vel(x, t, neg))
    return f


def noise(mix, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, mix["mu"].shape[1], 1, 1, 1, generator=g), g


def exact_sample(mix, labels, n_steps, w, seed, shift=None):
    """Flow UniPC (flow.py) at the world's shift (mix["shift"]: 3 as Wan 2.1's diffusers scheduler) over the exact
    guided velocity."""
    x, _ = noise(mix, len(labels), seed)
    sigmas, timesteps = flow.flow_schedule(n_steps, mix["shift"] if shift is None else shift)
    return flow.unipc_sample(guided(real_score(mix), context(mix, labels), w), x, sigmas, timesteps)


def exact_trajectories(mix, labels, w, seed, n_steps=400, max_t=1000.0):
    """The teacher's ODE pairs in the form `python data.py --make_ode_pairs` writes them for train_dmd (the states at
    the student's steps and the end), here of the exact (guided) ODE from noise at t = 1000, solved by Heun on n_steps
    uniform σ steps plus STEPS (data.py runs UniPC on a schedule snapped onto them) -> (traj (B,K,C,1,1,1), x0
    (B,C,1,1,1), ctx). Its ends agree with exact UniPC-50's (tests/test_gmm.py)."""
    x, _ = noise(mix, len(labels), seed)
    ctx = context(mix, labels)
    f, x = guided(real_score(mix), ctx, w, max_t), x.double()
    grid = torch.cat([torch.linspace(1, 0, n_steps + 1, dtype=torch.float64),
                      torch.tensor(STEPS, dtype=torch.float64) / 1000]).unique().flip(0)
    states = {}
    for s0, s1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        states.update({t: x.float() for t in STEPS if abs(s0 - t / 1000) < 1e-9})
        v0 = f(x, torch.full((len(x),), 1000 * s0)).double()
        v1 = f(x + (s1 - s0) * v0, torch.full((len(x),), 1000 * s1)).double()
        x = x + (s1 - s0) * 0.5 * (v0 + v1)
    return torch.stack([states[t] for t in STEPS], 1), x.float(), ctx


def ode_anchor(pairs, weight, batch):
    """train_dmd's ode_regression_weight term on the pairs of exact_trajectories: G -> weight x dmd.ode_regression_loss
    on a random batch of them (a random student step per sample)."""
    traj, x0, ctx = pairs
    def loss(G):
        i = torch.randint(len(x0), (batch,))
        return weight * dmd.ode_regression_loss(G, traj[i], x0[i], ctx[i], STEPS, [0])[0]
    return loss


def few_step_sample(vel, mix, labels, seed, w=0.0):
    """The DMD student's sampler (flow.rollout exiting at the last step: x0 prediction, re-noise) at STEPS over
    f(x, t, ctx)."""
    x, g = noise(mix, len(labels), seed)
    with torch.no_grad():
        return flow.rollout(guided(vel, context(mix, labels), w), x, STEPS, generator=g)[0]

# -----------------------------------------------------------------------------
# the generator and the fake score: a small MLP velocity network

class MLP(torch.nn.Module):
    def __init__(self, dim, classes, hidden=128, depth=3, freqs=8):
        super().__init__()
        self.freqs = freqs
        layers, n_in = [], dim + classes + 2 * freqs
        for _ in range(depth):
            layers += [torch.nn.Linear(n_in, hidden), torch.nn.SiLU()]
            n_in = hidden
        self.net = torch.nn.Sequential(*layers, torch.nn.Linear(n_in, dim))

    def forward(self, x, t, ctx):
        """x (B,C,1,1,1), t (B,) on 0-1000, ctx (B,L,K) -> v (B,C,1,1,1)."""
        B = x.shape[0]
        f = (t.float() / 1000)[:, None] * math.pi * 2.0 ** torch.arange(self.freqs, device=x.device)   # (B,freqs)
        return self.net(torch.cat([x.reshape(B, -1), ctx.sum(1), f.sin(), f.cos()], dim=1)).view(x.shape)


class ResidualCritic(torch.nn.Module):
    """The fake score as the exact teacher plus a learned difference: F = R + (M - M_0), M a trainable copy of an MLP
    regressed on R (the init, or --fake-hidden's) and M_0 its frozen starting point, so F starts equal to R and
    learns on the MLP's pretrained features. This is what the trainer's critic is against its teacher (a copy, or the
    frozen teacher plus a zero-initialised LoRA adapter: equal at the first step); a plain MLP copy here starts off R
    by the init's own regression error. Measured: no better (bench/HISTORY.md, "What limits the student's MMD")."""
    def __init__(self, mix, net):
        super().__init__()
        self.mix, self.net = mix, copy.deepcopy(net)
        self.start = [copy.deepcopy(net).requires_grad_(False)]   # in a list: not a submodule, not in parameters()

    def forward(self, x, t, ctx):
        with torch.no_grad():
            fixed = exact_velocity(self.mix, x, t, ctx) - self.start[0](x, t, ctx)
        return self.net(x, t, ctx) + fixed


class ExactCritic(torch.nn.Module):
    """A perfect critic: E[x0 | x_t] of the generator's own distribution, exact for a bank of n fresh samples per class
    (the exits' outputs in equal parts, the mixture the trainer's critic learns), redrawn from G at every critic step
    in place of a gradient step (train_gmm_dmd calls refresh). What DMD does when the critic is not the limit."""
    def __init__(self, mix, n=6000):
        super().__init__()
        self.mix, self.n, self.bank = mix, n, None
        self.unused = torch.nn.Parameter(torch.zeros(()))   # the optimiser wants one

    def refresh(self, G):
        per_exit = self.n // len(STEPS)
        with torch.no_grad():
            self.bank = []
            for k in range(self.mix["classes"]):
                ctx = context(self.mix, torch.full((per_exit,), k))
                xs = [flow.rollout(lambda x, t: G(x, t, ctx), torch.randn(per_exit, 2, 1, 1, 1), STEPS, e)[0]
                      for e in range(len(STEPS))]
                self.bank.append(torch.cat(xs).reshape(-1, 2).double())

    def forward(self, x, t, ctx):
        B = x.shape[0]
        s = (t.double() / 1000).view(B, 1, 1)
        xf, labels, x0 = x.reshape(B, 1, -1).double(), ctx.sum(1).argmax(1), torch.empty(B, 2, dtype=torch.float64)
        for k, ref in enumerate(self.bank):
            rows = labels == k
            logits = -(xf[rows] - (1 - s[rows]) * ref[None]).square().sum(-1) / (2 * s[rows, :, 0] ** 2)   # (b,M)
            x0[rows] = logits.softmax(1) @ ref
        return ((xf[:, 0] - x0) / s[:, 0]).to(x.dtype).view(x.shape)


def pretrain(net, mix, iters=1500, batch=256, lr=2e-3, seed=0):
    """The stand-in for "initialised from the teacher": regress the exact velocity at x_t of mixture samples,
    t ~ U(0, 1000), conditional only (G and F only ever see a class). AdamW, cosine lr. -> final mse."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, iters)
    for _ in range(iters):
        labels = torch.randint(mix["classes"], (batch,), generator=g)
        ctx = context(mix, labels)
        x0 = sample_mixture(mix, labels, g)
        t = 1000 * torch.rand(batch, generator=g)
        s = (t / 1000).view(-1, 1, 1, 1, 1)
        x = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
        loss = (net(x, t, ctx) - exact_velocity(mix, x, t, ctx)).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return loss.item()


def init_net(mix, hidden, depth, iters, seed):
    """An MLP of `hidden` x `depth` drawn at torch seed `seed` and regressed on the exact velocity (`pretrain`, `iters`
    steps) -> (net, final mse)."""
    torch.manual_seed(seed)
    net = MLP(mix["mu"].shape[1], mix["classes"], hidden, depth)
    return net, pretrain(net, mix, iters, seed=seed)


def score_t(batch, t_from, t_to, window):
    """Score timesteps (B,) of the DMD loss and the critic for a rollout that exited at t_from (next step t_to).
    "ours": dmd.score_timesteps at its defaults (SCORE_T: U[t_to, 1000), clamped to [20, 980]);
    "uniform": U[20, 980) whatever the exit step, as DMD2's randint(min_step, max_step) at 2% / 98%."""
    if window == "ours":
        return dmd.score_timesteps(batch, t_from, t_to, SCORE_T, "cpu")
    lo, hi = 1000 * SCORE_T["min_timestep_ratio"], 1000 * SCORE_T["max_timestep_ratio"]
    return lo + (hi - lo) * torch.rand(batch)


def exit_step(exits):
    """The rollout's exit step k*: "uniform" over STEPS (docs/method.md#the-rollout) or "last" (last_step_only)."""
    return int(torch.randint(len(STEPS), ())) if exits == "uniform" else len(STEPS) - 1


def renormalise(x_g, loss, g, stats, normaliser):
    """dmd_loss's (loss, g) under another normaliser of x̂_fake − x̂_real -> (loss, g). "ours" returns them as they
    are: per sample / mean|x_g − x̂_real|, which is DMD's weighting (σ²/α · CS/‖μ_real − x‖₁ turns the score
    difference into this) and DMD2's code (grad = (p_real − p_fake) / |p_real|.mean over C,H,W). "none": g =
    x̂_fake − x̂_real; "batch": one mean|x_g − x̂_real| over the whole batch (no per-sample reweighting)."""
    if normaliser == "ours":
        return loss, g
    diff = stats["x_fake"] - stats["x_real"]                                   # (B,C,1,1,1)
    norm = (stats["x_g"] - stats["x_real"]).abs().mean() if normaliser == "batch" else 1.0
    g = torch.nan_to_num(diff / norm)
    return 0.5 * torch.nn.functional.mse_loss(x_g.float(), stats["x_g"] - g, reduction="mean"), g


def opt_step(net, opt, loss, grad_clip):
    """zero_grad, backward, grad-norm clip (None: none), step."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    opt.step()


@torch.no_grad()
def ema_step(G_ema, G, decay):
    """The generator's EMA after one of its steps: G_ema <- decay·G_ema + (1 − decay)·G."""
    for e, p in zip(G_ema.parameters(), G.parameters()):
        e.lerp_(p, 1 - decay)


def train_gmm_dmd(mix, teacher, w, iters=3000, interval=5, batch=128, lr=1e-3, fake_lr=1e-3, betas=(0.0, 0.999),
                  weight_decay=0.01, grad_clip=1.0, ema=0.99, seed=0, every=0, callback=None, window="ours",
                  critic_samples="fresh", normaliser="ours", exits="uniform", lr_scheduler="constant", fake_init=None,
                  nets=None, anchor=None, max_t=1000.0):
    """DMD as train_dmd.train's loop runs it, on train_dmd's own functions. G and F start as copies of `teacher`,
    R is the closed form, the negative context is zeros. Every step: a critic step on a fresh no-grad rollout;
    every `interval` steps first a generator step. Exit steps uniform over STEPS, score timesteps as docs/method.md#the-score-window with
    train_dmd's defaults, fake guidance off, AdamW, grad-norm clip. EMA of G after every generator step.
    -> the EMA generator. Every `every` steps: callback(step, G_ema, {dmd_loss, g_abs, fake_score_loss}).
    Ablation switches (the defaults are the trainer's behaviour): window "ours" | "uniform" (score_t, both
    networks); grad_clip None = no clipping; critic_samples "fresh" | "generator" (on generator steps the critic
    trains on that step's x_g, detached, with its own fresh score timesteps, as DMD2's guidance turn reuses the
    generator turn's images; other steps as "fresh"); normaliser "ours" | "none" | "batch" (renormalise);
    exits "uniform" | "last" (exit_step). lr_scheduler "constant" | "cosine": both lrs, per trainer step to 0 at
    `iters`, as train_dmd's lr_scheduler = fake_score_lr_scheduler = "cosine" without warmup. fake_init: the critic's
    initial network (None: a copy of `teacher`, as the trainer starts it). nets: a dict that receives the final G
    (not the EMA) and F as "G" and "F". anchor: G -> a loss added to each generator step's (ode_anchor: train_dmd's
    ode_regression_weight term). max_t: the real score's guidance only at score t <= max_t (dmd.guidance)."""
    for name, val, ok in (("window", window, ("ours", "uniform")), ("critic_samples", critic_samples,
                          ("fresh", "generator")), ("normaliser", normaliser, ("ours", "none", "batch")),
                          ("exits", exits, ("uniform", "last")), ("lr_scheduler", lr_scheduler, ("constant", "cosine"))):
        if val not in ok:
            raise ValueError(f"{name} must be one of {ok}, got {val!r}")
    torch.manual_seed(seed)
    G, Fk, R = copy.deepcopy(teacher), copy.deepcopy(fake_init or teacher), real_score(mix)
    if isinstance(Fk, ExactCritic):
        Fk.refresh(G)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    g_opt = torch.optim.AdamW(G.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    f_opt = torch.optim.AdamW(Fk.parameters(), lr=fake_lr, betas=betas, weight_decay=weight_decay)
    cosine = lr_scheduler == "cosine"
    decay = lambda i: 0.5 * (1 + math.cos(math.pi * min(1.0, i / iters))) if cosine else 1.0   # noqa: E731
    stepped = (g_opt,) if isinstance(Fk, ExactCritic) else (g_opt, f_opt)   # the exact critic never steps
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, decay) for o in stepped]
    shape = (batch, mix["mu"].shape[1], 1, 1, 1)
    neg = torch.zeros(batch, 1, mix["classes"])
    loss = g = torch.full((), float("nan"))
    for step in range(iters):
        fresh = True
        if step % interval == 0:   # generator (DMD) step
            ctx = context(mix, torch.randint(mix["classes"], (batch,)))
            eps = torch.randn(shape)
            x_g, t_from, t_to = flow.rollout(lambda x, t: G(x, t, ctx), eps, STEPS, exit_step(exits))
            t = score_t(batch, t_from, t_to, window)
            w_t = dmd.guidance(dict(real_score_guidance_scale=w, guidance_warmup_steps=0,
                                    real_score_guidance_max_timestep=max_t), step, t)
            loss, g, stats = dmd.dmd_loss(x_g, t, R, Fk, ctx, neg, w_t, 0.0)
            loss, g = renormalise(x_g, loss, g, stats, normaliser)
            opt_step(G, g_opt, loss if anchor is None else loss + anchor(G), grad_clip)
            ema_step(G_ema, G, ema)
            fresh = critic_samples == "fresh"
        if fresh:   # critic step on a fresh no-grad rollout
            ctx = context(mix, torch.randint(mix["classes"], (batch,)))
            with torch.no_grad():
                eps = torch.randn(shape)
                x_g, t_from, t_to = flow.rollout(lambda x, t: G(x, t, ctx), eps, STEPS, exit_step(exits))
        if isinstance(Fk, ExactCritic):   # its bank of G's samples redrawn in place of a gradient step
            Fk.refresh(G)
            loss_f = torch.zeros(())
        else:
            loss_f, _ = dmd.critic_loss(Fk, x_g, score_t(batch, t_from, t_to, window), ctx)   # x_g detached inside
            opt_step(Fk, f_opt, loss_f, grad_clip)
        for sc in scheds:   # per trainer step, whatever the interval (train_dmd.py does the same)
            sc.step()
        if every and (step + 1) % every == 0:
            callback(step + 1, G_ema, {"dmd_loss": loss.item(), "g_abs": g.abs().mean().item(),
                                       "fake_score_loss": loss_f.item()})
    if nets is not None:
        nets.update(G=G, F=Fk)
    return G_ema


def train_gmm_ode(teacher, pairs, gen_steps, batch=128, lr=1e-3, betas=(0.0, 0.999), weight_decay=0.01, grad_clip=1.0,
                  ema=0.99, seed=0):
    """The regression alone (train_dmd's objective="ode_init") on the pairs of exact_trajectories, with the generator
    settings of train_gmm_dmd, for gen_steps steps -> the EMA generator."""
    torch.manual_seed(seed)
    G = copy.deepcopy(teacher)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt = torch.optim.AdamW(G.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    anchor = ode_anchor(pairs, 1.0, batch)
    for _ in range(gen_steps):
        opt_step(G, opt, anchor(G), grad_clip)
        ema_step(G_ema, G, ema)
    return G_ema

# -----------------------------------------------------------------------------
# metrics

def kernel_mean(a, b, bandwidths):
    """Mean of a sum of RBF kernels over all pairs of rows of a (n, C) and b (m, C), in float64."""
    d2 = torch.cdist(a.double(), b.double()).square()
    return sum(torch.exp(-d2 / (2 * h * h)).mean() for h in bandwidths).item()


def mode_shares(mix, x, labels, radius=3.0):
    """-> (K, N): share of each class's samples within radius·std·sqrt(dim/2) of each mode (nearest mean); a row sums to the
    class's in-mode share."""
    d = torch.cdist(x.reshape(len(x), -1).double(), mix["mu"])
    dmin, near = d.min(1)
    near[dmin > radius * mix["std"] * (mix["mu"].shape[1] / 2) ** 0.5] = -1   # 2-D: 3 std (98.9%); more: wider
    out = torch.zeros(mix["classes"], len(mix["mu"]), dtype=torch.float64)
    for k in range(mix["classes"]):
        a = near[labels == k]
        out[k] = torch.bincount(a[a >= 0], minlength=len(mix["mu"])).double() / max(len(a), 1)
    return out


def own_weights(mix, shares):
    """(K, N) shares -> weights over each class's own modes, renormalised over its in-mode samples."""
    own = shares * (mix["weights"] > 0)
    return own / own.sum(1, keepdim=True).clamp_min(1e-12)


def target(mix, w, n, seed):
    """The target of guidance w: exact mixture samples for w = 0; for w > 0 the exact 50-step guided sampler, whose
    own in-mode shares are then the expected weights. Labels cycle through the classes. -> dict x: per class
    (n/K, C) samples, weights (K, N), bw: the MMD bandwidths (0.5, 1.5, 5 std), kyy: the target-target kernel
    mean per class (computed once)."""
    labels = torch.arange(n) % mix["classes"]
    if w == 0:
        x, weights = sample_mixture(mix, labels, torch.Generator().manual_seed(seed)), mix["weights"]
    else:
        x = exact_sample(mix, labels, 50, w, seed)
        weights = own_weights(mix, mode_shares(mix, x, labels))
    bw = [mix["std"] * f for f in (0.5, 1.5, 5.0)]
    per_class = [x[labels == k].reshape(-1, x.shape[1]) for k in range(mix["classes"])]
    return {"x": per_class, "weights": weights, "bw": bw, "kyy": [kernel_mean(y, y, bw) for y in per_class]}


def mode_metrics(mix, x, labels, expected):
    """Mode-level metrics of samples x (B,C,1,1,1) with labels (B,) against expected (K, N) own-mode weights -> dict
    precision, weight_err (max abs), min_weight_ratio, coverage (modes with >= 1/4 of their weight), weights (K, N)."""
    own = mix["weights"] > 0
    sh = mode_shares(mix, x, labels)
    wts = own_weights(mix, sh)
    ratio = (wts / expected.clamp_min(1e-12))[own]
    return {"precision": (sh * own).sum(1).mean().item(), "weight_err": (wts - expected).abs()[own].max().item(),
            "min_weight_ratio": ratio.min().item(), "coverage": (ratio >= 0.25).double().mean().item(),
            "weights": wts}


def evaluate(mix, x, labels, tgt):
    """Samples x (B,C,1,1,1) with labels (B,) against a `target` -> mode_metrics plus mmd (biased: the square root
    of the V-statistic, per class, averaged over the classes)."""
    m = 0.0
    for k, (y, kyy) in enumerate(zip(tgt["x"], tgt["kyy"])):
        xk = x[labels == k].reshape(-1, x.shape[1])
        m += max(kernel_mean(xk, xk, tgt["bw"]) + kyy - 2 * kernel_mean(xk, y, tgt["bw"]), 0.0) ** 0.5 / mix["classes"]
    return {"mmd": m, **mode_metrics(mix, x, labels, tgt["weights"])}

def empirical_x0(ref, x_t, t):
    """E[x0 | x_t] under the empirical distribution of ref (M, C) at one t on 0-1000: exact for that distribution."""
    s = t / 1000
    w = torch.softmax(-torch.cdist(x_t.double(), (1 - s) * ref.double()).square() / (2 * s * s), 1)
    return (w @ ref.double()).float()


def critic_error(mix, G, Fk, n_ref=20000, n_q=1000, ts=(30, 100, 250, 500, 750, 950), seed=0):
    """How well the critic knows the generator: at each t, the mean squared x0 error of F on noised samples
    of G's 3-step rollout against E[x0 | x_t] of G's own distribution (empirical over n_ref other samples, per
    class), beside the signal, the same distance for the exact R. F's error near the signal = a DMD gradient of
    mostly critic error. -> {t: (F error, signal)}, averaged over the classes."""
    torch.manual_seed(seed)
    out = {t: [0.0, 0.0] for t in ts}
    with torch.no_grad():
        for k in range(mix["classes"]):
            ctx = context(mix, torch.full((n_ref + n_q,), k))
            x = flow.rollout(lambda x, t: G(x, t, ctx), torch.randn(n_ref + n_q, 2, 1, 1, 1), STEPS)[0]
            ref, q = x[:n_ref].reshape(n_ref, -1), x[n_ref:]
            for t in ts:
                s, tt = t / 1000, torch.full((n_q,), float(t))
                x_t = (1 - s) * q + s * torch.randn_like(q)
                own = empirical_x0(ref, x_t.reshape(n_q, -1), t)
                for i, net in enumerate((Fk, real_score(mix))):
                    x0 = (x_t - s * net(x_t, tt, ctx[:n_q])).reshape(n_q, -1)
                    out[t][i] += (x0 - own).square().sum(1).mean().item() / mix["classes"]
    return {t: tuple(v) for t, v in out.items()}

# -----------------------------------------------------------------------------
# ablation: ours -> plain DMD2, one change at a time

ABLATIONS = [   # (row, train_gmm_dmd overrides, also in the long run); "lr" / "fake_lr": factors on --lr / --fake-lr
    ("ours (trainer defaults)", {}, True),
    ("window uniform [20, 980]", dict(window="uniform"), True),
    ("no grad clip", dict(grad_clip=None), True),
    ("critic on the generator's x_g", dict(critic_samples="generator"), True),
    ("normaliser none", dict(normaliser="none"), False),
    ("normaliser batch mean", dict(normaliser="batch"), False),
    ("last-step exits", dict(exits="last"), True),
    ("generator lr x0.1", dict(lr=0.1), False),
    ("critic lr x2", dict(fake_lr=2.0), False),
    ("plain without window (no clip + critic on x_g)", dict(grad_clip=None, critic_samples="generator"), True),
    ("plain without no-clip (window + critic on x_g)", dict(window="uniform", critic_samples="generator"), False),
    ("plain without critic (window + no clip)", dict(window="uniform", grad_clip=None), False),
    ("plain (window + no clip + critic on x_g)", dict(window="uniform", grad_clip=None, critic_samples="generator"),
     True),
]
ABLATE_COLUMNS = [("MMD / exact 50", "mmd_ratio"), ("precision", "precision"), ("in-mode spread", "spread"),
                  ("min weight ratio", "min_weight_ratio"), ("coverage", "coverage"), ("late coverage", "late_coverage"),
                  ("late min ratio", "late_ratio")]


def mode_spread(mix, x):
    """RMS distance of the in-mode samples (within 3 std of a mode) to the mode's mean, over its exact value
    (r² = std²·χ²₂ truncated at 3 std: E[r²] = 2·std²·0.949). 1 = the right width (exact samples: 1.00);
    < 1 = modes drawn too narrow, which precision rewards."""
    d = torch.cdist(x.reshape(len(x), -1).double(), mix["mu"]).min(1).values
    d = d[d <= 3 * mix["std"]]
    r2 = 2 * mix["std"] ** 2 * (1 - 4.5 * math.exp(-4.5) / (1 - math.exp(-4.5)))   # χ²₂/2 ~ Exp(1), cut at 4.5
    return (d.square().mean() / r2).sqrt().item()


def ablation_run(a, mix, teacher, tgt, w, interval, steps, seed, kw):
    """One DMD run of the ablation at `seed` with train_gmm_dmd overrides kw -> dict of the ABLATE_COLUMNS keys
    (mmd_ratio still absolute: the caller divides by the exact 50-step sampler's)."""
    kw = dict(kw)
    lr, fake_lr = a.lr * kw.pop("lr", 1.0), a.fake_lr * kw.pop("fake_lr", 1.0)
    labels = torch.arange(a.eval_n) % mix["classes"]
    late = []

    def check(step, G, rec):
        if step > steps // 2:
            late.append(mode_metrics(mix, few_step_sample(G, mix, labels, seed + 1), labels, tgt["weights"]))
    G = train_gmm_dmd(mix, teacher, w, steps, interval, a.batch, lr, fake_lr, seed=seed,
                      every=max(1, steps // 20), callback=check, **kw)
    x = few_step_sample(G, mix, labels, seed + 1)
    r = evaluate(mix, x, labels, tgt)
    return {"mmd_ratio": r["mmd"], "precision": r["precision"], "spread": mode_spread(mix, x),
            "min_weight_ratio": r["min_weight_ratio"], "coverage": r["coverage"],
            "late_coverage": min(m["coverage"] for m in late), "late_ratio": min(m["min_weight_ratio"] for m in late)}


def ablate(a, mix):
    """--ablate: every ABLATIONS row at each --guidance (at --interval) and w = 3 at the quickstart's interval 1,
    --steps each; then the rows marked long at w = 0, --interval, --ablate-long x --steps (as many generator
    steps as interval 1). Over --ablate-seeds seeds, the teacher, target and exact sampler per seed as the main
    table builds them. Prints one markdown table of mean (min-max) over the seeds -> {setting: {row: [dicts]}}."""
    settings = [(w, a.interval, a.steps, False) for w in a.guidance] + ([(3.0, 1, a.steps, False)] if a.seed_setting
                                                                         else [])
    settings += [(0.0, a.interval, a.ablate_long * a.steps, True)] if a.ablate_long > 1 else []
    labels = torch.arange(a.eval_n) % mix["classes"]
    res = {s: {name: [] for name, _, long in ABLATIONS if long or not s[3]} for s in settings}
    for seed in range(a.seed, a.seed + a.ablate_seeds):
        teacher, _ = init_net(mix, a.hidden, a.depth, a.pretrain, seed)
        for w, interval, steps, long_only in settings:
            tgt = target(mix, w, 2 * a.eval_n, seed + 1000)
            base = evaluate(mix, exact_sample(mix, labels, 50, w, seed + 1), labels, tgt)["mmd"]
            for name, kw, long in ABLATIONS:
                if long_only and not long:
                    continue
                t1 = time.perf_counter()
                r = ablation_run(a, mix, teacher, tgt, w, interval, steps, seed, kw)
                r["mmd_ratio"] /= base
                res[(w, interval, steps, long_only)][name].append(r)
                print(f"  seed {seed} w {w:g} interval {interval} steps {steps} | {name:48s} | " + " | ".join(
                    f"{k} {r[k]:.3f}" for _, k in ABLATE_COLUMNS) + f" | {time.perf_counter() - t1:.0f} s", flush=True)
    print(f"\nbatch {a.batch}, lr {a.lr:g} / fake lr {a.fake_lr:g}, {a.eval_n} samples per row; mean (min-max) over "
          f"seeds {a.seed}-{a.seed + a.ablate_seeds - 1}; late = worst of the 10 checks in the second half of training\n")
    print("| w | interval | steps | config | " + " | ".join(c for c, _ in ABLATE_COLUMNS) + " |")
    print("|---|---|---|---|" + "---|" * len(ABLATE_COLUMNS))
    for (w, interval, steps, _), rows in res.items():
        for name, runs in rows.items():
            cells = []
            for _, k in ABLATE_COLUMNS:
                v = [r[k] for r in runs]
                cells.append(f"{sum(v) / len(v):.2f} ({min(v):.2f}-{max(v):.2f})")
            print(f"| {w:g} | {interval} | {steps} | {name} | " + " | ".join(cells) + " |")
    return res


# -----------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="DMD trainer steps (one critic step each)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 2.0],
                   help="real_score_guidance_scale w values (DMD2 form)")
    p.add_argument("--interval", type=int, default=5, help="generator_update_interval of the --guidance runs")
    p.add_argument("--seed-setting", action=argparse.BooleanOptionalAction, default=True,
                   help="also run w = 3 at the quickstart's interval 1 (collapse-prone: docs/method.md#guidance-and-mode-coverage)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--hidden", type=int, default=128, help="width of the MLP of G and F (and of the init)")
    p.add_argument("--depth", type=int, default=3, help="hidden layers of the MLP")
    p.add_argument("--fake-hidden", type=int, default=0, help="0: the critic starts as a copy of the init (as the "
                   "trainer's); N: its own MLP of width N, regressed like the init (a wider critic)")
    p.add_argument("--critic", choices=["copy", "residual", "exact"], default="copy", help="copy: the critic is "
                   "that MLP (the init's copy, or --fake-hidden's); residual: R + (MLP - its frozen start), equal to R at the start "
                   "as the trainer's critic is to its teacher (ResidualCritic); exact: a perfect critic (ExactCritic, "
                   "6000 fresh G samples per class each step)")
    p.add_argument("--exits", choices=["uniform", "last"], default="uniform", help="the rollout's exit step "
                   "(last = train_dmd's last_step_only)")
    p.add_argument("--lr-scheduler", choices=["constant", "cosine"], default="constant", help="both lrs over the "
                   "trainer steps, as train_dmd's lr_scheduler and fake_score_lr_scheduler (no warmup)")
    p.add_argument("--lr", type=float, default=1e-3, help="generator lr")
    p.add_argument("--fake-lr", type=float, default=1e-3, help="fake score lr")
    p.add_argument("--pretrain", type=int, default=1500, help="steps of velocity regression for the shared G/F init")
    p.add_argument("--eval-n", type=int, default=3000, help="samples per row (the classes in turn); the target has 2x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", type=int, default=3, help="classes (captions) of the mixture")
    p.add_argument("--modes", type=int, default=4, help="modes per class (weights falling linearly)")
    p.add_argument("--repeat", type=int, default=1, help="the circle repeated in this many channel pairs (a larger "
                   "picture: modes sqrt(repeat) x farther apart)")
    p.add_argument("--shift", type=float, default=3.0, help="the world's sampling shift (the exact samplers')")
    p.add_argument("--guidance-max-t", type=float, default=1000.0, help="train_dmd's real_score_guidance_max_timestep "
                   "for the DMD real score and the --ode-regression pairs")
    p.add_argument("--ode-regression", type=float, default=0.0, help="train_dmd's ode_regression_weight: DMD plus this "
                   "x the regression on exact ODE trajectories (DMD's regression loss); adds a row for the regression "
                   "alone (objective='ode_init') at as many generator steps. 0: off")
    p.add_argument("--ode-pairs", type=int, default=20000, help="trajectories of --ode-regression (classes in turn)")
    p.add_argument("--critic-error", action="store_true", help="after each DMD run: the critic's x0 error against "
                   "the generator's own distribution beside the signal (critic_error)")
    p.add_argument("--log", action="store_true", help="print a DMD log line with the mode metrics at every check")
    p.add_argument("--ablate", action="store_true", help="instead of the table: the ablation (ours -> "
                   "plain DMD2 one change at a time, ABLATIONS) at each --guidance (at --interval) and the quickstart's setting")
    p.add_argument("--ablate-seeds", type=int, default=3, help="seeds of --ablate, from --seed on")
    p.add_argument("--ablate-long", type=int, default=5, help="--ablate's long run at w = 0: this many x --steps "
                   "(5: as many generator steps at interval 5 as --steps at interval 1); 1 = none")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the tiny MLPs gain nothing from more, and "
                   "2 threads on a busy 2-core machine ran 50x slower here)")
    return p.parse_args(argv)


def dmd_rows(a, mix, teacher, critic, w, interval, tgt, labels):
    """The DMD student of one (w, interval) run -> its table rows [(w, name, metrics)]. With --ode-regression: DMD
    plus that term on --ode-pairs exact trajectories, and a row for the regression alone at as many generator steps."""
    history, rows, anchor = [], [], None   # history: mode metrics of the EMA generator at 20 checks through training
    ev = lambda G: evaluate(mix, few_step_sample(G, mix, labels, a.seed + 1), labels, tgt)   # noqa: E731

    def check(step, G, rec):
        mm = mode_metrics(mix, few_step_sample(G, mix, labels, a.seed + 1), labels, tgt["weights"])
        history.append((step, mm))
        if a.log:
            print(f"  w {w:g} interval {interval} step {step:5d} | dmd {rec['dmd_loss']:.3e} | "
                  f"|g| {rec['g_abs']:.3f} | fake {rec['fake_score_loss']:.3f} | precision {mm['precision']:.3f} | "
                  f"min weight ratio {mm['min_weight_ratio']:.2f} | coverage {mm['coverage']:.2f}", flush=True)
    if a.ode_regression > 0:
        t1 = time.perf_counter()
        pairs = exact_trajectories(mix, torch.arange(a.ode_pairs) % mix["classes"], w, a.seed + 2000,
                                   max_t=a.guidance_max_t)
        G = train_gmm_ode(teacher, pairs, -(-a.steps // interval), a.batch, a.lr, seed=a.seed)
        rows.append((w, f"ODE regression alone, {a.ode_pairs} pairs ({time.perf_counter() - t1:.0f} s)", ev(G)))
        anchor = ode_anchor(pairs, a.ode_regression, a.batch)
    t1 = time.perf_counter()
    nets = {}
    G = train_gmm_dmd(mix, teacher, w, a.steps, interval, a.batch, a.lr, a.fake_lr, seed=a.seed,
                      every=max(1, a.steps // 20), callback=check, exits=a.exits, lr_scheduler=a.lr_scheduler,
                      fake_init=critic, nets=nets, anchor=anchor, max_t=a.guidance_max_t)
    if a.critic_error:
        print(f"  w {w:g} interval {interval}: critic x0 error / signal at t = " + ", ".join(
            f"{t}: {e:.4f} / {sg:.4f}" for t, (e, sg) in critic_error(mix, nets["G"], nets["F"]).items()))
    r = ev(G)
    late = [mm for step, mm in history if step > a.steps // 2]
    r["late"] = (min(mm["coverage"] for mm in late), min(mm["min_weight_ratio"] for mm in late))
    plus = f" + {a.ode_regression:g} x ODE regression" if anchor else ""
    rows.append((w, f"DMD student, interval {interval}{plus} ({time.perf_counter() - t1:.0f} s)", r))
    return rows


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    mix = make_mixture(a.classes, a.modes, repeat=a.repeat, shift=a.shift)
    if a.ablate:
        res = ablate(a, mix)
        print(f"\ntotal {time.perf_counter() - t0:.1f} s")
        return res
    teacher, fit = init_net(mix, a.hidden, a.depth, a.pretrain, a.seed)
    critic, fit_f = init_net(mix, a.fake_hidden, a.depth, a.pretrain, a.seed + 1) if a.fake_hidden else (None, fit)
    if a.critic == "residual":
        critic = ResidualCritic(mix, critic or teacher)
    elif a.critic == "exact":
        critic = ExactCritic(mix)
    print(f"{torch.get_num_threads()} threads | init of G and F: MLP regressed on the exact velocity, {a.pretrain} steps, "
          f"mse {fit:.4f} / {fit_f:.4f} ({time.perf_counter() - t0:.1f} s)")
    labels = torch.arange(a.eval_n) % mix["classes"]
    runs = [(w, a.interval) for w in a.guidance] + ([(3.0, 1)] if a.seed_setting else [])
    rows, targets = [], {}
    for w, interval in runs:
        if w not in targets:
            tgt = targets[w] = target(mix, w, 2 * a.eval_n, a.seed + 1000)
            ev = lambda x: evaluate(mix, x, labels, tgt)   # noqa: E731
            seed = a.seed + 1
            if w == 0:
                rows.append((w, "exact mixture samples (another seed)",
                             ev(sample_mixture(mix, labels, torch.Generator().manual_seed(seed)))))
            rows.append((w, "exact UniPC 50 steps", ev(exact_sample(mix, labels, 50, w, seed))))
            if w != 0:   # what the metrics say when guidance is ignored
                rows.append((w, "exact UniPC 50 steps, no guidance", ev(exact_sample(mix, labels, 50, 0.0, seed))))
            rows.append((w, "exact UniPC 3 steps", ev(exact_sample(mix, labels, 3, w, seed))))
            rows.append((w, "exact velocity, student sampler", ev(few_step_sample(real_score(mix), mix, labels, seed, w))))
            rows.append((w, "init MLP, student sampler", ev(few_step_sample(teacher, mix, labels, seed, w))))
        rows += dmd_rows(a, mix, teacher, critic, w, interval, targets[w], labels)
    print(f"\n{a.classes} classes x {a.modes} modes in {mix['mu'].shape[1]} channels, shift {a.shift:g}, DMD guidance at "
          f"t <= {a.guidance_max_t:g}; {a.eval_n} samples per row, target {2 * a.eval_n}; DMD {a.steps} steps, batch "
          f"{a.batch}; student sampler = x0 + re-noise at {','.join(f'{s:g}' for s in STEPS)}; late = worst of the 10 "
          "checks in the second half of training\n")
    print("| w (CFG w+1) | sampler | MMD | / exact 50 | precision | max weight err | min weight ratio | coverage | "
          "late: coverage, min ratio | class-0 weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    base = {w: r["mmd"] for w, name, r in rows if name == "exact UniPC 50 steps"}
    own0 = mix["weights"][0] > 0
    for w, name, r in rows:
        late = f"{r['late'][0]:.2f}, {r['late'][1]:.2f}" if "late" in r else ""
        w0 = " ".join(f"{v:.2f}" for v in r["weights"][0][own0].tolist())
        print(f"| {w:g} | {name} | {r['mmd']:.3f} | {r['mmd'] / base[w]:.2f} | {r['precision']:.3f} | "
              f"{r['weight_err']:.3f} | {r['min_weight_ratio']:.2f} | {r['coverage']:.2f} | {late} | {w0} |")
    for w, tgt in targets.items():
        print(f"target class-0 weights at w={w:g}: {' '.join(f'{v:.2f}' for v in tgt['weights'][0][own0].tolist())}")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")
    return rows


if __name__ == "__main__":
    main()
