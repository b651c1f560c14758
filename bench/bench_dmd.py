"""
One DMD training step (generator step + critic step, batch 1, as train_dmd.py's loop runs them), random
weights: seconds per phase and peak memory of (a) LoRA generator and critic on ONE shared frozen base
(train_dmd's default) beside (b) full fp32 copies of generator and critic next to the frozen teacher.

  python bench/bench_dmd.py                                # CPU: fp32, cpu-small, both modes, < 1 min on 2 cores
  python bench/bench_dmd.py --preset t2v-1.3B              # CUDA default: bf16, 480x832, 21 latent frames (L=32760)
  python bench/bench_dmd.py --preset t2v-14B               # LoRA only by default (full copies cannot fit 80 GB)
  python bench/bench_dmd.py --modes lora --exit-step 0     # the cheapest exit step; --no-ckpt, --lora-rank 64, ...

Each mode runs in a fresh process: build (teacher on the meta device, to_empty + normal init, bf16 on CUDA),
one untimed warm-up step, --repeats timed steps (mean per phase; perf_counter, torch.cuda.synchronize around
each phase). The pieces are the trainer's: flow.rollout, train_dmd's score_timesteps, dmd_loss and critic_loss,
lora.trainable and lora.velocity_fn (bf16 autocast on CUDA), text_encoders.pad_context; with AdamW on fp32
masters, grad-norm clipping and the generator's EMA (updated every step here: an upper bound). Both rollouts exit
at --exit-step (default the last, the most expensive); the critic's rollout runs all its steps without grad, as in
train_dmd.
Memory: CUDA max_memory_allocated (and _reserved) over warm-up + timed steps, weights and optimiser states
included; CPU: peak RSS above the RSS after imports (build included) of a second fresh process per mode
(common.peak_rss_above_now, glibc mmap threshold 64 KiB; separate because it slows the steps ~1.5x).
LoRA + gradient checkpointing fails in train_dmd (CheckpointError: the recompute runs in backward, after
velocity_fn's use_adapter has restored the previous adapter); here the trained adapter stays selected
(set_adapter) through each sub-step so that the recompute replays it. The work is the same.
"""
import argparse
import copy
import multiprocessing as mp
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import flow  # noqa: E402
import lora  # noqa: E402
import model_wan as mw  # noqa: E402
import text_encoders  # noqa: E402
import dmd  # noqa: E402
import train_dmd as td  # noqa: E402
from common import card, gb, peak_rss_above_now  # noqa: E402

TEXT_LEN, TEXT_REAL, NEG_REAL = 512, 100, 120   # context rows; nonzero rows of the prompt and the negative prompt
BENCH = {   # name -> (config, (latent frames, height, width in pixels)); latent (1, 16, frames, H/8, W/8)
    "tiny": (mw.PRESETS["tiny"], (2, 64, 64)),                                                      # L=32
    "cpu-small": (mw.WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=4), (3, 128, 128)),    # L=192
    "t2v-1.3B": (mw.PRESETS["t2v-1.3B"], (21, 480, 832)),                                          # L=32760
    "t2v-14B": (mw.PRESETS["t2v-14B"], (21, 480, 832)),
}
# the goals for the LoRA step at 480x832x21: a 24 GB card (RTX 4090 class, 23.99 GiB total) and an
# 80 GB card (H100: 79.2 GiB total); usable = total minus ~0.5 GiB CUDA context, compared with peak RESERVED
GOALS = {"t2v-1.3B": ("24 GB", 23.5), "t2v-14B": ("80 GB", 78.5)}
LABELS = {
    "g_roll": "G step: rollout, no grad ({k} fwd)", "g_fwd": "G step: generator fwd with grad",
    "teacher": "G step: teacher R cond+uncond (2 fwd)", "f_dmd": "G step: critic F in DMD loss ({nf} fwd)",
    "g_bwd": "G step: generator backward{rc}", "g_opt": "G step: clip + AdamW + EMA",
    "f_roll": "F step: rollout, no grad ({k1} fwd)", "f_fwd": "F step: critic fwd",
    "f_bwd": "F step: critic backward{rc}", "f_opt": "F step: clip + AdamW", "other": "other (noise, t, losses)",
}


