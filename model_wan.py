"""
Wan 2.1 text-to-video DiT in plain PyTorch, its weight loaders, and a small multi-adapter LoRA.

Parameter layout: the ORIGINAL Wan layout (Wan-Video/Wan2.1 `WanModel`: `blocks.0.self_attn.q`,
`blocks.0.ffn.0`, `head.head`, ...) is native here because it maps onto plain nn.Sequential
modules. Diffusers checkpoints (`WanTransformer3DModel`) are converted on load with
`diffusers_to_original_key`, and `original_to_diffusers_key` converts back for export.

Numerics follow the reference implementations (docs/wan21.md#numerics):
- the timestep sinusoid is diffusers' fp32 recipe ([cos, sin]); RoPE tables are built in float64
  and applied in fp32 on interleaved pairs (no complex numbers);
- the residual stream, the modulation adds/gates, every LayerNorm and the head's modulation run
  in fp32 (the original repo's recipe); every Linear/Conv runs in its own weight dtype, so a bf16
  model does its matmuls and attention in bf16. `FP32_MODULES` stay fp32 when a model is cast.

Sequence parallelism (Ulysses, off by default): `enable_sequence_parallel(model, group)` splits the tokens
over a process group; two all-to-alls around self-attention are the only other change (parallel.py sets it up).

Causal student (docs/method.md#the-causal-student, off by default): `forward(..., causal=(num_frame_per_block, independent_first_frame))`
runs the whole clip under a block-causal SDPA mask (t per sample or per latent frame); with `kv_cache=` too it runs
one block against a KVCache of earlier frames (causal.py: block_starts, block_causal_mask, KVCache; WanDiT.new_kv_cache).
No mask is built and no other op added when neither is given. (FlexAttention is not used: SDPA + a boolean mask.)

Video sparse attention (VSA, off by default): `enable_sparse_attention(model, sparsity, cube, adapter)` runs the
self-attention of one adapter's forwards (the student's) through sparse_attn.py, with a zero-initialised gate per block.

Run `python model_wan.py` for a self-check of the tiny preset on CPU.
"""
import json
import math
import os
import re
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import sparse_attn
from causal import KVCache, block_causal_mask, block_starts   # re-exported: mw.block_starts, mw.KVCache
from lora import DEFAULT_LORA_TARGETS, Linear, add_adapter, adapters_as, lora_modules, matches, quantize_base, set_adapter
from quant import quantize
from ulysses import AllToAll, Gather, sp_split   # sp_split re-exported: mw.sp_split
from readers import open_safetensors, read_json, write_safetensors

# -----------------------------------------------------------------------------
# config

@dataclass
class WanConfig:
    dim: int = 1536            # model width E = num_heads * head_dim
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16           # latent channels
    out_dim: int = 16
    text_dim: int = 4096       # UMT5-XXL width
    freq_dim: int = 256        # timestep sinusoid width
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    rope_max_len: int = 1024   # positions per axis in the reference RoPE tables
    text_len: int = 512        # context rows the model attends to: prompts are zero-padded to it (UMT5: 512)

    @property
    def head_dim(self):
        return self.dim // self.num_heads

PRESETS = {
    "t2v-1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tiny random-weight model for CPU tests and the offline demo
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32),
    # the teacher demo.py trains on 2 CPU cores in ~2 min (text_encoders.TinyTextEncoder's 32-d words). Width 64 reached
    # 22% precision, 128 reaches 97% (bench/HISTORY.md); 16 context rows (5 words + EOS fit) run 5x faster than 512
    "demo": WanConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, text_dim=32, text_len=16),
    # the same teacher on 1x1x1 patches: 4x the tokens (3x4x4 = 48 on the demo's 3x4x4 latent) without a new VAE, the
    # geometry of the sparse-attention (VSA) demo student (config/demo_vsa.py)
    "demo_p1": WanConfig(dim=128, ffn_dim=512, num_heads=2, num_layers=4, text_dim=32, text_len=16, patch_size=(1, 1, 1)),
}

# parameters (by name component) kept in fp32 when the model is cast to bf16/fp16
FP32_MODULES = ("time_embedding", "time_projection", "modulation", "norm3")

# -----------------------------------------------------------------------------
# LoRA adapter files (the adapters themselves: lora.py)

def adapter_state_dict(model, name):
    """The adapter alone, in the PEFT keys diffusers' WanPipeline.load_lora_weights reads
    (`transformer.blocks.0.attn1.to_q.lora_A.weight`), with alpha/r folded into lora_B (diffusers assumes
    scale 1 when no alpha is stored). sample.load_student reads the same files back."""
    sd = {}
    for mname, m in lora_modules(model):
        if name not in m.lora_scale:
            continue
        A, B = m.lora_A[name].detach(), m.lora_B[name].detach()
        dname = original_to_diffusers_key(mname + ".weight")[: -len(".weight")]
        sd[f"transformer.{dname}.lora_A.weight"] = A.clone().contiguous()
        sd[f"transformer.{dname}.lora_B.weight"] = (B.float() * m.lora_scale[name]).to(B.dtype).contiguous()
    return sd

