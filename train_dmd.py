"""
DMD distillation of a Wan 2.1 teacher into a few-step student (shared/design/dmd.md §3-§6):
generator G (student), fake score F (critic) and the frozen real score R (teacher).

  python train_dmd.py config/wan_dmd_3step.py                 # the seed's 1.3B run
  python train_dmd.py config/tiny.py --max_train_steps=20     # tiny random teacher on CPU, no downloads
  python train_dmd.py path/to/simpletuner/config.json         # the seed's SimpleTuner config, mapped
  python train_dmd.py --help
  torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step.py    # DDP; FSDP2 and sequence parallelism: parallel.py

With LoRA on G and F (the default) ONE frozen base serves all three networks: R = base with no adapter,
G = base + adapter "generator", F = base + adapter "critic". Data-free: the training input is prompts only
(text embeddings precomputed once, the text encoder freed before training). With `datasets` (data.py): captions
and VAE latents cached once, read in bucket batches; they feed rollout_mode="data" and real_data_loss_weight.
"""
import copy
import json
import math
import os
import random
import shutil
import signal
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import model_wan as mw
import parallel
import publish
import sample

# -----------------------------------------------------------------------------
# defaults; override with config files (python train_dmd.py CONFIG.py) and --key=value
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # teacher: pipeline root/hub id/original folder;
                                       # "tiny": random tiny teacher; "random:t2v-1.3B" / "random:t2v-14B": random
                                       # weights at real size (memory and speed checks without downloads)
output_dir = "out/wan_dmd"
prompts_file = ""                      # training prompts, one per line (data-free DMD); empty: validation prompts
datasets = []                          # data.py dataset dicts; given: cached latents + captions replace prompts_file
rollout_mode = "backward"              # "backward": data-free rollout from noise; "data": noise dataset latents (dmd.md)
negative_prompt = None                 # None: Wan's default negative prompt; "": the empty prompt
height = 480                           # training resolution (pixels) of the generated samples
width = 832
num_training_frames = 21               # latent frames of a generated sample (21 latent = 81 video frames)
# DMD (dmd.md §3-§7)
dmd_denoising_steps = "1000,757,522"   # rollout and inference timesteps, σ = t/1000
warp_denoising_step = False            # Self-Forcing: t_k <- 1000*shift(t_k/1000) with timestep_shift
generator_update_interval = 1          # generator step every N trainer steps; the critic steps every step
real_score_guidance_scale = 3.0        # w in x_real = x_cond + w(x_cond - x_uncond) (DMD2 form: standard CFG = w+1)
fake_score_guidance_scale = 0.0        # the same form on the critic; 0 = off
min_timestep_ratio = 0.02              # final clamp of score timesteps to [1000*min, 1000*max]
max_timestep_ratio = 0.98
ts_schedule = True                     # score t >= the rollout's next timestep (else >= min_score_timestep)
ts_schedule_max = False                # score t <= the rollout's exit timestep (else <= 1000)
min_score_timestep = 0
timestep_shift = 1.0                   # shift applied to score timesteps (1 = none)
last_step_only = False                 # always exit the rollout at the last step
real_data_loss_weight = 0.0            # flow-matching term of G on dataset latents, added to the DMD loss (needs datasets)
flow_schedule_shift = 5.0              # shift of the real-data flow-matching timesteps
# causal student (Self-Forcing, dmd.md §9; README "Causal student"): the generator denoises blocks of latent
# frames one after another with a KV cache; teacher and critic stay bidirectional. causal=False: the keys below must
# keep their bidirectional values (one block, one exit step, no context noise), anything else is an error.
causal = False                         # block-causal generator (model_wan forward(causal=, kv_cache=))
num_frame_per_block = 0                # latent frames per block (Self-Forcing: 3); 0 = one block of all frames
independent_first_frame = False        # latent frame 0 is a block of its own (then the rest split into blocks)
same_step_across_blocks = True         # one exit step shared by all blocks; False: one drawn per block
context_noise = 0                      # t (0-1000 scale) of the no-grad pass that writes a finished block's cache; 0 = clean
dmd_loss_frames = 0                    # latent frames the DMD and critic losses see: the LAST ones of the rollout
                                       # (Self-Forcing: 21 of a longer num_training_frames); 0 = num_training_frames.
                                       # Shorter: the first kept frame is re-encoded by the VAE as an image latent
objective = "dmd"                      # "dmd"; "ode_init": regress the generator on teacher ODE trajectories (datasets
                                       # = the folder of `python data.py CONFIG --make_ode_pairs=prompts.txt`) at every
                                       # trainer step; no critic, no teacher forward
generator_init = ""                    # student to start the generator from: a train_dmd output folder or .safetensors
                                       # (LoRA file -> the generator adapter; full weights -> needs lora_rank = 0)
# networks
lora_rank = 128                        # generator LoRA rank; 0 = full fine-tune (a separate fp32 copy)
lora_alpha = 128
lora_targets = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
fake_score_lora_rank = 128             # critic LoRA rank; 0 = full fine-tune
fake_score_lora_alpha = 128
gradient_checkpointing = True
mixed_precision = "bf16"               # "bf16": bf16 base weights + autocast on CUDA; "no": fp32 (always fp32 on CPU)
compile = False                        # torch.compile each DiT block
# many GPUs (torchrun; parallel.py)
fsdp = False                           # FSDP2: shard teacher, generator and critic per block (sharded checkpoints)
sp_size = 1                            # Ulysses sequence parallelism: ranks per sample (divides heads and tokens)
# optimisation
optimizer = "adamw"                    # "adamw"; the seed's "adamw_bf16" maps to fp32 master weights (same updates)
learning_rate = 2e-5
adam_beta1 = 0.9
adam_beta2 = 0.999
adam_weight_decay = 0.01
adam_epsilon = 1e-8
lr_scheduler = "constant"              # constant | cosine | cosine_with_min_lr (all with linear warmup), over trainer steps
lr_warmup_steps = 0
lr_min_ratio = 0.1                     # cosine_with_min_lr: final lr = learning_rate * lr_min_ratio
max_grad_norm = 1.0
grad_clip_method = "norm"              # "norm" or "value"
fake_score_lr = 1e-5
fake_score_weight_decay = 0.01
fake_score_betas = (0.9, 0.999)
fake_score_eps = 1e-8
fake_score_grad_clip = 1.0
max_train_steps = 4000
train_batch_size = 1
gradient_accumulation_steps = 1
max_nonfinite_steps = 5                # abort after this many non-finite losses in a row
seed = 42
# EMA of the generator's trainable weights (fp32 shadow)
use_ema = True
ema_decay = 0.99
ema_update_interval = 5                # in generator steps
ema_start_step = 0
ema_validation = "ema_only"            # none | ema_only | comparison
# checkpoints
checkpoint_step_interval = 200
checkpoints_total_limit = 3
resume_from_checkpoint = "latest"      # "latest", a checkpoint folder, or "" for a fresh start
# validation and logging
validation_step_interval = 200
validation_prompt = "A cat walks on the grass, realistic style."
validation_prompt_library = ""         # JSON file: {"name": "prompt", ...} or ["prompt", ...]
validation_seed = 42
validation_num_inference_steps = 3     # must equal the number of dmd_denoising_steps
validation_guidance = 1.0              # the student sampler takes no CFG: must be 1.0
validation_resolution = "832x480"      # WxH
validation_num_video_frames = 81
log_interval = 1
report_to = "none"                     # "none" or "wandb"
tracker_project_name = "wan-dmd"
tracker_run_name = ""
# publishing (publish.py, rank 0): hub, model card, webhooks
push_to_hub = False                    # at the end: student, merged transformer, config, model card, samples -> hub_model_id
push_checkpoints_to_hub = False        # upload each checkpoint as written (background thread; retried when it fails)
hub_model_id = ""                      # "user/name" (created if needed); token: HF_TOKEN or the cached login
model_card_private = False             # create the hub repo private
model_card_note = ""                   # a paragraph added to the model card
push_merged_to_hub = True              # with LoRA: also upload the merged transformer/ (full weights) beside the adapter
webhook_config = None                  # JSON file or string: {"webhook_type": "discord"|"raw", "webhook_url"|"callback_url",
                                       # "message_prefix", "log_level"}; notified at start/validation/checkpoint/failure/end