class Clock:
    """Seconds per phase, accumulated; CUDA synchronised before and after each interval."""
    def __init__(self, cuda):
        self.cuda, self.sec = cuda, {}

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    @contextmanager
    def __call__(self, name):
        self.sync()
        t0 = time.perf_counter()
        yield
        self.sync()
        self.sec[name] = self.sec.get(name, 0.0) + time.perf_counter() - t0

    def wrap(self, fn, name):
        """fn timed under name (a string, or a function returning one at call time)."""
        def f(*args):
            with self(name() if callable(name) else name):
                return fn(*args)
        return f


@torch.no_grad()
def init_(model):
    """Random weights: N(0, 0.02) for weights and biases, norm scales 1, modulation tables N(0, 1/E)."""
    for name, p in model.named_parameters():
        if name.endswith("modulation"):
            p.normal_(0, p.shape[-1] ** -0.5)
        elif "norm" in name:
            p.fill_(1.0)
        else:
            p.normal_(0, 0.02)


def build(mode, cfg, dev, dtype, a):
    """-> (base, gen, critic, g_adapter, f_adapter) as train_dmd.build_networks makes them, random weights."""
    with torch.device("meta"):
        base = mw.WanDiT(cfg)
    base.cast(dtype).to_empty(device=dev)      # cast while on meta: no fp32 copy of the teacher on the device
    init_(base)
    base.requires_grad_(False).eval()
    base.gradient_checkpointing = a.ckpt
    if mode == "lora":
        for name in ("generator", "critic"):
            lora.add_adapter(base, name, a.lora_rank, a.lora_rank, tuple(td.DEFAULTS["lora_targets"]))
        return base, base, base, "generator", "critic"
    gen, critic = (copy.deepcopy(base).float().requires_grad_(True) for _ in range(2))
    return base, gen, critic, None, None


def setup(mode, a, dev, out):
    """Networks, optimisers, EMA and contexts of `mode` as train_dmd makes them, every network call timed under
    its phase by a Clock -> SimpleNamespace (stage: "G" or "F", the step now running)."""
    cuda = dev.type == "cuda"
    torch.manual_seed(0)
    c = dict(td.DEFAULTS)
    cfg = BENCH[a.preset][0]
    dtype = mw.pick_dtype("auto", dev)
    autocast = mw.autocast_fn(dtype, dev)
    base, gen, critic, ga, fa = build(mode, cfg, dev, dtype, a)
    n = SimpleNamespace(c=c, base=base, ga=ga, fa=fa, stage="G", clock=Clock(cuda))
    n.g_params, n.f_params = lora.trainable(gen, ga), lora.trainable(critic, fa)
    out.update(g_train=sum(p.numel() for p in n.g_params), f_train=sum(p.numel() for p in n.f_params))
    n.g_opt = torch.optim.AdamW(n.g_params, lr=c["learning_rate"], betas=(c["adam_beta1"], c["adam_beta2"]),
                                weight_decay=c["adam_weight_decay"], eps=c["adam_epsilon"])
    n.f_opt = torch.optim.AdamW(n.f_params, lr=c["fake_score_lr"], betas=tuple(c["fake_score_betas"]),
                                weight_decay=c["fake_score_weight_decay"], eps=c["fake_score_eps"])
    n.ema = [p.detach().float().clone() for p in n.g_params] if a.ema else None
    g = torch.Generator().manual_seed(1)
    n.ctx = text_encoders.pad_context([torch.randn(TEXT_REAL, cfg.text_dim, generator=g)]).to(dev, dtype)
    n.neg_ctx = text_encoders.pad_context([torch.randn(NEG_REAL, cfg.text_dim, generator=g)]).to(dev, dtype)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        out["resident"] = torch.cuda.memory_allocated()
    n.G = n.clock.wrap(lora.velocity_fn(gen, ga, autocast),
                       lambda: "f_roll" if n.stage == "F" else ("g_fwd" if torch.is_grad_enabled() else "g_roll"))
    n.R = n.clock.wrap(lora.velocity_fn(base, None, autocast), "teacher")
    n.F_dmd = n.clock.wrap(lora.velocity_fn(critic, fa, autocast), "f_dmd")
    n.F_fm = n.clock.wrap(lora.velocity_fn(critic, fa, autocast), "f_fwd")
    return n


