"""
What the context length costs a small DiT: the demo teacher's flow-matching step (forward + backward, batch 32,
latent (16,3,4,4)) with its own 16 context rows against Wan's 512 (zero-padded) rows, interleaved, best of 3.

  python bench/bench_text_len.py
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow  # noqa: E402
import model_wan as mw  # noqa: E402
import text_encoders  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(2)
    torch.manual_seed(0)
    x0 = torch.randn(32, 16, 3, 4, 4)
    ctx = text_encoders.TinyTextEncoder(32).encode(["a red circle moving left"] * 32)   # (32, 512, 32), 6 rows non-zero
    best = {16: float("inf"), 512: float("inf")}
    for rep in range(3):
        for n in best:
            m = mw.WanDiT(dataclasses.replace(mw.PRESETS["demo"], text_len=n))
            t0 = time.perf_counter()
            for _ in range(10):
                flow.flow_matching_loss(m, x0, ctx, 3.0).backward()
            best[n] = min(best[n], (time.perf_counter() - t0) / 10)
    print(f"demo teacher fwd+bwd, batch 32, 2 threads: text_len 16 {best[16] * 1000:.1f} ms, 512 {best[512] * 1000:.1f} ms, "
          f"ratio {best[512] / best[16]:.2f}x")