device = "auto"
# -----------------------------------------------------------------------------

# the seed's SimpleTuner config.json keys that differ from ours (all other implemented keys match by name)
SIMPLETUNER_RENAMES = {"train_batch_size": "train_batch_size", "validation_steps": "validation_step_interval",
                       "checkpointing_steps": "checkpoint_step_interval", "lr_warmup_steps": "lr_warmup_steps",
                       "adam_weight_decay": "adam_weight_decay", "model_path": "pretrained_model_name_or_path"}
SIMPLETUNER_VALUES = {"optimizer": {"adamw_bf16": "adamw"}, "mixed_precision": {"bf16": "bf16", "no": "no"}}

# -----------------------------------------------------------------------------
# DMD math: small pure functions over networks passed in as velocity functions f(x, t, ctx) -> v

def shift_timestep(t, s):
    """1000·shift_s(t/1000) with shift_s(u) = s·u/(1+(s−1)u)."""
    return 1000 * sample.shift_sigmas(t / 1000, s)


def rollout_steps(steps, warp, shift):
    return [float(shift_timestep(torch.tensor(t), shift)) if warp else float(t) for t in steps]


def rollout(gen, noise, ctx, steps, k_exit, generator=None):
    """Backward simulation (dmd.md §3): no-grad steps before k_exit, then the ONLY forward with gradient (as the
    caller's grad mode allows). noise (B,C,F,H,W) -> (x_g = x − σ·G(x, t_k*), t_from, t_to). generator: the
    re-noising draws from it (on the CPU) instead of the global stream."""
    x = noise
    with torch.no_grad():
        for k in range(k_exit):
            s, s_next = steps[k] / 1000, steps[k + 1] / 1000
            x0 = x - s * gen(x, torch.full((x.shape[0],), steps[k], device=x.device), ctx)
            x = (1 - s_next) * x0 + s_next * randn_as(x0, generator)
    s = steps[k_exit] / 1000
    x_g = x - s * gen(x, torch.full((x.shape[0],), steps[k_exit], device=x.device), ctx)
    t_to = steps[k_exit + 1] if k_exit + 1 < len(steps) else 0.0
    return x_g, steps[k_exit], t_to


def randn_as(x, generator=None):
    return torch.randn_like(x) if generator is None else torch.randn(x.shape, generator=generator).to(x.device)


def data_rollout(gen, x0, ctx, steps, k_exit):
    """The "data latent" mode (FastWan): noise a dataset latent x0 to t_k* and run the one student forward
    with gradient -> (x_g, t_from, t_to) as `rollout` returns them."""
    s = steps[k_exit] / 1000
    x = (1 - s) * x0 + s * torch.randn_like(x0)
    x_g = x - s * gen(x, torch.full((x.shape[0],), steps[k_exit], device=x.device), ctx)
    return x_g, steps[k_exit], steps[k_exit + 1] if k_exit + 1 < len(steps) else 0.0


def exit_steps(seed, step, salt, n_steps, n_blocks, same=True, last_only=False):
    """The rollout's exit step per block (dmd.md §3, §9), identical on every rank without a broadcast: drawn from
    a generator seeded by (seed, trainer step, salt: 0 generator / 1 critic). same: one draw shared by all blocks
    (the bidirectional student is one block: the same draw as before the causal mode); last_only: the last step."""
    if last_only:
        return [n_steps - 1] * n_blocks
    g = torch.Generator().manual_seed((seed * 100003 + step) * 2 + salt)
    ks = torch.randint(n_steps, (1 if same else n_blocks,), generator=g).tolist()
    return ks * n_blocks if same else ks


def causal_rollout(gen, noise, ctx, steps, exits, starts, cache, context_noise=0.0, grad_from=0, generator=None):
    """Block-wise backward simulation (dmd.md §9, Self-Forcing). gen(x, t, ctx, kv_cache=, start_frame=) runs one
    block of latent frames against the cache. Per block b (frames [starts[b], starts[b+1])): no-grad steps before
    exits[b], the block's ONLY forward with gradient at exits[b] (none for blocks starting before grad_from),
    its x̂0 written into the clip, then one no-grad pass on x̂0 noised to t = context_noise that rewrites the block's
    cache entries for the later blocks (the cache holds detached k/v: no gradient crosses blocks; the last block's
    pass is skipped, nothing reads it). With every exit at the last step and no grad this is the causal sampler.
    noise (B,C,F,H,W) -> (x_g (B,C,F,H,W), t_from, t_to): the score window of §4 spans every block's exit,
    t_from = the largest exit timestep, t_to = the smallest next timestep (the same step: that step's pair)."""
    B, Fr = noise.shape[0], noise.shape[2]
    cache.reset()
    out, windows = [], []
    for b, (s, e) in enumerate(zip(starts, starts[1:] + [Fr])):
        block = lambda x, t, ctx_, s=s: gen(x, t, ctx_, kv_cache=cache, start_frame=s)   # noqa: E731
        with torch.set_grad_enabled(torch.is_grad_enabled() and s >= grad_from):
            x0, t_from, t_to = rollout(block, noise[:, :, s:e], ctx, steps, exits[b], generator)
        out.append(x0)
        windows.append((t_from, t_to))
        if e < Fr:
            with torch.no_grad():
                sc = context_noise / 1000
                block((1 - sc) * x0.detach() + sc * randn_as(x0, generator),
                      torch.full((B,), float(context_noise), device=noise.device), ctx)
    return torch.cat(out, 2), max(w[0] for w in windows), min(w[1] for w in windows)


def keep_last_frames(x_g, n, vae=None):
    """The last n latent frames of a longer rollout (Self-Forcing's num_training_frames > 21). With a VAE the first
    kept frame is re-encoded as an image latent (decode up to it, encode its last pixel frame alone) so the clip
    starts as a real clip does; that frame carries no gradient. x_g (B,C,F,H,W) -> (B,C,n,H,W)."""
    Fr = x_g.shape[2]
    if n >= Fr:
        return x_g
    if vae is None:
        return x_g[:, :, Fr - n:]
    with torch.no_grad():
        pixels = vae.decode(x_g[:, :, :Fr - n + 1].detach().float())         # (B,3,1+4(F-n),8H,8W)
        first = vae.encode(pixels[:, :, -1:]).to(x_g.dtype)                    # (B,C,1,H,W)
    return torch.cat([first, x_g[:, :, Fr - n + 1:]], 2)


