"""
Forward+backward time and peak memory of our WanDiT against diffusers' WanTransformer3DModel, on identical
random weights and inputs, measured side by side in one run (interleaved repeats, median seconds).

  python bench/bench_dit.py                                          # CPU: fp32, cpu-small, ~30 s on 2 cores
  python bench/bench_dit.py --device cpu --preset tiny --repeats 1   # smoke test, a few seconds
  python bench/bench_dit.py --preset t2v-1.3B                        # CUDA: bf16, 480x832x81 (L=32760), grad ckpt on
  python bench/bench_dit.py --preset t2v-1.3B --compile              # + our blocks under torch.compile (third row)
  python bench/bench_dit.py --preset t2v-14B                         # ~120 GB with both models: nvidia-h200 only

Time: forward, then backward of out.float().square().mean() w.r.t. every parameter (train mode), and a
forward under no_grad. One untimed warm-up round, then --repeats rounds; rows alternate order every round.
Memory: peak above the resident weights and inputs during the step (gradients + activations + workspace):
torch.cuda.max_memory_allocated on CUDA; on CPU the peak RSS of a fresh process per model, which builds
only that model (after a tiny warm-up step), resets its high-water mark (/proc/self/clear_refs; ru_maxrss as a
fallback) and runs one step, with glibc's mmap threshold fixed so that freed tensors leave the RSS at once.
bf16 (CUDA): ours via WanDiT.cast (FP32_MODULES stay fp32); diffusers as from_pretrained(torch_dtype=bf16)
gives it (its _keep_in_fp32_modules and the rope tables stay fp32). The residual stream is fp32 in ours,
bf16 in diffusers, so bf16 outputs differ slightly; the strict check runs first, in fp32, on a small input.
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model_wan import PRESETS, WanConfig, WanDiT, diffusers_config, diffusers_to_original_key, pick_device, pick_dtype  # noqa: E402
from common import card, collect_children, gb, peak_rss_above_now, start_children  # noqa: E402

TEXT_LEN, TEXT_REAL = 512, 100   # context rows (UMT5 pads to 512 with zeros) and how many are a "prompt"
# name -> (config, default video size (frames, height, width) in pixels); latent (1, 16, (F-1)/4+1, H/8, W/8)
BENCH = {
    "tiny": (PRESETS["tiny"], (5, 64, 96)),                     # latent (1,16,2,8,12), L=48
    "cpu-small": (WanConfig(dim=512, ffn_dim=1536, num_heads=4, num_layers=4), (17, 128, 192)),  # (1,16,5,16,24), L=480
    "t2v-1.3B": (PRESETS["t2v-1.3B"], (81, 480, 832)),          # latent (1,16,21,60,104), L=32760
    "t2v-14B": (PRESETS["t2v-14B"], (81, 480, 832)),
}


def forward_flops(cfg, L, T=TEXT_LEN):
    """Model FLOPs of one forward, batch 1, as in docs/memory.md#flops (FLOPs = 2 x multiply-adds):
    per video token and block, 2*(4E^2 + 2E^2 + 2*E*Fd) for the self-attention q,k,v,o, cross-attention q,o
    and FFN projections, + 4*L*E for self-attention (QK^T and PV) + 4*T*E for cross-attention; per block
    and sample 4*T*E^2 for the text k,v projections. Embeddings and head are left out (<0.1% at 1.3B/480p;
    ~12% at cpu-small, whose text embedding is large next to its blocks). fwd+bwd = 3x this, recompute of
    gradient checkpointing not counted. 1.3B at L=32760: 282 TFLOP."""
    E, Fd = cfg.dim, cfg.ffn_dim
    per_token = 2 * (6 * E * E + 2 * E * Fd) + 4 * L * E + 4 * T * E
    return cfg.num_layers * (L * per_token + 4 * T * E * E)


def build_ref(cfg):
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(**{k: v for k, v in diffusers_config(cfg).items() if not k.startswith("_")})


@torch.no_grad()
def randomise_(model):
    """Every parameter random, the zero-initialised biases included: N(0, 0.02) for weights and biases,
    1 + N(0, 0.1) for norm scales, N(0, 1/E) for the modulation (scale_shift) tables."""
    for name, p in model.named_parameters():
        if "scale_shift_table" in name:
            p.normal_(0, p.shape[-1] ** -0.5)
        elif "norm" in name and name.endswith("weight"):
            p.normal_(1, 0.1)
        else:
            p.normal_(0, 0.02)


def cast_like_from_pretrained(ref, dtype):
    """What WanTransformer3DModel.from_pretrained(torch_dtype=dtype) loads: parameters in dtype except those
    under _keep_in_fp32_modules (time_embedder, scale_shift_table, norm2); buffers (rope tables) untouched."""
    keep = ref._keep_in_fp32_modules or []
    for name, p in ref.named_parameters():
        p.data = p.data.to(torch.float32 if any(m in name.split(".") for m in keep) else dtype)
    return ref


def latent_shape(frames, height, width):
    if (frames - 1) % 4 or height % 16 or width % 16:
        raise SystemExit(f"need frames = 4k+1 and height, width multiples of 16; got {frames}x{height}x{width}")
    return (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)


def make_inputs(cfg, shape, device, dtype=torch.float32):
    """x (B,16,F,H,W) latents, t (B,) timesteps, ctx (B,512,text_dim) text embeddings, rows >= 100 zero."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g)
    ctx = torch.randn(shape[0], TEXT_LEN, cfg.text_dim, generator=g)
    ctx[:, TEXT_REAL:] = 0
    t = torch.full((shape[0],), 500.0)
    return x.to(device, dtype), t.to(device), ctx.to(device, dtype)


