"""
What fits where: per-GPU memory of one DMD training step (generator step + critic step, batch 1), COMPUTED
by arithmetic from exact parameter counts — nothing here is measured, no GPU is needed.

  python bench/memory_table.py                         # 480x832x81, FSDP over 8 GPUs, no sequence parallelism
  python bench/memory_table.py --gpus 16 --sp 4 --height 720 --width 1280

Networks are built on the meta device and laid out as train_dmd.build_networks does (bf16 mode):
- LoRA: ONE frozen base (bf16, FP32_MODULES params fp32 as `cast` keeps them) with two fp32 adapters
  ("generator", "critic"; train_dmd's lora_targets and ranks). Full: the bf16 base is the teacher, plus
  `copy.deepcopy(base).float()` twice (generator, critic), every parameter trained.
- trainable states: fp32 params 4 B + AdamW moments 8 B for both networks, fp32 grads 4 B for ONE network
  (train_dmd frees the generator's grads before the critic step; the larger set counted), fp32 EMA of the
  generator's trainable params 4 B. (Counting grads of both, 16 B/param each, adds one more 4 B set.)
- activations, gradient checkpointing on, E = dim, Fd = ffn_dim, L = latent tokens:
    checkpointed block inputs     num_layers * L*E*4      (our residual stream is fp32 between blocks)
  + one block's recompute set     3 * L*Fd*2 (FFN hidden: GELU in/out, its grad) + 6 * L*E*2 (q/k/v/o, grads)
  + outside the blocks            2 * L*E*4 (head LayerNorm in/out) + 16 fp32 latents (DMD's x, noise, scores)
  all divided by sp_size P (sequence parallelism splits tokens, not weights).
- DDP: everything replicated on each GPU (gradient_as_bucket_view: no second grad buffer).
  FSDP over N: weights and trainable states / N, plus all-gather buffers of 2 blocks in the storage dtype
  of the largest network (bf16 base block + its adapters for LoRA, fp32 block for full copies).
- the frozen base in 8 bits (base_model_precision int8/fp8, quant.py): 1 byte per weight of the blocks' Linears + an
  fp32 scale per row, plus one layer's dequantised weight while it runs (fp32 product + its bf16 copy, the largest
  Linear). residual_dtype bf16 halves the checkpointed block inputs; activation_offload moves them to host memory.
Not counted: the VAE (fp32, ~0.5 GiB, idle during the step), CUDA context, allocator fragmentation
(bench_dmd measured reserved = 1.21-1.25x allocated: "tight" below means the computed allocation fits but not
with that overhead; PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True may close it), NCCL buffers.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model_wan as mw  # noqa: E402
import lora  # noqa: E402
import train_dmd as td  # noqa: E402

GIB = 2 ** 30
CARDS = (("80 GB H100", 78.5), ("141 GB H200", 139.0))   # usable GiB: total 79.2 / 139.8 minus CUDA context
OVERHEAD = 1.25                                            # reserved / allocated, bench_dmd on an H100
# measured on one H100 at 480x832x81: peak allocated, peak reserved (GiB). 1.3B: bench_dmd.py (bench/README.md);
# 14B LoRA: train_dmd.py random:t2v-14B, first step, expandable_segments (bench/gpu_check.sh train, 2026-11-26)
MEASURED = {("t2v-1.3B", "lora"): (16.93, 21.18), ("t2v-1.3B", "full"): (51.54, 62.14), ("t2v-14B", "lora"): (73.10, 74.14)}


def is_fp32(name):
    return any(part in mw.FP32_MODULES for part in name.split("."))


def stored_bytes(module, bf16=True):
    """Bytes of a module's non-LoRA params after cast(bf16) (FP32_MODULES stay fp32), or all fp32; + adapters fp32;
    8-bit codes 1 byte, their scales 4."""
    n = 0
    for name, p in module.named_parameters():
        size = 1 if name.endswith("weight_q") else 4 if ".lora_" in name or not bf16 or is_fp32(name) \
            or name.endswith("weight_scale") else 2
        n += p.numel() * size
    return n


def count(preset):
    """Exact parameter counts and bytes of the networks train_dmd.build_networks makes, from meta tensors."""
    cfg = mw.PRESETS[preset]
    with torch.device("meta"):
        base = mw.WanDiT(cfg)
        n = mw.num_params(base)
        c = dict(cfg=cfg, n=n, base=stored_bytes(base), block_full=stored_bytes(base.blocks[0], bf16=False))
        d = td.DEFAULTS
        lora.add_adapter(base, "generator", d["lora_rank"], d["lora_alpha"], tuple(d["lora_targets"]))
        lora.add_adapter(base, "critic", d["fake_score_lora_rank"], d["fake_score_lora_alpha"], tuple(d["lora_targets"]))
    c["lora_g"] = sum(p.numel() for p in lora.adapter_parameters(base, "generator"))
    c["lora_f"] = sum(p.numel() for p in lora.adapter_parameters(base, "critic"))
    c["block_lora"] = stored_bytes(base.blocks[0])
    lora.quantize_base(base, "int8")   # the same base in 8 bits (meta: nothing allocated)
    c["base8"] = stored_bytes(base) - sum(p.numel() * 4 for n, p in base.named_parameters() if ".lora_" in n)
    c["max_linear"] = max(m.in_features * m.out_features for _, m in lora.lora_modules(base))
    return c


def tokens(height, width, frames):
    lat = (1, 16, (frames - 1) // 4 + 1, height // 8, width // 8)   # VAE: 4x in time (+1), 8x in space
    return lat[2] * (lat[3] // 2) * (lat[4] // 2), lat[1] * lat[2] * lat[3] * lat[4]


def activations(cfg, L, latent_numel, sp, residual=4, offload=False):
    """Activation bytes of one network's forward+backward; residual: bytes per checkpointed element (fp32 4, bf16 2);
    offload: the checkpointed inputs live in host memory."""
    E, Fd = cfg.dim, cfg.ffn_dim
    ckpt = 0 if offload else cfg.num_layers * L * E * residual
    recompute = 3 * L * Fd * 2 + 6 * L * E * 2
    outside = 2 * L * E * 4 + 16 * latent_numel * 4
    return (ckpt + recompute + outside) / sp


def memory(c, mode, par, gpus, sp, L, latent_numel):
    """-> (weights, trainable states, activations) in bytes per GPU."""
    g, f = (c["lora_g"], c["lora_f"]) if mode == "lora" else (c["n"], c["n"])
    weights = c["base"]                                      # the frozen base (LoRA) / the teacher (full)
    states = 12 * (g + f) + 4 * max(g, f) + 4 * g            # params + AdamW, grads of one net, EMA of G
    if par == "fsdp":
        gather = 2 * (c["block_lora"] if mode == "lora" else c["block_full"])
        weights, states = weights / gpus + gather, states / gpus
    return weights, states, activations(c["cfg"], L, latent_numel, sp)


TARGETS = {"t2v-1.3B": 12e9, "t2v-14B": 48e9}   # the targets for one GPU, LoRA, 480x832x81 (bytes)
VARIANTS = (("bf16", 4, False), ("int8", 4, False), ("bf16", 2, False), ("int8", 2, False), ("int8", 4, True),
            ("int8", 2, True))   # (base storage, residual bytes, activation offload)


def precision_table(counts, L, lat, a):
    """One GPU (no FSDP), LoRA: the base's storage x the residual stream's dtype x activation offload."""
    print(f"\nOne GPU, LoRA r{td.DEFAULTS['lora_rank']} (generator and critic), {a.height}x{a.width}x{a.frames}, sp "
          f"{a.sp}: base_model_precision x residual_dtype x activation_offload (computed)\n")
    print("| model | base | residual | offload | weights | trainable states | activations | total GiB | target | meets it? |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for preset, c in counts.items():
        target = TARGETS[preset] / GIB
        for base, res, off in VARIANTS:
            w = c["base"] if base == "bf16" else c["base8"] + 6 * c["max_linear"]   # + one dequantised Linear
            _, s, _ = memory(c, "lora", "ddp", 1, a.sp, L, lat)
            act = activations(c["cfg"], L, lat, a.sp, res, off)
            tot = (w + s + act) / GIB
            print(f"| {preset[4:]} | {base} | {'fp32' if res == 4 else 'bf16'} | {'host' if off else '-'} | "
                  f"{w / GIB:.1f} | {s / GIB:.1f} | {act / GIB:.1f} | **{tot:.1f}** | {target:.1f} | "
                  f"{'yes' if tot * OVERHEAD <= target else 'allocation only' if tot <= target else 'no'} |")
    print(f"\n'yes': within the target with the measured {OVERHEAD}x reserved/allocated overhead; 'allocation only': "
          "the computed allocation fits, the overhead does not. The bf16 / fp32 / - rows were measured on an H100 "
          "(calibration below); the others are computed from them, not yet measured.")


def teacher_forward(cfg, L, sp):
    """Transient bytes of a frozen teacher's no-grad forward (one block at a time, nothing kept for backward): the fp32
    residual, q/k/v/o in bf16 and the FFN hidden with its GELU output in bf16 -> L*(4E + 8E + 4Fd) / P."""
    return L * (4 * cfg.dim + 8 * cfg.dim + 4 * cfg.ffn_dim) / sp


def teacher_table(counts, L, lat, a):
    """A separate teacher (teacher_model_name_or_path): the 14B in 8 bits gives the real score, generator and critic
    are LoRA adapters of the 1.3B base. Weights: the 1.3B base + the 14B's 8-bit codes and scales (+ one dequantised
    Linear while it runs); trainable states and activations: the 1.3B LoRA's, + the 14B's no-grad forward transient
    (it runs while the generator's graph is alive). FSDP over N: both bases / N + the gather of 2 blocks of each."""
    s13, s14 = counts["t2v-1.3B"], counts["t2v-14B"]
    print(f"\nA 14B teacher for a 1.3B LoRA student and critic (teacher_model_name_or_path, config/wan_dmd_3step_14b_teacher.py), "
          f"{a.height}x{a.width}x{a.frames}, sp {a.sp} (computed)\n")
    print("| 1.3B base | 14B teacher | parallelism | weights | trainable states | activations | total GiB | "
          + " | ".join(f"fits {name}?" for name, _ in CARDS) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(CARDS))
    for base, teacher in (("bf16", "int8"), ("int8", "int8"), ("bf16", "bf16")):
        for par, n in (("ddp", 1), ("fsdp", a.gpus)):
            w13 = s13["base"] if base == "bf16" else s13["base8"] + 6 * s13["max_linear"]
            w14 = s14["base"] if teacher == "bf16" else s14["base8"] + 6 * s14["max_linear"]
            _, st, act = memory(s13, "lora", par, n, a.sp, L, lat)
            if par == "fsdp":   # + 2 blocks of each base gathered (the 14B's in its storage bytes)
                w13 = w13 / n + 2 * s13["block_lora"]
                w14 = w14 / n + 2 * (s14["base8"] if teacher == "int8" else s14["base"]) / s14["cfg"].num_layers
            act += teacher_forward(s14["cfg"], L, a.sp)
            w, tot = (w13 + w14) / GIB, (w13 + w14 + st + act) / GIB
            where = "one GPU" if par == "ddp" else f"FSDP x{n}"
            print(f"| {base} | {teacher} | {where} | {w:.1f} | {st / GIB:.1f} | {act / GIB:.1f} | **{tot:.1f}** | "
                  + " | ".join(fits(tot, u) for _, u in CARDS) + " |")
    print("\nFor comparison: '14B LoRA, DDP' above (the 14B as teacher AND LoRA base). Not yet measured: a GPU run of "
          "`train_dmd.py config/wan_dmd_3step_14b_teacher.py --pretrained_model_name_or_path=random:t2v-1.3B "
          "--teacher_model_name_or_path=random:t2v-14B` would confirm the one-GPU int8 row.")


def fits(total, usable):
    return "yes" if total * OVERHEAD <= usable else "tight" if total <= usable else "no"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8, help="FSDP world size N")
    p.add_argument("--sp", type=int, default=1, help="sequence-parallel size P (divides activations)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--frames", type=int, default=81, help="video frames (4k+1)")
    a = p.parse_args()
    L, lat = tokens(a.height, a.width, a.frames)
    counts = {k: count(k) for k in ("t2v-1.3B", "t2v-14B")}
    print(f"# DMD step memory per GPU, computed (not measured): batch 1, {a.height}x{a.width}x{a.frames} "
          f"(L = {L:,} tokens), bf16 base, gradient checkpointing, sp_size {a.sp}\n")
    print("| model | mode | parallelism | weights | trainable states | activations | total GiB | "
          + " | ".join(f"fits {name}?" for name, _ in CARDS) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(CARDS))
    rows = []
    for preset, c in counts.items():
        for mode in ("lora", "full"):
            label = (f"LoRA r{td.DEFAULTS['lora_rank']} ({c['lora_g'] / 1e6:.0f}M+{c['lora_f'] / 1e6:.0f}M), shared base"
                     if mode == "lora" else f"full fp32 copies ({c['n'] / 1e6:.0f}M x2)")
            for par in ("ddp", "fsdp"):
                w, s, act = (x / GIB for x in memory(c, mode, par, a.gpus, a.sp, L, lat))
                tot = w + s + act
                rows.append((preset, mode, par, w + s))
                where = "DDP (replicated)" if par == "ddp" else f"FSDP x{a.gpus}"
                print(f"| {preset[4:]} | {label} | {where} | {w:.1f} | {s:.1f} | {act:.1f} | **{tot:.1f}** | "
                      + " | ".join(fits(tot, u) for _, u in CARDS) + " |")
    print(f"\n'yes': fits with the measured {OVERHEAD}x reserved/allocated overhead; 'tight': the computed "
          "allocation fits, the overhead does not.\n")

    print(f"Sequence parallelism (FSDP x{a.gpus}; activations / P):")
    for preset, mode, par, fixed in rows:
        if par == "fsdp":
            c = counts[preset]
            tot = {P: fixed + activations(c["cfg"], L, lat, P) / GIB for P in (1, 4)}
            print(f"  {preset[4:]:>4} {mode:<4}: sp 1 -> {tot[1]:5.1f} GiB, sp 4 -> {tot[4]:5.1f} GiB")

    precision_table(counts, L, lat, a)
    teacher_table(counts, L, lat, a)
    L0, lat0 = tokens(480, 832, 81)
    print("\nCalibration, one GPU at 480x832x81, sp 1 (measured on an H100, see MEASURED):")
    for (preset, mode), (alloc, res) in MEASURED.items():
        tot = sum(memory(counts[preset], mode, "ddp", 1, 1, L0, lat0)) / GIB
        print(f"  {preset[4:]:>4} {mode:<4}: computed {tot:5.2f} GiB | measured peak allocated {alloc:.2f} GiB ({tot / alloc - 1:+.0%}), "
              f"reserved {res:.2f} GiB ({tot / res - 1:+.0%})")


if __name__ == "__main__":
    main()
