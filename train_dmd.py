"""
DMD distillation of a Wan 2.1 teacher into a few-step student (docs/method.md):
generator G (student), fake score F (critic) and the frozen real score R (teacher).

  python train_dmd.py config/wan_dmd_3step.py                 # SimpleTuner's DMD quickstart, 1.3B
  python train_dmd.py config/tiny.py --max_train_steps=20     # tiny random teacher on CPU, no downloads
  python train_dmd.py path/to/simpletuner/config.json         # the quickstart's SimpleTuner config, mapped
  python train_dmd.py --help
  torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step.py    # DDP; FSDP2 and sequence parallelism: parallel.py

With LoRA on G and F (the default) ONE frozen base serves all three networks: R = base with no adapter,
G = base + adapter "generator", F = base + adapter "critic". Data-free: the training input is prompts only
(text embeddings precomputed once, the text encoder freed before training). With `datasets` (data.py): captions
and VAE latents cached once, read in bucket batches; they feed rollout_mode="data" and real_data_loss_weight.

The file reads top to bottom: defaults (the DMD objective itself is dmd.py, the student's rollout flow.rollout, the
code sample.py runs; the config's checks are checks.py; the networks networks.py); the checkpoint as one symmetric pair (checkpoint_state /
load_checkpoint); the run's setup; the loop, a short body over named phases (generator_step, critic_step,
ema_update, check_finite, log_step, end_of_step); validation and export.
"""
import gc
import json
import math
import os
import signal
import sys
import time

import torch
from tqdm import tqdm
from tqdm.contrib import DummyTqdmFile

import checks
import data
import dmd
import flow
import lora
import model_wan as mw
import parallel
import publish
import run_dir
import simpletuner
import text_encoders
import validation
from configurator import configure, default_keys, fail, pick_threads, redact
from networks import build_networks
from run_state import Run

# -----------------------------------------------------------------------------
# defaults; override with config files (python train_dmd.py CONFIG.py) and --key=value
pretrained_model_name_or_path = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # teacher: pipeline root/hub id/original folder;
                                       # "tiny": random tiny teacher; "random:t2v-1.3B" / "random:t2v-14B": random
                                       # weights at real size (memory and speed checks without downloads)
teacher_model_name_or_path = ""        # the real score's own Wan 2.1 DiT (same VAE, text encoder); "": the base above
teacher_model_precision = ""           # that teacher's 8-bit storage ("": base_model_precision's); docs/teacher.md
output_dir = "out/wan_dmd"             # checkpoints, log.jsonl, validation samples, the exported student and its model card
prompts_file = ""                      # training prompts, one per line (data-free DMD); empty: validation prompts
datasets = []                          # data.py dataset dicts; given: cached latents + captions replace prompts_file
dataloader_num_workers = 0             # worker processes reading the cached dataset entries (0: in the training process)
rollout_mode = "backward"              # "backward": data-free rollout from noise; "data": noise dataset latents (docs/keys.md)
negative_prompt = None                 # None: Wan's default negative prompt; "": the empty prompt
height = 480                           # training resolution (pixels) of the generated samples
width = 832                            # training width (pixels)
num_training_frames = 21               # latent frames of a generated sample (21 latent = 81 video frames)
# DMD (docs/method.md, docs/keys.md)
dmd_denoising_steps = "1000,757,522"   # rollout and inference timesteps, σ = t/1000
warp_denoising_step = False            # Self-Forcing: t_k <- 1000*shift(t_k/1000) with timestep_shift
generator_update_interval = 1          # generator step every N trainer steps; the critic steps every step
fake_score_warmup_steps = 0            # critic-only trainer steps first (the critic learns the initial student)
guidance_warmup_steps = 0              # real_score_guidance_scale ramps linearly from 0 over these trainer steps
real_score_guidance_scale = 3.0        # w in x_real = x_cond + w(x_cond - x_uncond) (DMD2 form: standard CFG = w+1)
real_score_guidance_max_timestep = 1000.0  # guidance only at score timesteps t <= this (0-1000); 1000: everywhere
fake_score_guidance_scale = 0.0        # the same form on the critic; 0 = off
min_timestep_ratio = 0.02              # final clamp of score timesteps to [1000*min, 1000*max]
max_timestep_ratio = 0.98              # upper clamp, the same 0-1 scale
ts_schedule = True                     # score t >= the rollout's next timestep (else >= min_score_timestep)
ts_schedule_max = False                # score t <= the rollout's exit timestep (else <= 1000)
min_score_timestep = 0                 # lowest score timestep (0-1000) when ts_schedule=False
timestep_shift = 1.0                   # shift applied to score timesteps (1 = none)
last_step_only = False                 # always exit the rollout at the last step
real_data_loss_weight = 0.0            # flow-matching term of G on dataset latents, added to the DMD loss (needs datasets
                                       # or teacher_data_samples)
ode_regression_weight = 0.0            # DMD's regression term (Yin et al. 2024, λ_reg): + this x the ODE-init regression
                                       # on teacher trajectories per generator step (datasets = a --make_ode_pairs folder,
                                       # or teacher_data_samples: made once with the real score's guidance)
teacher_data_samples = 0               # > 0: those latents (pairs) are teacher samples, this many seeds per prompt,
teacher_data_steps = 50                # made once (UniPC steps, CFG w+1) into output_dir/teacher_data (docs/method.md),
                                       # teacher_ode when they are ODE pairs (ode_regression_weight > 0)
flow_schedule_shift = 5.0              # shift of the real-data flow-matching timesteps
# causal student (Self-Forcing, docs/method.md#the-causal-student): the generator denoises blocks of latent
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
lora_alpha = 128                       # generator LoRA scale alpha / rank (128 / 128 = 1)
lora_targets = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
                                       # the generator's and critic's LoRA modules, by original-layout names (model_wan)
fake_score_lora_rank = 128             # critic LoRA rank; 0 = full fine-tune
fake_score_lora_alpha = 128            # critic LoRA scale alpha / rank
gradient_checkpointing = True          # recompute each DiT block in backward: less memory, slower steps
residual_dtype = "fp32"                # the DiT's residual stream between blocks: "fp32" (Wan's reference) or "bf16" (the
                                       # checkpointed block inputs take half the memory; bench/bench_quant.py: its error)