def generator_step(n, a, dev):
    """The DMD step of the generator: rollout exiting at a.exit_step, dmd_loss, backward, clip, AdamW, EMA."""
    c, clock = n.c, n.clock
    n.stage = "G"
    if n.ga:
        lora.set_adapter(n.base, n.ga)       # workaround: the checkpoint recompute in backward replays it
    n.g_opt.zero_grad(set_to_none=True)
    x_g, t_from, t_to = flow.rollout(lambda x, t: n.G(x, t, n.ctx), torch.randn(a.shape, device=dev), a.steps, a.exit_step)
    t = dmd.score_timesteps(1, t_from, t_to, c, dev)
    loss, _, _ = dmd.dmd_loss(x_g, t, n.R, n.F_dmd, n.ctx, n.neg_ctx, c["real_score_guidance_scale"], c["fake_score_guidance_scale"])
    with clock("g_bwd"):
        loss.backward()
    with clock("g_opt"):
        float(torch.nn.utils.clip_grad_norm_(n.g_params, c["max_grad_norm"]))
        n.g_opt.step()
        if n.ema is not None:
            with torch.no_grad():
                for e, p in zip(n.ema, n.g_params):
                    e.mul_(c["ema_decay"]).add_(p.detach().float(), alpha=1 - c["ema_decay"])
        if a.free_grads:
            n.g_opt.zero_grad(set_to_none=True)


def critic_step(n, a, dev):
    """The critic's flow-matching step on a fresh no-grad rollout: critic_loss, backward, clip, AdamW."""
    c, clock = n.c, n.clock
    n.stage = "F"
    if n.fa:
        lora.set_adapter(n.base, n.fa)
    n.f_opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        x_g, t_from, t_to = flow.rollout(lambda x, t: n.G(x, t, n.ctx), torch.randn(a.shape, device=dev), a.steps,
                                         a.exit_step)
    t = dmd.score_timesteps(1, t_from, t_to, c, dev)
    loss_f, _ = dmd.critic_loss(n.F_fm, x_g, t, n.ctx)
    with clock("f_bwd"):
        loss_f.backward()
    with clock("f_opt"):
        float(torch.nn.utils.clip_grad_norm_(n.f_params, c["fake_score_grad_clip"]))
        n.f_opt.step()
        if a.free_grads:
            n.f_opt.zero_grad(set_to_none=True)


def step(n, a, dev):
    """One trainer step (generator step, then critic step) -> seconds."""
    n.clock.sync()
    t0 = time.perf_counter()
    generator_step(n, a, dev)
    critic_step(n, a, dev)
    n.clock.sync()
    return time.perf_counter() - t0


def run_mode(mode, a):
    """Build the networks of `mode`, one warm-up step, a.repeats timed steps -> dict of results."""
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    out = {"mode": mode, "card": card(dev)}

    def body():
        n = setup(mode, a, dev, out)
        step(n, a, dev)                        # warm-up: first calls, lazy optimiser state
        n.clock.sec.clear()
        total = sum(step(n, a, dev) for _ in range(a.repeats)) / a.repeats
        out["sec"] = {name: s / a.repeats for name, s in n.clock.sec.items()}
        out["sec"]["other"] = total - sum(out["sec"].values())
        out["total"] = total
        if cuda:
            out["peak"], out["reserved"] = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()

    try:
        if a.rss:
            out["peak"], out["how"] = peak_rss_above_now(body)
        else:
            body()
    except torch.OutOfMemoryError as e:
        out.update(oom=str(e).split("\n")[0][:160], peak=torch.cuda.max_memory_allocated(),
                   reserved=torch.cuda.max_memory_reserved())
    return out


