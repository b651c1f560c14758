"""
What a train_dmd.py run holds: one dataclass, every field declared here with what it is. train_dmd.py fills it in
stages (new_run: devices and counters; setup: networks, prompts and data; setup_training: wrapping, optimisers, EMA,
the resume) and its loop's phases read and write it; validation.py reads it. Nothing else keeps training state.

The networks: with LoRA on both (the default) `base`, `gen` and `critic` are one module — the frozen teacher with the
adapters "generator" and "critic" — and `g_adapter` / `f_adapter` name the adapter each one runs under; with
lora_rank = 0 (or fake_score_lora_rank = 0) that network is a separate full copy and its adapter name is None.
"""
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch


@dataclass(slots=True)   # slots: a field set anywhere but here is an AttributeError
class Run:
    # --- new_run: the config, the devices and the counters -------------------------------------------------------
    c: dict                                   # the resolved config (train_dmd's keys)
    env: Any                                  # parallel.setup's process layout: rank, world, dp/sp groups, main
    dev: torch.device                         # this rank's device
    dtype: torch.dtype                        # compute dtype of the networks (bf16 on CUDA, fp32 on CPU)
    autocast: Callable                        # () -> the autocast context for dtype on dev
    steps: list                               # the student's timesteps (dmd_denoising_steps, warped when asked)
    say: Callable = print                     # print on rank 0, nothing on the others
    step: int = 0                             # trainer steps done (a critic step each)
    gen_steps: int = 0                        # generator updates done (the EMA counts these)
    bad_in_row: int = 0                       # non-finite steps in a row (abort at max_nonfinite_steps)
    gen_stats: dict = field(default_factory=dict)   # the latest generator step's statistics, for the next log line
    run_id: str = field(default_factory=lambda: os.urandom(6).hex())   # the tracker's run id, kept
                                              # by the checkpoints so a resumed run logs into the same wandb run
    last_good: Optional[str] = None           # the newest checkpoint written or resumed from (named by errors)
    norm_ref: float = 0.0                     # the trainable weights' norm there (this rank's shards): divergence
    kept: list = field(default_factory=list)  # this trainer step's generator batches, for its critic step
    t_last: float = 0.0                       # perf_counter of the previous log line (s/step)
    # --- setup: networks, prompts, data ---------------------------------------------------------------------------
    base: Any = None                          # the frozen base DiT: the teacher (real score R), + LoRA adapters
    teacher: Any = None                       # a separate real score's DiT (teacher_model_name_or_path; frozen, no
                                              # adapter), else None: base is the real score
    gen: Any = None                           # the generator's module (base, or a full copy)
    critic: Any = None                        # the critic's (fake score's) module (base, or a full copy)
    vae: Any = None                           # the Wan VAE (validation decodes; dmd_loss_frames re-encodes)
    loader: Any = None                        # the cached dataset's DataLoader (datasets / teacher pairs) or None
    batches: Any = None                       # the iterator over loader the loop draws from (None: prompts only)
    train_emb: list = field(default_factory=list)   # the training prompts' text embeddings (data-free DMD)
    val_prompts: list = field(default_factory=list)  # the validation prompts
    val_emb: list = field(default_factory=list)      # their text embeddings
    neg_ctx: Any = None                       # the negative prompt's padded context, one per batch sample
    shape: tuple = ()                         # the rollout's latent shape (B, 16, frames, height/8, width/8)
    starts: list = field(default_factory=lambda: [0])   # the latent frame where each causal block starts
    loss_frames: int = 0                      # latent frames the DMD and critic losses see (the rollout's last)
    cache: Any = None                         # the causal generator's KV cache (None: bidirectional)
    teacher_div: Any = None                   # the collapse signal's reference: the teacher's diversity per prompt
    # --- setup_training: wrapping, optimisers, EMA ----------------------------------------------------------------
    causal: Optional[tuple] = None            # (frames per block, independent first frame) of a causal student
    g_adapter: Optional[str] = None           # "generator" when the generator is a LoRA on base, else None
    f_adapter: Optional[str] = None           # "critic" when the critic is a LoRA on base, else None
    g_params: list = field(default_factory=list)   # the generator's trainable parameters
    f_params: list = field(default_factory=list)   # the critic's trainable parameters
    G: Any = None                             # the generator's velocity function (DDP-wrapped under torchrun)
    Fk: Any = None                            # the critic's velocity function (the fake score; DDP-wrapped)
    R: Any = None                             # the teacher's velocity function (the real score; never wrapped)
    g_opt: Any = None                         # the generator's AdamW
    f_opt: Any = None                         # the critic's AdamW
    g_sched: Any = None                       # the generator's lr schedule (LambdaLR, per trainer step)
    f_sched: Any = None                       # the critic's lr schedule
    ema: Optional[list] = None                # fp32 EMA of g_params (None: use_ema=False)
    named: dict = field(default_factory=dict)  # {"generator"/"critic": named trainable tensors} for FSDP checkpoints
    opts: dict = field(default_factory=dict)   # {"g_opt"/"f_opt": (module, optimiser)} for FSDP checkpoints