activation_offload = False             # keep the checkpointed block inputs in pinned host memory (needs gradient_checkpointing)
attention_sparsity = 0.0               # VSA (sparse_attn.py) in the generator's self-attention: the fraction of key cubes
                                       # each query cube skips (FastWan: 0.8 for 1.3B, 0.9 for 14B); 0 = dense
sparse_cube = (4, 4, 4)                # VSA cube in patch tokens (latent frames, latent height/2, latent width/2): 64 tokens
sparse_remainder = True                # VSA's fine softmax also over the unselected cubes, one mean key/value each (ours, not
                                       # VSA's: C extra keys per query; docs/method.md); False: VSA as published
sparsity_warmup_steps = 0              # attention_sparsity reached in 10 stages over these trainer steps, from 0 (all cubes:
                                       # the student starts dense); 0: sparse from the first step
mixed_precision = "bf16"               # "bf16": bf16 base weights + autocast on CUDA; "no": fp32 (always fp32 on CPU)
base_model_precision = "no"            # the frozen base (teacher; base of the LoRA generator and critic) stored in 8 bits:
                                       # "int8" / "fp8" weight-only, per-row scales (quant.py; SimpleTuner's "int8-quanto",
                                       # "fp8-torchao", ... map to these); "fp8-matmul": fp8 activations in the forward
                                       # matmuls too (torch._scaled_mm, GPUs with fp8 tensor cores); "no": mixed_precision
text_encoder_1_precision = "no"        # UMT5 (used once to embed the prompts) stored in 8 bits the same way
quantize_via = "accelerator"           # where weights are quantised as they load: "accelerator" (the device) or "cpu"
compile = False                        # torch.compile each DiT block
# many GPUs (torchrun; parallel.py)
fsdp = False                           # FSDP2: shard teacher, generator and critic per block (sharded checkpoints)
sp_size = 1                            # Ulysses sequence parallelism: ranks per sample (divides heads and tokens)
# optimisation
optimizer = "adamw"                    # "adamw"; SimpleTuner's "adamw_bf16" maps to fp32 master weights (same updates)
learning_rate = 2e-5                   # generator lr (scheduled by lr_scheduler)
adam_beta1 = 0.9                       # generator AdamW beta1
adam_beta2 = 0.999                     # generator AdamW beta2
adam_weight_decay = 0.01               # generator AdamW weight decay
adam_epsilon = 1e-8                    # generator AdamW eps
lr_scheduler = "constant"              # constant | cosine | cosine_with_min_lr (all with linear warmup), over trainer steps
lr_warmup_steps = 0                    # linear warmup of both lrs over these trainer steps
lr_min_ratio = 0.1                     # cosine_with_min_lr: final lr = learning_rate * lr_min_ratio (both networks)
fake_score_lr_scheduler = "constant"   # the critic's fake_score_lr schedule: the same choices and warmup as lr_scheduler
max_grad_norm = 1.0                    # generator gradient clip: max norm, or max |value| (grad_clip_method)
grad_clip_method = "norm"              # "norm" or "value": the generator's; the critic always clips its norm to
                                       # fake_score_grad_clip (SimpleTuner's DMDDistiller does the same)
fake_score_lr = 1e-5                   # critic lr (scheduled by fake_score_lr_scheduler)
fake_score_weight_decay = 0.01         # critic AdamW weight decay
fake_score_betas = (0.9, 0.999)        # critic AdamW betas
fake_score_eps = 1e-8                  # critic AdamW eps
fake_score_grad_clip = 1.0             # critic gradient clip (max norm)
max_train_steps = 4000                 # trainer steps: a critic step each, a generator step every generator_update_interval
train_batch_size = 1                   # samples per micro-batch per data-parallel group
gradient_accumulation_steps = 1        # micro-batches per optimiser step (global batch = batch x accum x groups)
max_nonfinite_steps = 5                # abort after this many non-finite losses in a row
seed = 42                              # networks' init, rollout noise, timesteps, data order (validation: validation_seed)
# EMA of the generator's trainable weights (fp32 shadow)
use_ema = True                         # keep an EMA of the generator; exported and validated per ema_validation
ema_decay = 0.99                       # EMA decay per EMA update
ema_update_interval = 5                # in generator steps
ema_start_step = 0                     # in generator steps: before it the EMA copies the weights (decay 0)
ema_validation = "ema_only"            # none | ema_only | comparison
# checkpoints
checkpoint_step_interval = 200         # a checkpoint every N trainer steps (and at the end / on SIGINT, SIGTERM)
checkpoints_total_limit = 3            # keep this run's newest N >= 1 checkpoints (its older ones deleted)
resume_from_checkpoint = "latest"      # "latest", a checkpoint folder, or "" for a fresh start
overwrite_output_dir = False           # True: a fresh start into a folder holding a run moves that run aside (never deleted)
export_from = ""                       # "checkpoint-N", a checkpoint folder or "latest": export that checkpoint's student
                                       # (EMA when kept) into output_dir as a run's end does, no training
# validation and logging
validation_step_interval = 200         # validation samples and the collapse signal every N trainer steps (and at the end)
validation_prompt = "A cat walks on the grass, realistic style." # the first validation prompt (also the training prompt without prompts_file / datasets)
validation_prompt_library = ""         # JSON file: {"name": "prompt", ...} or ["prompt", ...]
validation_seed = 42                   # validation noise: seed k of a prompt is validation_seed + k
validation_num_inference_steps = None  # derived: the number of dmd_denoising_steps (validation runs the student's own
                                       # rollout); a value given (SimpleTuner's config.json has one) must equal it