def ode_regression_loss(gen, traj, x0, ctx, steps, starts):
    """ODE-init regression (CausVid §4.3, Self-Forcing's initialisation): per sample and block a random index i of
    the student's steps; the block's frames are the teacher trajectory's state at steps[i] and its t is steps[i]
    (teacher forcing: one whole-clip causal pass with per-frame t); loss mean (x̂0 − x0_teacher)².
    traj (B,K,C,F,H,W) states at the K student timesteps; x0 (B,C,F,H,W) the teacher's final sample."""
    B, K, C, Fr, H, W = traj.shape
    blk = torch.tensor([sum(s <= f for s in starts) - 1 for f in range(Fr)])  # (F,) block of each frame
    idx = torch.randint(K, (B, len(starts)))[:, blk].to(traj.device)          # (B,F) trajectory index per frame
    x = traj.gather(1, idx[:, None, None, :, None, None].expand(B, 1, C, Fr, H, W)).squeeze(1)   # (B,C,F,H,W)
    t = torch.tensor(steps, dtype=torch.float32, device=traj.device)[idx]     # (B,F)
    v = gen(x, t if len(starts) > 1 else t[:, 0], ctx)
    pred = x - (t / 1000)[:, None, :, None, None] * v
    return F.mse_loss(pred.float(), x0.float()), t


def flow_matching_loss(net, x0, ctx, shift):
    """Plain flow-matching loss on data latents (the optional real-data term of §6): σ = shift(u), u ~ U(0,1),
    mean (net(x_σ, 1000σ) − (ε − x0))²."""
    sig = sample.shift_sigmas(torch.rand(x0.shape[0], device=x0.device), shift)
    eps = torch.randn_like(x0)
    s = sig.view(-1, 1, 1, 1, 1)
    return (net((1 - s) * x0 + s * eps, 1000 * sig, ctx).float() - (eps - x0)).square().mean()


def score_timesteps(batch, t_from, t_to, c, device):
    """Score timesteps of §4: uniform in the window, then shift, then the min/max ratio clamp -> (B,) float."""
    lo = t_to if c["ts_schedule"] else c["min_score_timestep"]
    hi = t_from if c["ts_schedule_max"] else 1000.0
    t = lo + (hi - lo) * torch.rand(batch, device=device)
    if c["timestep_shift"] > 1:
        t = shift_timestep(t, c["timestep_shift"])
    return t.clamp(1000 * c["min_timestep_ratio"], 1000 * c["max_timestep_ratio"])


def guided_x0(net, x_t, t, ctx, neg_ctx, w):
    """x0 of a flow net with guidance in the DMD2 form: x̂_c + w(x̂_c − x̂_u); w = 0: conditional only."""
    sig = (t / 1000).view(-1, 1, 1, 1, 1)
    x0 = x_t - sig * net(x_t, t, ctx)
    if w != 0:
        x0 = x0 + w * (x0 - (x_t - sig * net(x_t, t, neg_ctx)))
    return x0


def dmd_loss(x_g, t, real, fake, ctx, neg_ctx, w_real, w_fake):
    """Generator loss of §4. Everything but x_g is no-grad; ∂L/∂x_g = g / numel exactly.
    -> (loss, g, stats) with g = nan_to_num((x̂_fake − x̂_real) / mean|x_g − x̂_real|) per sample."""
    with torch.no_grad():
        xg = x_g.detach().float()
        sig = (t / 1000).view(-1, 1, 1, 1, 1)
        x_t = (1 - sig) * xg + sig * torch.randn_like(xg)
        x_fake = guided_x0(fake, x_t, t, ctx, neg_ctx, w_fake).float()
        x_real = guided_x0(real, x_t, t, ctx, neg_ctx, w_real).float()
        norm = (xg - x_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        g = torch.nan_to_num((x_fake - x_real) / norm)
    loss = 0.5 * F.mse_loss(x_g.float(), (xg - g), reduction="mean")
    stats = {"x_g": xg, "x_real": x_real, "x_fake": x_fake}
    return loss, g, stats


def critic_loss(fake, x_g, t, ctx):
    """Flow matching on the student's samples (§5): mean (F(x_t, t) − (ε − x_g))², x_g detached."""
    x_g = x_g.detach().float()
    sig = (t / 1000).view(-1, 1, 1, 1, 1)
    eps = torch.randn_like(x_g)
    pred = fake((1 - sig) * x_g + sig * eps, t, ctx)
    per_sample = (pred.float() - (eps - x_g)).square().mean(dim=(1, 2, 3, 4))
    return per_sample.mean(), per_sample.detach()

# -----------------------------------------------------------------------------
# setup helpers

def check_config(c):
    """Errors for values we cannot honour, never a silent ignore."""
    steps = [float(s) for s in str(c["dmd_denoising_steps"]).split(",")]
    if steps != sorted(steps, reverse=True) or not all(0 < s <= 1000 for s in steps):
        raise ValueError(f"dmd_denoising_steps must decrease within (0, 1000], got {c['dmd_denoising_steps']!r}")
    Fr, L = c["num_training_frames"], c["dmd_loss_frames"] or c["num_training_frames"]
    if c["objective"] not in ("dmd", "ode_init"):
        raise ValueError(f"objective must be 'dmd' or 'ode_init', got {c['objective']!r}")
    if not c["causal"]:
        bidir = {"num_frame_per_block": c["num_frame_per_block"] in (0, None, Fr),
                 "independent_first_frame": not c["independent_first_frame"],
                 "same_step_across_blocks": bool(c["same_step_across_blocks"]), "context_noise": c["context_noise"] == 0,
                 "dmd_loss_frames": L == Fr}
        bad = [k for k, ok in bidir.items() if not ok]
        if bad:
            raise ValueError(f"{', '.join(f'{k}={c[k]!r}' for k in bad)}: these are keys of the causal (block-wise) "
                             "student: set causal=True, or keep num_frame_per_block=0 (one block), "
                             "independent_first_frame=False, same_step_across_blocks=True, context_noise=0, "
                             "dmd_loss_frames=0")
    else:   # every block geometry error before any model is built (the seed's 121 frames -> 31 latent, dmd.md §8.11)
        nb, first = c["num_frame_per_block"] or 0, int(bool(c["independent_first_frame"]))
        Fv = 1 + (c["validation_num_video_frames"] - 1) // 4
        for what, n in (("num_training_frames", Fr), ("validation_num_video_frames (latent frames)", Fv)):
            try:
                ok = n - first >= 1 and mw.block_starts(n, nb, first)
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{what}={n}: {n - first} latent frames" + (" after the lone first frame" if first else "")
                                 + f" do not split into blocks of num_frame_per_block={nb}; e.g. 21 latent frames "
                                 "(81 video frames) with 3, or 21 with independent_first_frame and 4 (121 video "
                                 "frames are 31 latent: not a multiple of 3)")
        blocks = mw.block_starts(Fr, nb, first)
        if not 0 < L <= Fr or Fr - L not in blocks:
            raise ValueError(f"dmd_loss_frames={c['dmd_loss_frames']}: the loss keeps the last frames from a block start "
                             f"(block starts {blocks}); use 0 (all {Fr}) or one of {sorted(Fr - b for b in blocks)}")
        if not 0 <= c["context_noise"] < 1000:
            raise ValueError(f"context_noise={c['context_noise']}: a timestep in [0, 1000) (0 = clean context)")
        if c["sp_size"] > 1:
            raise ValueError("sp_size > 1: sequence parallelism does not support the causal student")
        if c["rollout_mode"] != "backward" and c["objective"] == "dmd":
            raise ValueError("rollout_mode='data' noises a whole dataset clip at once: the causal student needs "
                             "rollout_mode='backward'")
    if c["objective"] == "ode_init":
        if not any(d.get("dataset_type") == "latents" for d in c["datasets"]):
            raise ValueError("objective='ode_init' reads teacher ODE trajectories: datasets=[dict(dataset_type="
                             "'latents', cache_dir=...)] with the folder of `python data.py CONFIG "
                             "--make_ode_pairs=prompts.txt`")
        if c["real_data_loss_weight"] > 0:
            raise ValueError("real_data_loss_weight is a DMD term: set it to 0 with objective='ode_init'")
    if c["rollout_mode"] not in ("backward", "data"):
        raise ValueError(f"rollout_mode must be 'backward' or 'data', got {c['rollout_mode']!r}")
    videos = [d for d in c["datasets"] if d.get("dataset_type", "video") in ("video", "latents")]
    if (c["real_data_loss_weight"] > 0 or c["rollout_mode"] == "data") and not videos:
        raise ValueError("real_data_loss_weight > 0 and rollout_mode='data' need latents: add a video or latents dataset "
                         "to `datasets`")
    if videos and len(videos) != len(c["datasets"]) and (c["real_data_loss_weight"] > 0 or c["rollout_mode"] == "data"):
        raise ValueError("real_data_loss_weight > 0 / rollout_mode='data' need latents in every batch: drop the "
                         "prompt-only datasets from `datasets`")
    if c["validation_guidance"] != 1.0:
        raise ValueError("validation_guidance must be 1.0: the student sampler takes no CFG")
    if c["validation_num_inference_steps"] != len(steps):
        raise ValueError(f"validation_num_inference_steps={c['validation_num_inference_steps']} must equal the "
                         f"number of dmd_denoising_steps ({len(steps)}): validation runs the training rollout's sampler")
    for k, allowed in (("lr_scheduler", ("constant", "cosine", "cosine_with_min_lr")), ("grad_clip_method", ("norm", "value")),
                       ("ema_validation", ("none", "ema_only", "comparison")), ("mixed_precision", ("bf16", "no")),
                       ("optimizer", ("adamw", "adamw_bf16")), ("report_to", ("none", "wandb"))):
        if c[k] not in allowed:
            raise ValueError(f"{k} must be one of {allowed}, got {c[k]!r}")
    if not isinstance(c["sp_size"], int) or c["sp_size"] < 1:
        raise ValueError(f"sp_size must be a positive integer, got {c['sp_size']!r}")
    if (c["push_to_hub"] or c["push_checkpoints_to_hub"]) and not c["hub_model_id"]:
        raise ValueError("push_to_hub / push_checkpoints_to_hub need hub_model_id ('user/name' on the hub)")
    if c["height"] % 16 or c["width"] % 16:
        raise ValueError(f"height and width must be multiples of 16, got {c['height']}x{c['width']}")
    return steps


