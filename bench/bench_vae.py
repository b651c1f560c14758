"""
VAE decode time and peak memory of our WanVAE against diffusers' AutoencoderKLWan, on identical random
weights and latents, measured side by side in one run (interleaved repeats, median seconds).

  python bench/bench_vae.py                                    # CPU: fp32, 9x128x128 (latent (1,16,3,16,16)), ~1.5 min on 2 cores
  python bench/bench_vae.py --frames 5 --height 64 --width 64 --repeats 1   # smoke test
  python bench/bench_vae.py                                    # CUDA: bf16, 81x480x832 (latent (1,16,21,60,104))
  python bench/bench_vae.py --dtype fp32                       # CUDA in fp32 (TF32 off), the reference's precision

Both decode normalised latents: ours with decode(z), diffusers with decode(z * std + mean).sample (the
de-normalisation its pipeline does), both clamped to [-1,1]. The real config (base_dim 96) throughout.
Agreement first: in fp32 on a small latent (1,16,2,4,6), then at bench size in the bench dtype; the
bench-size decode is also the untimed warm-up round.
Memory: peak above the resident weights and latent during one decode: torch.cuda.max_memory_allocated on
CUDA; on CPU the peak RSS of a fresh process per model (bench/common.py's method, as bench_dit.py: a small
decode first, the high-water mark reset through /proc/self/clear_refs, glibc's mmap threshold fixed).
Ours returns the video in fp32 whatever the VAE dtype, diffusers in the VAE dtype: in bf16 our output
buffer is 3*F*H*W*2 bytes larger (+0.18 GiB at 81x480x832), which shows in the CUDA peak.
CUDA fp32 runs with TF32 off (true fp32 convolutions).
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_wan import pick_device  # noqa: E402
from vae_wan import WanVAE, WanVAEConfig  # noqa: E402
from common import card, collect_children, gb, peak_rss_above_now, start_children  # noqa: E402


def build_ref():
    from diffusers import AutoencoderKLWan
    from diffusers.utils import logging
    logging.set_verbosity_error()   # its .to(dtype) warns about fp32 modules; AutoencoderKLWan has none
    return AutoencoderKLWan()   # diffusers' defaults are the Wan 2.1 config


@torch.no_grad()
def randomise_(model):
    """Default (random) conv init, RMS gammas 1 + N(0, 0.1) instead of ones, and the decoder's last conv
    scaled by 1/4 so that its output stays inside the clamp (the agreement check then sees every value)."""
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            p.normal_(1, 0.1)
        elif name.startswith("decoder.conv_out."):
            p.mul_(0.25)


def decode_fn(model, z):
    """-> a closure decoding the normalised latent z (B,16,T,h,w) to (B,3,1+4(T-1),8h,8w)."""
    if isinstance(model, WanVAE):
        return lambda: model.decode(z)
    cfg = model.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1).to(z.device)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1).to(z.device)
    return lambda: model.decode((z.float() * std + mean).to(z.dtype)).sample


def make_latent(shape, device, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)


def run(fn, device):
    """One decode -> (seconds, CUDA peak bytes above what was allocated before; 0 on CPU)."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    del out
    return sec, peak