@torch.no_grad()
def load_adapter(model, name, sd):
    """The inverse of adapter_state_dict: PEFT keys (`transformer.<diffusers name>.lora_A.weight`, scale folded
    into B) become adapter `name` with alpha = rank, on exactly the Linears the file names."""
    mods, weights = dict(lora_modules(model)), {}
    for k, v in sd.items():
        m = re.match(r"^(?:transformer\.)?(.+)\.lora_([AB])(?:\.weight)?$", k)
        if m is None:
            raise ValueError(f"unexpected key {k!r} in a LoRA file")
        mname = diffusers_to_original_key(m.group(1) + ".weight")[: -len(".weight")]
        if mname not in mods:
            raise ValueError(f"LoRA key {k!r} names no Linear of the DiT")
        weights.setdefault(mname, {})[m.group(2)] = v
    rank = next(iter(weights.values()))["A"].shape[0]
    add_adapter(model, name, rank=rank, alpha=rank, targets=tuple(weights))
    for mname, ab in weights.items():
        for which, tensor in ab.items():
            p = (mods[mname].lora_A if which == "A" else mods[mname].lora_B)[name]
            if p.shape != tensor.shape:
                raise ValueError(f"{mname}.lora_{which} has shape {tuple(tensor.shape)}, expected {tuple(p.shape)}")
            p.copy_(tensor)

# -----------------------------------------------------------------------------
# the DiT

def layer_norm(x, weight=None, bias=None, eps=1e-6):
    """LayerNorm in fp32 over the last dim (the reference's FP32LayerNorm / WanLayerNorm)."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps)

class RMSNorm(nn.Module):
    """q/k RMSNorm over the full width (all heads together), as W `WanRMSNorm`."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # one fused kernel; statistics in fp32 whatever x's dtype (the reference normalises in fp32 too)
        return F.rms_norm(x, x.shape[-1:], self.weight.to(x.dtype), self.eps)

class LayerNorm(nn.Module):
    """Affine LayerNorm computed in fp32 (W `norm3`, the cross-attention pre-norm)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        return layer_norm(x, self.weight, self.bias, self.eps)

def timestep_sinusoid(t, dim):
    """(B,) float timesteps on the 0-1000 scale -> (B, dim) [cos, sin], diffusers' fp32 recipe."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    arg = t.float()[:, None] * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(arg), torch.sin(arg)], dim=-1)