validation_guidance = None             # derived: 1.0, the student sampler takes no CFG; a value given must be 1.0
validation_resolution = "832x480"      # WxH
validation_num_video_frames = 81       # video frames of a validation sample (4k+1)
validation_diversity_seeds = 4         # collapse signal (validation.py): seeds per prompt whose spread is compared
validation_teacher_steps = 50          # with the teacher's (UniPC steps, CFG w+1, measured once); seeds 0/1 = off
diversity_warn_ratio = 0.5             # a warning line when a prompt's student diversity < this x the teacher's
log_interval = 1                       # a log line (terminal, log.jsonl, wandb) every N trainer steps
report_to = "none"                     # "none" or "wandb"
tracker_project_name = "wan-dmd"       # wandb project
tracker_run_name = ""                  # wandb run name; empty: output_dir's folder name
# publishing (publish.py, rank 0): hub, model card, webhooks
push_to_hub = False                    # at the end: student, merged transformer, config, model card, samples -> hub_model_id
push_checkpoints_to_hub = False        # upload each checkpoint as written (background thread; retried when it fails)
hub_model_id = ""                      # "user/name" (created if needed); token: HF_TOKEN or the cached login
model_card_private = False             # create the hub repo private
model_card_note = ""                   # a paragraph added to the model card
push_merged_to_hub = True              # with LoRA: also upload the merged transformer/ (full weights) beside the adapter
webhook_config = None                  # JSON file or string: {"webhook_type": "discord"|"raw", "webhook_url"|"callback_url",
                                       # "message_prefix", "log_level"}; notified at start/validation/checkpoint/failure/end
device = "auto"                        # "auto": cuda when available, else cpu; or e.g. "cuda:1", "cpu"
threads = 0                            # torch CPU threads; 0: OMP_NUM_THREADS, else the free cores (cores - load)
# -----------------------------------------------------------------------------
# config and networks

def config(argv=None):
    """Defaults, then config files (plain Python, or SimpleTuner's config.json, mapped) and --key=value, in the
    order given -> the resolved config dict (sys.argv[1:] when argv is None)."""
    say = print if int(os.environ.get("RANK", "0")) == 0 else (lambda *a: None)
    return configure(dict(DEFAULTS), __file__, argv, json_map=lambda p: simpletuner.read_config(p, DEFAULTS, say))


def lr_lambda(c, kind):
    """The lr multiplier per trainer step of scheduler `kind` (lr_scheduler or fake_score_lr_scheduler's value)."""
    def f(step):
        if step < c["lr_warmup_steps"]:
            return (step + 1) / (c["lr_warmup_steps"] + 1)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - c["lr_warmup_steps"]) / max(1, c["max_train_steps"] - c["lr_warmup_steps"]))
        lo = c["lr_min_ratio"] if kind == "cosine_with_min_lr" else 0.0
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# -----------------------------------------------------------------------------
# checkpoints: one dict of every piece of state, written and read back by one symmetric pair

def rank_state(r):
    """This rank's random streams and data position."""
    return {"rng": parallel.rng_state(), **({"data": r.loader.state_dict()} if r.loader is not None else {})}


def checkpoint_state(r):
    """Rank 0's checkpoint dict: counters, scheduler, config, its rank state, and the weights, EMA and optimiser
    states unless FSDP shards them (then parallel.sharded_state, written by every rank)."""
    st = {"step": r.step, "gen_steps": r.gen_steps, "bad_in_row": r.bad_in_row, "g_sched": r.g_sched.state_dict(),
          "gen_stats": generator_record(r), "run_id": r.run_id, "f_sched": r.f_sched.state_dict(),
          "config": json.dumps(redact(r.c), default=str), "world": r.env.world, "fsdp": r.c["fsdp"], **rank_state(r)}
    if not r.c["fsdp"]:
        st.update(generator=[p.detach().cpu().clone() for p in r.g_params],
                  critic=[p.detach().cpu().clone() for p in r.f_params],
                  ema=[e.cpu().clone() for e in r.ema] if r.ema is not None else [],
                  g_opt=r.g_opt.state_dict(), f_opt=r.f_opt.state_dict())
    return st


def load_checkpoint(r, ckpt):
    """The inverse of checkpoint_state (+ the sharded part and this rank's file): restores exactly what it wrote."""
    st, rs = parallel.read_checkpoint(r.env, ckpt)   # state.pt and this rank's file, every rank agreeing
    changed = parallel.resume_changes(json.loads(st["config"]), json.loads(json.dumps(redact(r.c), default=str)), ckpt)
    if st.get("world", 1) != r.env.world:
        r.say(f"warning: {ckpt} was written by {st.get('world', 1)} process(es), this run has {r.env.world}: weights "
              "and optimiser states resume, the random streams and data order restart (not an exact resume)")
    if r.c["fsdp"]:
        parallel.load_sharded(os.path.join(ckpt, "sharded"), parallel.sharded_state(r.named, r.opts, r.ema), r.opts)
    else:
        for name, params in (("generator", r.g_params), ("critic", r.f_params)):
            if [tuple(v.shape) for v in st[name]] != [tuple(p.shape) for p in params]:
                raise run_dir.CannotResume(f"{ckpt}: its {name} does not match this config's (LoRA rank or full mode changed?); "
                                 "start a new run in another output_dir")
        with torch.no_grad():
            for p, v in zip(r.g_params, st["generator"]):
                p.copy_(v)
            for p, v in zip(r.f_params, st["critic"]):
                p.copy_(v)
            if r.ema is not None:
                r.ema = [v.to(r.dev) for v in st["ema"]]
        r.g_opt.load_state_dict(st["g_opt"])
        r.f_opt.load_state_dict(st["f_opt"])
    r.g_sched.load_state_dict(st["g_sched"])
    if "f_sched" in st:   # checkpoints before fake_score_lr_scheduler had a constant critic lr
        r.f_sched.load_state_dict(st["f_sched"])
    r.step, r.gen_steps, r.bad_in_row, r.run_id = st["step"], st["gen_steps"], st["bad_in_row"], st.get("run_id", r.run_id)
    r.gen_stats = st.get("gen_stats", {})
    apply_optimizer_settings(r)
    if st.get("world", 1) == r.env.world:   # this rank's random streams and data position
        if r.loader is not None:
            r.loader.load_state_dict(rs["data"])
        parallel.set_rng_state(rs["rng"])
    r.last_good = ckpt
    r.say(f"resumed from {ckpt} at step {r.step}")
    for k, (old, new) in changed.items():
        r.say(f"resume: {k} {old!r} -> {new!r} (applied)")
    if r.step >= r.c["max_train_steps"]:
        r.say(f"resume: {ckpt} is at step {r.step}, max_train_steps={r.c['max_train_steps']}: nothing to train; the "
              "student is exported again from it (raise max_train_steps to train on)")


