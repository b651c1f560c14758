"""The pure DMD functions of train_dmd.py (docs/method.md) against closed forms and analytic networks.

Networks are velocity functions f(x, t, ctx) -> v with x (B,C,F,H,W), t (B,) on 0-1000, v = eps - x0, and
x_t = (1-σ)x0 + σ·eps with σ = t/1000. Every random draw inside the functions comes from torch's global RNG, so the
tests reproduce it by re-seeding.
"""
import pytest
import torch

import dmd
import flow

SHAPE = (2, 3, 2, 4, 5)   # (B, C, F, H, W)
B = SHAPE[0]


def bview(v):
    """(B,) -> (B,1,1,1,1)."""
    return v.reshape(-1, 1, 1, 1, 1)


class AnalyticNet(torch.nn.Module):
    """v = a·x + b·sin(x) + ctx_b·σ + c, with a learnable a; its output depends on x, t and ctx (ctx is (B,))."""

    def __init__(self, a=0.3, b=0.2, c=0.05):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b, self.c = b, c
        self.calls = []

    def forward(self, x, t, ctx):
        self.calls.append({"x": x.detach().clone(), "t": t.detach().clone(), "ctx": ctx,
                           "grad": torch.is_grad_enabled()})
        return self.a * x + self.b * torch.sin(x) + bview(ctx) * bview(t / 1000) + self.c

    def closed(self, x, t, ctx):
        """The same function in float64 without autograd or bookkeeping."""
        x = x.double()
        a = self.a.detach().double()
        return a * x + self.b * torch.sin(x) + bview(ctx.double()) * bview(t.double() / 1000) + self.c


def x0_of(net, x_t, t, ctx):
    return x_t.double() - bview(t.double() / 1000) * net.closed(x_t, t, ctx)


def guided_by_hand(net, x_t, t, ctx, neg, w):
    xc, xu = x0_of(net, x_t, t, ctx), x0_of(net, x_t, t, neg)
    return xc + w * (xc - xu)


CTX = torch.tensor([0.7, -1.3])
NEG = torch.tensor([0.0, 0.0])


# ---------------------------------------------------------------------------------------------------------
# 1. the generator loss: ∂L/∂x_g = g / numel, L = 0.5·mean(g²), g as defined in docs/method.md#the-generators-loss

