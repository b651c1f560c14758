"""
Many GPUs for train_dmd.py, with PyTorch's own engine only (torch.distributed, launched by torchrun):

  torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step.py                    # DDP, 8 GPUs
  torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step_14b.py                 # FSDP2 (the 14B config sets fsdp)
  torchrun --nproc_per_node=8 train_dmd.py config/wan_dmd_3step.py --sp_size=4         # 2 data-parallel groups of 4
  torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train_dmd.py CONFIG.py

- DDP wraps exactly the trainable parameters of one network (an adapter of the shared base, or a full copy):
  `Trainable` below is a module holding only those, so the frozen teacher is never wrapped.
- FSDP2 (`fsdp=True`): `fully_shard` on every transformer block, then on the root, of each network (teacher
  base with its adapters, full copies); parameters keep their dtypes (bf16 base, fp32 norms/modulation and
  adapters), so gradients are reduce-scattered in fp32 and the numerics equal one GPU's. Checkpoints are
  sharded (torch.distributed.checkpoint); the export is gathered on rank 0.
- Sequence parallelism (`sp_size` P): ranks form world/P data-parallel groups of P consecutive ranks (one
  node's GPUs when P divides them); the ranks of a group hold the same sample (same seed and data shard)
  and split its tokens (model_wan.enable_sequence_parallel). Their parameter gradients are partial sums, so
  the loss is scaled by P before the world-wide averaging of DDP/FSDP: the result is the data-parallel mean.
"""
import json
import math
import os
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import checks
import flow
import model_wan as mw
import lora
import run_dir

try:   # public from torch 2.6; torch 2.5 has it under _composable
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover
    from torch.distributed._composable.fsdp import FSDPModule, fully_shard


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    sp_size: int = 1
    sp_group: object = None

    @property
    def dp_rank(self):   # the data-parallel group: seeds and data shards follow it
        return self.rank // self.sp_size

    @property
    def dp_size(self):
        return self.world // self.sp_size

    @property
    def main(self):
        return self.rank == 0


