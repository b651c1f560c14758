"""
Validation during a train_dmd.py run: the student's samples of the validation prompts as mp4s, and a live collapse
signal that needs no known modes.

The signal: at each validation the student samples `validation_diversity_seeds` seeds of every validation prompt
(seeds validation_seed + k, the first one is the mp4), and its diversity is the mean pairwise RMS distance between
the latents of one prompt, averaged over prompts. The teacher's diversity on the same prompts, seeds and size is
measured once (flow UniPC, validation_teacher_steps, standard CFG = real_score_guidance_scale + 1: the distribution
DMD aims at) and cached in output_dir/teacher_diversity.json. A student that collapses onto fewer modes draws its
seeds closer together: diversity_ratio = student / teacher falls, and below diversity_warn_ratio a warning line is
printed at that step. The statistics go into the step's log.jsonl record.
"""
import json
import os

import torch
from tqdm import tqdm

import data
import flow
import lora
import media
import sample
import text_encoders


@torch.no_grad()
def swap_in(params, values):
    """Copy `values` into `params`, returning the previous values (for validating/exporting EMA weights)."""
    old = [p.detach().clone() for p in params]
    for p, v in zip(params, values):
        p.copy_(v)
    return old


def diversity(latents):
    """Mean pairwise RMS distance between samples of one prompt: latents (S,C,F,H,W), S >= 2 -> float."""
    x = latents.flatten(1).double()
    d = torch.cdist(x, x) / x.shape[1] ** 0.5                       # (S,S) RMS distances
    S = x.shape[0]
    return float(d.sum() / (S * (S - 1)))