def rope_tables(Fp, Hp, Wp, head_dim, device, f0=0):
    """RoPE angles for a (Fp,Hp,Wp) patch grid -> cos, sin of shape (1, L, 1, head_dim/2), fp32.
    f0: absolute index of the first frame (a causal block starting at latent frame f0 keeps absolute positions).
    Pair k of a head rotates by f*inv_t[k] (first t/2 pairs), then h*inv_h, then w*inv_w, with
    axis dims t = d - 4(d//6), h = w = 2(d//6) (44/42/42 at d=128), each with its own exponent."""
    hw = 2 * (head_dim // 6)
    angs = []
    for n, a, o in ((Fp, head_dim - 2 * hw, f0), (Hp, hw, 0), (Wp, hw, 0)):
        inv = 1.0 / (10000 ** (torch.arange(0, a, 2, dtype=torch.float64, device=device) / a))  # (a/2,)
        angs.append(torch.arange(o, o + n, dtype=torch.float64, device=device)[:, None] * inv[None])  # (n, a/2)
    af, ah, aw = angs
    grid = torch.cat([af[:, None, None, :].expand(Fp, Hp, Wp, -1),
                      ah[None, :, None, :].expand(Fp, Hp, Wp, -1),
                      aw[None, None, :, :].expand(Fp, Hp, Wp, -1)], dim=-1)  # (Fp,Hp,Wp,d/2)
    grid = grid.reshape(1, Fp * Hp * Wp, 1, head_dim // 2)
    return grid.cos().float(), grid.sin().float()

def apply_rope(x, cos, sin):
    """x (B,L,N,d) rotated on interleaved pairs (2k, 2k+1) by the angles in cos/sin (1,L,1,d/2).
    The products promote to fp32 (the tables are fp32) and are written straight into x's dtype."""
    x1, x2 = x[..., 0::2], x[..., 1::2]              # (B,L,N,d/2) views
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out

def attention(q, k, v, sp_group=None, mask=None, sparse=None):
    """q (B,Lq,N,d), k/v (B,Lk,N,d) -> (B,Lq,N*d). SDPA picks flash/cuDNN kernels on GPU; a boolean
    mask (Lq,Lk), True = attend (the causal whole-clip pass), sends it to the efficient/math kernels.
    sparse = (gate (B,L,N,d), grid, sparsity, cube, remainder): video sparse attention (sparse_attn.py) instead of SDPA.
    With an SP group of P ranks (Ulysses), q/k/v (and the gate) hold this rank's L/P tokens of every head: one
    all-to-all trades them for all L tokens of N/P heads, attention runs on those, and a second all-to-all trades back."""
    if sp_group is not None:
        q, k, v, *g = AllToAll.apply(torch.stack([q, k, v] + list(sparse[:1] if sparse else [])), sp_group,
                                      False).unbind(0)
        sparse = sparse and (g[0], *sparse[1:])
    if sparse is not None:
        o = sparse_attn.sparse_attention(q, k, v, *sparse)
    else:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=mask).transpose(1, 2)
    if sp_group is not None:
        o = AllToAll.apply(o.unsqueeze(0), sp_group, True).squeeze(0)
    return o.flatten(2)

class Attention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.sp_group = None   # set on self-attention by enable_sequence_parallel
        self.sparse = self.gate_compress = None   # VSA (adapter, sparsity, cube, remainder), gate: enable_sparse_attention
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def sparse_on(self):   # VSA runs when the adapter that owns it is the active one (the same switch as LoRA's)
        return self.sparse is not None and self.q.adapter == self.sparse[0]

    def forward(self, x, ctx=None, rope=None, mask=None, cache=None, grid=None):
        """x (B,L,E); ctx (B,Lc,E) for cross-attention or None for self-attention -> (B,L,E).
        mask: block-causal (L,L) bool or None. cache: this layer's KVCache.update (k, v) -> (k, v): stores this
        call's k/v (after RoPE) and gives the cached frames' k/v plus them, to attend to. grid: the (F,H,W) patch grid
        of the L tokens (for sparse attention)."""
        ctx = x if ctx is None else ctx
        N = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (N, -1))    # (B,L,N,d)
        k = self.norm_k(self.k(ctx)).unflatten(-1, (N, -1))  # (B,Lc,N,d)
        v = self.v(ctx).unflatten(-1, (N, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache(k, v)
        sparse = (self.gate_compress(x).unflatten(-1, (N, -1)), grid, *self.sparse[1:]) if self.sparse_on() else None
        return self.o(attention(q, k, v, self.sp_group, mask, sparse))

class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E = cfg.dim
        self.eps = cfg.eps
        self.self_attn = Attention(E, cfg.num_heads, cfg.eps)
        self.norm3 = LayerNorm(E, cfg.eps)   # affine pre-norm of cross-attention (diffusers: norm2)
        self.cross_attn = Attention(E, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(Linear(E, cfg.ffn_dim), nn.GELU(approximate="tanh"), Linear(cfg.ffn_dim, E))
        self.modulation = nn.Parameter(torch.randn(1, 6, E) / E ** 0.5)

    def forward(self, x, e, ctx, rope, mask=None, cache=None, grid=None):
        """x (B,L,E) residual (fp32, or bf16 with residual_dtype bf16: computed in fp32 all the same); e (B,6,E) fp32 time projection, or (B,F,6,E) per latent frame (the causal
        whole-clip pass: frame f's tokens are modulated by its own timestep, x viewed as (B,F,HW,E) for each
        modulation, as Self-Forcing's CausalWan); ctx (B,Lc,E); rope tables; mask/cache for causal self-attention;
        grid (F,H,W) of the tokens for sparse self-attention."""
        dt, x = self.self_attn.q.compute_dtype, x.float()   # x arrives in the model's residual_dtype
        e = e if e.ndim == 4 else e[:, None]                                   # one timestep per sample = one "frame"
        fr = lambda y: y.unflatten(1, (e.shape[1], -1))                        # (B,L,E) -> (B,F,HW,E), a view
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e).chunk(6, dim=2)  # (B,F,1,E)
        h = torch.addcmul(shift, fr(layer_norm(x, eps=self.eps)), 1 + scale).flatten(1, 2)   # LN(x)(1+scale)+shift
        x = torch.addcmul(fr(x), fr(self.self_attn(h.to(dt), rope=rope, mask=mask, cache=cache, grid=grid)), gate).flatten(1, 2)
        x = x + self.cross_attn(self.norm3(x).to(dt), ctx=ctx)                 # no gate, no mask
        h = torch.addcmul(c_shift, fr(layer_norm(x, eps=self.eps)), 1 + c_scale).flatten(1, 2)
        return torch.addcmul(fr(x), fr(self.ffn(h.to(dt))), c_gate).flatten(1, 2)   # fp32 residual += o*gate

class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E = cfg.dim
        self.eps = cfg.eps
        self.head = Linear(E, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, E) / E ** 0.5)

    def forward(self, x, temb):
        """x (B,L,E) fp32; temb (B,E), or (B,F,E) per latent frame -> (B,L,out_dim*prod(patch))."""
        temb = temb if temb.ndim == 3 else temb[:, None]                       # (B,F,E): (B,F,1,E) modulation
        shift, scale = (self.modulation.float() + temb.float()[:, :, None]).chunk(2, dim=2)
        h = layer_norm(x, eps=self.eps).unflatten(1, (temb.shape[1], -1)) * (1 + scale) + shift
        return self.head(h.flatten(1, 2))

class _ToHost(torch.autograd.Function):
    """x -> its copy in host memory (pinned, copied asynchronously from CUDA); the gradient goes back to x's device.
    activation_offload: the checkpoint of a block keeps this copy instead of x, and its recompute (_run_on) copies
    it back, on the same stream, so the copies are ordered without a sync."""

    @staticmethod
    def forward(ctx, x):
        ctx.device = x.device
        return torch.empty(x.shape, dtype=x.dtype, pin_memory=x.is_cuda).copy_(x, non_blocking=x.is_cuda)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.device, non_blocking=True)

def _run_on(block, device, x, *args):
    return block(x.to(device, non_blocking=True), *args)

def fit_context(context, n):
    """(B,Lc,D) zero-padded text embeddings -> at most n rows: callers pad to 512 (Wan's UMT5 length); a model
    trained with a shorter text_len (the demo's) gets its own length, the cut rows must be padding."""
    if context.shape[1] <= n:
        return context
    if context[:, n:].any():
        raise ValueError(f"context has {context.shape[1]} rows, non-zero past the model's text_len={n}")
    return context[:, :n]

