"""
Wan 2.1 text-to-video DiT in plain PyTorch, its weight loaders, and a small multi-adapter LoRA.

Parameter layout: the ORIGINAL Wan layout (Wan-Video/Wan2.1 `WanModel`: `blocks.0.self_attn.q`,
`blocks.0.ffn.0`, `head.head`, ...) is native here because it maps onto plain nn.Sequential
modules. Diffusers checkpoints (`WanTransformer3DModel`) are converted on load with
`diffusers_to_original_key`, and `original_to_diffusers_key` converts back for export.

Numerics follow ../shared/design/wan21.md §2-§4:
- the timestep sinusoid is diffusers' fp32 recipe ([cos, sin]); RoPE tables are built in float64
  and applied in fp32 on interleaved pairs (no complex numbers);
- the residual stream, the modulation adds/gates, every LayerNorm and the head's modulation run
  in fp32 (the original repo's recipe); every Linear/Conv runs in its own weight dtype, so a bf16
  model does its matmuls and attention in bf16. `FP32_MODULES` stay fp32 when a model is cast.

Run `python model_wan.py` for a self-check of the tiny preset on CPU.
"""
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

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

    @property
    def head_dim(self):
        return self.dim // self.num_heads

PRESETS = {
    "t2v-1.3B": WanConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "t2v-14B": WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # tiny random-weight model for CPU tests and the offline demo
    "tiny": WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32),
}

# parameters (by name component) kept in fp32 when the model is cast to bf16/fp16
FP32_MODULES = ("time_embedding", "time_projection", "modulation", "norm3")

# -----------------------------------------------------------------------------
# LoRA-capable Linear: several named adapters on one frozen base weight

DEFAULT_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                        "ffn.0", "ffn.2")