def test_dmd_loss_gradient_is_g_over_numel_and_matches_section4():
    real, fake = AnalyticNet(0.3, 0.2, 0.05), AnalyticNet(-0.1, 0.5, -0.2)
    x_g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    t = torch.tensor([300.0, 800.0])
    torch.manual_seed(11)
    loss, g, st = dmd.dmd_loss(x_g, t, real, fake, CTX, NEG, 3.0, 0.5)
    loss.backward()
    n = x_g.numel()
    assert g.shape == SHAPE and torch.isfinite(g).all() and g.abs().max() > 0
    torch.testing.assert_close(x_g.grad, g / n, rtol=1e-5, atol=1e-6 * g.abs().max().item() / n)
    torch.testing.assert_close(loss, 0.5 * g.square().mean(), rtol=1e-6, atol=0)
    # everything except x_g is no-grad: the networks receive no gradient
    assert real.a.grad is None and fake.a.grad is None
    assert all(not c["grad"] for c in real.calls + fake.calls)

    # g by hand (float64) from the reproduced noise: x_t = (1-σ)x_g + σ·eps, DMD2 guidance on both scores
    torch.manual_seed(11)
    eps = torch.randn(SHAPE)
    sig = bview(t.double() / 1000)
    x_t = ((1 - sig) * x_g.detach().double() + sig * eps.double()).float()
    torch.testing.assert_close(real.calls[0]["x"], x_t, rtol=1e-6, atol=1e-6)
    x_real = guided_by_hand(real, x_t, t, CTX, NEG, 3.0)
    x_fake = guided_by_hand(fake, x_t, t, CTX, NEG, 0.5)
    norm = (x_g.detach().double() - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    g_hand = (x_fake - x_real) / norm
    torch.testing.assert_close(st["x_real"].double(), x_real, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(st["x_fake"].double(), x_fake, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g.double(), g_hand, rtol=1e-4, atol=1e-5)


# 2. fake ≡ real, no guidance: nothing to correct

def test_zero_update_when_fake_equals_real():
    net = AnalyticNet()
    x_g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    t = torch.tensor([250.0, 900.0])
    loss, g, _ = dmd.dmd_loss(x_g, t, net, net, CTX, NEG, 0.0, 0.0)
    loss.backward()
    assert torch.equal(g, torch.zeros(SHAPE))
    assert torch.equal(x_g.grad, torch.zeros(SHAPE))
    assert loss.item() == 0.0


# 3. the per-sample normaliser and nan_to_num

def _gap_nets(scale1):
    """real: analytic; fake = real + d_b with a per-sample offset d = (0.4, 0.4·scale1)."""
    real = AnalyticNet()

    def fake(x, t, ctx):
        d = torch.tensor([0.4, 0.4 * scale1])
        return real(x, t, ctx) + bview(d)
    return real, fake


def test_normaliser_is_per_sample():
    x_g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([400.0, 600.0])
    gs = []
    for scale1 in (1.0, 10.0):                       # scale sample 1's x_fake - x_real gap
        real, fake = _gap_nets(scale1)
        torch.manual_seed(5)
        gs.append(dmd.dmd_loss(x_g.clone(), t, real, fake, CTX, NEG, 0.0, 0.0)[1])
    assert torch.equal(gs[0][0], gs[1][0])
    torch.testing.assert_close(gs[1][1], 10 * gs[0][1], rtol=1e-4, atol=1e-6)

    real, fake = _gap_nets(1.0)
    x_g2 = x_g.clone()
    x_g2[1] = 5 * x_g2[1] + 3                         # scale sample 1's x_g - x_real gap
    torch.manual_seed(5)
    _, g2, st = dmd.dmd_loss(x_g2, t, real, fake, CTX, NEG, 0.0, 0.0)
    assert torch.equal(g2[0], gs[0][0])
    assert not torch.allclose(g2[1], gs[0][1])
    # g_b = (x_fake - x_real)_b / mean_{C,F,H,W}|x_g - x_real|_b  (a batch-wide mean would fail this)
    norm = (x_g2 - st["x_real"]).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(g2, (st["x_fake"] - st["x_real"]) / norm, rtol=1e-6, atol=1e-7)


def test_nan_to_num_when_normaliser_is_zero():
    """x_g = 0, σ = 0.5 and a real net v = x/σ make x̂_real = 0 = x_g exactly: the normaliser is exactly 0."""
    def real(x, t, ctx):
        return x / bview(t / 1000)

    x_g = torch.zeros(SHAPE)
    x_g[1] = torch.randn(SHAPE[1:], generator=torch.Generator().manual_seed(3))   # sample 1: ordinary
    t = torch.tensor([500.0, 500.0])
    # 0/0: fake = real
    torch.manual_seed(6)
    loss, g, st = dmd.dmd_loss(x_g, t, real, real, CTX, NEG, 0.0, 0.0)
    assert torch.equal(st["x_real"][0], torch.zeros(SHAPE[1:]))     # the setup really gives a zero normaliser
    assert torch.isfinite(g).all() and torch.equal(g, torch.zeros(SHAPE))
    assert loss.item() == 0.0
    # x/0: fake differs; g stays free of NaN/inf (inf -> the largest finite float) and sample 1 is untouched
    def fake(x, t, ctx):
        return real(x, t, ctx) + 0.25
    torch.manual_seed(6)
    _, g, st = dmd.dmd_loss(x_g, t, real, fake, CTX, NEG, 0.0, 0.0)
    assert torch.isfinite(g).all() and not torch.isnan(g).any()
    assert (g[0] != 0).all()
    norm1 = (x_g[1] - st["x_real"][1]).abs().mean()
    torch.testing.assert_close(g[1], (st["x_fake"][1] - st["x_real"][1]) / norm1)


# 4. guidance in the DMD2 form

def test_sampler_guidance_interval():
    """flow.guided with max_t: CFG at t <= max_t, the conditional pass alone above it (no unconditional call); the
    default 1000 guides everywhere."""
    calls = []
    def net(x, t, ctx):
        calls.append(float(ctx.sum()))
        return x * 0 + ctx.sum()
    cond, neg, x = torch.ones(1, 1, 1), torch.zeros(1, 1, 1), torch.zeros(1, 1)
    v = flow.guided(net, cond, neg, 4.0, max_t=500.0)
    assert v(x, torch.tensor([600.0])).item() == 1.0 and calls == [1.0]
    assert v(x, torch.tensor([500.0])).item() == 4.0 and calls == [1.0, 1.0, 0.0]
    assert flow.guided(net, cond, neg, 4.0)(x, torch.tensor([999.0])).item() == 4.0


def test_guided_x0_dmd2_form_and_single_call_without_guidance():
    net = AnalyticNet()
    x_t = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([200.0, 700.0], dtype=torch.float64)
    ctx, neg = CTX.double(), torch.tensor([-0.5, 2.0], dtype=torch.float64)
    xc, xu = x0_of(net, x_t, t, ctx), x0_of(net, x_t, t, neg)
    assert (xc - xu).abs().min() > 1e-3                 # the net really depends on ctx
    for w in (3.0, -0.5, 1.0):
        net.calls.clear()
        out = dmd.guided_x0(net, x_t, t, ctx, neg, w)
        torch.testing.assert_close(out, xc + w * (xc - xu), rtol=1e-12, atol=1e-12)
        assert not torch.allclose(out, xu + w * (xc - xu))  # not standard CFG with scale w
        assert len(net.calls) == 2 and net.calls[0]["ctx"] is ctx and net.calls[1]["ctx"] is neg
    net.calls.clear()
    out = dmd.guided_x0(net, x_t, t, ctx, neg, 0.0)
    assert len(net.calls) == 1 and net.calls[0]["ctx"] is ctx
    torch.testing.assert_close(out, xc, rtol=1e-12, atol=1e-12)



def test_guidance_interval_and_warmup():
    """real_score_guidance_max_timestep: per-sample w, 0 above the bound (guidance in a limited interval), each sample
    guided as with its own scalar w; 1000 (the default) keeps the scalar; the warm-up ramp multiplies both."""
    c = dict(real_score_guidance_scale=3.0, guidance_warmup_steps=4, real_score_guidance_max_timestep=600.0)
    t = torch.tensor([200.0, 700.0], dtype=torch.float64)
    assert dmd.guidance(c, 1) == 1.5                                        # ramp: (1 + 1) / 4 of 3
    w = dmd.guidance(c, 10, t)
    assert w.shape == (2, 1, 1, 1, 1) and w.flatten().tolist() == [3.0, 0.0]
    assert dmd.guidance(dict(c, real_score_guidance_max_timestep=1000.0), 10, t) == 3.0
    net = AnalyticNet()
    x_t = torch.randn(SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    ctx, neg = CTX.double(), torch.tensor([-0.5, 2.0], dtype=torch.float64)
    out = dmd.guided_x0(net, x_t, t, ctx, neg, w.double())
    torch.testing.assert_close(out[:1], dmd.guided_x0(net, x_t, t, ctx, neg, 3.0)[:1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[1:], x0_of(net, x_t, t, ctx)[1:], rtol=1e-12, atol=1e-12)
    net.calls.clear()
    above = dmd.guided_x0(net, x_t, t, ctx, neg, torch.zeros(2, 1, 1, 1, 1, dtype=torch.float64))
    assert len(net.calls) == 2   # both forwards even when all are above the bound: every rank runs the same forwards
    torch.testing.assert_close(above, x0_of(net, x_t, t, ctx), rtol=1e-12, atol=1e-12)

# 5. Gaussian analytic scores: one DMD step moves the generator's mean toward the data mean

def gaussian_velocity(m, s2=1.0):
    """Exact flow velocity of the marginal of x_t when x0 ~ N(m, s2·I)."""
    m = float(m)

    def v(x, t, ctx):
        sig = bview(t / 1000).to(x.dtype)
        a = 1 - sig
        x0 = m + a * s2 / (a * a * s2 + sig * sig) * (x - a * m)
        return (x - x0) / sig
    return v


def test_gaussian_velocity_is_the_posterior_mean():
    """Sanity check of the closed form used below: E[x0|x_t] by Monte Carlo regression (x0 ~ N(m, s²))."""
    gen = torch.Generator().manual_seed(9)
    m, s2, sig = 1.5, 2.0, 0.6
    x0 = m + s2 ** 0.5 * torch.randn(200000, dtype=torch.float64, generator=gen)
    x_t = (1 - sig) * x0 + sig * torch.randn(200000, dtype=torch.float64, generator=gen)
    slope = torch.cov(torch.stack([x0, x_t]))[0, 1] / x_t.var()
    assert abs(slope.item() - (1 - sig) * s2 / ((1 - sig) ** 2 * s2 + sig ** 2)) < 0.01
    v = gaussian_velocity(m, s2)(x_t.view(-1, 1, 1, 1, 1), torch.full((200000,), 1000 * sig, dtype=torch.float64), None)
    assert abs((x_t - sig * v.view(-1) - x0).mean().item()) < 0.01   # unbiased posterior mean


@pytest.mark.parametrize("t_val", [100.0, 300.0, 500.0, 700.0, 900.0])
@pytest.mark.parametrize("mu_d,theta0", [(1.5, 0.0), (-1.0, 0.5), (0.0, 2.0), (0.3, -0.8)])
def test_dmd_step_moves_gaussian_generator_toward_data(t_val, mu_d, theta0):
    theta = torch.nn.Parameter(torch.tensor(theta0))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(10))
    x_g = noise + theta                                   # generator: N(theta, 1)
    real, fake = gaussian_velocity(mu_d), gaussian_velocity(theta.item())
    t = torch.full((B,), t_val)
    torch.manual_seed(12)
    loss, g, st = dmd.dmd_loss(x_g, t, real, fake, CTX, NEG, 0.0, 0.0)
    loss.backward()
    # closed form: x̂_fake - x̂_real = (mu_g - mu_d)·σ²/((1-σ)² + σ²), constant over elements
    sig = t_val / 1000
    gap = (theta0 - mu_d) * sig ** 2 / ((1 - sig) ** 2 + sig ** 2)
    norm = (x_g.detach() - st["x_real"]).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(st["x_fake"] - st["x_real"], torch.full(SHAPE, gap), rtol=1e-3, atol=2e-5)
    torch.testing.assert_close(g, gap / norm.expand(SHAPE), rtol=1e-3, atol=2e-5)
    sign = 1.0 if theta0 > mu_d else -1.0
    assert (torch.sign(g) == sign).all() and torch.sign(g.mean()).item() == sign
    # ∂L/∂theta = Σ g / numel; one SGD step strictly reduces |theta - mu_d| without overshooting
    torch.testing.assert_close(theta.grad, g.mean(), rtol=1e-5, atol=1e-9)
    with torch.no_grad():
        theta -= 0.5 * theta.grad
    assert abs(theta.item() - mu_d) < abs(theta0 - mu_d)
    assert (theta.item() - mu_d) * (theta0 - mu_d) > 0


# 6. rollout: backward simulation with gradient through the exit step only

STEPS = [1000.0, 750.0, 500.0, 250.0]


@pytest.mark.parametrize("k_exit", range(len(STEPS)))
def test_rollout_grad_only_at_exit_and_renoises_with_fresh_noise(k_exit):
    gen = AnalyticNet(0.6, 0.3, 0.1)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(13))
    torch.manual_seed(14)
    x_g, t_from, t_to = flow.rollout(lambda x, t: gen(x, t, CTX), noise, STEPS, k_exit)
    calls = gen.calls
    assert len(calls) == k_exit + 1
    assert [c["grad"] for c in calls] == [False] * k_exit + [True]
    assert t_from == STEPS[k_exit] and t_to == (STEPS[k_exit + 1] if k_exit + 1 < len(STEPS) else 0.0)
    for k, c in enumerate(calls):
        assert torch.equal(c["t"], torch.full((B,), STEPS[k]))
    assert torch.equal(calls[0]["x"], noise)

    # replay: x_{k+1} = (1-σ_{k+1})·x̂0_k + σ_{k+1}·ε_{k+1}, ε drawn fresh from the global RNG at each step
    torch.manual_seed(14)
    eps_seen = [noise]
    for k in range(k_exit):
        s, s_next = STEPS[k] / 1000, STEPS[k + 1] / 1000
        x0 = calls[k]["x"].double() - s * gen.closed(calls[k]["x"], calls[k]["t"], CTX)
        eps = torch.randn(SHAPE)
        assert all(not torch.allclose(eps, e) for e in eps_seen)
        eps_seen.append(eps)
        torch.testing.assert_close(calls[k + 1]["x"].double(), (1 - s_next) * x0 + s_next * eps.double(),
                                   rtol=1e-5, atol=1e-5)
    s = STEPS[k_exit] / 1000
    x_k = calls[k_exit]["x"]
    torch.testing.assert_close(x_g.double(), x_k.double() - s * gen.closed(x_k, calls[k_exit]["t"], CTX),
                               rtol=1e-5, atol=1e-5)
    # d Σx_g / da = -σ_{k*}·Σx_{k*}: the input of the exit step carries no gradient from earlier steps
    (grad,) = torch.autograd.grad(x_g.sum(), gen.a)
    torch.testing.assert_close(grad.double(), -s * x_k.double().sum(), rtol=1e-5, atol=1e-5)


def test_rollout_under_no_grad_has_no_grad_forward():
    gen = AnalyticNet()
    with torch.no_grad():
        x_g, _, _ = flow.rollout(lambda x, t: gen(x, t, CTX), torch.randn(SHAPE), STEPS, 2)
    assert [c["grad"] for c in gen.calls] == [False] * 3 and not x_g.requires_grad


# 7. score timesteps: window, shift, clamp

def cfg(**kw):
    c = dict(ts_schedule=True, ts_schedule_max=False, min_score_timestep=0, timestep_shift=1.0,
             min_timestep_ratio=0.0, max_timestep_ratio=1.0)
    c.update(kw)
    return c


N = 20000


def test_score_timesteps_window_bounds():
    t = dmd.score_timesteps(N, 757.0, 522.0, cfg(), "cpu")
    assert t.shape == (N,) and t.dtype == torch.float32
    assert t.min() >= 522.0 and t.max() <= 1000.0 and abs(t.mean().item() - 761.0) < 5
    t = dmd.score_timesteps(N, 757.0, 522.0, cfg(ts_schedule_max=True), "cpu")
    assert t.min() >= 522.0 and t.max() <= 757.0 and abs(t.mean().item() - 639.5) < 3
    t = dmd.score_timesteps(N, 757.0, 522.0, cfg(ts_schedule=False, ts_schedule_max=True, min_score_timestep=100), "cpu")
    assert t.min() >= 100.0 and t.max() <= 757.0
    t = dmd.score_timesteps(N, 757.0, 522.0, cfg(ts_schedule=False, min_score_timestep=100), "cpu")
    assert t.min() >= 100.0 and t.max() <= 1000.0 and abs(t.mean().item() - 550.0) < 8
    assert t.min() < 110 and t.max() > 990             # the whole window is used
    t = dmd.score_timesteps(N, 522.0, 0.0, cfg(), "cpu")  # after the last step t_to = 0
    assert t.min() >= 0.0 and t.min() < 5


def test_score_timestep_shift():
    assert flow.shift_timestep(torch.tensor(500.0), 5.0).item() == pytest.approx(2500 / 3, rel=1e-6)
    assert flow.shift_timestep(torch.tensor(250.0), 3.0).item() == pytest.approx(1000 * 0.75 / 1.5, rel=1e-6)
    assert flow.rollout_steps([1000, 750, 500, 250], True, 5.0) == pytest.approx([1000, 937.5, 2500 / 3, 625], rel=1e-6)
    assert flow.rollout_steps([1000, 757, 522], False, 5.0) == [1000.0, 757.0, 522.0]
    c1 = cfg(ts_schedule=False, min_score_timestep=0)
    c5 = dict(c1, timestep_shift=5.0)
    torch.manual_seed(15)
    t1 = dmd.score_timesteps(N, 757.0, 522.0, c1, "cpu")
    torch.manual_seed(15)
    t5 = dmd.score_timesteps(N, 757.0, 522.0, c5, "cpu")
    # same uniform draws u: t5 = 1000·s·u/(1+(s-1)u) with u = t1/1000
    u = t1.double() / 1000
    torch.testing.assert_close(t5.double(), 1000 * 5 * u / (1 + 4 * u), rtol=1e-5, atol=1e-3)
    assert (t5 >= t1).all() and t5.mean() > t1.mean() + 100
    # shift 1 (and below) means none
    torch.manual_seed(15)
    assert torch.equal(dmd.score_timesteps(N, 757.0, 522.0, dict(c1, timestep_shift=1.0), "cpu"), t1)


@pytest.mark.parametrize("shift", [1.0, 5.0])
@pytest.mark.parametrize("sched,sched_max", [(True, False), (False, False), (False, True), (True, True)])
def test_score_timesteps_final_clamp(shift, sched, sched_max):
    c = cfg(ts_schedule=sched, ts_schedule_max=sched_max, min_score_timestep=0, timestep_shift=shift,
            min_timestep_ratio=0.02, max_timestep_ratio=0.98)
    for t_from, t_to in ((1000.0, 757.0), (757.0, 522.0), (522.0, 0.0)):
        t = dmd.score_timesteps(N, t_from, t_to, c, "cpu")
        assert t.min() >= 20.0 and t.max() <= 980.0
    c = cfg(ts_schedule=False, timestep_shift=shift, min_timestep_ratio=0.02, max_timestep_ratio=0.98)
    t = dmd.score_timesteps(N, 1000.0, 0.0, c, "cpu")
    assert (t == 980.0).any() and (shift > 1 or (t == 20.0).any())


# 8. critic loss: flow matching on the student's samples

def test_critic_loss_closed_form_and_no_grad_to_x_g():
    fake = AnalyticNet(0.4, -0.3, 0.1)
    x_g = torch.randn(SHAPE, generator=torch.Generator().manual_seed(16)).requires_grad_(True)
    t = torch.tensor([150.0, 650.0])
    torch.manual_seed(17)
    loss, per = dmd.critic_loss(fake, x_g, t, CTX)
    torch.manual_seed(17)
    eps = torch.randn(SHAPE).double()
    sig = bview(t.double() / 1000)
    xg = x_g.detach().double()
    x_t = (1 - sig) * xg + sig * eps
    err = fake.closed(x_t, t, CTX) - (eps - xg)
    torch.testing.assert_close(per.double(), err.square().mean(dim=(1, 2, 3, 4)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.double(), err.square().mean(), rtol=1e-5, atol=1e-6)
    assert not per.requires_grad
    loss.backward()
    assert x_g.grad is None                                  # x_g is a constant for the critic
    # dL/da = mean(2·err·x_t)
    torch.testing.assert_close(fake.a.grad.double(), (2 * err * x_t).mean(), rtol=1e-4, atol=1e-6)
