"""
Causal (block-wise, KV-cached) 3-step student vs the bidirectional 3-step student, random weights, same clip:
per-block latency, time to the first block (DiT only; --vae adds its streamed decode), steady frames/s, and the
whole-clip masked forward (the causal training pass) against the plain bidirectional forward.

  python bench/bench_causal.py                                                    # CPU: tiny, fp32
  python bench/bench_causal.py --device cuda --dtype bf16 --preset t2v-1.3B --height 480 --width 832 --frames 81
"""
import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow  # noqa: E402
import model_wan as mw  # noqa: E402
import sample  # noqa: E402
import vae_wan  # noqa: E402
from common import random_dit  # noqa: E402


def video_frames(s, e):
    """Pixel frames of latent frames [s, e): the first latent frame is 1 frame, every later one 4."""
    return sum(1 if f == 0 else 4 for f in range(s, e))


def parse_args():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="tiny", choices=list(mw.PRESETS))
    p.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    p.add_argument("--height", type=int, default=128)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num-frame-per-block", type=int, default=3)
    p.add_argument("--independent-first-frame", action="store_true")
    p.add_argument("--steps", default="1000,757,522")
    p.add_argument("--context-noise", type=float, default=0.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"])
    p.add_argument("--vae", action="store_true", help="also decode: first frames = first block + its streamed decode")
    p.add_argument("--vae-base-dim", type=int, default=96, help="96 = the real Wan 2.1 VAE")
    return p.parse_args()


def setup(args):
    """Random-weight DiT (and VAE with --vae), context, noise and the block layout -> SimpleNamespace."""
    dev = mw.pick_device(args.device)
    cuda = dev.type == "cuda"
    dt = mw.pick_dtype({"fp32": "float32", "bf16": "bfloat16"}.get(args.dtype, "auto"), dev)
    r = SimpleNamespace(dev=dev, cuda=cuda, dt=dt, sync=torch.cuda.synchronize if cuda else (lambda: None))
    torch.manual_seed(0)
    cfg = mw.PRESETS[args.preset]
    r.dit = random_dit(cfg, dev, dt)
    r.vae = vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=args.vae_base_dim)).to(dev).eval() if args.vae else None
    r.steps = [float(s) for s in args.steps.split(",")]
    r.causal = dict(num_frame_per_block=args.num_frame_per_block, independent_first_frame=args.independent_first_frame,
                    context_noise=args.context_noise, window=None)   # sample.read_causal_config's form
    r.blocks = (args.num_frame_per_block, args.independent_first_frame)
    r.ctx = torch.randn(1, 512, cfg.text_dim, device=dev, dtype=dt)
    r.ctx[:, 100:] = 0
    r.x, _ = flow.initial_noise(1, args.frames, args.height, args.width, 0, dev)
    r.Fn = r.x.shape[2]
    r.starts = mw.block_starts(r.Fn, *r.blocks)
    r.ends = r.starts[1:] + [r.Fn]
    r.nframes = video_frames(0, r.Fn)
    r.name = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    return r


def bidirectional(r):
    """The bidirectional 3-step student on the whole clip (+ its decode) -> (DiT seconds, seconds to frames)."""
    t0 = time.perf_counter()
    with torch.no_grad():
        z = sample.sample_student(r.dit, r.ctx, r.x, r.steps, None, torch.Generator().manual_seed(1))
        r.sync()
        t_dit = time.perf_counter() - t0
        if r.vae is not None:
            r.vae.decode(z)
            r.sync()
    return t_dit, time.perf_counter() - t0   # first frames only when everything is done


def causal_run(r):
    """The causal student block by block (+ each block's streamed decode) -> (seconds at each block's end, total)."""
    marks, vcache = [], {}
    t0 = time.perf_counter()

    def on_block(s, x0):
        if r.vae is not None:
            r.vae.decode_stream(x0, vcache)
        r.sync()
        marks.append(time.perf_counter() - t0)
    with torch.no_grad():
        sample.sample_student(r.dit, r.ctx, r.x, r.steps, r.causal, torch.Generator().manual_seed(1), on_block)
    r.sync()
    return marks, time.perf_counter() - t0