class Linear(nn.Linear):
    """nn.Linear that runs in its weight's dtype and adds the active LoRA adapter, if any:
    y = W x + b + (alpha/r) * B A x. `self.adapter` (a name or None) is set by `use_adapter`.
    The adapter branch runs in the base dtype too (A and B stay fp32 master weights, cast like autocast)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ParameterDict()   # name -> (r, in)
        self.lora_B = nn.ParameterDict()   # name -> (out, r)
        self.lora_scale = {}               # name -> alpha / r
        self.adapter = None

    def forward(self, x):
        x = x.to(self.weight.dtype)
        y = F.linear(x, self.weight, self.bias)
        name = self.adapter
        if name is not None and name in self.lora_scale:
            A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
            y = y + F.linear(F.linear(x, A), B) * self.lora_scale[name]
        return y

def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]

def add_adapter(model, name, rank=16, alpha=None, targets=DEFAULT_LORA_TARGETS, dtype=torch.float32):
    """Add adapter `name` (A kaiming-uniform, B zero: a fresh adapter is an identity) to every Linear
    whose dotted name ends with one of `targets`. Returns the new trainable parameters."""
    alpha = rank if alpha is None else alpha
    params, hit = [], 0
    for mname, m in lora_modules(model):
        if not any(mname == t or mname.endswith("." + t) for t in targets):
            continue
        if name in m.lora_scale:
            raise ValueError(f"adapter {name!r} already exists on {mname}")
        dev = m.weight.device
        A = nn.Parameter(torch.empty(rank, m.in_features, device=dev, dtype=dtype))
        nn.init.kaiming_uniform_(A, a=math.sqrt(5))   # PEFT's init for lora_A
        B = nn.Parameter(torch.zeros(m.out_features, rank, device=dev, dtype=dtype))
        m.lora_A[name], m.lora_B[name], m.lora_scale[name] = A, B, alpha / rank
        params += [A, B]
        hit += 1
    if hit == 0:
        raise ValueError(f"no Linear matched the LoRA targets {targets}")
    return params

def adapter_names(model):
    return sorted({n for _, m in lora_modules(model) for n in m.lora_scale})

def set_adapter(model, name):
    """Select the adapter used by every forward from now on (None = the base model)."""
    if name is not None and name not in adapter_names(model):
        raise ValueError(f"unknown adapter {name!r}; have {adapter_names(model)}")
    for _, m in lora_modules(model):
        m.adapter = name

@contextmanager
def use_adapter(model, name):
    """with use_adapter(model, "generator"): v = model(x, t, ctx)   -- restores the previous choice."""
    prev = [m.adapter for _, m in lora_modules(model)]
    set_adapter(model, name)
    try:
        yield model
    finally:
        for (_, m), p in zip(lora_modules(model), prev):
            m.adapter = p

def adapter_parameters(model, name):
    return [p for _, m in lora_modules(model) if name in m.lora_scale for p in (m.lora_A[name], m.lora_B[name])]

@torch.no_grad()
def merge_adapter(model, name, delete=True):
    """W += (alpha/r) B A, computed in fp32; the adapter is removed unless delete=False."""
    for _, m in lora_modules(model):
        if name in m.lora_scale:
            delta = (m.lora_B[name].float() @ m.lora_A[name].float()) * m.lora_scale[name]
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            if delete:
                delete_adapter_on(m, name)

def delete_adapter_on(m, name):
    del m.lora_A[name], m.lora_B[name], m.lora_scale[name]
    if m.adapter == name:
        m.adapter = None

def delete_adapter(model, name):
    for _, m in lora_modules(model):
        if name in m.lora_scale:
            delete_adapter_on(m, name)

def adapter_state_dict(model, name, layout="diffusers"):
    """The adapter alone. layout="diffusers": PEFT keys `transformer.blocks.0.attn1.to_q.lora_A.weight`
    as diffusers' WanPipeline.load_lora_weights reads them, with alpha/r folded into lora_B
    (diffusers assumes scale 1 when no alpha is stored). layout="native": our module names, unscaled."""
    sd = {}
    for mname, m in lora_modules(model):
        if name not in m.lora_scale:
            continue
        A, B = m.lora_A[name].detach(), m.lora_B[name].detach()
        if layout == "native":
            sd[f"{mname}.lora_A"], sd[f"{mname}.lora_B"] = A.clone(), B.clone()
        elif layout == "diffusers":
            dname = original_to_diffusers_key(mname + ".weight")[: -len(".weight")]
            sd[f"transformer.{dname}.lora_A.weight"] = A.clone().contiguous()
            sd[f"transformer.{dname}.lora_B.weight"] = (B.float() * m.lora_scale[name]).to(B.dtype).contiguous()
        else:
            raise ValueError(f"layout must be 'diffusers' or 'native', got {layout!r}")
    return sd

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

def rope_tables(Fp, Hp, Wp, head_dim, device):
    """RoPE angles for a (Fp,Hp,Wp) patch grid -> cos, sin of shape (1, L, 1, head_dim/2), fp32.
    Pair k of a head rotates by f*inv_t[k] (first t/2 pairs), then h*inv_h, then w*inv_w, with
    axis dims t = d - 4(d//6), h = w = 2(d//6) (44/42/42 at d=128), each with its own exponent."""
    hw = 2 * (head_dim // 6)
    angs = []
    for n, a in ((Fp, head_dim - 2 * hw), (Hp, hw), (Wp, hw)):
        inv = 1.0 / (10000 ** (torch.arange(0, a, 2, dtype=torch.float64, device=device) / a))  # (a/2,)
        angs.append(torch.arange(n, dtype=torch.float64, device=device)[:, None] * inv[None])  # (n, a/2)
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

def attention(q, k, v):
    """q (B,Lq,N,d), k/v (B,Lk,N,d) -> (B,Lq,N*d). SDPA picks flash/cuDNN kernels on GPU."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2)

class Attention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x, ctx=None, rope=None):
        """x (B,L,E); ctx (B,Lc,E) for cross-attention or None for self-attention -> (B,L,E)."""
        ctx = x if ctx is None else ctx
        N = self.num_heads
        q = self.norm_q(self.q(x)).unflatten(-1, (N, -1))    # (B,L,N,d)
        k = self.norm_k(self.k(ctx)).unflatten(-1, (N, -1))  # (B,Lc,N,d)
        v = self.v(ctx).unflatten(-1, (N, -1))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.o(attention(q, k, v))

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

    def forward(self, x, e, ctx, rope):
        """x (B,L,E) fp32 residual; e (B,6,E) fp32 time projection; ctx (B,Lc,E); rope tables."""
        dt = self.self_attn.q.weight.dtype
        shift, scale, gate, c_shift, c_scale, c_gate = (self.modulation.float() + e).chunk(6, dim=1)  # (B,1,E)
        h = torch.addcmul(shift, layer_norm(x, eps=self.eps), 1 + scale)        # LN(x)(1+scale)+shift, fp32
        x = torch.addcmul(x, self.self_attn(h.to(dt), rope=rope), gate)        # fp32 residual += o * gate
        x = x + self.cross_attn(self.norm3(x).to(dt), ctx=ctx)                 # no gate, no mask
        h = torch.addcmul(c_shift, layer_norm(x, eps=self.eps), 1 + c_scale)
        x = torch.addcmul(x, self.ffn(h.to(dt)), c_gate)
        return x

class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        E = cfg.dim
        self.eps = cfg.eps
        self.head = Linear(E, cfg.out_dim * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, E) / E ** 0.5)

    def forward(self, x, temb):
        """x (B,L,E) fp32; temb (B,E) -> (B,L,out_dim*prod(patch))."""
        shift, scale = (self.modulation.float() + temb.float()[:, None]).chunk(2, dim=1)
        return self.head(layer_norm(x, eps=self.eps) * (1 + scale) + shift)

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

    def check_inputs(self, x, t, context):
        c = self.cfg
        if x.ndim != 5 or x.shape[1] != c.in_dim:
            raise ValueError(f"x must be (B,{c.in_dim},F,H,W), got shape {tuple(x.shape)}")
        B, _, Fr, H, W = x.shape
        pt, ph, pw = c.patch_size
        if Fr % pt or H % ph or W % pw:
            raise ValueError(f"x shape {tuple(x.shape)}: F,H,W must be divisible by the patch size {c.patch_size}")
        if max(Fr // pt, H // ph, W // pw) > c.rope_max_len:
            raise ValueError(f"x shape {tuple(x.shape)}: more than {c.rope_max_len} patches along an axis")
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},) (one timestep per sample), got {tuple(t.shape)}")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != c.text_dim:
            raise ValueError(f"context must be ({B},L,{c.text_dim}), got shape {tuple(context.shape)}")

    def forward(self, x, t, context):
        """x (B,C,F,H,W) latents; t (B,) float timesteps in [0,1000]; context (B,Lc,text_dim) text
        embeddings with padded rows zero -> velocity (B,C,F,H,W) in fp32."""
        self.check_inputs(x, t, context)
        c = self.cfg
        B, _, Fr, H, W = x.shape
        pt, ph, pw = c.patch_size
        Fp, Hp, Wp = Fr // pt, H // ph, W // pw
        dt = self.patch_embedding.weight.dtype
        x = self.patch_embedding(x.to(dt)).flatten(2).transpose(1, 2).float()       # (B,L,E) fp32
        rope = rope_tables(Fp, Hp, Wp, c.head_dim, x.device)                         # 2x (1,L,1,d/2)
        temb = self.time_embedding(timestep_sinusoid(t, c.freq_dim)).float()         # (B,E)
        e = self.time_projection(temb).float().unflatten(1, (6, -1))                 # (B,6,E)
        ctx = self.text_embedding(context)                                           # (B,Lc,E)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e, ctx, rope, use_reentrant=False)
            else:
                x = block(x, e, ctx, rope)
        y = self.head(x, temb).float()                                               # (B,L,pt*ph*pw*C)
        y = y.view(B, Fp, Hp, Wp, pt, ph, pw, c.out_dim)
        y = y.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(B, c.out_dim, Fr, H, W)
        return y

    def cast(self, dtype):
        """Cast to dtype, keeping FP32_MODULES (time MLPs, modulation tables, affine norms) in fp32."""
        for name, p in self.named_parameters():
            keep = any(part in FP32_MODULES for part in name.split("."))
            p.data = p.data.to(torch.float32 if keep else dtype)
        return self

def num_params(model):
    return sum(p.numel() for p in model.parameters())

# -----------------------------------------------------------------------------
# key maps between the original (native) and diffusers layouts (wan21.md §5)

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
            "pos_embed_seq_len": None}

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

def find_dit_files(source):
    """source -> (list of .safetensors files, config dict or {}). See load_dit for what is accepted."""
    src = str(source)
    if not os.path.exists(src):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith((".", "/")):
            src = resolve_hub(src)
        else:
            raise FileNotFoundError(f"no such file or folder: {src!r} (expected a diffusers transformer/ "
                                    "folder, a pipeline root, an original-layout folder, a .safetensors file or a hub id)")
    if os.path.isfile(src):
        if not src.endswith(".safetensors"):
            raise ValueError(f"{src!r}: expected a .safetensors file")
        cfg_path = os.path.join(os.path.dirname(src), "config.json")
        return [src], _read_json(cfg_path) if os.path.exists(cfg_path) else {}
    if os.path.exists(os.path.join(src, "model_index.json")):
        src = os.path.join(src, "transformer")
    names = sorted(os.listdir(src)) if os.path.isdir(src) else []
    index = [n for n in names if n.endswith(".safetensors.index.json")]
    if index:
        weight_map = _read_json(os.path.join(src, index[0]))["weight_map"]
        files = [os.path.join(src, n) for n in sorted(set(weight_map.values()))]
    else:
        files = [os.path.join(src, n) for n in names if n.endswith(".safetensors")]
    if not files:
        raise FileNotFoundError(f"no *.safetensors (or *.safetensors.index.json) in {src!r}")
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"shards listed in the index are missing: {missing}")
    cfg_path = os.path.join(src, "config.json")
    return files, _read_json(cfg_path) if os.path.exists(cfg_path) else {}

def _read_json(path):
    with open(path) as f:
        return json.load(f)

def read_state_dict(files, dtype=None, device="cpu"):
    """Read safetensors files tensor by tensor into native (original-layout) keys, casting as we go
    so host memory peaks near one copy of the weights."""
    from safetensors import safe_open
    sd = {}
    for path in files:
        with safe_open(path, framework="pt", device=str(device)) as f:
            for k in f.keys():
                name = k
                for p in COMFY_PREFIXES:
                    if name.startswith(p):
                        name = name[len(p):]
                        break
                t = f.get_tensor(k)
                if dtype is not None and t.is_floating_point():   # FP32_MODULES are read at full precision
                    keep = any(part in FP32_MODULES for part in diffusers_to_original_key(name).split("."))
                    t = t.to(torch.float32 if keep else dtype)
                sd[name] = t
    if any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd):
        sd = {diffusers_to_original_key(k): v for k, v in sd.items()}
    return sd

def config_from_state_dict(sd, config=None):
    """WanConfig from tensor shapes, with num_heads from config.json (either layout) or head_dim 128."""
    config = config or {}
    for k in ("image_dim", "added_kv_proj_dim"):
        if config.get(k) is not None:
            raise ValueError(f"config.json has {k}={config[k]}: image-to-video Wan is not supported")
    if config.get("model_type", "t2v") != "t2v":
        raise ValueError(f"config.json model_type={config['model_type']!r}: only t2v is supported")
    if "patch_embedding.weight" not in sd:
        raise ValueError("not a Wan DiT checkpoint: no patch_embedding.weight among "
                         f"{len(sd)} tensors (first keys: {sorted(sd)[:5]})")
    pe = sd["patch_embedding.weight"]  # (E, C, pt, ph, pw)
    E = pe.shape[0]
    num_layers = 1 + max((int(k.split(".")[1]) for k in sd if k.startswith("blocks.")), default=-1)
    heads = config.get("num_heads") or config.get("num_attention_heads")
    if heads is None:
        heads = E // 128   # every released Wan 2.1 DiT uses head_dim 128
        print(f"load_dit: no head count in config.json, assuming head_dim 128 -> {heads} heads")
    patch = tuple(pe.shape[2:])
    cfg = WanConfig(dim=E, ffn_dim=sd["blocks.0.ffn.0.weight"].shape[0] if num_layers else 0,
                    num_heads=int(heads), num_layers=num_layers, in_dim=pe.shape[1],
                    out_dim=sd["head.head.weight"].shape[0] // math.prod(patch),
                    text_dim=sd["text_embedding.0.weight"].shape[1],
                    freq_dim=sd["time_embedding.0.weight"].shape[1], patch_size=patch,
                    eps=config.get("eps", 1e-6), rope_max_len=config.get("rope_max_seq_len", 1024))
    declared = {"dim": config.get("dim"), "num_layers": config.get("num_layers"), "ffn_dim": config.get("ffn_dim")}
    for k, v in declared.items():
        if v is not None and v != getattr(cfg, k):
            raise ValueError(f"config.json says {k}={v} but the weights have {k}={getattr(cfg, k)}")
    return cfg

def load_dit(source, dtype=None, device="cpu"):
    """Load a Wan 2.1 T2V DiT from:
    - a diffusers `transformer/` folder, or a pipeline root (model_index.json),
    - an original-layout folder (config.json + diffusion_pytorch_model*.safetensors, sharded or not),
    - a single .safetensors file (with or without the ComfyUI `model.diffusion_model.` prefix),
    - a hub repo id (only the DiT files are downloaded; HF_HUB_OFFLINE and the cache are honoured).
    The model is built on the meta device and the tensors are assigned, so host memory stays near one
    copy of the weights; the checkpoint's dtype is kept unless `dtype` is given."""
    files, config = find_dit_files(source)
    sd = read_state_dict(files, dtype=None if dtype is None else dtype, device=device)
    cfg = config_from_state_dict(sd, config)
    with torch.device("meta"):
        model = WanDiT(cfg)
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

def save_dit(model, path, layout="diffusers"):
    """Save base weights as one safetensors file plus config.json in `path` (diffusers or original layout)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    if layout == "diffusers":
        sd, cfg = to_diffusers_state_dict(model), diffusers_config(model.cfg)
    elif layout == "original":
        c = model.cfg
        sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
        cfg = {"_class_name": "WanModel", "model_type": "t2v", "dim": c.dim, "eps": c.eps, "ffn_dim": c.ffn_dim,
               "freq_dim": c.freq_dim, "in_dim": c.in_dim, "num_heads": c.num_heads, "num_layers": c.num_layers,
               "out_dim": c.out_dim, "text_len": 512}
    else:
        raise ValueError(f"layout must be 'diffusers' or 'original', got {layout!r}")
    save_file({k: v.detach().contiguous() for k, v in sd.items()}, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    # offline self-check: the tiny preset learns to denoise a fixed latent by flow matching on CPU
    torch.manual_seed(0)
    cfg = PRESETS["tiny"]
    model = WanDiT(cfg)
    print(f"tiny WanDiT: {num_params(model):,} parameters; 1.3B preset: ", end="")
    with torch.device("meta"):
        print(f"{num_params(WanDiT(PRESETS['t2v-1.3B'])):,} parameters")
    x0 = torch.randn(2, 16, 3, 8, 12)
    ctx = torch.randn(2, 7, cfg.text_dim)
    add_adapter(model, "student", rank=8)
    set_adapter(model, "student")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for step in range(101):
        sigma = torch.rand(2)
        noise = torch.randn_like(x0)
        xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        loss = F.mse_loss(model(xt, 1000 * sigma, ctx), noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            print(f"step {step:3d} | flow-matching loss {loss.item():.4f} (LoRA rank 8 on a frozen tiny base)")