def noise(c, seed, dev):
    """The validation noise of one seed (diffusers' convention, CPU generator) -> (x (1,16,T,h,w), generator)."""
    W, H = (int(v) for v in c["validation_resolution"].lower().split("x"))
    return flow.initial_noise(1, c["validation_num_video_frames"], H // 16 * 16, W // 16 * 16, seed, dev)


def student_latents(r, ctx, seed):
    """The student's sample of one prompt and seed, with sample.py's sampler (flow.rollout exiting at the last step;
    block by block with the KV cache for a causal student) -> latents (1,16,T,h,w) fp32."""
    x, gen = noise(r.c, seed, r.dev)
    if r.causal:   # the student DiT itself under its adapter, as sample.py runs it
        causal = dict(num_frame_per_block=r.causal[0], independent_first_frame=r.causal[1],
                      context_noise=r.c["context_noise"])
        with lora.use_adapter(r.gen, r.g_adapter), r.autocast():
            return sample.sample_student(r.gen, ctx, x, r.steps, causal, gen).float()
    G = lora.velocity_fn(r.gen, r.g_adapter, r.autocast, r.causal)
    return sample.sample_student(r.gen, ctx, x, r.steps, None, gen, velocity=G)


def teacher_settings(c, prompts):
    """What the teacher's diversity depends on: the key of its cache file (JSON-normalised)."""
    return json.loads(json.dumps(dict(
        teacher=data.real_score_source(c), prompts=prompts, seed=c["validation_seed"],
        seeds=c["validation_diversity_seeds"], resolution=c["validation_resolution"],
        frames=c["validation_num_video_frames"], steps=c["validation_teacher_steps"],
        cfg=c["real_score_guidance_scale"] + 1, negative_prompt=c["negative_prompt"])))


def cached_teacher_diversity(c, prompts):
    """(mean, per prompt) from output_dir/teacher_diversity.json when it was measured with these settings, else
    None. train_dmd reads it once at setup, before any rank can write it, so that every rank takes the same branch."""
    path = os.path.join(c["output_dir"], "teacher_diversity.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        d = json.load(f)
    return (d["mean"], d["per_prompt"]) if d.get("settings") == teacher_settings(c, prompts) else None


def teacher_diversity(r):
    """The teacher's diversity on the validation prompts and seeds, measured once per run setting (r.teacher_div:
    read back from output_dir/teacher_diversity.json at setup when the settings match) -> (mean, [per prompt])."""
    if r.teacher_div is not None:
        return r.teacher_div
    c = r.c
    layout, shift = flow.teacher_layout_shift(data.real_score_source(c))   # r.R: the real score's model
    sigmas, timesteps = flow.flow_schedule(c["validation_teacher_steps"], shift, layout)
    scale = c["real_score_guidance_scale"] + 1                       # DMD2's w is standard CFG w + 1
    per, S = [], c["validation_diversity_seeds"]
    bar = tqdm(total=len(r.val_emb) * S * c["validation_teacher_steps"], desc="teacher diversity (once)", leave=False,
               disable=not r.env.main or None)   # None: no bar when stderr is not a terminal (a log file)
    for e in r.val_emb:
        ctx = text_encoders.pad_context([e]).to(r.dev, r.dtype)
        velocity = flow.guided(r.R, ctx, r.neg_ctx[:1] if scale > 1 else None, scale)
        lats = [flow.unipc_sample(velocity, noise(c, c["validation_seed"] + k, r.dev)[0], sigmas.to(r.dev),
                                  timesteps.to(r.dev), bar) for k in range(S)]
        per.append(diversity(torch.cat(lats)))
    bar.close()
    r.teacher_div = (sum(per) / len(per), per)
    if r.env.main:
        with open(os.path.join(c["output_dir"], "teacher_diversity.json"), "w") as f:
            json.dump({"settings": teacher_settings(c, r.val_prompts), "mean": r.teacher_div[0], "per_prompt": per},
                      f, indent=1)
    return r.teacher_div


@torch.no_grad()
def validate(r, step):
    """Student samples of the validation prompts -> mp4s (the first seed; rank 0 decodes and writes) and, with
    validation_diversity_seeds >= 2, the collapse signal -> {diversity, teacher_diversity, diversity_ratio,
    diversity_ratio_min} for the step's log record ({} without it). Every rank runs the DiT (sharded or
    sequence-parallel networks need them all). r: train_dmd's run."""
    c, env = r.c, r.env
    modes = {"none": ["raw"], "ema_only": ["ema"], "comparison": ["raw", "ema"]}[c["ema_validation"] if r.ema is not None else "none"]
    out = os.path.join(c["output_dir"], "validation", f"step_{step}")
    S, per = max(1, c["validation_diversity_seeds"]), []
    bar = tqdm(total=len(modes) * len(r.val_prompts), desc="validation", unit="prompt", leave=False, disable=not env.main or None)
    for mode in modes:
        old = swap_in(r.g_params, r.ema) if mode == "ema" else None
        per = []   # the signal of the last mode (the exported weights)
        for i, (p, e) in enumerate(zip(r.val_prompts, r.val_emb)):
            ctx = text_encoders.pad_context([e]).to(r.dev, r.dtype)
            lats = [student_latents(r, ctx, c["validation_seed"] + k) for k in range(S)]
            if env.main:
                media.write_mp4(os.path.join(out, f"{i:02d}_{mode}_{media.slug(p)}.mp4"), r.vae.decode(lats[0].float())[0])
            if S > 1:
                per.append(diversity(torch.cat(lats)))
            bar.update(1)
        if old is not None:
            swap_in(r.g_params, old)
    bar.close()
    stats = collapse_signal(r, step, per) if per else {}
    if env.main:
        print(f"validation: {len(r.val_prompts)} prompt(s) x {modes} -> {out}" +
              (f" | diversity {stats['diversity']:.4f} = {stats['diversity_ratio']:.2f}x the teacher's" if stats else ""))
    return stats


def collapse_signal(r, step, per):
    """The student's per-prompt diversities against the teacher's -> the log fields; a warning line below
    diversity_warn_ratio."""
    t_mean, t_per = teacher_diversity(r)
    ratios = [s / max(t, 1e-12) for s, t in zip(per, t_per)]
    stats = dict(diversity=sum(per) / len(per), teacher_diversity=t_mean,
                 diversity_ratio=sum(per) / len(per) / max(t_mean, 1e-12), diversity_ratio_min=min(ratios))
    if r.env.main and stats["diversity_ratio_min"] < r.c["diversity_warn_ratio"]:
        print(f"warning: step {step}: the student's samples are {stats['diversity_ratio_min']:.2f}x as diverse as the "
              f"teacher's on a validation prompt (mean {stats['diversity_ratio']:.2f}x, warn below "
              f"{r.c['diversity_warn_ratio']:g}): a sign of mode collapse; see README 'Distillation settings'")
    return stats