def forward_pair(r):
    """One whole-clip forward, after a warm-up one: bidirectional vs masked causal (per-frame t) -> seconds."""
    t = torch.full((1,), 500.0, device=r.dev)
    tf = t[:, None].expand(1, r.Fn).contiguous()
    out = []
    for kw, tt in (({}, t), ({"causal": r.blocks}, tf)):
        with torch.no_grad():
            r.dit(r.x, tt, r.ctx, **kw)   # warm-up
            r.sync()
            t0 = time.perf_counter()
            r.dit(r.x, tt, r.ctx, **kw)
            r.sync()
            out.append(time.perf_counter() - t0)
    return out


def report(args, r, bi, ca):
    """The per-block table and the summary lines from the repeats' medians."""
    vae = r.vae is not None
    t_bi_dit = statistics.median(b[0] for b in bi)
    t_bi = statistics.median(b[1] for b in bi)
    marks = [statistics.median(m[0][i] for m in ca) for i in range(len(r.starts))]
    t_ca = statistics.median(m[1] for m in ca)
    per_block = [marks[0]] + [b - a for a, b in zip(marks, marks[1:])]
    print(f"{'block':>5s} {'latent frames':>13s} {'video frames':>12s} {'latency s':>10s} {'frames/s':>9s}"
          "   (block time: its 3 steps + the previous block's context pass" + (" + its decode)" if vae else ")"))
    for i, (s, e) in enumerate(zip(r.starts, r.ends)):
        vf = video_frames(s, e)
        print(f"{i:5d} {f'{s}-{e - 1}':>13s} {vf:12d} {per_block[i]:10.4f} {vf / per_block[i]:9.1f}")
    rates = [video_frames(s, e) / d for s, e, d in zip(r.starts, r.ends, per_block)]
    steady = statistics.median(rates[1:] or rates)
    t_fwd_bi, t_fwd_ca = forward_pair(r)
    what = "first decoded frames" if vae else "first block's x0 (DiT only)"
    nframes = r.nframes
    print(f"bidirectional 3-step: {t_bi_dit:.3f} s DiT" + (f", {t_bi:.3f} s with decode" if vae else "") +
          f" -> {nframes / t_bi:.1f} frames/s; {what} only at the end: {t_bi:.3f} s")
    print(f"causal 3-step cached: {t_ca:.3f} s total -> {nframes / t_ca:.1f} frames/s; {what} after "
          f"{marks[0]:.3f} s; steady {steady:.1f} frames/s (median over blocks after the first)")
    print(f"one whole-clip forward: bidirectional {t_fwd_bi:.4f} s, causal masked {t_fwd_ca:.4f} s "
          f"({t_fwd_ca / t_fwd_bi:.2f}x)")
    print(f"SUMMARY {r.name} {args.preset} {r.dt} {nframes}x{args.height}x{args.width} blocks {r.blocks}: first "
          f"{'frames' if vae else 'block (DiT)'} {marks[0]:.3f} s causal vs {t_bi:.3f} s bidirectional "
          f"({t_bi / marks[0]:.1f}x sooner); total {t_ca:.3f} s vs {t_bi:.3f} s (causal/bidir {t_ca / t_bi:.2f}x); "
          f"steady {steady:.1f} frames/s vs {nframes / t_bi:.1f}; masked fwd {t_fwd_ca / t_fwd_bi:.2f}x")


def main():
    args = parse_args()
    r = setup(args)
    print(f"{r.name} | torch {torch.__version__} | DiT {args.preset} {r.dt} | {r.nframes}x{args.height}x{args.width} -> "
          f"latent {tuple(r.x.shape)} | blocks {[e - s for s, e in zip(r.starts, r.ends)]} | steps {r.steps}"
          + (f" | VAE base_dim {args.vae_base_dim} fp32" if r.vae else " | DiT only"))
    bidirectional(r), causal_run(r)   # warm-up
    bi, ca = [], []
    for _ in range(args.repeats):   # interleaved, so that shared-machine load hits both alike
        bi.append(bidirectional(r))
        ca.append(causal_run(r))
    report(args, r, bi, ca)


if __name__ == "__main__":
    main()