class WanDiT(nn.Module):
    def __init__(self, cfg: WanConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim {cfg.dim} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        E = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, E, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(Linear(cfg.text_dim, E), nn.GELU(approximate="tanh"), Linear(E, E))
        self.time_embedding = nn.Sequential(Linear(cfg.freq_dim, E), nn.SiLU(), Linear(E, E))
        self.time_projection = nn.Sequential(nn.SiLU(), Linear(E, 6 * E))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.gradient_checkpointing = False
        self.residual_dtype = torch.float32   # the residual stream between blocks (bf16: half the checkpointed inputs)
        self.activation_offload = False       # with gradient checkpointing: the checkpointed inputs kept in host memory
        self.sp_group = None   # sequence parallelism (enable_sequence_parallel): tokens split over the group

    def check_inputs(self, x, t, context, per_frame=False):
        c = self.cfg
        if x.ndim != 5 or x.shape[1] != c.in_dim:
            raise ValueError(f"x must be (B,{c.in_dim},F,H,W), got shape {tuple(x.shape)}")
        B, _, Fr, H, W = x.shape
        pt, ph, pw = c.patch_size
        if Fr % pt or H % ph or W % pw:
            raise ValueError(f"x shape {tuple(x.shape)}: F,H,W must be divisible by the patch size {c.patch_size}")
        if max(Fr // pt, H // ph, W // pw) > c.rope_max_len:
            raise ValueError(f"x shape {tuple(x.shape)}: more than {c.rope_max_len} patches along an axis")
        if t.shape != (B,) and not per_frame:
            raise ValueError(f"t must have shape ({B},) (one timestep per sample), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != c.text_dim:
            raise ValueError(f"context must be ({B},L,{c.text_dim}), got shape {tuple(context.shape)}")
        if self.sp_group is not None:
            P, L = torch.distributed.get_world_size(self.sp_group), (Fr // pt) * (H // ph) * (W // pw)
            if L % P or c.num_heads % P:
                raise ValueError(f"sequence parallelism over {P} ranks needs the token count ({L} for x shape "
                                 f"{tuple(x.shape)}) and the head count ({c.num_heads}) divisible by {P}")

    def check_causal_inputs(self, x, t, causal, kv_cache, start_frame):
        """The causal arguments of forward (see there); x and context have passed check_inputs' other checks."""
        B, _, Fr, H, W = x.shape
        pt, ph, pw = self.cfg.patch_size
        Fp, hw = Fr // pt, (H // ph) * (W // pw)
        if self.sp_group is not None or self.blocks[0].self_attn.sparse_on():
            raise ValueError("sequence parallelism and sparse attention do not support the causal student "
                             "(causal/kv_cache given)")
        if causal is None:
            raise ValueError("a kv_cache forward needs causal=(num_frame_per_block, independent_first_frame) too")
        nb, first = causal
        if kv_cache is None:
            block_starts(Fp, nb, first)   # raises when the blocks do not tile the frames
            if start_frame != 0:
                raise ValueError(f"start_frame={start_frame} needs a kv_cache (the whole-clip pass starts at frame 0)")
            if t.shape not in ((B,), (B, Fp)):
                raise ValueError(f"t must have shape ({B},) or ({B}, {Fp}) (per latent frame), got {tuple(t.shape)}")
            return
        if t.shape != (B,):
            raise ValueError(f"with a kv_cache t must have shape ({B},) (one timestep per block), got {tuple(t.shape)}")
        off = 1 if first else 0
        if first and start_frame == 0:
            ok = Fp == 1
        elif nb == 0:
            ok = start_frame == off
        else:
            ok = start_frame >= off and (start_frame - off) % nb == 0 and Fp == nb
        if not ok:
            raise ValueError(f"a kv_cache forward takes exactly one block: x has {Fp} latent frames at start_frame="
                             f"{start_frame}, but blocks are {nb or 'all'} frames" +
                             (" after a lone first frame" if first else "") + " (block_starts gives the starts)")
        if (kv_cache.batch, kv_cache.tokens_per_frame) != (B, hw):
            raise ValueError(f"kv_cache is for batch {kv_cache.batch} and {kv_cache.tokens_per_frame} tokens per frame, "
                             f"x has batch {B} and {hw}")
        if kv_cache.dtype != self.blocks[0].self_attn.k.compute_dtype:
            raise ValueError(f"kv_cache dtype {kv_cache.dtype} != the model's {self.blocks[0].self_attn.k.compute_dtype}")
        if start_frame + Fp > self.cfg.rope_max_len:
            raise ValueError(f"frames up to {start_frame + Fp} exceed rope_max_len={self.cfg.rope_max_len} RoPE positions")

    def forward(self, x, t, context, causal=None, kv_cache=None, start_frame=0):
        """x (B,C,F,H,W) latents; t (B,) float timesteps in [0,1000]; context (B,Lc,text_dim) text
        embeddings with padded rows zero -> velocity (B,C,F,H,W) in fp32.
        Causal student (docs/method.md#the-causal-student):
        - causal=(num_frame_per_block, independent_first_frame), no kv_cache: the whole clip in one pass with the
          block-causal mask; t is (B,) or (B,F) per latent frame.
        - kv_cache too: x is ONE block starting at absolute latent frame start_frame, t is (B,). Its k/v are written
          to the cache first (overwriting those frames; later frames are dropped), then it attends to every cached
          frame up to its own end. The cache holds detached k/v: no gradient flows between blocks. Gradient
          checkpointing works here too: the recompute in backward re-reads the earlier frames' cached k/v and
          writes nothing (an error if the cache rolled or was reset in between)."""
        self.check_inputs(x, t, context, per_frame=causal is not None and kv_cache is None)
        if causal is not None or kv_cache is not None:
            self.check_causal_inputs(x, t, causal, kv_cache, start_frame)
        c = self.cfg
        B, _, Fr, H, W = x.shape
        pt, ph, pw = c.patch_size
        Fp, Hp, Wp = Fr // pt, H // ph, W // pw
        dt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dt)).flatten(2).transpose(1, 2).float()       # (B,L,E) fp32
        rope = rope_tables(Fp, Hp, Wp, c.head_dim, x.device, start_frame)            # 2x (1,L,1,d/2)
        if t.ndim == 2:   # per latent frame (causal whole-clip pass)
            temb = self.time_embedding(timestep_sinusoid(t.flatten(), c.freq_dim)).float().unflatten(0, t.shape)
            e = self.time_projection(temb).float().unflatten(-1, (6, -1))            # (B,F,6,E)
        else:
            temb = self.time_embedding(timestep_sinusoid(t, c.freq_dim)).float()     # (B,E)
            e = self.time_projection(temb).float().unflatten(1, (6, -1))             # (B,6,E)
        ctx = self.text_embedding(fit_context(context, c.text_len))                  # (B,<=text_len,E)
        if self.sp_group is not None:   # this rank's L/P tokens (and their RoPE rows) through the blocks
            x, rope = sp_split(x, self.sp_group), tuple(sp_split(r, self.sp_group) for r in rope)
        mask, slots = None, None
        if kv_cache is not None:
            slots = kv_cache.write_slots(start_frame, Fp)
        elif causal is not None and len(block_starts(Fp, *causal)) > 1:
            mask = block_causal_mask(Fp, Hp * Wp, *causal, device=x.device)
        for i, block in enumerate(self.blocks):
            cache = None if slots is None else partial(kv_cache.update, i, slots)
            if self.gradient_checkpointing and torch.is_grad_enabled():
                # the recompute runs in backward, after use_adapter has restored its choice: replay this one
                state = [(m, m.adapter) for m in block.modules() if isinstance(m, Linear)]
                fn, xin = (partial(_run_on, block, x.device), _ToHost.apply(x)) if self.activation_offload else (block, x)
                x = checkpoint(fn, xin, e, ctx, rope, mask, cache, (Fp, Hp, Wp), use_reentrant=False,
                               context_fn=lambda s=state: (nullcontext(), adapters_as(s)))
            else:
                x = block(x, e, ctx, rope, mask, cache, (Fp, Hp, Wp))
            x = x.to(self.residual_dtype)   # what the next block's checkpoint keeps; each block computes in fp32
        y = self.head(x.float(), temb).float()                                               # (B,L,pt*ph*pw*C)
        if self.sp_group is not None:
            y = Gather.apply(y, self.sp_group)
        y = y.view(B, Fp, Hp, Wp, pt, ph, pw, c.out_dim)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, c.out_dim, Fr, H, W)
        return y

    def new_kv_cache(self, batch, max_frames, tokens_per_frame, device=None, dtype=None):
        """An empty KVCache for this model's self-attention layers (device/dtype: the model's by default)."""
        k = self.blocks[0].self_attn.k
        return KVCache(len(self.blocks), batch, max_frames, tokens_per_frame, self.cfg.num_heads, self.cfg.head_dim,
                       device or k.bias.device, dtype or k.compute_dtype)

    def cast(self, dtype):
        """Cast to dtype, keeping FP32_MODULES (time MLPs, modulation tables, affine norms) and the scales of an
        8-bit base in fp32; 8-bit codes are left as they are."""
        for name, p in self.named_parameters():
            if not p.is_floating_point():
                continue
            keep = name.endswith("weight_scale") or any(part in FP32_MODULES for part in name.split("."))
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

def num_params(model):
    return sum(p.numel() for p in model.parameters())

def enable_sparse_attention(model, sparsity, cube=sparse_attn.DEFAULT_CUBE, adapter=None, remainder=False):
    """VSA (sparse_attn.py) in `model`'s self-attention, in the forwards with LoRA adapter `adapter` active (None:
    those with no adapter, i.e. a full student copy): the teacher and critic stay dense. Each block gets its gate
    `self_attn.gate_compress`, a zero Linear (the model starts dense), kept when called again: with an adapter its
    weight is frozen and the gate is a LoRA target, in a full copy it trains as a whole. sparsity None: dense again.
    remainder: the unselected cubes' pseudo-keys in the fine softmax (sparse_attn.sparse_attention)."""
    if sparsity is not None:
        sparse_attn.check_sparse(sparsity, cube)
    for a in (b.self_attn for b in model.blocks):
        if sparsity is not None and a.gate_compress is None:
            with torch.device(a.q.bias.device):
                a.gate_compress = Linear(a.q.in_features, a.q.out_features).to(a.q.compute_dtype)
            nn.init.zeros_(a.gate_compress.weight), nn.init.zeros_(a.gate_compress.bias)
            a.gate_compress.requires_grad_(adapter is None)
        cube = tuple(int(c) for c in cube)
        a.sparse = None if sparsity is None else (adapter, float(sparsity), cube, bool(remainder))
        a.gate_compress = a.gate_compress if sparsity is not None else None
    return model

# -----------------------------------------------------------------------------
# Ulysses sequence parallelism: P ranks of a group hold the same sample; each runs 1/P of the tokens through
# the blocks and, inside self-attention only, 1/P of the heads over all tokens (two all-to-alls per block).
# Off unless enable_sequence_parallel is called. Parameter gradients are partial sums over the group.

def enable_sequence_parallel(model, group):
    """Split the tokens of `model`'s forward over the ranks of process group `group` (None: off again)."""
    model.sp_group = group
    for block in model.blocks:
        block.self_attn.sp_group = group
    return model

# -----------------------------------------------------------------------------
# key maps between the original (native) and diffusers layouts (docs/wan21.md#weight-key-maps)

_O2D_GLOBAL = [
    ("time_embedding.0.", "condition_embedder.time_embedder.linear_1."),
    ("time_embedding.2.", "condition_embedder.time_embedder.linear_2."),
    ("time_projection.1.", "condition_embedder.time_proj."),
    ("text_embedding.0.", "condition_embedder.text_embedder.linear_1."),
    ("text_embedding.2.", "condition_embedder.text_embedder.linear_2."),
    ("head.modulation", "scale_shift_table"),
    ("head.head.", "proj_out."),
]
_O2D_BLOCK = [  # applied to the part after "blocks.{i}."
    ("self_attn.o.", "attn1.to_out.0."), ("cross_attn.o.", "attn2.to_out.0."),
    ("self_attn.norm_", "attn1.norm_"), ("cross_attn.norm_", "attn2.norm_"),
    ("self_attn.", "attn1.to_"), ("cross_attn.", "attn2.to_"),
    ("norm3.", "norm2."), ("ffn.0.", "ffn.net.0.proj."), ("ffn.2.", "ffn.net.2."),
    ("modulation", "scale_shift_table"),
]
_BLOCK_RE = re.compile(r"^(blocks\.\d+\.)(.*)$")

def _map_key(key, glob, block):
    m = _BLOCK_RE.match(key)
    if m:
        prefix, rest = m.groups()
        for a, b in block:
            if rest.startswith(a):
                return prefix + b + rest[len(a):]
        return key
    for a, b in glob:
        if key.startswith(a):
            return b + key[len(a):]
    return key

def original_to_diffusers_key(key):
    return _map_key(key, _O2D_GLOBAL, _O2D_BLOCK)

def diffusers_to_original_key(key):
    return _map_key(key, [(b, a) for a, b in _O2D_GLOBAL], [(b, a) for a, b in _O2D_BLOCK])

def to_diffusers_state_dict(model):
    """Base weights (no adapters) in diffusers' WanTransformer3DModel layout."""
    return {original_to_diffusers_key(k): v for k, v in model.state_dict().items() if ".lora_" not in k}

def diffusers_config(cfg: WanConfig):
    """config.json of the equivalent diffusers WanTransformer3DModel."""
    return {"_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_dim, "out_channels": cfg.out_dim, "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
            "image_dim": None, "added_kv_proj_dim": None, "rope_max_seq_len": cfg.rope_max_len,
            "pos_embed_seq_len": None, **({} if cfg.text_len == 512 else {"text_len": cfg.text_len})}

# -----------------------------------------------------------------------------
# loading

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
HUB_PATTERNS = ["model_index.json", "config.json", "diffusion_pytorch_model*.safetensors*",
                "transformer/config.json", "transformer/diffusion_pytorch_model*.safetensors*"]

def resolve_hub(repo_id, patterns=HUB_PATTERNS):
    """Download (or find in the local cache; HF_HUB_OFFLINE honoured) only the files we need."""
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=patterns)
    except Exception as e:
        raise FileNotFoundError(f"{repo_id!r} is not a local path, and the hub repo could not be read "
                                f"(looked for {patterns}): {type(e).__name__}: {e}") from e

