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
weight (at most 141 MB: the 14B's FFN); the activations stay bf16, so the error is the weights' alone.
"fp8-matmul" stores as "fp8" and in the forward also quantises the activations per row to e4m3 for
torch._scaled_mm (the fp8 tensor cores: W8A8, faster, less exact); its backward is the weight-only one. `resolve`
turns it into "fp8" where the device has no such matmul.

Why our own and not torchao / quanto: ~180 lines that a reader checks against the formulas above, that work on
CPU (the tests), under FSDP2 (8-bit parameters shard as any other) and torch.compile, on every torch >= 2.5,
without a new dependency; weight-only 8-bit needs nothing more.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KINDS = ("int8", "fp8", "fp8-matmul")   # fp8-matmul: fp8 storage, and fp8 activations in the forward matmul
QMAX = {"int8": 127.0, "fp8": 448.0, "fp8-matmul": 448.0}
# SimpleTuner's spellings (base_model_precision / text_encoder_1_precision) -> ours; both libraries' int8 and
# fp8 are weight-only per-channel formats of the same kind
ALIASES = {"no": "no", "none": "no", "no_change": "no", "bf16": "no", "fp32": "no", "int8": "int8", "fp8": "fp8",
           "int8-quanto": "int8", "int8-torchao": "int8", "fp8-quanto": "fp8", "fp8-torchao": "fp8",
           "fp8uz-quanto": "fp8", "int8-torchao-wo": "int8", "fp8-matmul": "fp8-matmul"}


def parse_precision(value, key="base_model_precision"):
    """A config's precision string -> "no", "int8", "fp8" or "fp8-matmul" (a one-line error for anything else)."""
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


def fp8_matmul_works(device):
    """Does torch._scaled_mm run here with per-row scales (CUDA: compute capability >= 8.9 and a recent torch; the
    CPU since torch 2.6)? Probed once with a 16 x 16 product, before any model runs (a probe inside a compiled
    region would break the graph)."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        return False
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        s = torch.ones(16, 1, device=device)
        torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t(), out_dtype=torch.bfloat16)
        return True
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False


def resolve(value, device, key="base_model_precision", say=print):
    """A config's precision value (parse_precision) -> the kind to run on `device`: fp8-matmul where the device
    cannot run it -> fp8 (weight-only), said; every other kind as it is."""
    kind = parse_precision(value, key)
    if kind == "fp8-matmul" and not fp8_matmul_works(device):
        say(f"notice: no fp8 matmul on {device} (torch._scaled_mm with per-row scales): fp8-matmul runs as fp8 "
            "weight-only (dequantised weights, bf16 activations)")
        return "fp8"
    return kind


def codes(q, dtype):
    """8-bit codes -> their values in `dtype` (exact for bf16, fp16 and fp32), without the scale."""
    return (q if q.dtype == torch.int8 else q.view(torch.float8_e4m3fn)).to(dtype)


def dequantize(q, scale, dtype=torch.float32):
    """(q, scale) -> the weight W ~ s * q in `dtype` (the product in fp32)."""
    return (codes(q, torch.float32) * scale[:, None]).to(dtype)


def fp8_matmul(x, q, scale):
    """x (..., K) @ (s q)^T with x quantised to e4m3 per row (dynamic scale max|x_row| / 448) and torch._scaled_mm
    taking both scales: W8A8, the fp8 tensor cores' product. The output in x's dtype."""
    x2 = x.reshape(-1, x.shape[-1])
    sx = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / 448.0
    xq = (x2.float() / sx).to(torch.float8_e4m3fn)
    y = torch._scaled_mm(xq, q.view(torch.float8_e4m3fn).t(), scale_a=sx, scale_b=scale[None, :].float(),
                         out_dtype=x.dtype)
    return y.view(*x.shape[:-1], q.shape[0])


def fp8_matmul_fits(x, q):
    """The product's shape and dtype suit _scaled_mm (CUDA: dimensions multiples of 16, bf16 output)."""
    return q.dtype == torch.uint8 and x.shape[-1] % 16 == 0 and q.shape[0] % 16 == 0 and \
        (x.dtype == torch.bfloat16 or x.device.type == "cpu")


class _Linear8(torch.autograd.Function):
    """y = x W^T + b with W = s q dequantised into x's dtype for this call only (or, fp8_mm, the fp8 product of
    fp8_matmul): the 8-bit q (not W) is saved for backward, which dequantises again (weight-only: the input's
    gradient in the compute dtype; the weight is frozen, no gradient for q and s)."""

    @staticmethod
    def forward(ctx, x, q, scale, bias, fp8_mm=False):
        ctx.save_for_backward(q, scale)
        ctx.has_bias = bias is not None
        b = None if bias is None else bias.to(x.dtype)
        if fp8_mm and fp8_matmul_fits(x, q):
            y = fp8_matmul(x, q, scale)
            return y if b is None else y + b
        return F.linear(x, dequantize(q, scale, x.dtype), b)

    @staticmethod
    def backward(ctx, g):
        q, scale = ctx.saved_tensors
        gx = g @ dequantize(q, scale, g.dtype) if ctx.needs_input_grad[0] else None
        gb = g.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[3] else None
        return gx, None, None, gb, None


def linear(x, q, scale, bias=None, fp8_mm=False):
    """F.linear for an 8-bit weight (q, scale): the computation in x's dtype (fp8_mm: fp8 activations too)."""
    return _Linear8.apply(x, q, scale, bias, fp8_mm)


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
        return linear(x, self.weight_q, self.weight_scale, self.bias, self.kind == "fp8-matmul")

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