def map_simpletuner(d):
    """SimpleTuner config.json -> our keys (those we implement); the rest listed in one warning."""
    known = set(DEFAULTS)
    out, skipped = {}, []
    for k, v in d.items():
        k = k.lstrip("-")
        ours = SIMPLETUNER_RENAMES.get(k, k)
        if ours in known:
            v = SIMPLETUNER_VALUES.get(ours, {}).get(v, v) if isinstance(v, str) else v
            if isinstance(DEFAULTS[ours], tuple) and isinstance(v, str):
                v = tuple(float(x) for x in v.strip("[]()").split(","))
            if isinstance(DEFAULTS[ours], (int, float)) and not isinstance(DEFAULTS[ours], bool) and isinstance(v, str):
                v = type(DEFAULTS[ours])(float(v))
            if isinstance(DEFAULTS[ours], bool) and isinstance(v, str):
                v = v.lower() == "true"
            out[ours] = v
        else:
            skipped.append(k)
    if skipped:
        print(f"warning: SimpleTuner keys not implemented here, ignored: {', '.join(sorted(skipped))}")
    return out


TINY_TEXT_MARKER = "tiny_text_encoder"   # file in a teacher folder whose prompts TinyTextEncoder embeds (demo.py)


class TinyTextEncoder:
    """Deterministic stand-in for UMT5 with the tiny teacher: each word maps to a fixed random vector,
    EOS appended, rows after the prompt exactly zero."""

    def __init__(self, dim, max_length=512):
        self.dim, self.max_length = dim, max_length

    def encode(self, prompts):
        out = torch.zeros(len(prompts), self.max_length, self.dim)
        for i, p in enumerate(prompts):
            words = mw.clean_prompt(p).lower().split()[: self.max_length - 1] + ["</s>"]
            for j, w in enumerate(words):
                seed = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") % (2**31) + len(w)
                out[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
        return out


def text_encoder(src, dtype, dev, dit=None):
    """The teacher folder's text encoder: TinyTextEncoder for a demo.py teacher (TINY_TEXT_MARKER; its width from
    `dit`, or from the folder's DiT config), else UMT5 through mw.load_text_encoder."""
    if os.path.exists(os.path.join(src, TINY_TEXT_MARKER)):
        return TinyTextEncoder((dit if dit is not None else mw.load_dit(src)).cfg.text_dim)
    return mw.load_text_encoder(src, dtype=dtype, device=dev)


def build_networks(c, dev, dtype):
    """-> (base DiT holding the teacher (+ LoRA adapters), generator module, critic module, vae, text encoder)."""
    src = c["pretrained_model_name_or_path"]
    if src == "tiny":
        torch.manual_seed(c["seed"])
        base = mw.WanDiT(mw.PRESETS["tiny"]).to(dev)
        vae = mw.WanVAE(mw.WanVAEConfig(base_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)).to(dev)
        te = TinyTextEncoder(base.cfg.text_dim)
    elif src.startswith("random:"):   # real architecture, random weights, built on the device
        preset = src.split(":", 1)[1]
        if preset not in mw.PRESETS:
            raise ValueError(f"{src!r}: unknown preset {preset!r}; have {sorted(mw.PRESETS)}")
        torch.manual_seed(c["seed"])
        with torch.device(dev):
            base = mw.WanDiT(mw.PRESETS[preset]).cast(dtype)
            vae = mw.WanVAE(mw.WanVAEConfig())
        te = TinyTextEncoder(base.cfg.text_dim)
    else:
        base = mw.load_dit(src, dtype=dtype, device=dev)
        vae = mw.load_vae(src, dtype=torch.float32, device=dev)
        # a demo.py teacher folder names TinyTextEncoder; else UMT5, loaded, used and freed in encode_prompts
        te = text_encoder(src, dtype, dev, base) if os.path.exists(os.path.join(src, TINY_TEXT_MARKER)) else None
    base.requires_grad_(False).eval()
    base.gradient_checkpointing = c["gradient_checkpointing"]
    gen = critic = base
    if c["lora_rank"] > 0:
        mw.add_adapter(base, "generator", c["lora_rank"], c["lora_alpha"], tuple(c["lora_targets"]))
    else:
        gen = copy.deepcopy(base).float()
    if c["generator_init"]:   # e.g. the causal ODE-init student (before the critic adapter: the critic stays the teacher's)
        with torch.no_grad():
            load_generator_init(c, base, gen, "generator" if gen is base else None)
    if c["fake_score_lora_rank"] > 0:
        mw.add_adapter(base, "critic", c["fake_score_lora_rank"], c["fake_score_lora_alpha"], tuple(c["lora_targets"]))
    else:
        critic = copy.deepcopy(base).float()
        if "generator" in mw.adapter_names(critic):
            mw.delete_adapter(critic, "generator")
    for m in {id(gen): gen, id(critic): critic}.values():
        if m is not base:
            for n, p in m.named_parameters():
                p.requires_grad_(".lora_" not in n)
    return base, gen, critic, vae, te


def networks(*models):
    """The distinct modules among base, generator and critic (one when LoRA shares the base)."""
    return list({id(m): m for m in models}.values())


def trainable(model, adapter):
    """The trainable parameters of a network: its adapter's, or every base parameter of a full copy."""
    return list(named_trainable(model, adapter).values())


def named_trainable(model, adapter):
    """{name: parameter} of `trainable`, in its order."""
    if adapter is not None:
        return {n: p for n, p in model.named_parameters() if n.endswith(f".lora_A.{adapter}") or n.endswith(f".lora_B.{adapter}")}
    return {n: p for n, p in model.named_parameters() if ".lora_" not in n}


def velocity_fn(model, adapter, autocast, causal=None):
    """f(x, t, ctx, **kw) -> fp32 velocity of `model` with `adapter` active (None = the base weights). causal =
    (num_frame_per_block, independent_first_frame): the block-causal student; kw (kv_cache=, start_frame=) then runs
    one block against the cache (DDP and parallel.Trainable pass keywords through)."""
    def f(x, t, ctx, **kw):
        with mw.use_adapter(model, adapter), autocast():
            if causal is None:
                return model(x, t, ctx).float()
            return model(x, t, ctx, causal=causal, **kw).float()
    return f


def load_generator_init(c, base, gen, g_adapter):
    """generator_init: a LoRA file becomes the generator adapter (its own rank); full weights fill the generator's
    full copy (lora_rank = 0). A train_dmd output folder: student_ema.safetensors, else student.safetensors."""
    from safetensors.torch import load_file
    path = c["generator_init"]
    if os.path.isdir(path):
        names = [n for n in ("student_ema.safetensors", "student.safetensors") if os.path.exists(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"generator_init={path!r}: no student_ema.safetensors or student.safetensors there")
        path = os.path.join(path, names[0])
    sd = load_file(path)
    if any(".lora_A" in k for k in sd):
        if g_adapter is None:
            raise ValueError(f"generator_init={path!r} is a LoRA adapter: use lora_rank > 0 (it sets the rank)")
        mw.delete_adapter(base, "generator")
        mw.load_adapter(base, "generator", {k: v.to(base.patch_embedding.weight.device) for k, v in sd.items()})
    else:
        if g_adapter is not None:
            raise ValueError(f"generator_init={path!r} holds full weights: use lora_rank = 0 (a full generator copy)")
        sample.load_student(gen, path)
    return path


def lr_lambda(c):
    def f(step):
        if step < c["lr_warmup_steps"]:
            return (step + 1) / (c["lr_warmup_steps"] + 1)
        if c["lr_scheduler"] == "constant":
            return 1.0
        progress = min(1.0, (step - c["lr_warmup_steps"]) / max(1, c["max_train_steps"] - c["lr_warmup_steps"]))
        lo = c["lr_min_ratio"] if c["lr_scheduler"] == "cosine_with_min_lr" else 0.0
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def pad_context(rows, dev, dtype):
    """List of (n_i, D) trimmed embeddings -> (B, 512, D) on dev in dtype (mw.pad_context)."""
    return mw.pad_context(rows).to(dev, dtype)


def encode_prompts(c, te, prompts, dev, dtype):
    """Encode prompts once (the text encoder is then freed) -> list of trimmed (n_i, D) CPU tensors."""
    if te is None:
        te = mw.load_text_encoder(c["pretrained_model_name_or_path"], dtype=dtype, device=dev)
    out = []
    for i in range(0, len(prompts), 16):
        emb = te.encode(prompts[i:i + 16]).cpu()
        out += [mw.trim_context(e).clone() for e in emb]
    return out

# -----------------------------------------------------------------------------
# checkpoints

def seed_all(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    st = {"python": list(random.getstate()[1]), "python_pos": random.getstate()[2],
          "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)), "numpy_pos": int(np.random.get_state()[2]),
          "numpy_gauss": [int(np.random.get_state()[3]), float(np.random.get_state()[4])],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    random.setstate((3, tuple(st["python"]), st["python_pos"]))
    np.random.set_state(("MT19937", st["numpy"].numpy().astype(np.uint32), st["numpy_pos"], *st["numpy_gauss"]))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(out_dir, state, limit, env=parallel.Dist(), rank_state=None, sharded=None):
    """Write checkpoint-{step}/ via a temporary folder and a rename; keep the newest `limit`. state.pt comes
    from rank 0; with several processes rank r > 0 adds rank{r}.pt (its RNG and data position) and FSDP adds
    the sharded weights and optimiser states under sharded/ (torch.distributed.checkpoint, every rank)."""
    final = os.path.join(out_dir, f"checkpoint-{state['step']:07d}")
    tmp = final + ".tmp"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    parallel.barrier(env)
    if not env.main:
        torch.save(rank_state, os.path.join(tmp, f"rank{env.rank}.pt"))
    if sharded is not None:
        parallel.save_sharded(os.path.join(tmp, "sharded"), sharded)
    parallel.barrier(env)
    if env.main:
        torch.save(state, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
        for d in done[: max(0, len(done) - max(1, limit))]:
            shutil.rmtree(os.path.join(out_dir, d), ignore_errors=True)
    parallel.barrier(env)
    return final


def find_checkpoint(out_dir, spec):
    if not spec:
        return None
    if spec != "latest":
        if not os.path.exists(os.path.join(spec, "state.pt")):
            raise FileNotFoundError(f"resume_from_checkpoint={spec!r}: no state.pt there")
        return spec
    if not os.path.isdir(out_dir):
        return None
    done = sorted(d for d in os.listdir(out_dir) if d.startswith("checkpoint-") and not d.endswith(".tmp"))
    return os.path.join(out_dir, done[-1]) if done else None

# -----------------------------------------------------------------------------

def train(c):
    """train_loop with publishing around it (publish.py, rank 0 only): env.json, webhook messages at start,
    validation, checkpoint, failure (then re-raised) and finish; loss curve, contact sheets, model card, hub."""
    steps = rollout_steps(check_config(c), c["warp_denoising_step"], c["timestep_shift"])   # config errors come first
    pub = publish.Publisher(c, main=int(os.environ.get("RANK", "0")) == 0)
    try:
        out = train_loop(c, pub, steps)
    except SystemExit:   # SIGINT/SIGTERM: a checkpoint was written
        pub.notify("stopped", "training stopped by a signal; a checkpoint was written, the same command resumes",
                   level="warning")
        pub.close()
        raise
    except BaseException as e:
        pub.failed(e)
        raise
    pub.finish(steps)
    return out


def train_loop(c, pub, steps):   # steps: the checked config's rollout timesteps (train)
    dev = torch.device(c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    env, dev = parallel.setup(c["sp_size"], dev, c["fsdp"])   # torchrun: process groups; one process: nothing
    say = print if env.main else (lambda *a, **k: None)   # rank 0 alone prints, logs, validates, exports
    cuda = dev.type == "cuda"
    bf16 = cuda and c["mixed_precision"] == "bf16"
    dtype = torch.bfloat16 if bf16 else torch.float32
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else (lambda: torch.autocast("cpu", enabled=False))
    if c["optimizer"] == "adamw_bf16":
        say("notice: optimizer adamw_bf16 -> AdamW with fp32 master weights (the same updates, more exact)")
    if env.main:
        os.makedirs(c["output_dir"], exist_ok=True)
        with open(os.path.join(c["output_dir"], "config.json"), "w") as f:
            json.dump(c, f, indent=2, default=str)
    seed_all(c["seed"])   # the same on every rank: identical networks (tiny teacher, adapter init)

    # prompts -> embeddings (encoder freed), networks
    val_prompts = [c["validation_prompt"]]
    if c["validation_prompt_library"]:
        with open(c["validation_prompt_library"]) as f:
            lib = json.load(f)
        val_prompts += list(lib.values()) if isinstance(lib, dict) else list(lib)
    if c["datasets"]:
        train_prompts = []   # contexts come from the cached captions
    elif c["prompts_file"]:
        with open(c["prompts_file"]) as f:
            train_prompts = [line.strip() for line in f if line.strip()]
    else:
        train_prompts = val_prompts
    if not train_prompts and not c["datasets"]:
        raise ValueError("no training prompts")
    base, gen, critic, vae, te = build_networks(c, dev, dtype)
    neg = mw.WAN_NEGATIVE_PROMPT if c["negative_prompt"] is None else c["negative_prompt"]
    loader = None
    if c["datasets"]:   # cached latents + caption embeddings (built here on first use), read in bucket batches
        import data
        te = te or mw.load_text_encoder(c["pretrained_model_name_or_path"], dtype=dtype, device=dev)
        cached = data.CachedDataset(data.MediaDataset(c["datasets"], seed=c["seed"]), vae, te,
                                    rank=env.rank, world_size=env.world, device=dev)
        # shards per data-parallel group: the ranks of a sequence-parallel group read the same batches
        loader = data.Loader(cached, c["train_batch_size"], seed=c["seed"], rank=env.dp_rank, world_size=env.dp_size)
    embeds = encode_prompts(c, te, train_prompts + val_prompts + [neg], dev, dtype)
    train_emb, val_emb, neg_emb = embeds[: len(train_prompts)], embeds[len(train_prompts):-1], embeds[-1:]
    del te
    g_adapter = "generator" if gen is base else None
    f_adapter = "critic" if critic is base else None
    for m in networks(base, gen, critic):
        if c["fsdp"]:
            parallel.shard(m)
        if env.sp_group is not None:
            mw.enable_sequence_parallel(m, env.sp_group)
        if c["compile"]:
            for b in m.blocks:
                b.compile()
    seed_all(c["seed"] + env.dp_rank)   # noise, timesteps and prompts: per data-parallel group
    g_params, f_params = trainable(gen, g_adapter), trainable(critic, f_adapter)
    # DDP on exactly the trainable parameters (FSDP: inside the sharded modules); the teacher R is not wrapped
    causal = (c["num_frame_per_block"] or 0, bool(c["independent_first_frame"])) if c["causal"] else None
    G = parallel.data_parallel(env, velocity_fn(gen, g_adapter, autocast, causal), g_params, c["fsdp"])
    Fk = parallel.data_parallel(env, velocity_fn(critic, f_adapter, autocast), f_params, c["fsdp"])
    R = velocity_fn(base, None, autocast)
    g_opt = torch.optim.AdamW(g_params, lr=c["learning_rate"], betas=(c["adam_beta1"], c["adam_beta2"]),
                              weight_decay=c["adam_weight_decay"], eps=c["adam_epsilon"])
    f_opt = torch.optim.AdamW(f_params, lr=c["fake_score_lr"], betas=tuple(c["fake_score_betas"]),
                              weight_decay=c["fake_score_weight_decay"], eps=c["fake_score_eps"])
    g_sched = torch.optim.lr_scheduler.LambdaLR(g_opt, lr_lambda(c))
    ema = [p.detach().float().clone() for p in g_params] if c["use_ema"] else None
    say(f"teacher {c['pretrained_model_name_or_path']} | generator {'LoRA r%d' % c['lora_rank'] if g_adapter else 'full'} "
        f"({sum(p.numel() for p in g_params):,} trainable) | critic {'LoRA r%d' % c['fake_score_lora_rank'] if f_adapter else 'full'} "
        f"({sum(p.numel() for p in f_params):,}) | shared base: {g_adapter is not None and f_adapter is not None} | "
        f"{dev} {dtype} | steps {steps}")
    say(f"{env.world} process(es): {env.dp_size} data-parallel x sp {env.sp_size}{' | FSDP2' if c['fsdp'] else ''} | "
        f"global batch {c['train_batch_size'] * c['gradient_accumulation_steps'] * env.dp_size} = {c['train_batch_size']} "
        f"per group x accum {c['gradient_accumulation_steps']} x {env.dp_size} group(s)")

    # FSDP: weights, EMA and optimiser states are sharded tensors, saved by torch.distributed.checkpoint
    named = {"generator": named_trainable(gen, g_adapter), "critic": named_trainable(critic, f_adapter)}
    opts = {"g_opt": (gen, g_opt), "f_opt": (critic, f_opt)}
    step, gen_steps, bad_in_row = 0, 0, 0
    ckpt = find_checkpoint(c["output_dir"], c["resume_from_checkpoint"])
    if ckpt:
        st = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
        if st.get("fsdp", False) != c["fsdp"]:
            raise ValueError(f"{ckpt} was written with fsdp={st.get('fsdp', False)}: resume with the same setting")
        if st.get("world", 1) != env.world:
            say(f"warning: {ckpt} was written by {st.get('world', 1)} process(es), this run has {env.world}: weights "
                "and optimiser states resume, the random streams and data order restart (not an exact resume)")
        if c["fsdp"]:
            parallel.load_sharded(os.path.join(ckpt, "sharded"), parallel.sharded_state(named, opts, ema), opts)
        else:
            for name, params in (("generator", g_params), ("critic", f_params)):
                if [tuple(v.shape) for v in st[name]] != [tuple(p.shape) for p in params]:
                    raise ValueError(f"{ckpt}: its {name} does not match this config's (LoRA rank or full mode changed?); "
                                     "use another output_dir or resume_from_checkpoint=''")
            with torch.no_grad():
                for p, v in zip(g_params, st["generator"]):
                    p.copy_(v)
                for p, v in zip(f_params, st["critic"]):
                    p.copy_(v)
                if ema is not None:
                    ema = [v.to(dev) for v in st["ema"]]
            g_opt.load_state_dict(st["g_opt"])
            f_opt.load_state_dict(st["f_opt"])
        g_sched.load_state_dict(st["g_sched"])
        step, gen_steps, bad_in_row = st["step"], st["gen_steps"], st["bad_in_row"]
        mine = os.path.join(ckpt, f"rank{env.rank}.pt")
        if st.get("world", 1) == env.world:   # this rank's random streams and data position
            rs = torch.load(mine, map_location="cpu", weights_only=True) if env.rank > 0 else st
            if loader is not None:
                loader.load_state_dict(rs["data"])
            set_rng_state(rs["rng"])
        say(f"resumed from {ckpt} at step {step}")

    def rank_state():
        return {"rng": rng_state(), **({"data": loader.state_dict()} if loader is not None else {})}

    def state():   # rank 0's checkpoint dict; the weights only when they are not sharded
        st = {"step": step, "gen_steps": gen_steps, "bad_in_row": bad_in_row, "g_sched": g_sched.state_dict(),
              "config": json.dumps(c, default=str), "world": env.world, "fsdp": c["fsdp"], **rank_state()}
        if not c["fsdp"]:
            st.update(generator=[p.detach().cpu().clone() for p in g_params],
                      critic=[p.detach().cpu().clone() for p in f_params],
                      ema=[e.cpu().clone() for e in ema] if ema is not None else [],
                      g_opt=g_opt.state_dict(), f_opt=f_opt.state_dict())
        return st

    stop = {"signal": None}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _: stop.update(signal=s))
    wandb = None
    if c["report_to"] == "wandb" and env.main:
        import wandb as _wandb
        wandb = _wandb.init(project=c["tracker_project_name"], name=c["tracker_run_name"] or None, config=c)
    log_path = os.path.join(c["output_dir"], "log.jsonl")
    if os.path.exists(log_path) and env.main:   # drop lines of steps lost since the checkpoint resumed (all, fresh)
        with open(log_path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    log_f = open(log_path, "a") if env.main else None
    B, Fr = c["train_batch_size"], c["num_training_frames"]
    shape = (B, 16, Fr, c["height"] // 8, c["width"] // 8)
    neg_ctx = pad_context(neg_emb * B, dev, dtype)

    batches = iter(loader) if loader is not None else None

    def next_batch():
        """-> (ctx (B,512,D), data latents (B,16,T,h,w) or None, ODE trajectories (B,K,16,T,h,w) or None): the next
        dataset batch, or random prompts."""
        if batches is None:
            idx = torch.randint(len(train_emb), (B,)).tolist()
            return pad_context([train_emb[i] for i in idx], dev, dtype), None, None
        b = next(batches)
        traj = b.get("trajectory")
        if c["objective"] == "ode_init" and (traj is None or traj.shape[3] != Fr or
                                             not torch.allclose(b["trajectory_t"][0], torch.tensor(steps))):
            raise ValueError(f"objective='ode_init': {b['file'][0]} has " + ("no trajectory" if traj is None else
                             f"{traj.shape[3]} latent frames at t={b['trajectory_t'][0].tolist()}, this run has "
                             f"{Fr} at {steps}") + ": make the ODE pairs with this config (python data.py CONFIG "
                             "--make_ode_pairs=prompts.txt)")
        return b["context"].to(dev, dtype), b["latents"].to(dev) if "latents" in b else None, traj

    ode = c["objective"] == "ode_init"
    starts = mw.block_starts(Fr, *causal) if causal else [0]   # latent frame where each block starts
    L = c["dmd_loss_frames"] or Fr                             # the losses see the last L frames of the rollout
    cache = gen.new_kv_cache(B, Fr, (c["height"] // 16) * (c["width"] // 16)) if causal else None

    def student(ctx, x0, ks):   # the rollout of rollout_mode -> (x_g, t_from, t_to); noise shaped as the data
        if c["rollout_mode"] == "data":
            return data_rollout(G, x0, ctx, steps, ks[0])
        noise = torch.randn(x0.shape if x0 is not None and not causal else shape, device=dev)
        if not causal:
            return rollout(G, noise, ctx, steps, ks[0])
        x_g, t_from, t_to = causal_rollout(G, noise, ctx, steps, ks, starts, cache, c["context_noise"], grad_from=Fr - L)
        return keep_last_frames(x_g, L, vae), t_from, t_to

    def exit_step(salt):   # per block; identical on every rank: drawn from a generator seeded by (seed, step, G or F)
        return exit_steps(c["seed"], step, salt, len(steps), len(starts), c["same_step_across_blocks"], c["last_step_only"])

    def clip(params, method, value):   # -> the gradient norm as a tensor (read with .item() only when logging)
        if method == "value":
            torch.nn.utils.clip_grad_value_(params, value)
            return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
        return torch.nn.utils.clip_grad_norm_(params, value)

    accum = c["gradient_accumulation_steps"]
    scale = env.sp_size / accum   # sequence parallelism: a group's partial gradients must sum, not average

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_last = time.perf_counter()
    bar = tqdm(total=c["max_train_steps"], initial=step, desc="dmd", dynamic_ncols=True, disable=not env.main)
    while step < c["max_train_steps"]:
        rec = {"step": step + 1}
        log_now = (step + 1) % c["log_interval"] == 0   # statistics (and their device syncs) only on log steps
        k = exit_step(0)
        # generator step: DMD, or the ODE-init regression (then no critic and no teacher forward)
        if step % c["generator_update_interval"] == 0 or ode:
            g_opt.zero_grad(set_to_none=True)
            losses, reals = [], []
            for i in range(accum):
                ctx, x0, traj = next_batch()
                with parallel.sync_gradients(G, [gen], on=i == accum - 1):   # sync on the last micro-step only
                    if ode:
                        loss, t = ode_regression_loss(G, traj.to(dev), x0, ctx, steps, starts)
                    else:
                        x_g, t_from, t_to = student(ctx, x0, k)
                        t = score_timesteps(B, t_from, t_to, c, dev)
                        loss, g, st_ = dmd_loss(x_g, t, R, Fk, ctx, neg_ctx, c["real_score_guidance_scale"], c["fake_score_guidance_scale"])
                    total = loss
                    if c["real_data_loss_weight"] > 0:   # §6's optional real-data term: plain flow matching of G on x0
                        reals.append(flow_matching_loss(G, x0, ctx, c["flow_schedule_shift"]))
                        total = loss + c["real_data_loss_weight"] * reals[-1]
                    ok = parallel.all_true(env, torch.isfinite(total))   # every rank takes the same branch
                    if ok:
                        (total * scale).backward()
                losses.append(loss.detach() if ok else torch.full_like(loss, float("nan")))   # a NaN skips the step
            loss = torch.stack(losses).mean()
            if reals and log_now:
                rec["real_data_loss"] = torch.stack(reals).mean().item()
            if torch.isfinite(loss):
                g_norm = clip(g_params, c["grad_clip_method"], c["max_grad_norm"])
                g_opt.step()
                gen_steps += 1
                if ema is not None and gen_steps % c["ema_update_interval"] == 0:
                    d = 0.0 if gen_steps < c["ema_start_step"] else c["ema_decay"]
                    with torch.no_grad():
                        for e, p in zip(ema, g_params):
                            e.mul_(d).add_(p.detach().float(), alpha=1 - d)
                g_opt.zero_grad(set_to_none=True)   # free the gradients before the critic step
                if log_now and ode:
                    rec.update(ode_loss=parallel.mean(env, loss).item(), ode_t=t.mean().item(),
                               g_grad_norm=parallel.local(g_norm).item())
                elif log_now:   # losses averaged over ranks, the other statistics are rank 0's
                    rec.update(dmd_loss=parallel.mean(env, loss).item(), g_abs=g.abs().mean().item(),
                               score_t=t.mean().item(), exit_step=k if causal else k[0],
                               g_grad_norm=parallel.local(g_norm).item(),
                               **{f"{n}_{s}": getattr(v, s)().item() for n, v in st_.items() for s in ("mean", "std")})
            else:
                rec["ode_loss" if ode else "dmd_loss"] = float("nan")
        loss_f = torch.zeros(())   # the ODE-init objective trains the generator alone
        if not ode:
            # critic step on fresh no-grad rollouts
            f_opt.zero_grad(set_to_none=True)
            losses, pers, ts = [], [], []
            for i in range(accum):
                ctx, x0, _ = next_batch()
                with torch.no_grad():
                    x_g, t_from, t_to = student(ctx, x0, exit_step(1))
                t = score_timesteps(B, t_from, t_to, c, dev)
                with parallel.sync_gradients(Fk, [critic], on=i == accum - 1):
                    loss_f, per = critic_loss(Fk, x_g, t, ctx)
                    ok = parallel.all_true(env, torch.isfinite(loss_f))
                    if ok:
                        (loss_f * scale).backward()
                losses.append(loss_f.detach() if ok else torch.full_like(loss_f, float("nan")))
                pers.append(per)
                ts.append(t)
            loss_f = torch.stack(losses).mean()
            if torch.isfinite(loss_f):
                f_norm = clip(f_params, "norm", c["fake_score_grad_clip"])
                f_opt.step()
                f_opt.zero_grad(set_to_none=True)
                if log_now:   # critic loss per score-timestep bin of 250, to catch collapse early
                    bins = {}
                    for ti, li in zip(torch.cat(ts).tolist(), torch.cat(pers).tolist()):
                        bins.setdefault(f"fake_score_loss_t{int(ti // 250) * 250}", []).append(li)
                    rec.update(fake_score_loss=parallel.mean(env, loss_f).item(), f_grad_norm=parallel.local(f_norm).item(),
                               **{k_: sum(v) / len(v) for k_, v in bins.items()})
        finite = torch.isfinite(loss_f) and math.isfinite(rec.get("ode_loss" if ode else "dmd_loss", 0.0))
        bad_in_row = 0 if finite else bad_in_row + 1
        if not finite:
            say(f"step {step + 1}: non-finite loss ({'ode' if ode else 'dmd'} {rec.get('ode_loss' if ode else 'dmd_loss')}, "
                f"critic {loss_f.item()}), update skipped")
            if bad_in_row >= c["max_nonfinite_steps"]:
                raise RuntimeError(f"{bad_in_row} non-finite losses in a row: aborting (lower the learning rates, "
                                   "check the teacher and the guidance scale)")
        g_sched.step()   # per trainer step: warmup and decay count the steps of max_train_steps, whatever the interval
        step += 1
        bar.update(1)
        if log_now and env.main:   # one JSONL record and one terminal line per log interval
            now = time.perf_counter()
            rec.update(lr=g_sched.get_last_lr()[0], s_per_step=(now - t_last) / c["log_interval"],
                       peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
                       peak_reserved_gb=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0)
            t_last = now
            log_f.write(json.dumps(rec) + "\n")
            log_f.flush()
            if wandb is not None:
                wandb.log(rec, step=step)
            tqdm.write(f"step {step:6d} | {'ode' if ode else 'dmd'} {rec.get('ode_loss' if ode else 'dmd_loss', float('nan')):.3e} | fake {rec.get('fake_score_loss', float('nan')):.4f} "
                  f"| |g| {rec.get('g_abs', float('nan')):.3e} | gnorm G {rec.get('g_grad_norm', float('nan')):.2e} "
                  f"F {rec.get('f_grad_norm', float('nan')):.2e} | lr {rec['lr']:.2e} | t {rec.get('score_t', float('nan')):5.1f} "
                  f"| {rec['s_per_step']:.2f} s/step | mem {rec['peak_mem_gb']:.1f} GB")
        last = step >= c["max_train_steps"]
        stopping = stop["signal"] if env.world == 1 else not parallel.all_true(env, not stop["signal"])   # any rank
        if step % c["checkpoint_step_interval"] == 0 or last or stopping:
            path = save_checkpoint(c["output_dir"], state() if env.main else {"step": step}, c["checkpoints_total_limit"],
                                   env, None if env.main else rank_state(),
                                   parallel.sharded_state(named, opts, ema) if c["fsdp"] else None)
            say(f"checkpoint {path}")
            pub.checkpoint(step, path)
        if step % c["validation_step_interval"] == 0 or last:
            validate(c, env, gen, g_adapter, g_params, ema, vae, val_prompts, val_emb, steps, step, dev, dtype, autocast, causal)
            pub.validation(step)
        if stopping:
            say(f"signal {stop['signal'] or 'on another rank'}: checkpoint written at step {step}, exiting")
            if log_f is not None:
                log_f.close()
            parallel.cleanup(env)
            sys.exit(0)
    bar.close()
    if log_f is not None:
        log_f.close()
    export(c, env, gen, g_adapter, g_params, ema)
    if wandb is not None:
        wandb.finish()
    parallel.cleanup(env)
    return {"base": base, "generator": gen, "critic": critic, "g_params": g_params, "f_params": f_params, "ema": ema}


@torch.no_grad()
def swap_in(params, values):
    """Copy `values` into `params`, returning the previous values (for validating/exporting EMA weights)."""
    old = [p.detach().clone() for p in params]
    for p, v in zip(params, values):
        p.copy_(v)
    return old


def validate(c, env, gen, g_adapter, g_params, ema, vae, prompts, embs, steps, step, dev, dtype, autocast, causal=None):
    """Student samples of the validation prompts -> mp4s. Every rank runs the DiT (sharded or sequence-parallel
    networks need them all); rank 0 alone decodes and writes. A causal student samples block by block with the
    KV cache (sample.causal_sample: the training rollout's stepping with every exit at the last step)."""
    W, H = (int(v) for v in c["validation_resolution"].lower().split("x"))
    Fn = c["validation_num_video_frames"]
    modes = {"none": ["raw"], "ema_only": ["ema"], "comparison": ["raw", "ema"]}[c["ema_validation"] if ema is not None else "none"]
    G = velocity_fn(gen, g_adapter, autocast, causal)
    out = os.path.join(c["output_dir"], "validation", f"step_{step}")
    for mode in modes:
        old = swap_in(g_params, ema) if mode == "ema" else None
        for i, (p, e) in enumerate(zip(prompts, embs)):
            x, gen_ = sample.initial_noise(1, Fn, H // 16 * 16, W // 16 * 16, c["validation_seed"], dev)
            with torch.no_grad():
                ctx = pad_context([e], dev, dtype)
                if causal:   # sample.py's sampler: equal to causal_rollout with every exit last (tests)
                    with mw.use_adapter(gen, g_adapter), autocast():
                        lat = sample.causal_sample(gen, ctx, x, steps, causal, c["context_noise"], generator=gen_).float()
                else:
                    lat = sample.student_sample(lambda x_, t_: G(x_, t_, ctx), x, steps, gen_)
                if env.main:
                    video = vae.decode(lat.float())[0]
                    sample.write_mp4(os.path.join(out, f"{i:02d}_{mode}_{sample.slug(p)}.mp4"), video)
        if old is not None:
            swap_in(g_params, old)
    if env.main:
        print(f"validation: {len(prompts)} prompt(s) x {modes} -> {out}")


def export(c, env, gen, g_adapter, g_params, ema):
    """The student (EMA weights when used) as (a) student[_ema].safetensors — the LoRA adapter in diffusers/PEFT
    keys, or full weights — and (b) merged full weights in diffusers transformer/ layout with config.json.
    Written by rank 0; FSDP first gathers the sharded weights into a CPU copy there (every rank takes part)."""
    from safetensors.torch import save_file
    if ema is not None:
        swap_in(g_params, ema)
    if c["fsdp"]:
        gen = parallel.gathered_copy(env, gen)
    if not env.main:
        return
    name = "student_ema.safetensors" if ema is not None else "student.safetensors"
    path = os.path.join(c["output_dir"], name)
    if g_adapter is not None:   # the teacher base stays untouched: the merge is computed into a copy
        save_file(mw.adapter_state_dict(gen, g_adapter), path)
        merged = mw.merged_state_dict(gen, g_adapter)
    else:
        save_file({k: v.contiguous() for k, v in mw.to_diffusers_state_dict(gen).items()}, path)
        merged = None
    mw.save_dit(gen, os.path.join(c["output_dir"], "transformer"), layout="diffusers", state_dict=merged)
    print(f"exported {path} and {os.path.join(c['output_dir'], 'transformer')}/")


DEFAULTS = {k: v for k, v in dict(globals()).items() if k in set(__import__("configurator").default_keys(__file__))}

if __name__ == "__main__":
    from configurator import configure
    train(configure(globals(), __file__, json_map=map_simpletuner))