def peak_rss_child(which, shape, queue):
    """CPU memory of one decode in a fresh process: peak RSS above the RSS after building model and latent."""
    torch.manual_seed(0)
    model = WanVAE().eval() if which == "ours" else build_ref().eval()
    run(decode_fn(model, make_latent((1, 16, 2, 2, 2), "cpu", torch.float32)), torch.device("cpu"))   # page in code
    fn = decode_fn(model, make_latent(shape, "cpu", torch.float32))
    queue.put((which, *peak_rss_above_now(lambda: run(fn, torch.device("cpu")))))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp32"], help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default: CUDA 81, CPU 9)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 8 (default: CUDA 480, CPU 128)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 8 (default: CUDA 832, CPU 128)")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up round")
    args = p.parse_args()
    dev = pick_device(args.device or "auto")
    cuda = dev.type == "cuda"
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype or ("bf16" if cuda else "fp32")]
    F0, H0, W0 = (81, 480, 832) if cuda else (9, 128, 128)
    frames, height, width = args.frames or F0, args.height or H0, args.width or W0
    if (frames - 1) % 4 or height % 8 or width % 8:
        raise SystemExit(f"need frames = 4k+1 and height, width multiples of 8; got {frames}x{height}x{width}")
    shape = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)
    c = WanVAEConfig()
    print(f"{card(dev)} | torch {torch.__version__} | {str(dtype)[6:]} | Wan 2.1 VAE: base_dim {c.base_dim}, "
          f"dim_mult {c.dim_mult}, {c.num_res_blocks} res blocks, z_dim {c.z_dim}")
    print(f"decode latent {shape} -> video (1,3,{frames},{height},{width})")

    if not cuda:   # memory children run while this process builds and checks (nothing is timed meanwhile)
        children, queue = start_children(peak_rss_child, [(w, shape) for w in ("ours", "diffusers")])

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # true fp32
    torch.manual_seed(0)
    with torch.device(dev):
        ref = build_ref().eval()
        randomise_(ref)
        ours = WanVAE().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    a, b = run_pair(ours, ref, make_latent((1, 16, 2, 4, 6), dev, torch.float32))
    diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"fp32 check, latent (1,16,2,4,6): max|ours - diffusers| = {diff:.2e} (max|diffusers| {scale:.2e})")
    if not diff <= 1e-5 * scale:
        raise SystemExit("outputs disagree: the comparison would not be like for like")
    ours.to(dtype)
    ref.to(dtype)
    z = make_latent(shape, dev, dtype)
    models = {"ours (WanVAE)": ours, "diffusers": ref}
    fns = {name: decode_fn(m, z) for name, m in models.items()}
    t0 = time.perf_counter()
    a, b = run_pair(ours, ref, z)   # also the warm-up round
    print(f"{str(dtype)[6:]} at bench size: max|ours - diffusers| = {(a - b).abs().max().item():.2e}, "
          f"mean {(a - b).abs().mean().item():.2e} (max|diffusers| {b.abs().max().item():.2e}; "
          f"warm-up {time.perf_counter() - t0:.1f} s)")
    del a, b

    mem, mem_how = {}, "torch.cuda.max_memory_allocated above weights and latent"
    if not cuda:
        mem, how = collect_children(children, queue, {"ours": "ours (WanVAE)", "diffusers": "diffusers"})
        mem_how = f"peak RSS above the built model and latent, fresh process per model ({how}, fp32)"
    times = {name: [] for name in models}
    t_start = time.perf_counter()
    for r in range(args.repeats):
        for name in (list(models) if r % 2 == 0 else list(models)[::-1]):
            sec, peak = run(fns[name], dev)
            times[name].append(sec)
            if cuda:
                mem[name] = max(mem.get(name, 0), peak)
    print(f"timing: {time.perf_counter() - t_start:.1f} s for {args.repeats} rounds\n")

    hdr = f"{'model':<16}{'decode s':>10}{'frames/s':>10}{'peak mem':>12}"
    print(hdr + "\n" + "-" * len(hdr))
    med = {name: statistics.median(v) for name, v in times.items()}
    for name in models:
        print(f"{name:<16}{med[name]:>10.3f}{frames / med[name]:>10.2f}{gb(mem[name]):>12}")
    print(f"peak mem = {mem_how}")
    O, D = list(models)
    print(f"{O} / {D}: decode time {med[O] / med[D]:.3f}x, peak mem {mem[O] / mem[D]:.3f}x")


def run_pair(ours, ref, z):
    with torch.no_grad():
        return decode_fn(ours, z)().float(), decode_fn(ref, z)().float()


if __name__ == "__main__":
    main()
