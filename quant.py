"""
8-bit weight-only storage for frozen weights: the DiT base that teacher, generator and critic share
(`base_model_precision`), and the UMT5 text encoder (`text_encoder_1_precision`).

A weight W (out, in) is stored as 8-bit codes q (out, in) and one fp32 scale per output row:
- "int8": q = round(W / s) in [-127, 127], s = max|W_row| / 127 (symmetric; the error of an entry <= s/2)
- "fp8":  q = e4m3(W / s), s = max|W_row| / 448 (e4m3's largest finite value; 3 mantissa bits: relative error
          <= 2^-4 per entry, uniform over magnitudes, where int8's error is uniform in absolute terms)
fp8 codes are kept as their bytes (uint8): an integer tensor that Module.float() / .to(bf16) / a cast of the model
leaves alone (a float8 tensor would be cast to wrong values silently).

The matmul runs on the weight dequantised into the activations' dtype, W = s q (the product in fp32, then rounded
to bf16 as a bf16 base's weights are): y = x W^T + b. `linear` is an autograd function that saves the 8-bit codes,
not W, for backward, so weights in memory stay 8-bit; only the layer being computed has a transient copy of its
weight (at most 141 MB: the 14B's FFN). No fp8 matmul kernel is used (weights only: the activations stay bf16, so
the error is the weights' alone).

Why our own and not torchao / quanto: ~100 lines that a reader checks against the formulas above, that work on
CPU (the tests), under FSDP2 (8-bit parameters shard as any other) and torch.compile, on every torch >= 2.5,
without a new dependency; weight-only 8-bit needs nothing more.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("int8", "fp8")
QMAX = {"int8": 127.0, "fp8": 448.0}
# SimpleTuner's spellings (base_model_precision / text_encoder_1_precision) -> ours; both libraries' int8 and
# fp8 are weight-only per-channel formats of the same kind
ALIASES = {"no": "no", "none": "no", "no_change": "no", "bf16": "no", "fp32": "no", "int8": "int8", "fp8": "fp8",
           "int8-quanto": "int8", "int8-torchao": "int8", "fp8-quanto": "fp8", "fp8-torchao": "fp8",
           "fp8uz-quanto": "fp8", "int8-torchao-wo": "int8"}


def parse_precision(value, key="base_model_precision"):
    """A config's precision string -> "no", "int8" or "fp8" (a one-line error for anything else)."""
    v = str(value).strip().lower()
    if v not in ALIASES:
        raise ValueError(f"{key}={value!r}: expected one of {sorted(ALIASES)} (4-bit and nf4 formats are not supported)")
    return ALIASES[v]


@torch.no_grad()
def quantize(w, kind):
    """w (out, in) floating -> (q (out, in) int8 or uint8 e4m3 bytes, scale (out,) fp32). Computed in fp32 on
    w's device (quantize_via: the caller puts w on the CPU or the accelerator first)."""
    if kind not in KINDS:
        raise ValueError(f"unknown 8-bit kind {kind!r}; have {KINDS}")
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"quantize expects a floating 2-D weight, got {w.dtype} of shape {tuple(w.shape)}")
    w = w.float()
    amax = w.abs().amax(dim=1)
    if not w.is_meta and not torch.isfinite(amax).all():
        raise ValueError("quantize: the weight has non-finite entries")
    scale = torch.where(amax > 0, amax / QMAX[kind], torch.ones_like(amax))   # an all-zero row keeps scale 1
    x = w / scale[:, None]
    if kind == "int8":
        return x.round_().clamp_(-127, 127).to(torch.int8), scale
    return x.to(torch.float8_e4m3fn).view(torch.uint8), scale


def codes(q, dtype):
    """8-bit codes -> their values in `dtype` (exact for bf16, fp16 and fp32), without the scale."""
    return (q if q.dtype == torch.int8 else q.view(torch.float8_e4m3fn)).to(dtype)


def dequantize(q, scale, dtype=torch.float32):
    """(q, scale) -> the weight W ~ s * q in `dtype` (the product in fp32)."""
    return (codes(q, torch.float32) * scale[:, None]).to(dtype)


class _Linear8(torch.autograd.Function):
    """y = x W^T + b with W = s q dequantised into x's dtype for this call only: the 8-bit q (not W) is saved for
    backward, which dequantises again (the weight is frozen: no gradient for q and s)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias):
        ctx.save_for_backward(q, scale)
        ctx.has_bias = bias is not None
        return F.linear(x, dequantize(q, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, g):
        q, scale = ctx.saved_tensors
        gx = g @ dequantize(q, scale, g.dtype) if ctx.needs_input_grad[0] else None
        gb = g.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, None, None, gb


def linear(x, q, scale, bias=None):
    """F.linear for an 8-bit weight (q, scale): the computation in x's dtype."""
    return _Linear8.apply(x, q, scale, bias)


class QuantLinear(nn.Module):
    """A frozen nn.Linear stored in 8 bits (the text encoder's layers; the DiT's are lora.Linear, which keeps LoRA
    adapters beside its own 8-bit storage). The output dtype is the input's."""

    def __init__(self, linear_module, kind):
        super().__init__()
        self.in_features, self.out_features, self.kind = linear_module.in_features, linear_module.out_features, kind
        q, scale = quantize(linear_module.weight.data, kind)
        self.weight_q = nn.Parameter(q, requires_grad=False)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        b = linear_module.bias
        self.bias = None if b is None else nn.Parameter(b.data.clone(), requires_grad=False)

    def forward(self, x):
        return linear(x, self.weight_q, self.weight_scale, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}"


def quantize_linears(module, kind, skip=()):
    """Replace every nn.Linear under `module` whose dotted name has no part in `skip` by a QuantLinear, one layer at
    a time (the bf16 weight is freed as its 8-bit copy is made: host memory never grows). -> number replaced."""
    n = 0
    for name, child in list(module.named_modules()):
        for cname, sub in list(child.named_children()):
            full = f"{name}.{cname}" if name else cname
            if type(sub) is nn.Linear and not any(p in skip for p in full.split(".")):
                setattr(child, cname, QuantLinear(sub, kind))
                n += 1
    return n


def nbytes(module):
    """Bytes of a module's parameters and buffers as stored (8-bit codes count 1 byte)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
