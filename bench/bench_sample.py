"""
Inference speed with random weights: the 3-step DMD student (DiT seconds, VAE decode seconds, end to end)
and, for scale, the 50-step CFG teacher projected from timed steps. No downloads; text embeddings are random
(B,512,4096) with the rows after a 100-token prompt zero, as UMT5 gives them (text encoding not timed).

  python bench/bench_sample.py                          # CUDA: 1.3B bf16 DiT, fp32 VAE, 480x832x81
  python bench/bench_sample.py --compile                # + our blocks under torch.compile
  python bench/bench_sample.py --sparsity 0,0.8,0.9 --dit-only   # the student with video sparse attention (sparse_attn)
  python bench/bench_sample.py --preset tiny --frames 9 --height 64 --width 64   # CPU smoke run
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow  # noqa: E402
import model_wan as mw  # noqa: E402
import sample  # noqa: E402
import vae_wan  # noqa: E402
from common import random_dit  # noqa: E402


def timed(fn, sync, repeats):
    """Median seconds of fn() over `repeats` runs after one warm-up run."""
    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="t2v-1.3B", choices=list(mw.PRESETS))
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", default="1000,757,522")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--vae-base-dim", type=int, default=96, help="96 = the real Wan 2.1 VAE")
    p.add_argument("--sparsity", default="0", help="student attention sparsities to time (0 = dense SDPA)")
    p.add_argument("--dit-only", action="store_true", help="skip the VAE decode and the end-to-end timing")
    args = p.parse_args()
    dev = mw.pick_device("auto")
    cuda = dev.type == "cuda"
    dt = mw.pick_dtype("auto", dev)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    cfg = mw.PRESETS[args.preset]
    dit = random_dit(cfg, dev, dt)
    vae = vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=args.vae_base_dim)).to(dev).eval()
    steps = [float(s) for s in args.steps.split(",")]
    ctx = torch.randn(1, 512, cfg.text_dim, device=dev, dtype=dt)
    ctx[:, 100:] = 0
    x, gen = flow.initial_noise(1, args.frames, args.height, args.width, 0, dev)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"{name} | torch {torch.__version__} | DiT {args.preset} {dt} | VAE base_dim {args.vae_base_dim} fp32 | "
          f"{args.frames}x{args.height}x{args.width} -> latent {tuple(x.shape)}")

    def student():
        with torch.no_grad():
            return sample.sample_student(dit, ctx, x, steps, None, gen)

    def decode():
        with torch.no_grad():
            return vae.decode(lat)

    def end_to_end():
        with torch.no_grad():
            noise, g = flow.initial_noise(1, args.frames, args.height, args.width, 1, dev)
            z = sample.sample_student(dit, ctx, noise, steps, None, g)
            video = vae.decode(z.float())
            return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()

    def teacher_step():   # one CFG step = two forwards (cond, uncond)
        with torch.no_grad():
            return flow.guided(dit, ctx, torch.zeros_like(ctx), 5.0)(x, torch.full((1,), 999.0, device=dev))

    rows = []
    lat = student()
    for label in (["eager", "compiled"] if args.compile else ["eager"]):
        if label == "compiled":
            for b in dit.blocks:
                b.compile()
        for s in (float(v) for v in args.sparsity.split(",")):
            mw.enable_sparse_attention(dit, s if s > 0 else None)   # zero gates: timing only
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t_dit = timed(student, sync, args.repeats)
            t_step = timed(teacher_step, sync, args.repeats)
            rows.append((label + (f" VSA {s:g}" if s > 0 else ""), t_dit, t_step))
            print(f"{rows[-1][0]:16s} 3-step DiT {t_dit:.3f} s | one forward {t_step / 2:.3f} s", flush=True)
        mw.enable_sparse_attention(dit, None)
    if args.dit_only:
        return
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_vae = timed(decode, sync, max(1, args.repeats - 1))
    vae_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    t_e2e = timed(end_to_end, sync, max(1, args.repeats - 1))
    print(f"{'DiT':16s} {'3-step s':>9s} {'teacher step s':>15s} {'50-step CFG teacher s (projected)':>34s} {'speed-up':>9s}")
    for label, t_dit, t_step in rows:
        print(f"{label:16s} {t_dit:9.3f} {t_step:15.3f} {50 * t_step:34.1f} {50 * t_step / t_dit:8.1f}x")
    print(f"VAE decode (fp32, chunked): {t_vae:.3f} s, peak {vae_peak:.2f} GiB "
          f"(CUDA max_memory_allocated during decode, DiT and VAE weights included)")
    print(f"end to end (noise -> 3 steps -> decode -> uint8 frames on host), last DiT mode: {t_e2e:.3f} s")


if __name__ == "__main__":
    main()