def looks_like_hub_id(src):
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", src)) and not src.startswith((".", "/"))

def check_source(src, key):
    """A teacher source -> None when it can be read: "tiny", "random:<preset>", a local folder, or a hub id whose
    small files this machine finds in the hub cache or downloads; else one FileNotFoundError with the fix."""
    if src == "tiny" or src.startswith("random:") or os.path.isdir(src):
        return
    if not looks_like_hub_id(src):
        raise FileNotFoundError(f"{key}={src!r}: no such folder (a Wan 2.1 diffusers or original-layout folder, a "
                                "hub id such as Wan-AI/Wan2.1-T2V-1.3B-Diffusers, or 'tiny')")
    try:
        resolve_hub(src, ["model_index.json", "config.json"])
    except FileNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
        name = src.split("/")[-1]
        raise FileNotFoundError(
            f"{key}={src!r}: not a local folder and not in the hub cache ("
            + ("HF_HUB_OFFLINE is set" if offline else "the hub could not be reached") + f"): download it once where "
            f"the hub is reachable (hf download {src} --local-dir /data/{name}) and give that folder, "
            f"--{key}=/data/{name}") from None

def pick_device(spec="auto"):
    """The one place a device is chosen: "auto" -> cuda when available, else cpu; else torch.device(spec)."""
    return torch.device(spec if spec != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))