def prepare(model, ckpt, x, t, ctx):
    """Train mode, requires_grad on every parameter, gradient checkpointing on/off -> forward closure."""
    model.train().requires_grad_(True)
    if isinstance(model, WanDiT):
        model.gradient_checkpointing = ckpt
        return lambda: model(x, t, ctx)
    if ckpt:
        model.enable_gradient_checkpointing()
    return lambda: model(x, t, ctx, return_dict=False)[0]


def compiled_view(model):
    """A WanDiT sharing `model`'s parameters whose blocks run through torch.compile (regional compilation)."""
    view = WanDiT.__new__(WanDiT)
    view.__dict__ = dict(model.__dict__, _modules=dict(model._modules))
    view.blocks = torch.nn.ModuleList(torch.compile(b) for b in model.blocks)
    return view


def run_step(model, fn, backward, device):
    """One forward (+ backward of out.float().square().mean()) -> (seconds, CUDA peak bytes above the
    memory allocated before the step, so gradients and activations; 0 on CPU)."""
    cuda = device.type == "cuda"
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    with torch.set_grad_enabled(backward):
        out = fn()
        if backward:
            out.float().square().mean().backward()
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base if cuda else 0
    del out
    model.zero_grad(set_to_none=True)
    return sec, peak


def peak_rss_child(which, cfg, shape, ckpt, backward, queue):
    """CPU memory of one step in a fresh process: peak RSS above the RSS after building model and inputs."""
    torch.manual_seed(0)
    for c, s in ((PRESETS["tiny"], (1, 16, 2, 8, 12)), (cfg, shape)):   # a tiny step first, so that code paged in
        model = WanDiT(c) if which == "ours" else build_ref(c)          # and lazy init don't count as memory
        fn = prepare(model, ckpt, *make_inputs(c, s, "cpu"))
        if c is not cfg:
            run_step(model, fn, backward, torch.device("cpu"))
    queue.put((which, *peak_rss_above_now(lambda: run_step(model, fn, backward, torch.device("cpu")))))


O, D, C = "ours (WanDiT)", "diffusers", "ours + compile"   # the rows


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--preset", default=None, choices=list(BENCH), help="default: t2v-1.3B on CUDA, cpu-small on CPU")
    p.add_argument("--frames", type=int, help="video frames, 4k+1 (default from the preset: 81 for t2v-*)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16 (latent is /8, patches /16)")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16")
    p.add_argument("--repeats", type=int, help="timed rounds after a warm-up round (default: CUDA 5, CPU 20)")
    p.add_argument("--compile", action="store_true", help="add a row: our blocks under torch.compile")
    p.add_argument("--no-backward", action="store_true", help="forward-only timings (memory of the no_grad forward)")
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing for both (default: on for CUDA, off for CPU)")
    return p.parse_args()


