"""
The 8-bit frozen base (quant.py, base_model_precision) measured side by side in one run on the CPU:
(1) the DiT's output error against fp32 for bf16, int8 and fp8 storage (the 8-bit ones computed in fp32 and in bf16),
    and for a bf16 residual stream between blocks (residual_dtype), on random weights at the 1.3B width (--layers of
    its blocks) and on a trained teacher (the demo's);
(2) bytes of the frozen base for 1.3B, 14B and UMT5-XXL per precision, exact from parameter counts (meta tensors);
(3) the peak anonymous host memory of loading a saved bf16 model with and without streaming 8-bit quantisation,
    against the file's size (a fresh process per load; file pages the loader maps are page cache, not counted);
(4) the CPU forward time of each row against fp32 (CPU only: the GPU's dequantise cost is not measured here).

  python bench/bench_quant.py                                   # + out/demo/teacher when it exists
  python bench/bench_quant.py --demo_teacher=/tmp/demo/teacher --layers 4 --frames 5
"""
import argparse
import copy
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lora  # noqa: E402
import model_wan as mw  # noqa: E402
import quant  # noqa: E402
from common import gb, random_dit  # noqa: E402
from text_encoders import TinyTextEncoder  # noqa: E402

F32, B16 = torch.float32, torch.bfloat16
# (row, base storage, compute dtype, residual stream dtype between blocks)
ROWS = (("fp32", "no", F32, F32), ("bf16", "no", B16, F32), ("int8", "int8", F32, F32),
        ("int8, bf16 compute", "int8", B16, F32), ("fp8", "fp8", F32, F32), ("fp8, bf16 compute", "fp8", B16, F32),
        ("fp8-matmul (fp8 activations too)", "fp8-matmul", F32, F32), ("fp8-matmul, bf16 compute", "fp8-matmul", B16, F32),
        ("fp32, bf16 residual", "no", F32, B16), ("bf16, bf16 residual", "no", B16, B16),
        ("int8, bf16 compute, bf16 residual", "int8", B16, B16))


def variant(model, kind, dtype, residual):
    m = copy.deepcopy(model)
    if kind != "no":
        lora.quantize_base(m, kind)
    m.residual_dtype = residual
    return m.cast(dtype).eval()


@torch.no_grad()
def error_rows(model, inputs, reps=2):
    """[(row, relative L2 error, max |error| / max |ref|, forward s)] of each ROWS variant of `model` on `inputs`
    [(x, t, ctx)], against the fp32 model's outputs."""
    ref, rows = None, []
    for name, kind, dtype, residual in ROWS:
        m = variant(model, kind, dtype, residual)
        t0 = time.perf_counter()
        for _ in range(reps):
            out = torch.cat([m(x, t, ctx).flatten() for x, t, ctx in inputs])
        sec = (time.perf_counter() - t0) / reps
        ref = out if ref is None else ref
        rows.append((name, ((out - ref).norm() / ref.norm()).item(), ((out - ref).abs().max() / ref.abs().max()).item(), sec))
        del m
    return rows


def random_inputs(cfg, frames, h, w, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, cfg.in_dim, frames, h, w, generator=g), torch.tensor([t]),
             torch.randn(1, 64, cfg.text_dim, generator=g)) for t in (900.0, 500.0, 100.0)[:n]]