def pick_dtype(spec, device):
    """The one place the DiT/text-encoder dtype is chosen: "auto" (sample.py) and "bf16" (train_dmd's
    mixed_precision): bfloat16 on CUDA, float32 elsewhere; "no": float32; "bfloat16"/"float16"/"float32" as named."""
    if spec in ("auto", "bf16"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    named = {"no": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    if spec not in named:
        raise ValueError(f"dtype {spec!r}: one of auto, bf16, no, {', '.join(k for k in named if k != 'no')}")
    return named[spec]

def autocast_fn(dtype, device):
    """-> a context factory: bf16 autocast when the base runs in bfloat16 on CUDA (fp32 adapters and full copies
    then compute in bf16 too), else a no-op."""
    on = dtype == torch.bfloat16 and torch.device(device).type == "cuda"
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=on)

def find_dit_files(source):
    """source -> (list of .safetensors files, config dict or {}). See load_dit for what is accepted."""
    src = str(source)
    if not os.path.exists(src):
        if looks_like_hub_id(src):
            src = resolve_hub(src)
        else:
            raise FileNotFoundError(f"no such file or folder: {src!r} (expected a diffusers transformer/ "
                                    "folder, a pipeline root, an original-layout folder, a .safetensors file or a hub id)")
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise ValueError(f"{src!r}: expected a .safetensors file")
        cfg_path = os.path.join(os.path.dirname(src), "config.json")
        return [src], read_json(cfg_path) if os.path.exists(cfg_path) else {}
    if os.path.exists(os.path.join(src, "model_index.json")):
        src = os.path.join(src, "transformer")
    names = sorted(os.listdir(src)) if os.path.isdir(src) else []
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        weight_map = read_json(os.path.join(src, index[0]))["weight_map"]
        files = [os.path.join(src, n) for n in sorted(set(weight_map.values()))]
    else:
        files = [os.path.join(src, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or *.safetensors.index.json) in {src!r}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"shards listed in the index are missing: {missing}")
    cfg_path = os.path.join(src, "config.json")
    return files, read_json(cfg_path) if os.path.exists(cfg_path) else {}

def is_8bit_target(native_key):
    """Is this original-layout key the weight of a Linear that base_model_precision stores in 8 bits (the blocks'
    attention and FFN Linears, lora.DEFAULT_LORA_TARGETS: 99% of the DiT's weights; embeddings, time MLPs, head,
    norms and modulation keep their precisions)?"""
    return native_key.endswith(".weight") and matches(native_key[:-len(".weight")], DEFAULT_LORA_TARGETS)

def read_state_dict(files, dtype=None, device="cpu", quant="no", quantize_via="cpu"):
    """Read safetensors files tensor by tensor into native (original-layout) keys, casting as we go
    so host memory peaks near one copy of the weights. quant "int8" / "fp8": each 8-bit target (is_8bit_target)
    is stored in 8 bits as it is read (X.weight -> X.weight_q + X.weight_scale, quant.py), on the CPU or, with
    quantize_via="accelerator", on `device`: no full-precision copy of those weights ever exists."""
    read_dev = "cpu" if quant != "no" and quantize_via == "cpu" else device
    sd = {}
    for path in files:
        with open_safetensors(path, read_dev) as f:   # a truncated or foreign file: an error naming it
            for k in f.keys():
                name = k
                for p in COMFY_PREFIXES:
                    if name.startswith(p):
                        name = name[len(p):]
                        break
                t = f.get_tensor(k)
                native = diffusers_to_original_key(name)
                if quant != "no" and is_8bit_target(native):
                    q, scale = quantize(t, quant)
                    stem = name[:-len("weight")]
                    sd[stem + "weight_q"], sd[stem + "weight_scale"] = q.to(device), scale.to(device)
                    continue
                if dtype is not None and t.is_floating_point():   # FP32_MODULES are read at full precision
                    keep = any(part in FP32_MODULES for part in native.split("."))
                    t = t.to(torch.float32 if keep else dtype)
                sd[name] = t.to(device)
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd):
        sd = {diffusers_to_original_key(k): v for k, v in sd.items()}
    return sd