def checked_pair(cfg, dev):
    """Identical weights: a random diffusers model -> our layout, fp32 on the device; their outputs compared in
    fp32 on a small latent (1,16,3,8,12), an error unless they agree -> (ours, ref)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # true fp32 for the check
    torch.manual_seed(0)
    with torch.device(dev):
        ref = build_ref(cfg)
        randomise_(ref)
        ours = WanDiT(cfg)
    ours.load_state_dict({diffusers_to_original_key(k): v for k, v in ref.state_dict().items()}, strict=True)
    with torch.no_grad():
        xs, ts, cs = make_inputs(cfg, (1, 16, 3, 8, 12), dev)
        a, b = ours(xs, ts, cs), ref(xs, ts, cs, return_dict=False)[0]
        diff, scale = (a - b).abs().max().item(), b.abs().max().item()
    print(f"fp32 check, latent (1,16,3,8,12): max|ours - diffusers| = {diff:.2e} (max|diffusers| {scale:.2e})")
    if not diff <= 1e-4 * scale:
        raise SystemExit("outputs disagree: the comparison would not be like for like")
    return ours, ref


def bench_rows(ours, ref, cfg, shape, dev, dtype, ckpt, compile_):
    """Both models in the bench dtype on the bench inputs (+ the compiled view of ours) -> ({row: model},
    {row: forward closure}); prints their sizes and their difference at bench size."""
    if dtype != torch.float32:
        ours.cast(dtype)
        cast_like_from_pretrained(ref, dtype)
    x, t, ctx = make_inputs(cfg, shape, dev, dtype)
    models = {O: ours, D: ref}
    fns = {name: prepare(m, ckpt, x, t, ctx) for name, m in models.items()}
    if compile_:   # made after prepare(ours): it shares its parameters, train mode and checkpointing flag
        models[C] = compiled_view(ours)
        fns[C] = prepare(models[C], ckpt, x, t, ctx)
    for name in (O, D):
        print(f"{name}: {sum(q.numel() for q in models[name].parameters()) / 1e6:.1f} M params, weights "
              + gb(sum(q.numel() * q.element_size() for q in models[name].parameters())))
    with torch.no_grad():
        a, b = fns[O]().float(), fns[D]().float()
        print(f"{str(dtype)[6:]} at bench size: max|ours - diffusers| = {(a - b).abs().max().item():.2e} "
              f"(max|diffusers| {b.abs().max().item():.2e})")
        del a, b
    return models, fns


def time_rounds(models, fns, repeats, backward, dev, mem):
    """1 warm-up round (and compilation), then `repeats` rounds, the rows' order alternating every round ->
    {row: {"fb": [seconds], "f": [seconds]}}; on CUDA the step's peak goes into mem[row]."""
    cuda = dev.type == "cuda"
    times = {name: {"fb": [], "f": []} for name in models}
    t_start = time.perf_counter()
    for r in range(1 + repeats):   # round 0: warm-up (and compilation), not recorded
        for name, m in (list(models.items()) if r % 2 == 0 else list(models.items())[::-1]):
            for mode in (("fb", "f") if backward else ("f",)):
                sec, peak = run_step(m, fns[name], mode == "fb", dev)
                if r:
                    times[name][mode].append(sec)
                    if cuda and mode == ("fb" if backward else "f"):
                        mem[name] = max(mem.get(name, 0), peak)
    print(f"timing: {time.perf_counter() - t_start:.1f} s for 1 warm-up + {repeats} rounds\n")
    return times