def adamw_settings(c):
    """-> the generator's and the critic's AdamW settings from the config."""
    return (dict(lr=c["learning_rate"], betas=(c["adam_beta1"], c["adam_beta2"]), weight_decay=c["adam_weight_decay"],
                 eps=c["adam_epsilon"]),
            dict(lr=c["fake_score_lr"], betas=tuple(c["fake_score_betas"]), weight_decay=c["fake_score_weight_decay"],
                 eps=c["fake_score_eps"]))


def apply_optimizer_settings(r):
    """After a resume, the config's AdamW settings over the checkpoint's (load_state_dict restores the saved ones),
    each scheduler's base lr included: lr = base lr x lr_lambda(step), as LambdaLR computes it (unchanged settings:
    the same numbers)."""
    c = r.c
    g_set, f_set = adamw_settings(c)
    for opt, sched, settings, kind in ((r.g_opt, r.g_sched, g_set, c["lr_scheduler"]),
                                       (r.f_opt, r.f_sched, f_set, c["fake_score_lr_scheduler"])):
        lr = settings["lr"] * lr_lambda(c, kind)(sched.last_epoch)
        for group in opt.param_groups:
            group.update(settings, initial_lr=settings["lr"], lr=lr)
        sched.base_lrs = [settings["lr"]] * len(opt.param_groups)
        sched._last_lr = [lr] * len(opt.param_groups)   # what get_last_lr() (the log) reads


# -----------------------------------------------------------------------------
# setting up a run: r, the Run (run_state.py) that every phase of the loop reads and writes (no trainer class)

def new_run(c, steps):
    """The run before any network: devices (torchrun: process groups), dtype, counters."""
    dev = mw.pick_device(c["device"])
    env, dev = parallel.setup(c["sp_size"], dev, c["fsdp"])   # torchrun: process groups; one process: nothing
    dtype = mw.pick_dtype(c["mixed_precision"], dev)
    return Run(c=c, env=env, dev=dev, dtype=dtype, autocast=mw.autocast_fn(dtype, dev), steps=steps,
               say=print if env.main else (lambda *a, **k: None))