def demo_inputs(model, seed=0):
    """The demo teacher's own input: its latent size (16 x 3 x 4 x 4 at the default demo) and caption embeddings."""
    import quality
    te, g = TinyTextEncoder(model.cfg.text_dim, model.cfg.text_len), torch.Generator().manual_seed(seed)
    caps = quality.captions()[:: len(quality.captions()) // 3][:3]
    return [(torch.randn(1, model.cfg.in_dim, 3, 4, 4, generator=g), torch.tensor([t]), te.encode([cap]))
            for t, cap in zip((900.0, 500.0, 100.0), caps)]


def print_errors(title, rows):
    print(f"\n{title}\n| storage | rel. L2 error vs fp32 | max error / max output | CPU forward, x fp32 |\n|---|---|---|---|")
    for name, rel, mx, sec in rows:
        print(f"| {name} | {rel:.2e} | {mx:.2e} | {sec / rows[0][3]:.2f}x |")


def bytes_table():
    """Bytes of the frozen base per precision: the DiT presets and UMT5-XXL, meta tensors (nothing allocated)."""
    from transformers import UMT5Config, UMT5EncoderModel
    print("\n| model | parameters | bf16 | int8 / fp8 | 8-bit share of the weights |\n|---|---|---|---|---|")
    for preset in ("t2v-1.3B", "t2v-14B"):
        with torch.device("meta"):
            m = mw.WanDiT(mw.PRESETS[preset]).cast(torch.bfloat16)
            n, b16 = mw.num_params(m), quant.nbytes(m)
            lora.quantize_base(m, "int8")
        share = sum(p.numel() for k, p in m.named_parameters() if k.endswith("weight_q")) / n
        print(f"| Wan {preset} DiT | {n / 1e9:.2f} B | {gb(b16)} | {gb(quant.nbytes(m))} | {share:.1%} |")
    cfg = UMT5Config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                     feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        te = UMT5EncoderModel(cfg).to(torch.bfloat16)
        n, b16 = sum(p.numel() for p in te.parameters()), quant.nbytes(te)
        quant.quantize_linears(te, "int8", skip=("wo",))
    share = sum(p.numel() for k, p in te.named_parameters() if k.endswith("weight_q")) / n
    print(f"| UMT5-XXL encoder (wo kept) | {n / 1e9:.2f} B | {gb(b16)} | {gb(quant.nbytes(te))} | {share:.1%} |")


def anon_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def load_peak(path, kind, queue):
    """In a fresh process: the peak anonymous RSS above the start while load_dit reads `path` (bf16; 8-bit kind
    streamed), sampled every 2 ms."""
    torch.set_num_threads(1)
    base, peak, done = anon_kb(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon_kb())
            time.sleep(0.002)
    th = threading.Thread(target=sample)
    th.start()
    m = mw.load_dit(path, dtype=torch.bfloat16, quant=kind, quantize_via="cpu")
    done.set()
    th.join()
    queue.put((kind, (max(peak[0], anon_kb()) - base) * 1024, quant.nbytes(m)))


def host_memory(layers):
    cfg = copy.deepcopy(mw.PRESETS["t2v-1.3B"])
    cfg.num_layers = layers
    with tempfile.TemporaryDirectory() as d:
        mw.save_dit(random_dit(cfg, "cpu", torch.bfloat16), d)
        size = os.path.getsize(os.path.join(d, "diffusion_pytorch_model.safetensors"))
        print(f"\nstreaming load of a bf16 file of {gb(size)} (1.3B width, {layers} blocks), peak anonymous host memory:")
        print("| load | peak above start | the model's bytes |\n|---|---|---|")
        for kind in ("no", "int8", "fp8"):
            ctx = mp.get_context("spawn")
            q = ctx.Queue()
            p = ctx.Process(target=load_peak, args=(d, kind, q))
            p.start()
            _, peak, nbytes = q.get()
            p.join()
            print(f"| {'bf16' if kind == 'no' else kind + ' (streamed)'} | {gb(peak)} ({peak / size:.2f}x the file) | {gb(nbytes)} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--layers", type=int, default=2, help="blocks of the 1.3B-width random DiT")
    ap.add_argument("--frames", type=int, default=3, help="latent frames of its input (x 30 x 52 latent: 480x832)")
    ap.add_argument("--height", type=int, default=30, help="latent height (patch 2: tokens = frames*h*w/4)")
    ap.add_argument("--width", type=int, default=52)
    ap.add_argument("--demo_teacher", default="out/demo/teacher", help="a trained teacher folder ('' to skip)")
    ap.add_argument("--memory_layers", type=int, default=6, help="blocks of the model saved for (3); 0 skips (3)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = copy.deepcopy(mw.PRESETS["t2v-1.3B"])
    cfg.num_layers = a.layers
    tokens = a.frames * a.height * a.width // 4
    model = random_dit(cfg, "cpu", torch.float32)
    print_errors(f"random weights (normal 0.02), 1.3B width, {a.layers} blocks, {tokens} tokens, t = 900/500/100 "
                 f"(CPU, {a.threads} thread):", error_rows(model, random_inputs(cfg, a.frames, a.height, a.width)))
    if a.demo_teacher and os.path.isdir(a.demo_teacher):
        teacher = mw.load_dit(a.demo_teacher).float()
        print_errors(f"trained weights: the teacher of {a.demo_teacher} ({mw.num_params(teacher):,} parameters), its "
                     "latent size, three captions:", error_rows(teacher, demo_inputs(teacher), reps=5))
    bytes_table()
    if a.memory_layers:
        host_memory(a.memory_layers)


if __name__ == "__main__":
    main()
