"""
A small multi-adapter LoRA: several named adapters on one frozen base weight, one of them active at a time.

One frozen Wan base serves DMD's three networks (train_dmd.py): the teacher is the base with no adapter, the
generator and the critic are the base with adapters "generator" and "critic". `use_adapter` selects one for a
forward; `adapters_as` replays a selection (gradient checkpointing recomputes after the selection is restored).
The adapter file format (PEFT keys of diffusers' Wan names) is model_wan.adapter_state_dict / load_adapter.
The frozen base weight may be stored in 8 bits (`quantize_base`, quant.py: base_model_precision): the adapters,
the bias and everything that is not a targeted Linear keep their precisions.
A network of DMD is then (model, adapter): `trainable` lists its parameters, `velocity_fn` runs it.
"""
import math
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import quant


DEFAULT_LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                        "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o",
                        "ffn.0", "ffn.2")

class Linear(nn.Linear):
    """nn.Linear that runs in its weight's dtype and adds the active LoRA adapter, if any:
    y = W x + b + (alpha/r) * B A x. `self.adapter` (a name or None) is set by `use_adapter`.
    The adapter branch runs in the base dtype too (A and B stay fp32 master weights, cast like autocast).
    8-bit base (`to_8bit`): W is stored as weight_q (codes) and weight_scale (fp32 per output row) and `weight` is
    None; the compute dtype is then the bias's (every Wan Linear has one)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__(in_features, out_features, bias=bias)
        self.lora_A = nn.ParameterDict()   # name -> (r, in)
        self.lora_B = nn.ParameterDict()   # name -> (out, r)
        self.lora_scale = {}               # name -> alpha / r
        self.adapter = None
        self.quant = None                  # None, or "int8" / "fp8" once the base weight is stored in 8 bits

    @property
    def compute_dtype(self):
        return self.weight.dtype if self.weight is not None else self.bias.dtype

    def to_8bit(self, kind):
        """Store the (frozen) base weight in 8 bits: weight -> weight_q, weight_scale (quant.quantize; on the meta
        device: empty placeholders of the right dtypes, filled by load_state_dict(assign=True))."""
        if self.quant is not None:
            raise ValueError(f"the base weight is already stored as {self.quant}")
        if self.bias is None:
            raise ValueError("an 8-bit Linear needs a bias (it carries the compute dtype)")
        q, scale = quant.quantize(self.weight.data, kind)
        del self.weight
        self.register_parameter("weight", None)
        self.weight_q, self.weight_scale = nn.Parameter(q, False), nn.Parameter(scale, False)
        self.quant = kind

    def base_weight(self, dtype=None):
        """The base weight W (dequantised when stored in 8 bits) in `dtype` (default: its own / the compute dtype)."""
        if self.quant is None:
            return self.weight if dtype is None else self.weight.to(dtype)
        return quant.dequantize(self.weight_q, self.weight_scale, dtype or self.compute_dtype)

    def forward(self, x):
        x = x.to(self.compute_dtype)
        if self.quant is None:
            y = F.linear(x, self.weight, self.bias)
        else:
            y = quant.linear(x, self.weight_q, self.weight_scale, self.bias, self.quant == "fp8-matmul")
        name = self.adapter
        if name is not None and name in self.lora_scale:
            A, B = self.lora_A[name].to(x.dtype), self.lora_B[name].to(x.dtype)
            y = y + F.linear(F.linear(x, A), B) * self.lora_scale[name]
        return y

def matches(mname, targets):
    """Is the module of dotted name `mname` one of `targets` (a full name, or a suffix after a dot)? The one rule of
    add_adapter, quantize_base and model_wan.is_8bit_target (so a streamed 8-bit load fills what quantize_base made)."""
    return any(mname == t or mname.endswith("." + t) for t in targets)

def lora_modules(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]

def add_adapter(model, name, rank=16, alpha=None, targets=DEFAULT_LORA_TARGETS, dtype=torch.float32):
    """Add adapter `name` (A kaiming-uniform, B zero: a fresh adapter is an identity) to every Linear
    whose dotted name ends with one of `targets`. Returns the new trainable parameters."""
    alpha = rank if alpha is None else alpha
    params, hit = [], 0
    for mname, m in lora_modules(model):
        if not matches(mname, targets):
            continue
        if name in m.lora_scale:
            raise ValueError(f"adapter {name!r} already exists on {mname}")
        dev = m.bias.device if m.weight is None else m.weight.device
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

@contextmanager
def adapters_as(state):
    """Select each Linear's adapter as listed in `state` [(module, name)]; restore the current choice after."""
    prev = [(m, m.adapter) for m, _ in state]
    for m, a in state:
        m.adapter = a
    try:
        yield
    finally:
        for m, a in prev:
            m.adapter = a

