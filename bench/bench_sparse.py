"""
Video sparse attention (sparse_attn.py) against dense SDPA: self-attention time at sparsity 0 / 0.5 / 0.8 / 0.9,
side by side in one run, forward (sampling) and forward+backward (training), with the ratio to dense.

  OMP_NUM_THREADS=1 python bench/bench_sparse.py        # CPU: 8x16x32 = 4,096 tokens, 12 heads x 128, fp32, fwd
  python bench/bench_sparse.py --device=cuda --dtype=bf16   # Wan 1.3B at 480x832x81: 21x30x52 = 32,760 tokens,
                                                            # 12 heads x 128, bf16, fwd and fwd+bwd (about a minute)

The sparse time is the whole method: cube means, coarse attention, top-k, the fine stage (--kernel: auto = flex on
CUDA, gather elsewhere) and the gated sum; the "overhead" row is all of it but the fine stage's kernel (cube
reordering, coarse stage, selection, flex's block mask, gated sum). "kept" is the fraction of key cubes attended,
k/C; a "+rem" row is the same sparsity with sparse_remainder (the unselected cubes' means in the fine softmax: C extra
keys per query). The first call of each row is a warm-up (torch.compile of flex on CUDA happens there) and is not timed.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import sparse_attn as sa  # noqa: E402
from common import card  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--tokens", default=None, help="patch grid FxHxW; default 8x16x32 (CPU), 21x30x52 (CUDA)")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cube", default="4,4,4", help="tokens per cube: frames,height,width")
    p.add_argument("--sparsities", default="0,0.5,0.8,0.9")
    p.add_argument("--kernel", default="auto", help="auto, gather or flex; a comma list runs each")
    p.add_argument("--remainder", default="0,1", help="sparse_remainder off (0) and/or on (1): a row each")
    p.add_argument("--modes", default=None, help="fwd and/or fwdbwd; default fwd (CPU), fwd,fwdbwd (CUDA)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per row; default 2 (CPU), 10 (CUDA)")
    p.add_argument("--flex-mode", default=None, help="torch.compile mode of flex, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--flex-options", default=None, help="JSON kernel_options replacing sparse_attn.FLEX_KERNEL_OPTIONS")
    p.add_argument("--profile", action="store_true", help="then a profiler table of one sparse forward (sparsity 0.8)")
    return p.parse_args()


def timed(fn, repeats, sync):
    """Median seconds of `repeats` calls after one untimed warm-up call, and the peak CUDA memory of a call."""
    fn()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return statistics.median(times), peak


def runner(mode, attend, q, k, v, gate, grad):
    """A zero-argument call: attend(q, k, v, gate) under no_grad (fwd), or with backward into q, k, v, gate."""
    if mode == "fwd":
        def f():
            with torch.no_grad():
                attend(q, k, v, gate)
        return f

    def f():
        for t in (q, k, v, gate):
            t.grad = None
        attend(q, k, v, gate).backward(grad)
    return f


def overhead(q, k, v, gate, grid, cube, flex, padded):
    """sparse_attention at sparsity 0.8 without the fine stage's kernel (its output replaced by q's cubes)."""
    valid = sa.real_tokens(grid, cube, q.device)
    qc, kc, vc = (sa.to_cubes(t, grid, cube) for t in (q, k, v))
    scores, o_c = sa.coarse_attention(qc, kc, vc, valid)
    idx = sa.select_cubes(scores, 0.8)
    if flex:
        sa.selection_block_mask(idx, valid if padded else None, valid.shape[1], exact=False)
    return sa.from_cubes(torch.addcmul(qc, sa.to_cubes(gate, grid, cube), o_c[:, :, :, None]), grid, cube)


def main():
    a = parse_args()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[a.dtype or ("bf16" if cuda else "fp32")]
    grid = tuple(int(n) for n in (a.tokens or ("21x30x52" if cuda else "8x16x32")).split("x"))
    cube = tuple(int(n) for n in a.cube.split(","))
    modes = (a.modes or ("fwd,fwdbwd" if cuda else "fwd")).split(",")
    repeats = a.repeats or (10 if cuda else 2)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    L, C = math.prod(grid), math.prod(sa.cube_counts(grid, cube))
    torch.manual_seed(0)
    q, k, v, gate, grad = (torch.randn(a.batch, L, a.heads, a.head_dim, device=dev, dtype=dt) for _ in range(5))
    gate.mul_(0.1)
    sa.FLEX_COMPILE_MODE = a.flex_mode
    if a.flex_options:
        sa.FLEX_KERNEL_OPTIONS = json.loads(a.flex_options)
    padded = any(g % c for g, c in zip(grid, cube))
    print(f"{card(dev)} | torch {torch.__version__} | {dt} | grid {grid} = {L:,} tokens x {a.heads} heads x "
          f"{a.head_dim} | cube {cube} = {math.prod(cube)} tokens, {C} cubes"
          f"{' (padded)' if padded else ''}" + (f" | flex {a.flex_mode} {sa.FLEX_KERNEL_OPTIONS}" if cuda else ""))

    def dense(q, k, v, gate):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    for mode in modes:
        qs = [t.requires_grad_(mode == "fwdbwd") for t in (q, k, v, gate)]
        t_dense, m_dense = timed(runner(mode, dense, *qs, grad), repeats, sync)
        print(f"\n{mode:7s} | {'kernel':6s} | {'sparsity':>8s} | {'kept':>6s} | {'ms':>9s} | {'x dense':>7s} | peak GiB")
        print(f"{mode:7s} | {'sdpa':6s} | {'dense':>8s} | {1:6.3f} | {1e3 * t_dense:9.1f} | {1:7.2f} | {m_dense / 2**30:.2f}")
        for kernel in a.kernel.split(","):
            name = sa.pick_kernel(kernel, dev, cube)
            if mode == "fwd":
                t, m = timed(runner(mode, lambda *t: overhead(*t, grid, cube, name == "flex", padded), *qs, grad),
                             repeats, sync)
                print(f"{mode:7s} | {name:6s} | {'overhead':>8s} | {'-':>6s} | {1e3 * t:9.1f} | {t / t_dense:7.2f} | "
                      f"{m / 2**30:.2f}")
            for s, rem in ((float(x), r == "1") for x in a.sparsities.split(",") for r in a.remainder.split(",")):
                def attend(q, k, v, gate, s=s, rem=rem):
                    return sa.sparse_attention(q, k, v, gate, grid, s, cube, remainder=rem, kernel=name)
                label = f"{s:.2f}" + ("+rem" if rem else "")
                try:
                    t, m = timed(runner(mode, attend, *qs, grad), repeats, sync)
                except (RuntimeError, ValueError, NotImplementedError) as e:   # e.g. flex backward on CPU
                    print(f"{mode:7s} | {name:6s} | {label:>8s} | skipped: {type(e).__name__}: {str(e).splitlines()[0][:90]}")
                    continue
                print(f"{mode:7s} | {name:6s} | {label:>8s} | {sa.num_selected(s, C) / C:6.3f} | {1e3 * t:9.1f} | "
                      f"{t / t_dense:7.2f} | {m / 2**30:.2f}")

    if a.profile:
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda) as prof:
            sa.sparse_attention(q, k, v, gate, grid, 0.8, cube, kernel=a.kernel.split(",")[0])
            sync()
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