def report(cfg, L, card_name, cuda, models, times, mem, mem_how, backward):
    """The table (median seconds, TFLOP/s and MFU on CUDA, peak memory) and the ratios to diffusers."""
    fwd = forward_flops(cfg, L)
    peak_tf = 788.0 if "H200" in card_name else 798.0   # docs/memory.md#flops: measured bf16 matmul peaks, H200 and H100
    print(f"model FLOPs (docs/memory.md formula): forward {fwd / 1e12:.4g} TFLOP, fwd+bwd 3x = {3 * fwd / 1e12:.4g} TFLOP"
          + (f"; MFU vs {peak_tf:.0f} TFLOP/s bf16 peak" if cuda else ""))
    hdr = f"{'model':<16}{'fwd+bwd s':>11}{'TFLOP/s':>9}{'MFU':>7}{'fwd s':>9}{'TFLOP/s':>9}{'MFU':>7}{'peak mem':>12}"
    print(hdr + "\n" + "-" * len(hdr))
    med = {(n, m): statistics.median(v) if v else float("nan") for n in models for m, v in times[n].items()}
    for name in models:
        line = f"{name:<16}"
        for mode, flops, w in (("fb", 3 * fwd, 11), ("f", fwd, 9)):
            tflops = flops / med[name, mode] / 1e12
            line += f"{med[name, mode]:>{w}.3f}{tflops:>9.2f}" + (f"{tflops / peak_tf:>7.1%}" if cuda else f"{'-':>7}")
        print(line + f"{gb(mem[name]) if name in mem else '-':>12}")
    print(f"peak mem = {mem_how}")
    for name in [n for n in models if n != D]:
        ratio = [f"fwd+bwd time {med[name, 'fb'] / med[D, 'fb']:.3f}x"] if backward else []
        ratio += [f"fwd time {med[name, 'f'] / med[D, 'f']:.3f}x"]
        if min(mem[D], mem.get(name, 0)) > 2**24:   # below 16 MiB a ratio is allocator noise (tiny preset)
            ratio.append(f"peak mem {mem[name] / mem[D]:.3f}x")
        print(f"{name} / {D}: " + ", ".join(ratio))


def main():
    args = parse_args()
    dev = pick_device(args.device or "auto")
    cuda = dev.type == "cuda"
    dtype = pick_dtype("auto", dev)
    ckpt = cuda if args.ckpt is None else args.ckpt
    backward = not args.no_backward
    repeats = args.repeats or (5 if cuda else 20)
    preset = args.preset or ("t2v-1.3B" if cuda else "cpu-small")
    cfg, (F0, H0, W0) = BENCH[preset]
    shape = latent_shape(args.frames or F0, args.height or H0, args.width or W0)
    L = shape[2] * shape[3] * shape[4] // 4                     # video tokens after the (1,2,2) patchify
    card_name = card(dev)
    print(f"{card_name} | torch {torch.__version__} | {str(dtype)[6:]} | preset {preset}: dim {cfg.dim} ({cfg.num_heads} "
          f"heads x {cfg.head_dim}), ffn {cfg.ffn_dim}, {cfg.num_layers} layers, text_dim {cfg.text_dim}")
    print(f"latent {shape} L={L} | context (1,{TEXT_LEN},{cfg.text_dim}), {TEXT_REAL} nonzero rows | "
          f"grad ckpt {'on' if ckpt else 'off'} | {'fwd+bwd and fwd' if backward else 'fwd only'}")
    if not cuda:   # memory children run while this process builds and checks (nothing is timed meanwhile)
        children, queue = start_children(peak_rss_child, [(w, cfg, shape, ckpt, backward) for w in ("ours", "diffusers")])
    ours, ref = checked_pair(cfg, dev)
    models, fns = bench_rows(ours, ref, cfg, shape, dev, dtype, ckpt, args.compile)
    mem, mem_how = {}, "torch.cuda.max_memory_allocated above weights and inputs"
    if not cuda:
        mem, how = collect_children(children, queue, {"ours": O, "diffusers": D})
        mem_how = f"peak RSS above the built model and inputs, fresh process per model ({how})"
    times = time_rounds(models, fns, repeats, backward, dev, mem)
    report(cfg, L, card_name, cuda, models, times, mem, mem_how, backward)


if __name__ == "__main__":
    main()