def adapter_parameters(model, name):
    return [p for _, m in lora_modules(model) if name in m.lora_scale for p in (m.lora_A[name], m.lora_B[name])]

@torch.no_grad()
def merge_adapter(model, name, delete=True):
    """W += (alpha/r) B A, computed in fp32; the adapter is removed unless delete=False. An 8-bit base cannot take
    a merge (merged_state_dict with the full-precision base does)."""
    for _, m in lora_modules(model):
        if name in m.lora_scale:
            if m.quant is not None:
                raise ValueError(f"cannot merge adapter {name!r} into an {m.quant} base: dequantize_base first, or "
                                 "use merged_state_dict(model, name, base) with the full-precision base weights")
            delta = (m.lora_B[name].float() @ m.lora_A[name].float()) * m.lora_scale[name]
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            if delete:
                delete_adapter_on(m, name)

@torch.no_grad()
def merged_state_dict(model, name, base=None):
    """Base weights with adapter `name` merged (W + (alpha/r) B A in fp32), adapters left out; `model` is untouched.
    An 8-bit base merges into the full-precision weights of `base` (a state dict holding at least the weights of
    the 8-bit Linears): the export is the adapter on the original weights, not on their 8-bit copy."""
    sd = {k: v for k, v in model.state_dict().items() if ".lora_" not in k and not k.endswith((".weight_q", ".weight_scale"))}
    for mname, m in lora_modules(model):
        if m.quant is not None:
            if base is None or mname + ".weight" not in base:
                raise ValueError(f"{mname} is stored as {m.quant}: merged_state_dict needs its full-precision weight")
            sd[mname + ".weight"] = base[mname + ".weight"]
    for mname, m in lora_modules(model):
        if name in m.lora_scale:
            W = sd[mname + ".weight"]
            delta = (m.lora_B[name].float() @ m.lora_A[name].float()) * m.lora_scale[name]
            sd[mname + ".weight"] = (W.float() + delta.to(W.device)).to(W.dtype)
    return sd

def quantize_base(model, kind, targets=DEFAULT_LORA_TARGETS):
    """Store the base weight of every Linear whose dotted name ends with one of `targets` in 8 bits (quant.py;
    kind "int8" or "fp8"), one layer at a time: the full-precision weight of a layer is freed as its 8-bit copy is
    made. On a meta model: placeholders for load_state_dict(assign=True). -> number of Linears stored in 8 bits."""
    n = 0
    for mname, m in lora_modules(model):
        if m.quant is None and matches(mname, targets):
            m.to_8bit(kind)
            n += 1
    if n == 0:
        raise ValueError(f"no Linear matched the 8-bit targets {targets}")
    return n

def dequantize_base(model, dtype=None):
    """The inverse of quantize_base: every 8-bit base weight back to a full weight in `dtype` (default: the compute
    dtype; a full fine-tune copy of an 8-bit teacher starts from exactly the teacher's weights)."""
    for _, m in lora_modules(model):
        if m.quant is not None:
            W = m.base_weight(dtype)
            del m.weight_q, m.weight_scale
            m.weight, m.quant = nn.Parameter(W, requires_grad=False), None
    return model

def base_precision(model):
    """"no", or the 8-bit kind of the model's base Linears."""
    return next((m.quant for _, m in lora_modules(model) if m.quant is not None), "no")

def delete_adapter_on(m, name):
    del m.lora_A[name], m.lora_B[name], m.lora_scale[name]
    if m.adapter == name:
        m.adapter = None

def delete_adapter(model, name):
    for _, m in lora_modules(model):
        if name in m.lora_scale:
            delete_adapter_on(m, name)

# -----------------------------------------------------------------------------
# a network = a model with one adapter selected (None: the base weights), or a full copy (adapter None)

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
        with use_adapter(model, adapter), autocast():
            if causal is None:
                return model(x, t, ctx).float()
            return model(x, t, ctx, causal=causal, **kw).float()
    return f