def setup(c, steps):
    """Devices, prompts and their embeddings, networks, data, optimisers, EMA; resumed when a checkpoint exists."""
    r = new_run(c, steps)
    parallel.early_resume_check(c, json.loads(json.dumps(redact(c), default=str)))
    env, dev, dtype = r.env, r.dev, r.dtype
    n, why = pick_threads(c["threads"])
    torch.set_num_threads(n)
    r.say(f"torch threads: {n} ({why})")
    if c["optimizer"] == "adamw_bf16":
        r.say("notice: optimizer adamw_bf16 -> AdamW with fp32 master weights (the same updates, more exact)")
    if c["teacher_data_samples"] > 0:   # the teacher's samples (ODE pairs) of the prompts: the anchors' data
        c = r.c = dict(c, datasets=[data.teacher_anchor(c, env.rank, env.world)])
        parallel.barrier(env)
    parallel.seed_all(c["seed"])   # the same on every rank: identical networks (tiny teacher, adapter init)
    prompts = data.read_prompts(c)   # (training, validation): prompt errors before any model is built
    r.base, r.gen, r.critic, r.vae, te = build_networks(c, dev, dtype)
    r.teacher = data.load_real_score(c, dev, dtype)   # teacher_model_name_or_path's DiT, else None: the base is R
    r.loader, r.train_emb, r.val_prompts, r.val_emb, neg_emb = data.training_inputs(c, prompts, te, r.vae, env, dev, dtype)
    del te   # UMT5 (11 GB in bf16) is not needed again
    setup_training(r)
    B, Fr = c["train_batch_size"], c["num_training_frames"]
    r.shape = (B, 16, Fr, c["height"] // 8, c["width"] // 8)
    r.neg_ctx = text_encoders.pad_context(neg_emb * B).to(dev, dtype)
    r.starts = mw.block_starts(Fr, *r.causal) if r.causal else [0]   # latent frame where each block starts
    r.loss_frames = c["dmd_loss_frames"] or Fr                         # the losses see the last frames of the rollout
    r.cache = r.gen.new_kv_cache(B, Fr, (c["height"] // 16) * (c["width"] // 16)) if r.causal else None
    r.teacher_div = validation.cached_teacher_diversity(c, r.val_prompts)   # the collapse signal's reference
    return r


def setup_training(r):
    """Wrapping (FSDP, sequence parallelism, compile, DDP), optimisers, scheduler, EMA, then the resume."""
    c, env = r.c, r.env
    r.g_adapter = "generator" if r.gen is r.base else None
    r.f_adapter = "critic" if r.critic is r.base else None
    for m in {id(m): m for m in (r.base, r.gen, r.critic, r.teacher or r.base)}.values():   # distinct (LoRA: one)
        if c["fsdp"]:
            parallel.shard(m)
        if env.sp_group is not None:
            mw.enable_sequence_parallel(m, env.sp_group)
        if c["compile"]:
            for b in m.blocks:
                b.compile()
    parallel.seed_all(c["seed"] + env.dp_rank)   # noise, timesteps and prompts: per data-parallel group
    r.g_params, r.f_params = lora.trainable(r.gen, r.g_adapter), lora.trainable(r.critic, r.f_adapter)
    # DDP on exactly the trainable parameters (FSDP: inside the sharded modules); the teacher R is not wrapped
    r.causal = (c["num_frame_per_block"] or 0, bool(c["independent_first_frame"])) if c["causal"] else None
    r.G = parallel.data_parallel(env, lora.velocity_fn(r.gen, r.g_adapter, r.autocast, r.causal), r.g_params, c["fsdp"])
    r.Fk = parallel.data_parallel(env, lora.velocity_fn(r.critic, r.f_adapter, r.autocast), r.f_params, c["fsdp"])
    r.R = lora.velocity_fn(r.teacher or r.base, None, r.autocast)   # a separate teacher never has an adapter
    g_set, f_set = adamw_settings(c)
    r.g_opt, r.f_opt = torch.optim.AdamW(r.g_params, **g_set), torch.optim.AdamW(r.f_params, **f_set)
    r.g_sched = torch.optim.lr_scheduler.LambdaLR(r.g_opt, lr_lambda(c, c["lr_scheduler"]))
    r.f_sched = torch.optim.lr_scheduler.LambdaLR(r.f_opt, lr_lambda(c, c["fake_score_lr_scheduler"]))
    r.ema = [p.detach().float().clone() for p in r.g_params] if c["use_ema"] else None
    r.say(f"teacher {data.real_score_source(c)} | generator "
          f"{'LoRA r%d' % c['lora_rank'] if r.g_adapter else 'full'} ({sum(p.numel() for p in r.g_params):,} trainable) | "
          f"critic {'LoRA r%d' % c['fake_score_lora_rank'] if r.f_adapter else 'full'} "
          f"({sum(p.numel() for p in r.f_params):,}) | shared base: {r.g_adapter is not None and r.f_adapter is not None} | "
          f"{r.dev} {r.dtype} | steps {r.steps}")
    r.say(f"{env.world} process(es): {env.dp_size} data-parallel x sp {env.sp_size}{' | FSDP2' if c['fsdp'] else ''} | "
          f"global batch {c['train_batch_size'] * c['gradient_accumulation_steps'] * env.dp_size} = "
          f"{c['train_batch_size']} per group x accum {c['gradient_accumulation_steps']} x {env.dp_size} group(s)")
    # FSDP: weights, EMA and optimiser states are sharded tensors, saved by torch.distributed.checkpoint
    r.named = {"generator": lora.named_trainable(r.gen, r.g_adapter), "critic": lora.named_trainable(r.critic, r.f_adapter)}
    r.opts = {"g_opt": (r.gen, r.g_opt), "f_opt": (r.critic, r.f_opt)}
    ckpt = parallel.find_checkpoint(c["output_dir"], c["resume_from_checkpoint"], env, r.say)
    if ckpt:
        load_checkpoint(r, ckpt)
    r.norm_ref = parallel.local_norm(r.g_params + r.f_params)   # divergence: the weights' norm at the last good state


# -----------------------------------------------------------------------------
# the loop's phases

def next_batch(r):
    """-> (ctx (B,512,D), data latents (B,16,T,h,w) or None, ODE trajectories (B,K,16,T,h,w) or None): the next
    dataset batch, or random prompts."""
    c, B = r.c, r.c["train_batch_size"]
    if r.batches is None:
        idx = torch.randint(len(r.train_emb), (B,)).tolist()
        return text_encoders.pad_context([r.train_emb[i] for i in idx]).to(r.dev, r.dtype), None, None
    b = next(r.batches)
    traj, Fr = b.get("trajectory"), c["num_training_frames"]
    ode_init = c["objective"] == "ode_init"
    who = "objective='ode_init'" if ode_init else "ode_regression_weight > 0"
    if (ode_init or c["ode_regression_weight"] > 0) and (traj is None or traj.shape[3] != Fr or not torch.allclose(
            b["trajectory_t"][0], torch.tensor(r.steps))):
        raise run_dir.StalePairs(f"{who}: {b['file'][0]} has " + ("no trajectory" if traj is None else
                         f"{traj.shape[3]} latent frames at t={b['trajectory_t'][0].tolist()}, this run has "
                         f"{Fr} at {r.steps}") + ": make the ODE pairs with this config (python data.py CONFIG "
                         "--make_ode_pairs=prompts.txt)")
    return b["context"].to(r.dev, r.dtype), b["latents"].to(r.dev) if "latents" in b else None, traj


def step_batch(r, generator):
    """The trainer step's next micro-batch: the generator step draws it (next_batch) and keeps it, the critic step
    of the same trainer step takes the kept ones in order (DMD2, FastVideo, Self-Forcing and SimpleTuner do the same: a
    dataset is read once per step, and with rollout_mode="data" the critic learns the clips the generator was rolled
    out from); a critic-only step (warmup, generator_update_interval > 1) draws its own."""
    if not generator:
        return r.kept.pop(0) if r.kept else next_batch(r)
    b = next_batch(r)
    r.kept.append(b)
    return b


def student(r, ctx, x0, ks):
    """The rollout of rollout_mode -> (x_g, t_from, t_to); noise shaped as the data. ks: the exit step per block."""
    if r.c["rollout_mode"] == "data":
        return dmd.data_rollout(r.G, x0, ctx, r.steps, ks[0])
    noise = torch.randn(x0.shape if x0 is not None and not r.causal else r.shape, device=r.dev)
    if not r.causal:
        return flow.rollout(lambda x, t: r.G(x, t, ctx), noise, r.steps, ks[0])
    r.cache.reset()
    x_g, t_from, t_to = flow.causal_rollout(lambda x, t, s: r.G(x, t, ctx, kv_cache=r.cache, start_frame=s), noise,
                                            r.steps, ks, r.starts, r.c["context_noise"],
                                            grad_from=r.c["num_training_frames"] - r.loss_frames)
    return dmd.keep_last_frames(x_g, r.loss_frames, r.vae), t_from, t_to


def exit_step(r, salt):   # per block; identical on every rank: drawn from a generator seeded by (seed, step, G or F)
    c = r.c
    return dmd.exit_steps(c["seed"], r.step, salt, len(r.steps), len(r.starts), c["same_step_across_blocks"],
                      c["last_step_only"])


def clip(params, method, value):
    """Gradient clipping -> the gradient norm as a tensor (read with .item() only when logging)."""
    if method == "value":
        torch.nn.utils.clip_grad_value_(params, value)
        return torch.cat([p.grad.flatten() for p in params if p.grad is not None]).norm()
    return torch.nn.utils.clip_grad_norm_(params, value)


def update_generator(r, draw, micro):
    """The generator's optimiser step, the same for DMD and the ODE init: micro's loss accumulated over the
    micro-batches that draw() gives, then (when finite) clip, AdamW step and EMA -> (loss, the last micro-batch's
    extras, the gradient norm; None when the loss is non-finite: the update is skipped). The added loss terms
    (extras' last item) go into r.gen_stats, kept for the next log line."""
    c = r.c
    r.g_opt.zero_grad(set_to_none=True)
    loss, extras = parallel.accumulate(r.env, c["gradient_accumulation_steps"], r.G, [r.gen], draw, micro)
    # the statistics stay device tensors (no sync) until a log line reads them (log_step), which may come steps later
    r.gen_stats = {"gen_step": r.step + 1, **{k: torch.stack([e[-1][k] for e in extras]).detach().mean()
                                              for k in extras[-1][-1]}}
    if not torch.isfinite(loss):
        return loss, extras[-1], None
    g_norm = clip(r.g_params, c["grad_clip_method"], c["max_grad_norm"])
    r.g_opt.step()
    r.gen_steps += 1
    ema_update(r)
    r.g_opt.zero_grad(set_to_none=True)   # free the gradients before the critic step
    return loss, extras[-1], g_norm


def generator_step(r, rec):
    """One DMD generator update: the distribution-matching gradient (docs/method.md), + the optional real-data and
    regression terms; EMA after it. Its statistics into r.gen_stats, kept for the next log line."""
    c, k = r.c, exit_step(r, 0)

    def micro(ctx, x0, traj):
        x_g, t_from, t_to = student(r, ctx, x0, k)
        t = dmd.score_timesteps(c["train_batch_size"], t_from, t_to, c, r.dev)
        loss, g, st = dmd.dmd_loss(x_g, t, r.R, r.Fk, ctx, r.neg_ctx, dmd.guidance(c, r.step, t),
                                   c["fake_score_guidance_scale"])
        # DMD's optional anchors (docs/method.md#the-regression-term): flow matching on data latents, regression on
        # the teacher's trajectories
        weight = {"real_data_loss": c["real_data_loss_weight"], "ode_regression_loss": c["ode_regression_weight"]}
        terms = {}
        if weight["real_data_loss"] > 0:
            terms["real_data_loss"] = flow.flow_matching_loss(r.G, x0, ctx, c["flow_schedule_shift"])
        if weight["ode_regression_loss"] > 0:
            terms["ode_regression_loss"] = dmd.ode_regression_loss(r.G, traj.to(r.dev), x0, ctx, r.steps, r.starts)[0]
        return loss + sum(weight[k] * v for k, v in terms.items()), loss, (t, g, st, terms)
    loss, (t, g, st, _), g_norm = update_generator(r, lambda: step_batch(r, True), micro)
    if g_norm is None:
        rec["dmd_loss"] = r.gen_stats["dmd_loss"] = float("nan")
        return
    # losses averaged over ranks, the other statistics are rank 0's
    r.gen_stats.update(dmd_loss=parallel.mean(r.env, loss), g_abs=g.abs().mean(), score_t=t.mean(),
                       exit_step=k if r.causal else k[0], g_grad_norm=parallel.local(g_norm),
                       **{f"{n}_{s}": getattr(v, s)() for n, v in st.items() for s in ("mean", "std")})


def ode_init_step(r, rec):
    """One ODE-init generator update: the regression of the student's steps on the teacher's ODE trajectories (no
    critic, no teacher forward: the trajectories are data). Its statistics into r.gen_stats."""
    def micro(ctx, x0, traj):
        loss, t = dmd.ode_regression_loss(r.G, traj.to(r.dev), x0, ctx, r.steps, r.starts)
        return loss, loss, (t, {})
    loss, (t, _), g_norm = update_generator(r, lambda: next_batch(r), micro)
    if g_norm is None:
        rec["ode_loss"] = r.gen_stats["ode_loss"] = float("nan")
        return
    r.gen_stats.update(ode_loss=parallel.mean(r.env, loss), ode_t=t.mean(), g_grad_norm=parallel.local(g_norm))


def generator_record(r):
    """The latest generator step's statistics as numbers, with gen_step, the trainer step they come from: with
    generator_update_interval > 1 a log line can fall between generator steps (interval 5, log_interval 5: always)."""
    r.gen_stats = {k: v.item() if torch.is_tensor(v) else v for k, v in r.gen_stats.items()}
    return dict(r.gen_stats)


def ema_update(r):
    """EMA of the generator's trainable weights every ema_update_interval generator steps (decay 0 before
    ema_start_step: the EMA follows the weights)."""
    c = r.c
    if r.ema is not None and r.gen_steps % c["ema_update_interval"] == 0:
        d = 0.0 if r.gen_steps < c["ema_start_step"] else c["ema_decay"]
        with torch.no_grad():
            for e, p in zip(r.ema, r.g_params):
                e.mul_(d).add_(p.detach().float(), alpha=1 - d)


def critic_step(r, rec, log_now):
    """One critic update (docs/method.md#the-critic) on fresh no-grad rollouts of the step's batch (step_batch) -> its loss (a tensor). On
    log steps: the critic loss per score-timestep bin of 250, to catch collapse early."""
    c = r.c

    def prepare():
        ctx, x0, _ = step_batch(r, False)
        with torch.no_grad():
            x_g, t_from, t_to = student(r, ctx, x0, exit_step(r, 1))
        return ctx, x_g, dmd.score_timesteps(c["train_batch_size"], t_from, t_to, c, r.dev)

    def micro(ctx, x_g, t):
        loss_f, per = dmd.critic_loss(r.Fk, x_g, t, ctx)
        return loss_f, loss_f, (per, t)
    r.f_opt.zero_grad(set_to_none=True)
    loss_f, extras = parallel.accumulate(r.env, c["gradient_accumulation_steps"], r.Fk, [r.critic], prepare, micro)
    if torch.isfinite(loss_f):
        f_norm = clip(r.f_params, "norm", c["fake_score_grad_clip"])
        r.f_opt.step()
        r.f_opt.zero_grad(set_to_none=True)
        if log_now:
            bins = {}
            for ti, li in zip(torch.cat([e[1] for e in extras]).tolist(), torch.cat([e[0] for e in extras]).tolist()):
                bins.setdefault(f"fake_score_loss_t{int(ti // 250) * 250}", []).append(li)
            rec.update(fake_score_loss=parallel.mean(r.env, loss_f).item(), f_grad_norm=parallel.local(f_norm).item(),
                       **{k_: sum(v) / len(v) for k_, v in bins.items()})
    return loss_f


def check_finite(r, rec, key, loss_f=None):
    """Count non-finite steps in a row (their updates were skipped, each named): the generator's loss rec[key], the
    critic's loss_f (None: no critic step); abort after max_nonfinite_steps, naming the last good checkpoint."""
    bad = {"generator": f"{key[:-5]} {rec.get(key)}"} if not math.isfinite(rec.get(key, 0.0)) else {}
    if loss_f is not None and not torch.isfinite(loss_f):
        bad["critic"] = f"critic {loss_f.item()}"
    r.bad_in_row = r.bad_in_row + 1 if bad else 0
    if bad:
        r.say(f"step {r.step + 1}: non-finite loss ({', '.join(bad.values())}): {' and '.join(bad)} update skipped")
        if r.bad_in_row >= r.c["max_nonfinite_steps"]:
            raise run_dir.Diverged(f"{r.bad_in_row} non-finite losses in a row: aborting (lower the learning rates, "
                               "check the teacher and the guidance scale); the last good checkpoint: "
                               f"{r.last_good or 'none written'}")


def nonfinite_state(r):
    """-> the parts of the checkpoint that hold a non-finite value (a checkpoint is never written with them: it would
    rotate out the last good one). Every rank calls it (FSDP: each checks its shards)."""
    opt = lambda o: [v for st in o.state.values() for v in st.values() if torch.is_tensor(v)]   # noqa: E731
    parts = {"generator weights": r.g_params, "critic weights": r.f_params, "EMA": r.ema or [],
             "generator optimiser state": opt(r.g_opt), "critic optimiser state": opt(r.f_opt)}
    growth = parallel.growth(r.env, r.g_params + r.f_params, r.norm_ref)   # divergence shows in the weights first
    if growth > parallel.DIVERGED:
        raise run_dir.Diverged(f"step {r.step}: diverging (the weights' norm grew {growth:.3g}x since the last checkpoint): "
                           f"lower the learning rates; the last good checkpoint: {r.last_good or 'none written'}")
    return [k for k, ts in parts.items() if not parallel.all_finite(r.env, ts)]


def log_step(r, pub, rec):
    """The step's record, completed with lr, speed and memory, to publish's log (rank 0: JSONL, wandb, terminal)."""
    cuda, now = r.dev.type == "cuda", time.perf_counter()
    rec.update(lr=r.g_sched.get_last_lr()[0], s_per_step=(now - r.t_last) / r.c["log_interval"],
               peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
               peak_reserved_gb=torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0)
    r.t_last = now
    rec.update(generator_record(r))
    pub.log(rec, r.step, "ode" if r.c["objective"] == "ode_init" else "dmd")


def end_of_step(r, pub, stop, validated):
    """Checkpoint on its interval, at the last step and on a signal (then exit 0); the validation artefacts."""
    c, env, step = r.c, r.env, r.step
    last = step >= c["max_train_steps"]
    stopping = stop["signal"] if env.world == 1 else not parallel.all_true(env, not stop["signal"])   # any rank
    bad = nonfinite_state(r) if step % c["checkpoint_step_interval"] == 0 or last or stopping else None
    if bad:
        r.say(f"step {step}: checkpoint skipped: non-finite {', '.join(bad)}; the last good checkpoint stays: "
              f"{r.last_good or 'none written'}")
        if last:
            raise run_dir.Diverged(f"non-finite {', '.join(bad)} at the last step: nothing exported; the last good "
                               f"checkpoint: {r.last_good or 'none written'}")
    elif bad is not None:
        path = parallel.save_checkpoint(c["output_dir"], checkpoint_state(r) if env.main else {"step": step},
                               c["checkpoints_total_limit"], env, None if env.main else rank_state(r),
                               parallel.sharded_state(r.named, r.opts, r.ema) if c["fsdp"] else None)
        r.say(f"checkpoint {path}")
        r.last_good, r.norm_ref = path, parallel.local_norm(r.g_params + r.f_params)
        pub.checkpoint(step, path)
    if validated:
        pub.validation(step)
    if stopping:
        r.say(f"signal {stop['signal'] or 'on another rank'}: exiting at step {step}; the last checkpoint: "
              f"{r.last_good or 'none written'}")
        pub.close_log()
        close_run(r)
        sys.exit(128 + (stop["signal"] or signal.SIGTERM))   # 130 / 143: a scheduler sees an interrupted run

# -----------------------------------------------------------------------------
# the run

@run_dir.locked   # rank 0 holds output_dir's lock throughout: one run per folder, never a fresh start over an old run
def train(c):
    """train_loop with publishing around it (publish.py, rank 0 only): env.json, webhook messages at start,
    validation, checkpoint, failure (then re-raised) and finish; loss curve, contact sheets, model card, hub."""
    steps = flow.rollout_steps(checks.check_config(c), c["warp_denoising_step"], c["timestep_shift"])   # config errors first
    if c["export_from"]:
        return export_checkpoint(c, steps)
    pub = publish.Publisher(c, main=int(os.environ.get("RANK", "0")) == 0)
    stdout = sys.stdout   # train_loop routes prints above its bar; restored here whatever happens
    try:
        out = train_loop(c, pub, steps)
    except SystemExit:   # SIGINT/SIGTERM: a checkpoint was written
        pub.notify("stopped", "training stopped by a signal; the same command resumes from its last checkpoint",
                   level="warning")
        pub.close()
        raise
    except BaseException as e:
        pub.failed(e)
        raise
    finally:
        sys.stdout = stdout
    pub.finish(steps)
    return out


def dmd_trainer_step(r, rec, log_now):
    """One DMD trainer step: a generator step every generator_update_interval steps (after the critic's warmup),
    a critic step, the count of non-finite losses."""
    c, warm = r.c, r.c["fake_score_warmup_steps"]
    if r.step >= warm and (r.step - warm) % c["generator_update_interval"] == 0:
        generator_step(r, rec)
    check_finite(r, rec, "dmd_loss", critic_step(r, rec, log_now))


def ode_init_trainer_step(r, rec, log_now):
    """One ODE-init trainer step (objective="ode_init"): the generator's regression alone, every step."""
    ode_init_step(r, rec)
    check_finite(r, rec, "ode_loss")


def train_loop(c, pub, steps):
    """The training loop, the same for DMD and the ODE init: per trainer step the objective's step
    (dmd_trainer_step or ode_init_trainer_step), the schedulers, a log line, then checkpoint / validation / signal
    handling. Its bar is drawn on a terminal only (a log file gets the step lines)."""
    r = setup(c, steps)
    trainer_step = ode_init_trainer_step if c["objective"] == "ode_init" else dmd_trainer_step
    stop = {"signal": None}
    caller = {sig: signal.signal(sig, lambda s, _: stop.update(signal=s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    pub.open_log(r.step, r.run_id)
    r.batches = iter(r.loader) if r.loader is not None else None
    if r.dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r.t_last = time.perf_counter()
    stdout = sys.stdout   # every print of the loop (log lines, validation, hub, webhooks) goes above the bar, not into it
    bar = tqdm(total=c["max_train_steps"], initial=r.step, desc="dmd", dynamic_ncols=True, disable=not r.env.main or None, file=stdout)
    sys.stdout = DummyTqdmFile(stdout)
    while r.step < c["max_train_steps"]:
        rec = {"step": r.step + 1}
        log_now = (r.step + 1) % c["log_interval"] == 0   # statistics (and their device syncs) only on log steps
        if c["sparsity_warmup_steps"] and c["attention_sparsity"]:   # this step's VSA stage (dmd.sparsity)
            mw.enable_sparse_attention(r.gen, dmd.sparsity(c, r.step), tuple(c["sparse_cube"]), r.g_adapter,
                                       c["sparse_remainder"])
        trainer_step(r, rec, log_now)
        r.g_sched.step()   # per trainer step: warmup and decay count the steps of max_train_steps, whatever the interval
        r.f_sched.step()
        r.step += 1
        bar.update(1)
        val_now = r.step % c["validation_step_interval"] == 0 or r.step >= c["max_train_steps"]
        if val_now:   # samples, and the collapse signal into this step's record
            rec.update(validation.validate(r, r.step))
        if log_now:
            log_step(r, pub, rec)
        elif val_now and len(rec) > 1:
            pub.log(rec, r.step, quiet=True)
        end_of_step(r, pub, stop, val_now)
    sys.stdout = stdout
    bar.close()
    for sig, handler in caller.items():   # the caller's handlers back: Ctrl-C stops demo.py's later stages again
        signal.signal(sig, handler)
    export_student(r)
    pub.close_log()
    close_run(r)
    return {"base": r.base, "generator": r.gen, "critic": r.critic, "g_params": r.g_params, "f_params": r.f_params,
            "ema": r.ema}


def export_student(r):
    """The student at r.step (EMA weights swapped in when kept) -> output_dir's student files (publish.export);
    every rank takes part in gathering FSDP's shards."""
    if r.ema is not None:
        validation.swap_in(r.g_params, r.ema)
    gen = parallel.gathered_copy(r.env, r.gen) if r.c["fsdp"] else r.gen
    if r.env.main:
        publish.export(r.c, gen, r.g_adapter, r.ema, r.step)


def export_checkpoint(c, steps):
    """--export_from=CHECKPOINT: that checkpoint's student exported into output_dir as the end of a run exports it
    (the same files; the model card names its step), without training: the networks, then the checkpoint loaded."""
    ckpt = parallel.find_checkpoint(c["output_dir"], c["export_from"], key="export_from")
    if ckpt is None:
        raise run_dir.NoCheckpoint(f"export_from={c['export_from']!r}: no checkpoint in {c['output_dir']}")
    r = new_run(c, steps)
    parallel.seed_all(c["seed"])   # as setup: the same tiny/random teacher and adapter init
    r.base, r.gen, r.critic, r.vae, _ = build_networks(c, r.dev, r.dtype)
    r.c = dict(c, resume_from_checkpoint=ckpt)
    setup_training(r)
    export_student(r)
    if r.env.main:
        val = [x for x in publish.read_log(c["output_dir"]) if x["step"] == r.step and "diversity_ratio" in x]
        print(f"exported the student of {ckpt} (step {r.step})" + (f": diversity {val[-1]['diversity_ratio']:.2f}x the "
              "teacher's at that step" if val else "") + f"; model card {publish.write_card(c, steps)['README.md']}")
    close_run(r)


def close_run(r):
    """The process group goes last: the DDP reducers first (one alive at the group's destruction aborted a
    torchrun exit now and then: "terminate called without an active exception")."""
    r.G = r.Fk = None
    gc.collect()
    parallel.cleanup(r.env)


DEFAULTS = {k: v for k, v in dict(globals()).items() if k in set(default_keys(__file__))}

if __name__ == "__main__":
    cfg = checks.preflight(config(), "train_dmd.py")   # every mistake of the config, its files, its teacher: one line
    try:
        if cfg["webhook_config"]:
            publish.load_webhook_config(cfg["webhook_config"])
    except (ValueError, FileNotFoundError) as e:
        fail("train_dmd.py", str(e))
    try:
        train(cfg)
    except run_dir.Refused as e:   # the folder in use, an old run in the way, a checkpoint that cannot resume, ...
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"train_dmd.py: error: {e}", file=sys.stderr)
        sys.exit(e.status)
    publish.print_next_commands(cfg, sys.argv[1:])   # rank 0: what to type next
