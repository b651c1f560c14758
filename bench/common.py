"""
Helpers shared by the bench scripts (no script imports another): peak-RSS measurement of one step in fresh
processes, byte formatting, the device line, and a random-weight DiT built on the meta device.

CPU memory: a step runs in a spawned process started with glibc's mmap threshold fixed at 64 KiB (every larger
tensor gets its own mmap, unmapped when freed, so the RSS tracks live tensors instead of the heap's high water);
its peak RSS above the RSS before the step is read from VmHWM after /proc/self/clear_refs resets it (ru_maxrss,
which cannot be reset, as a fallback).
"""
import multiprocessing as mp
import os
import resource
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
import model_wan as mw  # noqa: E402


def status_kb(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in KiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_above_now(run):
    """Peak RSS in bytes while run() runs, above the RSS before it -> (bytes, how it was measured)."""
    before = status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # reset VmHWM to the current RSS, so a spike while building cannot hide the step's peak
        how = "VmHWM"
    except OSError:    # ru_maxrss cannot be reset: exact if the step's peak is the highest, else an upper bound
        how = "ru_maxrss"
    run()
    peak = status_kb("VmHWM") if how == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) * 1024, how


def start_children(target, arg_tuples):
    """One spawned process per tuple, running target(*args, queue), started with the mmap threshold fixed at
    64 KiB (in the children only: freed tensors leave their RSS at once) -> (children, queue)."""
    ctx_mp = mp.get_context("spawn")
    queue = ctx_mp.Queue()
    children = [ctx_mp.Process(target=target, args=(*args, queue)) for args in arg_tuples]
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    for c in children:
        c.start()
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return children, queue


def collect_children(children, queue, names):
    """Join the memory subprocesses -> ({name: peak bytes}, how it was measured)."""
    for c in children:
        c.join()
        if c.exitcode:
            raise SystemExit(f"memory subprocess failed with exit code {c.exitcode}")
    mem, how = {}, ""
    for _ in children:
        which, nbytes, how = queue.get()
        mem[names.get(which, which)] = nbytes
    return mem, how


def gb(n):
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def card(dev):
    """The device, in words: the CUDA card's name, or the CPU and its torch threads."""
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"


@torch.no_grad()
def random_dit(cfg, device, dtype):
    """Random-weight DiT built on the meta device and materialised on `device` (no host copy)."""
    with torch.device("meta"):
        dit = mw.WanDiT(cfg)
    dit.to_empty(device=device)
    for name, p in dit.named_parameters():
        p.normal_(0, cfg.dim ** -0.5 if "modulation" in name else 0.02)
    return dit.cast(dtype).eval()