def config_from_state_dict(sd, config=None, source="the checkpoint"):
    """WanConfig from tensor shapes, with num_heads from config.json (either layout) or head_dim 128."""
    config = config or {}
    for k in ("image_dim", "added_kv_proj_dim"):
        if config.get(k) is not None:
            raise ValueError(f"config.json has {k}={config[k]}: image-to-video Wan is not supported")
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(f"config.json model_type={config['model_type']!r}: only t2v is supported")
    if "patch_embedding.weight" not in sd:
        raise ValueError(f"{source}: not a Wan DiT checkpoint: no patch_embedding.weight among "
                         f"{len(sd)} tensors (first keys: {sorted(sd)[:5]})")
    pe = sd["patch_embedding.weight"]  # (E, C, pt, ph, pw)
    E = pe.shape[0]
    num_layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    heads = config.get("num_heads") or config.get("num_attention_heads")
    if heads is None:
        heads = E // 128   # every released Wan 2.1 DiT uses head_dim 128
        print(f"load_dit: no head count in config.json, assuming head_dim 128 -> {heads} heads")
    patch = tuple(pe.shape[2:])
    ffn0 = sd.get("blocks.0.ffn.0.weight", sd.get("blocks.0.ffn.0.weight_q"))   # weight_q: read in 8 bits
    cfg = WanConfig(dim=E, ffn_dim=ffn0.shape[0] if num_layers else 0,
                    num_heads=int(heads), num_layers=num_layers, in_dim=pe.shape[1],
                    out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
                    text_dim=sd["text_embedding.0.weight"].shape[1],
                    freq_dim=sd["time_embedding.0.weight"].shape[1], patch_size=patch,
                    eps=config.get("eps", 1e-6), rope_max_len=config.get("rope_max_seq_len", 1024),
                    text_len=config.get("text_len", 512))
    declared = {"dim": config.get("dim"), "num_layers": config.get("num_layers"), "ffn_dim": config.get("ffn_dim")}
    for k, v in declared.items():
        if v is not None and v != getattr(cfg, k):
            raise ValueError(f"config.json says {k}={v} but the weights have {k}={getattr(cfg, k)}")
    return cfg

