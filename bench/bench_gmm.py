"""
DMD against a closed form (issue 7 §3). A class-conditional Gaussian mixture whose exact flow-matching
velocity is known is the real score R; the trainer's own pure functions (flow.rollout, train_dmd's
score_timesteps, dmd_loss, critic_loss) distil a small MLP generator into a 3-step sampler (steps 1000,757,522).
Its samples are scored against exact samples of the target beside the exact 50-step sampler and plain 3-step
sampling.

  python bench/bench_gmm.py                        # w = 0 and w = 2 at interval 5, and the seed's w = 3, interval 1
  python bench/bench_gmm.py --guidance 0 1 --interval 1 --steps 6000 --log

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
import train_dmd as td  # noqa: E402

STEPS = [1000.0, 757.0, 522.0]   # the seed's dmd_denoising_steps
SCORE_T = dict(ts_schedule=True, ts_schedule_max=False, min_score_timestep=0, timestep_shift=1.0,
               min_timestep_ratio=0.02, max_timestep_ratio=0.98)   # train_dmd's defaults for the score timesteps

# -----------------------------------------------------------------------------
# the mixture, its exact velocity, exact samplers

def make_mixture(classes=3, modes=4, dim=2, radius=3.0, std=0.2):
    """classes x modes isotropic Gaussians N(mu_i, std² I) in `dim` channels. The means sit on a circle in the first
    two channels, component i in class i % classes, so each class spans the whole circle; within a class the
    weights fall linearly (4:3:2:1 for 4 modes) so that wrong weights show.
    -> dict mu (N, dim) float64, weights (K, N) p(component | class), cls (N,), std, classes."""
    n = classes * modes
    ang = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    mu = torch.zeros(n, dim, dtype=torch.float64)
    mu[:, 0], mu[:, 1] = radius * ang.cos(), radius * ang.sin()
    cls = torch.arange(n) % classes
    within = torch.arange(modes, 0, -1, dtype=torch.float64)
    weights = torch.zeros(classes, n, dtype=torch.float64)
    for k in range(classes):
        weights[k, cls == k] = within / within.sum()
    return {"mu": mu, "weights": weights, "cls": cls, "std": std, "classes": classes}


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


def guided(vel, ctx, w):
    """f(x, t, ctx) -> the samplers' v(x, t) for fixed ctx with DMD2-form guidance v_c + w(v_c − v_u)
    (x0 = x − σv is linear in v, so this is dmd_loss's x̂_c + w(x̂_c − x̂_u) too)."""
    neg = torch.zeros_like(ctx)
    def f(x, t):
        vc = vel(x, t, ctx)
        return vc if w == 0 else vc + w * (vc - vel(x, t, neg))
    return f


def noise(mix, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, mix["mu"].shape[1], 1, 1, 1, generator=g), g


def exact_sample(mix, labels, n_steps, w, seed, shift=3.0):
    """Flow UniPC (flow.py, flow shift 3 as Wan 2.1's diffusers scheduler) over the exact guided velocity."""
    x, _ = noise(mix, len(labels), seed)
    sigmas, timesteps = flow.flow_schedule(n_steps, shift)
    return flow.unipc_sample(guided(real_score(mix), context(mix, labels), w), x, sigmas, timesteps)


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


def train_gmm_dmd(mix, teacher, w, iters=3000, interval=5, batch=128, lr=1e-3, fake_lr=1e-3, betas=(0.0, 0.999),
                  weight_decay=0.01, grad_clip=1.0, ema=0.99, seed=0, every=0, callback=None):
    """DMD as train_dmd.train's loop runs it, on train_dmd's own functions. G and F start as copies of `teacher`,
    R is the closed form, the negative context is zeros. Every step: a critic step on a fresh no-grad rollout;
    every `interval` steps first a generator step. Exit steps uniform over STEPS, score timesteps as §4 with
    train_dmd's defaults, fake guidance off, AdamW, grad-norm clip. EMA of G after every generator step.
    -> the EMA generator. Every `every` steps: callback(step, G_ema, {dmd_loss, g_abs, fake_score_loss})."""
    torch.manual_seed(seed)
    G, Fk, R = copy.deepcopy(teacher), copy.deepcopy(teacher), real_score(mix)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    g_opt = torch.optim.AdamW(G.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    f_opt = torch.optim.AdamW(Fk.parameters(), lr=fake_lr, betas=betas, weight_decay=weight_decay)
    shape = (batch, mix["mu"].shape[1], 1, 1, 1)
    neg = torch.zeros(batch, 1, mix["classes"])
    loss = g = torch.full((), float("nan"))
    for step in range(iters):
        if step % interval == 0:   # generator (DMD) step
            ctx = context(mix, torch.randint(mix["classes"], (batch,)))
            x_g, t_from, t_to = flow.rollout(lambda x, t: G(x, t, ctx), torch.randn(shape), STEPS,
                                             int(torch.randint(len(STEPS), ())))
            t = td.score_timesteps(batch, t_from, t_to, SCORE_T, "cpu")
            loss, g, _ = td.dmd_loss(x_g, t, R, Fk, ctx, neg, w, 0.0)
            g_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(G.parameters(), grad_clip)
            g_opt.step()
            with torch.no_grad():
                for e, p in zip(G_ema.parameters(), G.parameters()):
                    e.lerp_(p, 1 - ema)
        ctx = context(mix, torch.randint(mix["classes"], (batch,)))   # critic step on a fresh no-grad rollout
        with torch.no_grad():
            x_g, t_from, t_to = flow.rollout(lambda x, t: G(x, t, ctx), torch.randn(shape), STEPS,
                                             int(torch.randint(len(STEPS), ())))
        t = td.score_timesteps(batch, t_from, t_to, SCORE_T, "cpu")
        loss_f, _ = td.critic_loss(Fk, x_g, t, ctx)
        f_opt.zero_grad(set_to_none=True)
        loss_f.backward()
        torch.nn.utils.clip_grad_norm_(Fk.parameters(), grad_clip)
        f_opt.step()
        if every and (step + 1) % every == 0:
            callback(step + 1, G_ema, {"dmd_loss": loss.item(), "g_abs": g.abs().mean().item(),
                                       "fake_score_loss": loss_f.item()})
    return G_ema

# -----------------------------------------------------------------------------
# metrics

def kernel_mean(a, b, bandwidths):
    """Mean of a sum of RBF kernels over all pairs of rows of a (n, C) and b (m, C), in float64."""
    d2 = torch.cdist(a.double(), b.double()).square()
    return sum(torch.exp(-d2 / (2 * h * h)).mean() for h in bandwidths).item()


def mode_shares(mix, x, labels, radius=3.0):
    """-> (K, N): share of each class's samples within radius·std of each mode (nearest mean); a row sums to the
    class's in-mode share."""
    d = torch.cdist(x.reshape(len(x), -1).double(), mix["mu"])
    dmin, near = d.min(1)
    near[dmin > radius * mix["std"]] = -1
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

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.strip().split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="DMD trainer steps (one critic step each)")
    p.add_argument("--guidance", type=float, nargs="+", default=[0.0, 2.0],
                   help="real_score_guidance_scale w values (DMD2 form)")
    p.add_argument("--interval", type=int, default=5, help="generator_update_interval of the --guidance runs")
    p.add_argument("--seed-setting", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the seed's w = 3 at interval 1 (dmd.md §11: collapse-prone)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="generator lr")
    p.add_argument("--fake-lr", type=float, default=1e-3, help="fake score lr")
    p.add_argument("--pretrain", type=int, default=1500, help="steps of velocity regression for the shared G/F init")
    p.add_argument("--eval-n", type=int, default=3000, help="samples per row (the classes in turn); the target has 2x")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", action="store_true", help="print a DMD log line with the mode metrics at every check")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the tiny MLPs gain nothing from more, and "
                   "2 threads on a busy 2-core machine ran 50x slower here)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    mix = make_mixture()
    torch.manual_seed(a.seed)
    teacher = MLP(mix["mu"].shape[1], mix["classes"])
    fit = pretrain(teacher, mix, a.pretrain, seed=a.seed)
    print(f"{torch.get_num_threads()} threads | init of G and F: MLP regressed on the exact velocity, {a.pretrain} steps, "
          f"mse {fit:.4f} ({time.perf_counter() - t0:.1f} s)")
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
        history = []   # mode metrics of the EMA generator at 20 checks through training

        def check(step, G, rec):
            mm = mode_metrics(mix, few_step_sample(G, mix, labels, a.seed + 1), labels, targets[w]["weights"])
            history.append((step, mm))
            if a.log:
                print(f"  w {w:g} interval {interval} step {step:5d} | dmd {rec['dmd_loss']:.3e} | "
                      f"|g| {rec['g_abs']:.3f} | fake {rec['fake_score_loss']:.3f} | precision {mm['precision']:.3f} | "
                      f"min weight ratio {mm['min_weight_ratio']:.2f} | coverage {mm['coverage']:.2f}", flush=True)
        t1 = time.perf_counter()
        G = train_gmm_dmd(mix, teacher, w, a.steps, interval, a.batch, a.lr, a.fake_lr, seed=a.seed,
                          every=max(1, a.steps // 20), callback=check)
        r = evaluate(mix, few_step_sample(G, mix, labels, a.seed + 1), labels, targets[w])
        late = [mm for step, mm in history if step > a.steps // 2]
        r["late"] = (min(mm["coverage"] for mm in late), min(mm["min_weight_ratio"] for mm in late))
        rows.append((w, f"DMD student, interval {interval} ({time.perf_counter() - t1:.0f} s)", r))
    print(f"\n3 classes x 4 modes, {a.eval_n} samples per row, target {2 * a.eval_n}; DMD {a.steps} steps, batch "
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
