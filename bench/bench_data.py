"""
Data-loading throughput: decode + resize of an 81-frame 480p clip on CPU (data.py's PyAV path:
MediaDataset -> load_frames -> resize to the 480x832 bucket), and reading cached entries back
(CachedDataset.__getitem__: safetensors load + context zero-padding) for a 1.3B-sized entry
(latents (16,21,60,104) fp32, context (n=40, 4096)).

  python bench/bench_data.py                          # 81x480x832 H.264 clip, 3 repeats
  python bench/bench_data.py --frames 17 --repeats 1  # smoke test

The clip is synthetic (a moving gradient, libx264 yuv420p crf 17) written once into a temp folder.
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import cache  # noqa: E402
import data  # noqa: E402


def write_clip(path, frames, h, w):
    import av
    y, x = np.mgrid[0:h, 0:w]
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=16)
        s.height, s.width, s.pix_fmt, s.options = h, w, "yuv420p", {"crf": "17"}
        for i in range(frames):
            img = np.stack([(x + 4 * i) % 256, (y + 2 * i) % 256, np.full_like(x, 128)], -1).astype(np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        c.mux(s.encode())
    open(path[:-4] + ".txt", "w").write("a moving gradient")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    with tempfile.TemporaryDirectory() as d:
        write_clip(os.path.join(d, "clip.mp4"), a.frames, 480, 832)
        ds = data.MediaDataset(dict(instance_data_dir=d, num_frames=a.frames, resolution=480), verbose=False)
        times = []
        for r in range(a.repeats + 1):   # the first round warms up
            t0 = time.perf_counter()
            v = ds[(0, r)]["video"]
            times.append(time.perf_counter() - t0)
        s = statistics.median(times[1:])
        print(f"decode + resize {a.frames}x480x832 -> {tuple(v.shape)}: {s:.3f} s/clip = {1 / s:.2f} clips/s "
              f"({a.frames / s:.0f} frames/s, {torch.get_num_threads()} threads)")
        T = 1 + (a.frames - 1) // 4
        path = os.path.join(d, "entry.safetensors")
        cache.write_entry(path, {"latents": torch.randn(16, T, 60, 104), "context": torch.randn(40, 4096)},
                          kind="sample", caption="a moving gradient")
        n, t0 = 20, time.perf_counter()
        for _ in range(n):
            t = cache.CachedDataset.read(path)
            item = {"latents": t["latents"].clone(), "context": cache.pad(t["context"])}
        s = (time.perf_counter() - t0) / n
        mb = os.path.getsize(path) / 2**20
        print(f"cache read {tuple(item['latents'].shape)} + context {tuple(item['context'].shape)} ({mb:.1f} MiB): "
              f"{s * 1000:.1f} ms/entry = {1 / s:.0f} entries/s (page cache warm)")


if __name__ == "__main__":
    main()