def load_dit(source, dtype=None, device="cpu", quant="no", quantize_via="cpu"):
    """Load a Wan 2.1 T2V DiT from:
    - a diffusers `transformer/` folder, or a pipeline root (model_index.json),
    - an original-layout folder (config.json + diffusion_pytorch_model*.safetensors, sharded or not),
    - a single .safetensors file (with or without the ComfyUI `model.diffusion_model.` prefix),
    - a hub repo id (only the DiT files are downloaded; HF_HUB_OFFLINE and the cache are honoured).
    The model is built on the meta device and the tensors are assigned, so host memory stays near one
    copy of the weights; the checkpoint's dtype is kept unless `dtype` is given. quant "int8" / "fp8": the
    blocks' Linears are stored in 8 bits as they are read (read_state_dict; quantize_via "cpu" or "accelerator")."""
    files, config = find_dit_files(source)
    sd = read_state_dict(files, dtype=dtype, device=device, quant=quant, quantize_via=quantize_via)
    cfg = config_from_state_dict(sd, config, repr(str(source)))
    with torch.device("meta"):
        model = WanDiT(cfg)
        if quant != "no":
            quantize_base(model, quant)   # meta placeholders for the 8-bit codes and scales
    expected = set(model.state_dict().keys())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"checkpoint {source!r} does not match WanDiT({cfg}):\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    for k, v in model.state_dict().items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} != model shape {tuple(v.shape)}")
    model.load_state_dict(sd, assign=True)
    if dtype is not None and dtype != torch.float32:
        model.cast(dtype)
    return model.eval()

def save_dit(model, path, layout="diffusers", state_dict=None):
    """Save base weights (or `state_dict`, native keys) as one safetensors file plus config.json in `path`
    (diffusers or original layout)."""
    os.makedirs(path, exist_ok=True)
    sd = state_dict if state_dict is not None else {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    if layout == "diffusers":
        sd, cfg = {original_to_diffusers_key(k): v for k, v in sd.items()}, diffusers_config(model.cfg)
    elif layout == "original":
        c = model.cfg
        cfg = {"_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "eps": c.eps, "ffn_dim": c.ffn_dim,
               "freq_dim": c.freq_dim, "in_dim": c.in_dim, "num_heads": c.num_heads, "num_layers": c.num_layers,
               "out_dim": c.out_dim, "text_len": c.text_len}
    else:
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    write_safetensors(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

# -----------------------------------------------------------------------------

def linear_names():
    """The names of the DiT's Linear layers with a block's index dropped (self_attn.q, ffn.0, head.head, ...): what
    lora_targets may name, checked before any model loads. Built once on the meta device (no weights)."""
    if not _LINEAR_NAMES:
        with torch.device("meta"):
            _LINEAR_NAMES.extend(sorted({re.sub(r"^blocks\.\d+\.", "", n) for n, _ in lora_modules(_WanDiT(PRESETS["tiny"]))}))
    return _LINEAR_NAMES


_LINEAR_NAMES, _WanDiT = [], WanDiT   # the class itself: a caller that swaps mw.WanDiT (a test) does not change it

if __name__ == "__main__":   # offline self-check: LoRA on a frozen tiny base learns to denoise a fixed latent (CPU)
    torch.manual_seed(0)
    model, x0 = WanDiT(PRESETS["tiny"]), torch.randn(2, 16, 3, 8, 12)
    ctx = torch.randn(2, 7, model.cfg.text_dim)
    with torch.device("meta"):
        print(f"tiny WanDiT: {num_params(model):,} parameters; 1.3B: {num_params(WanDiT(PRESETS['t2v-1.3B'])):,}")
    model.requires_grad_(False)
    opt = torch.optim.AdamW(add_adapter(model, "student", rank=8), lr=3e-3)
    set_adapter(model, "student")
    for step in range(101):
        sigma, noise = torch.rand(2), torch.randn_like(x0)
        xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        loss = F.mse_loss(model(xt, 1000 * sigma, ctx), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step:3d} | flow-matching loss {loss.item():.4f} (LoRA rank 8 on a frozen tiny base)")