def setup(sp_size, device, fsdp=False):
    """-> (Dist, device). Initialises the process group when launched by torchrun (also with one process): NCCL
    on CUDA (one GPU per local rank), gloo on CPU. Plain `python train_dmd.py`: no process group at all."""
    checks.check_launch(sp_size, fsdp)
    if "RANK" not in os.environ:
        return Dist(), device
    rank, local, world = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():   # generous timeout: rank 0 alone decodes validation videos and exports
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(minutes=60),
                                **({"device_id": device} if device.type == "cuda" else {}))
    env = Dist(rank, world, local, sp_size)
    if sp_size > 1:   # every rank creates every group (a collective), keeps its own
        for g in range(world // sp_size):
            group = dist.new_group(list(range(g * sp_size, (g + 1) * sp_size)))
            if g == rank // sp_size:
                env.sp_group = group
    return env, device


def cleanup(env):
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier(env):
    if env.world > 1:
        dist.barrier()


def all_true(env, flag):
    """A bool every rank agrees on: True only if `flag` (bool or 0-dim tensor) is true on every rank."""
    if env.world == 1:
        return bool(flag)
    t = torch.as_tensor(flag, dtype=torch.float32, device="cuda" if dist.get_backend() == "nccl" else "cpu").reshape(1)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_finite(env, tensors):
    """True on every rank when every tensor is finite on every rank (a DTensor: this rank's shard, no gather)."""
    ok = all(bool(torch.isfinite(t.to_local() if hasattr(t, "to_local") else t).all()) for t in tensors)
    return all_true(env, ok)


def local_norm(tensors):
    """The L2 norm of this rank's part of `tensors` (a DTensor: its shard) as a float (divergence checks)."""
    ts = [(t.to_local() if hasattr(t, "to_local") else t).detach().float().norm() for t in tensors]
    return float(torch.stack(ts).norm()) if ts else 0.0


def growth(env, tensors, ref):
    """How many times the norm of `tensors` grew since it was `ref` (local_norm), the largest over the ranks (each
    compares its own shards); 0 where it is not finite (non-finite states are caught by all_finite) or ref is 0."""
    g = local_norm(tensors) / ref if ref else 0.0
    g = torch.tensor(g if math.isfinite(g) else 0.0)
    if env.world > 1:
        g = g.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(g, op=dist.ReduceOp.MAX)
    return float(g)


def mean(env, x):
    """The mean over ranks of a tensor (for logging)."""
    if env.world == 1:
        return x
    x = x.detach().float().clone()
    dist.all_reduce(x)
    return x / env.world


def local(x):
    """A DTensor (FSDP parameter, gradient norm) -> its full value; a tensor as it is."""
    return x.full_tensor() if hasattr(x, "full_tensor") else x

# -----------------------------------------------------------------------------
# data parallelism

class Trainable(nn.Module):
    """The trainable parameters of one network as a module DDP can wrap; forward = that network's velocity
    f(x, t, ctx) with its adapter active. The network itself is not a submodule: DDP sees only `params`."""

    def __init__(self, fn, params):
        super().__init__()
        self.params = nn.ParameterList(params)
        self.fn = fn

    def forward(self, x, t, ctx, **kw):
        return self.fn(x, t, ctx, **kw)


def data_parallel(env, fn, params, fsdp):
    """-> the velocity function to train through: DDP over `params` when several processes run without FSDP
    (gradients averaged in backward), else `fn` itself (FSDP reduce-scatters inside the sharded modules)."""
    if env.world == 1 or fsdp:
        return fn
    dev = params[0].device
    return nn.parallel.DistributedDataParallel(Trainable(fn, params), device_ids=[dev] if dev.type == "cuda" else None,
                                               gradient_as_bucket_view=True)   # no buffers: nothing else to sync


@contextmanager
def sync_gradients(net, modules, on):
    """Gradient accumulation: gradients are averaged over ranks only when `on` (the last micro-step). Set around
    the forward AND backward: DDP decides in its forward. `modules`: the FSDP-sharded networks involved."""
    if on:
        yield
        return
    if isinstance(net, nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
        return
    sharded = [m for m in modules if isinstance(m, FSDPModule)]
    for m in sharded:
        m.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        for m in sharded:
            m.set_requires_gradient_sync(True)

# -----------------------------------------------------------------------------
# FSDP2

def shard(model):
    """fully_shard every transformer block, then the root (embeddings, head) of a WanDiT, in place."""
    for block in model.blocks:
        fully_shard(block)
    # the root too reshards after each forward (by default it stays gathered until backward, and the no-grad
    # rollouts have no backward: checkpoints and exports would then see gathered, not sharded, parameters)
    fully_shard(model, reshard_after_forward=True)
    return model


def sharded_state(named, optimizers, ema):
    """The tensors of a checkpoint under FSDP, as torch.distributed.checkpoint saves and loads them in place:
    {"generator": {name: shard}, "critic": ..., "ema": ..., "g_opt": ..., "f_opt": ...}."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    st = {k: {n: p.detach() for n, p in ps.items()} for k, ps in named.items()}
    if ema is not None:
        st["ema"] = {n: e for n, e in zip(named["generator"], ema)}
    for k, (net, opt) in optimizers.items():
        st[k] = get_optimizer_state_dict(net, opt)
    return st


def save_sharded(path, st):
    import torch.distributed.checkpoint as dcp
    dcp.save(st, checkpoint_id=path)


def load_sharded(path, st, optimizers):
    """Load a save_sharded checkpoint into the live tensors of `st` (from sharded_state) and the optimizers."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    dcp.load(st, checkpoint_id=path)
    for k, (net, opt) in optimizers.items():
        set_optimizer_state_dict(net, opt, optim_state_dict=st[k])


def gathered_copy(env, model):
    """A plain CPU WanDiT (with the same adapters) holding the full weights of the sharded `model`, on rank 0;
    None elsewhere. A collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.main:
        return None
    with torch.device("meta"):
        plain = mw.WanDiT(model.cfg)
        vsa = model.blocks[0].self_attn.sparse   # (adapter, sparsity, cube): the gates before the adapters on them
        if vsa is not None:
            mw.enable_sparse_attention(plain, vsa[1], vsa[2], vsa[0])
        if lora.base_precision(model) != "no":   # an 8-bit base: the same 8-bit storage (before any adapter)
            lora.quantize_base(plain, lora.base_precision(model))
        for name in lora.adapter_names(model):
            mods = [(n, m) for n, m in lora.lora_modules(model) if name in m.lora_scale]
            r = mods[0][1].lora_A[name].shape[0]
            lora.add_adapter(plain, name, r, mods[0][1].lora_scale[name] * r, tuple(n for n, _ in mods))
    plain.load_state_dict(sd, assign=True)
    return plain.requires_grad_(False)

def accumulate(env, accum, net, modules, prepare, loss_fn):
    """`accum` micro-batches (gradient_accumulation_steps): prepare() -> inputs (outside the no-sync context), then
    loss_fn(*inputs) -> (total, loss, extra) and its backward, gradients synced on the last micro-batch only; a
    non-finite total on any rank skips its backward everywhere -> (mean loss, NaN if any was skipped; [extra])."""
    scale = env.sp_size / accum   # sequence parallelism: a group's partial gradients must sum, not average
    losses, extras = [], []
    for i in range(accum):
        inputs = prepare()
        with sync_gradients(net, modules, on=i == accum - 1):   # sync on the last micro-step only
            total, loss, extra = loss_fn(*inputs)
            ok = all_true(env, torch.isfinite(total))   # every rank takes the same branch
            if ok:
                (total * scale).backward()
        losses.append(loss.detach() if ok else torch.full_like(loss, float("nan")))   # a NaN skips the step
        extras.append(extra)
    return torch.stack(losses).mean(), extras

# -----------------------------------------------------------------------------
# process state: random streams and the checkpoint folder every rank writes into (train_dmd's checkpoint_state
# and load_checkpoint say what goes in it)

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


def save_checkpoint(out_dir, state, limit, env=Dist(), rank_state=None, sharded=None):
    """Write checkpoint-{step}/ via a temporary folder and a rename; keep the newest `limit` of this run (run_dir:
    rotation sees only the run's own, complete checkpoints). state.pt comes from rank 0; with several processes rank
    r > 0 adds rank{r}.pt (its RNG and data position) and FSDP adds the sharded weights and optimiser states under
    sharded/ (torch.distributed.checkpoint, every rank); the checksums of every file go in last (run_dir)."""
    final = os.path.join(out_dir, f"checkpoint-{state['step']:07d}")
    tmp = final + ".tmp"
    if env.main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(env)
    if not env.main:
        torch.save(rank_state, os.path.join(tmp, f"rank{env.rank}.pt"))
    if sharded is not None:
        save_sharded(os.path.join(tmp, "sharded"), sharded)
    barrier(env)
    if env.main:
        try:
            torch.save(state, os.path.join(tmp, "state.pt"))
            if "config" in state:   # the run's keys beside it: a resume checks them before any model loads
                with open(os.path.join(tmp, "config.json"), "w") as f:
                    f.write(state["config"])
            run_dir.write_checksums(tmp, state.get("run_id"), state["step"])
        except (OSError, RuntimeError) as e:   # a full disk (torch.save says it as a RuntimeError), a vanished mount
            shutil.rmtree(tmp, ignore_errors=True)
            good = run_dir.checkpoints(out_dir, state.get("run_id"))
            raise run_dir.CannotWrite(f"{final}: cannot be written ({str(e).splitlines()[0][:120]}): make room or give "
                                      "a writable output_dir, then resume; the newest complete checkpoint: "
                                      f"{good[-1] if good else 'none yet'}") from None
        run_dir.make_room(final, state.get("run_id"))
        os.replace(tmp, final)
        run_dir.rotate(out_dir, limit, state.get("run_id"))
    barrier(env)
    return final


def read_checkpoint(env, ckpt):
    """-> (state.pt, this rank's rank{r}.pt or state.pt): every rank reads its files, then all agree before any goes
    on (a bad rank1.pt stops every rank alike, named in one line, never a torch.load text advising an unsafe load)."""
    st = rs = err = None
    try:
        st = run_dir.load(os.path.join(ckpt, "state.pt"))
        own = env.rank and st.get("world", 1) == env.world
        rs = run_dir.load(os.path.join(ckpt, f"rank{env.rank}.pt")) if own else st
    except ValueError as e:
        err = e
    if not all_true(env, err is None):
        raise err or run_dir.CannotResume(f"{ckpt}: a file of it cannot be read on another rank (named there)")
    return st, rs


# the trainable weights' norm growing more than this factor between two checkpoints is divergence (train_dmd aborts
# naming the last good checkpoint; the weights reach |w| = 1e10 while the losses are still finite)
DIVERGED = 100.0

# train_dmd keys a run cannot change when it resumes (its checkpoint holds state made with the old value): the
# networks' shapes and starting weights, the student's definition (its steps; the causal student's blocks and
# frames), what the data position and the drawn exit steps count in (datasets, batch size, seed), the FSDP layout.
# use_ema may be turned off, never on (the EMA would start empty and the export would call raw weights EMA). Every
# other key (learning rates, AdamW settings, max_train_steps, the intervals, guidance, validation, ...) takes its
# new value, announced.
RESUME_FIXED = ("pretrained_model_name_or_path", "teacher_model_name_or_path", "generator_init", "lora_rank",
                "lora_alpha", "lora_targets", "fake_score_lora_rank", "fake_score_lora_alpha", "objective", "dmd_denoising_steps",
                "warp_denoising_step", "causal", "num_frame_per_block", "independent_first_frame",
                "same_step_across_blocks", "context_noise", "dmd_loss_frames", "num_training_frames", "datasets",
                "teacher_data_samples", "teacher_data_steps", "train_batch_size", "seed", "fsdp")


def resume_changes(saved, new, ckpt):
    """The config a checkpoint was written with vs this run's (both as JSON values) -> {key: (old, new)} of the
    changed keys; a ValueError naming every one that cannot change (RESUME_FIXED, use_ema turned on)."""
    def same(k, a, b):   # the student's steps by their values: "1000, 757, 522" is "1000,757,522"
        if k == "dmd_denoising_steps":
            try:
                return flow.parse_steps(a) == flow.parse_steps(b)
            except (ValueError, TypeError):
                pass
        return a == b
    changed = {k: (saved[k], v) for k, v in new.items()
               if k in saved and not same(k, saved[k], v) and k != "resume_from_checkpoint"}
    fixed = [k for k, (_, v) in changed.items() if k in RESUME_FIXED or (k == "use_ema" and v)
             or (k == "timestep_shift" and (new.get("warp_denoising_step") or saved.get("warp_denoising_step")))]
    if fixed:
        raise run_dir.CannotResume(f"{ckpt} was written with {', '.join(f'{k}={changed[k][0]!r}' for k in fixed)}, this config "
                         f"has {', '.join(f'{k}={changed[k][1]!r}' for k in fixed)}: these cannot change when a run "
                         "resumes; keep the checkpoint's values, or start a new run in another output_dir")
    return changed


def early_resume_check(c, config_json):
    """The checkpoint a start will resume, its config.json against this config (`config_json`: {key: JSON value})
    before any model loads: a key that cannot change is refused now, not after the teacher has loaded. The full
    check runs again on its state.pt; a checkpoint without config.json (an older version's) waits for that one."""
    spec = c["resume_from_checkpoint"]
    if not spec or c.get("export_from"):
        return
    found = run_dir.checkpoints(c["output_dir"]) if spec == "latest" else [run_dir.named_checkpoint(c["output_dir"], spec)]
    try:
        with open(os.path.join(found[-1], "config.json")) as f:
            saved = json.load(f)
    except (IndexError, OSError, ValueError):
        return
    if c["teacher_data_samples"] > 0:   # the run sets its datasets to the teacher pairs it makes: not the user's key
        saved.pop("datasets", None)
        config_json = {k: v for k, v in config_json.items() if k != "datasets"}
    resume_changes(saved, config_json, found[-1])


def find_checkpoint(out_dir, spec, env=Dist(), say=print, key="resume_from_checkpoint"):
    """spec (the value of `key`): "latest" (None when there is none), "" (None), "checkpoint-N" (N unpadded too:
    out_dir's) or a folder. Its checksums verified by rank 0 (run_dir.verify), every rank agreeing: a damaged
    `latest` falls back to the previous complete checkpoint with a warning, a damaged explicit one is a ValueError
    naming the file."""
    if not spec:
        return None
    spec = run_dir.named_checkpoint(out_dir, spec, key) if spec != "latest" else spec
    last_bad = None
    for ckpt in reversed(run_dir.checkpoints(out_dir)) if spec == "latest" else [spec]:
        bad = run_dir.verify(ckpt) if env.main else None
        if all_true(env, bad is None):
            return ckpt
        last_bad = bad or f"{ckpt}: a file failed its checksum (named on rank 0)"
        if spec != "latest":
            raise run_dir.CannotResume(f"{last_bad}: resume from another checkpoint (resume_from_checkpoint=checkpoint-N)")
        say(f"warning: {last_bad}: falling back to the previous complete checkpoint")
    if last_bad:   # every checkpoint of out_dir damaged: never a fresh start over them
        raise run_dir.CannotResume(f"{last_bad}: no undamaged checkpoint left in {out_dir}: resume one by path, or give this "
                         "run another output_dir")
    return None
