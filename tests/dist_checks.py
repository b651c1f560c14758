"""Checks that need several processes, run by tests/test_parallel.py as
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_checks.py NAME OUT_DIR
on CPU with gloo. Each check compares the distributed computation with a single-process one computed
in the same process, and raises (non-zero exit) on a mismatch."""
import gc
import os
import sys

import torch
import torch.distributed as dist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import flow  # noqa: E402
import lora  # noqa: E402
import model_wan as mw  # noqa: E402
import dmd  # noqa: E402


def tiny(seed=0):
    torch.manual_seed(seed)
    m = mw.WanDiT(mw.PRESETS["tiny"])
    with torch.no_grad():   # non-zero head and gammas so every parameter gets a gradient
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def check_sp_attention(out):
    """Ulysses attention, and the whole DiT under sequence parallelism, equal one process: outputs, and input
    and parameter gradients (summed over the group), with and without gradient checkpointing, and with VSA."""
    r, P = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 8 * P, 4, 16, generator=g, requires_grad=True) for _ in range(3))
    ref = mw.attention(q, k, v)
    ref.square().sum().backward()
    ref_grads = [t.grad.clone() for t in (q, k, v)]
    ql, kl, vl = (mw.sp_split(t.detach(), dist.group.WORLD).clone().requires_grad_(True) for t in (q, k, v))
    o = mw.attention(ql, kl, vl, dist.group.WORLD)
    torch.testing.assert_close(o, mw.sp_split(ref.detach(), dist.group.WORLD), rtol=1e-5, atol=1e-6)
    o.square().sum().backward()
    for t, gref in zip((ql, kl, vl), ref_grads):
        torch.testing.assert_close(t.grad, mw.sp_split(gref, dist.group.WORLD), rtol=1e-5, atol=1e-6)

    for ckpt, sparse in ((False, None), (True, None), (True, 0.5)):   # sparse: VSA, the gate in the all-to-all
        ref_m, sp_m = tiny(), tiny()
        ref_m.gradient_checkpointing = sp_m.gradient_checkpointing = ckpt
        for m in (ref_m, sp_m) if sparse else ():
            mw.enable_sparse_attention(m, sparse, (1, 2, 2))
            torch.manual_seed(5)
            with torch.no_grad():
                for b in m.blocks:
                    b.self_attn.gate_compress.weight.normal_(0, 0.1)
        mw.enable_sequence_parallel(sp_m, dist.group.WORLD)
        x = torch.randn(2, 16, 3, 8, 8, generator=g, requires_grad=True)
        t = torch.tensor([757.0, 31.5])
        ctx = torch.randn(2, 7, 32, generator=g)
        y_ref = ref_m(x, t, ctx)
        (y_ref * torch.linspace(-1, 1, y_ref.numel()).view_as(y_ref)).sum().backward()
        gx_ref = x.grad.clone()
        x.grad = None
        y = sp_m(x, t, ctx)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        gx = x.grad.clone()   # upstream of the token split gradients are partial sums, like the parameters'
        dist.all_reduce(gx)
        torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
        for (n, p_ref), p in zip(ref_m.named_parameters(), sp_m.parameters()):
            gp = p.grad.clone()
            dist.all_reduce(gp)
            torch.testing.assert_close(gp, p_ref.grad, rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")
    if r == 0:
        print("sp_attention ok")


def check_ddp_grads(out):
    """DDP on the trainable parameters of the shared-base generator and critic, with accumulation over 2
    micro-steps x 2 ranks, gives the gradients of one process on the concatenated batch of 4; the first
    micro-step does not synchronise; the frozen base gets no gradient."""
    import parallel
    import train_dmd
    c = train_dmd.config([os.path.join(ROOT, "config", "tiny.py")])
    env, dev = parallel.setup(1, torch.device("cpu"))
    cpu = torch.float32

    def nets():
        parallel.seed_all(0)
        base, gen, critic, _, _ = train_dmd.build_networks(c, dev, cpu)
        with torch.no_grad():   # non-zero LoRA B so that A gets gradients too
            for p in lora.trainable(base, "generator") + lora.trainable(base, "critic"):
                p.add_(0.02 * torch.randn_like(p))
        return base

    g = torch.Generator().manual_seed(3)
    x, eps = torch.randn(4, 16, 3, 8, 8, generator=g), torch.randn(4, 16, 3, 8, 8, generator=g)
    t, ctx = torch.tensor([900.0, 757.0, 300.0, 40.0]), torch.randn(4, 9, 32, generator=g)

    def losses(G, Fk, idx):   # a generator loss through G and a critic loss through Fk on samples idx
        lg = (G(x[idx], t[idx], ctx[idx]) - eps[idx]).square().mean()
        lf = (Fk(x[idx] * 0.5, t[idx] * 0.5, ctx[idx]) + eps[idx]).square().mean()
        return lg, lf

    ref = nets()
    G, Fk = (lora.velocity_fn(ref, a, lambda: torch.autocast("cpu", enabled=False)) for a in ("generator", "critic"))
    lg, lf = losses(G, Fk, slice(0, 4))
    (lg + lf).backward()
    ref_g = [p.grad.clone() for p in lora.trainable(ref, "generator") + lora.trainable(ref, "critic")]

    base = nets()
    g_params, f_params = lora.trainable(base, "generator"), lora.trainable(base, "critic")
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    G = parallel.data_parallel(env, lora.velocity_fn(base, "generator", autocast), g_params, False)
    Fk = parallel.data_parallel(env, lora.velocity_fn(base, "critic", autocast), f_params, False)
    assert isinstance(G, torch.nn.parallel.DistributedDataParallel)
    for i in range(2):   # rank r, micro-step i: sample 2i + r
        idx = slice(2 * i + env.rank, 2 * i + env.rank + 1)
        with parallel.sync_gradients(G, [base], on=i == 1), parallel.sync_gradients(Fk, [base], on=i == 1):
            lg, lf = losses(G, Fk, idx)
            ((lg + lf) / 2).backward()
        if i == 0:   # not synchronised yet: the ranks' gradients differ
            both = [torch.empty_like(g_params[0].grad) for _ in range(2)]
            dist.all_gather(both, g_params[0].grad.contiguous())
            assert not torch.allclose(*both), "gradients were synchronised on a no-sync micro-step"
    for p, r in zip(g_params + f_params, ref_g):
        torch.testing.assert_close(p.grad, r, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for n, p in base.named_parameters() if ".lora_" not in n)
    if env.main:
        print("ddp_grads ok")


def check_causal_exits(out):
    """The causal student's per-block exit steps (dmd.exit_steps) are identical on every rank although each
    rank's own random streams differ; a DDP-wrapped causal LoRA generator runs the block-wise rollout (a gradient
    forward per block, one backward) and ends with the same averaged gradients on every rank."""
    import parallel
    import train_dmd
    env, dev = parallel.setup(1, torch.device("cpu"))
    r, P = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(1000 + r)   # the ranks' global streams differ (noise and prompts are per rank)
    draws = torch.tensor([dmd.exit_steps(42, step, salt, 3, 7, same=False, last_only=False)
                          for step in range(50) for salt in (0, 1)])
    gathered = [torch.empty_like(draws) for _ in range(P)]
    dist.all_gather(gathered, draws)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "exit steps differ across ranks"
    assert len(set(draws.flatten().tolist())) == 3
    c = train_dmd.config([os.path.join(ROOT, "config", "tiny.py"), os.path.join(ROOT, "config", "tiny_causal.py")])
    parallel.seed_all(0)
    base, gen, _, _, _ = train_dmd.build_networks(c, dev, torch.float32)
    with torch.no_grad():   # non-zero LoRA B so that every adapter weight gets a gradient
        for p in lora.trainable(base, "generator"):
            p.add_(0.02 * torch.randn_like(p))
    params = lora.trainable(base, "generator")
    autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    G = parallel.data_parallel(env, lora.velocity_fn(base, "generator", autocast, (2, False)), params, False)
    assert isinstance(G, torch.nn.parallel.DistributedDataParallel)
    torch.manual_seed(r)   # per-rank noise
    exits = dmd.exit_steps(42, 3, 0, 3, 2, same=False)
    cache = base.new_kv_cache(1, 4, 16)
    ctx = torch.randn(1, 5, 32)
    x_g, _, _ = flow.causal_rollout(lambda x, t, s: G(x, t, ctx, kv_cache=cache, start_frame=s), torch.randn(1, 16, 4, 8, 8),
                                    [1000.0, 757.0, 522.0], exits, [0, 2])
    x_g.square().mean().backward()
    for p in params:
        both = [torch.empty_like(p.grad) for _ in range(P)]
        dist.all_gather(both, p.grad.contiguous())
        torch.testing.assert_close(both[0], both[1], rtol=0, atol=0)
    assert any(p.grad.abs().sum() > 0 for p in params)
    G = x_g = None   # the DDP reducer goes before the process group (destroyed after it, gloo aborted the exit now and then)
    gc.collect()
    if env.main:
        print("causal_exits ok")


if __name__ == "__main__":
    dist.init_process_group("gloo")
    try:
        globals()["check_" + sys.argv[1]](sys.argv[2] if len(sys.argv) > 2 else None)
        dist.barrier()
    finally:
        dist.destroy_process_group()