def in_child(mode, a, env=None):
    """run_mode(mode, a) in a fresh spawned process, with `env` added to its environment."""
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
            return ex.submit(run_mode, mode, a).result()
    finally:
        for k in env or {}:
            os.environ.pop(k, None)


def parse_args():
    """The flags, with their defaults resolved: device, preset, repeats, modes, shape, steps, exit step."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--preset", default=None, choices=list(BENCH), help="default: t2v-1.3B on CUDA, cpu-small on CPU")
    p.add_argument("--frames", type=int, help="latent frames (default: 21 for t2v-*, i.e. 81 video frames)")
    p.add_argument("--height", type=int, help="pixels, a multiple of 16")
    p.add_argument("--width", type=int, help="pixels, a multiple of 16")
    p.add_argument("--modes", choices=("lora", "full", "both"), default=None, help="default: lora for t2v-14B, else both")
    p.add_argument("--steps", default=td.DEFAULTS["dmd_denoising_steps"], help="rollout timesteps (train_dmd's dmd_denoising_steps)")
    p.add_argument("--exit-step", type=int, default=None, help="rollout exit step, 0-based (default: the last)")
    p.add_argument("--lora-rank", type=int, default=128, help="rank (= alpha) of both adapters")
    p.add_argument("--ckpt", action=argparse.BooleanOptionalAction, default=True, help="gradient checkpointing")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA of the generator")
    p.add_argument("--free-grads", action="store_true", help="drop grads right after each optimiser step "
                   "(train_dmd keeps them until the next zero_grad)")
    p.add_argument("--repeats", type=int, default=None, help="timed steps after a warm-up step (default: CPU 3, CUDA 2, 14B 1)")
    a = p.parse_args()
    a.device = str(mw.pick_device(a.device or "auto"))
    cuda = a.device.startswith("cuda")
    a.preset = a.preset or ("t2v-1.3B" if cuda else "cpu-small")
    a.repeats = a.repeats or (3 if not cuda else 1 if a.preset == "t2v-14B" else 2)
    a.modes = {"lora": ["lora"], "full": ["full"], "both": ["lora", "full"]}[a.modes or ("lora" if a.preset == "t2v-14B" else "both")]
    _, (F0, H0, W0) = BENCH[a.preset]
    a.size = (a.frames or F0, a.height or H0, a.width or W0)
    Fr, H, W = a.size
    if H % 16 or W % 16:
        raise SystemExit(f"height and width must be multiples of 16, got {H}x{W}")
    a.shape = (1, 16, Fr, H // 8, W // 8)
    a.steps = [float(s) for s in str(a.steps).split(",")]
    a.exit_step = len(a.steps) - 1 if a.exit_step is None else a.exit_step
    if not 0 <= a.exit_step < len(a.steps):
        raise SystemExit(f"--exit-step must be in [0, {len(a.steps) - 1}]")
    return a


def report(a, results, cuda):
    """The header lines, the phase table (seconds per phase, total, memory, trainable counts) and the goals."""
    modes, (Fr, H, W) = a.modes, a.size
    cfg = BENCH[a.preset][0]
    r0 = results[modes[0]]
    print(f"{r0['card']} | torch {torch.__version__} | {'bf16 autocast, bf16 teacher' if cuda else 'fp32'} | preset {a.preset}: "
          f"dim {cfg.dim} ({cfg.num_heads} heads x {cfg.head_dim}), ffn {cfg.ffn_dim}, {cfg.num_layers} layers, text_dim {cfg.text_dim}")
    print(f"latent {a.shape} L={Fr * (H // 16) * (W // 16)} | context (1,{TEXT_LEN},{cfg.text_dim}), {TEXT_REAL} nonzero rows | steps {a.steps}, "
          f"exit step {a.exit_step} | grad ckpt {'on' if a.ckpt else 'off'} | LoRA rank {a.lora_rank} | EMA {'on' if a.ema else 'off'}"
          f" | grads {'freed after each optimiser step' if a.free_grads else 'kept to the next zero_grad (train_dmd)'}"
          f" | mean of {a.repeats} steps after 1 warm-up")
    k, nf = a.exit_step, 2 if td.DEFAULTS["fake_score_guidance_scale"] else 1
    labels = {n: s.format(k=k, k1=k + 1, nf=nf, rc=" (+ recompute)" if a.ckpt else "") for n, s in LABELS.items()}
    heads = {"lora": "LoRA, shared base", "full": "full fp32 copies"}
    both = len(modes) == 2 and not any("oom" in r for r in results.values())
    hdr = f"{'phase (seconds)':<42}" + "".join(f"{heads[m]:>19}" for m in modes) + (f"{'full/LoRA':>11}" if both else "")
    print("\n" + hdr + "\n" + "-" * len(hdr))

    def row(label, vals, fmt, ratio=True):
        line = f"{label:<42}" + "".join(f"{fmt(v):>19}" if v is not None else f"{'OOM':>19}" for v in vals)
        if both and ratio:
            line += f"{vals[1] / vals[0]:>10.2f}x" if vals[0] else f"{'-':>11}"
        print(line)

    for name in LABELS:
        row(labels[name], [results[m]["sec"].get(name, 0.0) if "sec" in results[m] else None for m in modes],
            lambda v: f"{v:.3f}")
    print("-" * len(hdr))
    row("total s/step", [results[m].get("total") for m in modes], lambda v: f"{v:.3f}")
    row("peak memory", [results[m]["peak"] for m in modes], gb)
    if cuda:
        row("  peak reserved", [results[m]["reserved"] for m in modes], gb)
        row("  after build (weights, adapters)", [results[m].get("resident") for m in modes], gb)
    row("trainable params G / F (M)", [(results[m].get("g_train"), results[m].get("f_train")) for m in modes],
        lambda v: f"{v[0] / 1e6:.1f} / {v[1] / 1e6:.1f}" if v[0] is not None else "-", ratio=False)
    how = (f"peak RSS above the RSS after imports, build included, fresh process per mode ({r0.get('how')})" if not cuda
           else "torch.cuda.max_memory_allocated over warm-up + timed steps (weights, optimiser states, EMA included)")
    print(f"peak memory = {how}")
    for m in modes:
        if "oom" in results[m]:
            print(f"{heads[m]}: out of memory ({results[m]['oom']})")
    goals(a, results, cuda, heads)


def goals(a, results, cuda, heads):
    """Does the measured step fit the goal's cards (CUDA), or the note that a CPU run cannot say."""
    if cuda and a.preset in GOALS:
        card_name, usable = GOALS[a.preset]
        at_size = a.size == BENCH[a.preset][1]
        Fr, H, W = a.size
        for m in a.modes:
            r = results[m]
            ok = "oom" not in r and r["reserved"] / 2**30 <= usable
            print(f"goal ({'the target' if m == 'lora' else 'for comparison'}): {a.preset} {heads[m]} DMD step fits a {card_name} "
                  f"card (peak reserved <= {usable} GiB): {'YES' if ok else 'NO'} ({gb(r['reserved'])})"
                  + ("" if at_size else f" [measured at {Fr}x{H}x{W}, the goal is at {BENCH[a.preset][1]}]"))
    elif not cuda:
        print("CPU: a smoke test at a toy size (a rank-128 adapter on dim 256 is about as large as the blocks it adapts): "
              "the full/LoRA ratios say nothing about 1.3B/14B. The goals (1.3B LoRA in 24 GB, 14B in 80 GB) need CUDA.")


def main():
    a = parse_args()
    cuda = a.device.startswith("cuda")
    results = {}
    for mode in a.modes:   # one fresh process per mode: clean allocator, clean RSS high-water mark
        a.rss = False
        results[mode] = in_child(mode, a)
        if not cuda:     # CPU memory: another process, each tensor >= 64 KiB its own mmap (as bench_dit.py)
            a.rss = True
            mem = in_child(mode, a, {"MALLOC_MMAP_THRESHOLD_": "65536"})
            results[mode].update(peak=mem["peak"], how=mem["how"])
    report(a, results, cuda)


if __name__ == "__main__":
    main()
