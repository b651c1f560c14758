"""
Text encoders: Wan's UMT5-XXL through transformers (docs/wan21.md#the-text-encoder), and the demo's TinyTextEncoder (a fixed random
vector per word). Both give (B, 512, D) contexts whose rows after the prompt are exactly zero; trim_context and
pad_context move between that and the trimmed (n, D) rows the caches store.
"""
import os
import re

import torch

import quant
import readers
from model_wan import load_dit, looks_like_hub_id, resolve_hub

# UMT5 text encoder (docs/wan21.md#the-text-encoder): transformers' UMT5EncoderModel + the pipeline's tokenizer

# Wan's default negative prompt (W shared_config.sample_neg_prompt), used when none is given
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")
T5_PTH = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER_DIR = os.path.join("google", "umt5-xxl")   # tokenizer folder inside the original repo
TEXT_HUB_PATTERNS = ["model_index.json", "text_encoder/*", "tokenizer/*", T5_PTH, "google/umt5-xxl/*"]


def clean_prompt(text):
    """Wan's prompt cleaning: ftfy.fix_text (when installed, as diffusers does), html.unescape twice,
    whitespace collapsed and stripped."""
    import html
    try:
        import ftfy
        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class TextEncoder:
    """encode(prompts) -> (B, max_length, d_model) embeddings whose rows past each prompt's tokens
    (EOS included) are exactly zero, in the encoder's dtype."""

    def __init__(self, model, tokenizer, max_length=512):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @torch.no_grad()
    def encode(self, prompts):
        if isinstance(prompts, str):
            prompts = [prompts]
        tok = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
                             truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        dev = next(self.model.parameters()).device
        ids, mask = tok.input_ids.to(dev), tok.attention_mask.to(dev)
        h = self.model(input_ids=ids, attention_mask=mask).last_hidden_state   # (B,L,d)
        return h * mask[..., None].to(h.dtype)                                  # padded rows -> exactly 0


def trim_context(e):
    """(L, D) embedding with zero rows after the prompt -> its first n rows (n >= 1: EOS included)."""
    nz = (e.abs().sum(-1) > 0).nonzero()
    return e[: int(nz.max()) + 1 if len(nz) else 1]


def pad_context(rows, length=512):
    """List of (n_i, D) trimmed embeddings -> (B, length, D) with exact zero rows after each prompt."""
    out = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])
    for i, r in enumerate(rows):
        out[i, : r.shape[0]] = r[:length]
    return out


def _t5_original_to_hf(key):
    """models_t5_umt5-xxl-enc-bf16.pth keys -> UMT5EncoderModel keys (docs/wan21.md#weight-key-maps)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.match(r"blocks\.(\d+)\.(.+)$", key)
    if not m:
        return key
    i, rest = m.groups()
    table = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight", "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    return f"encoder.block.{i}.{table.get(rest, rest)}"


def _load_t5_original(pth, dtype=None, device="cpu"):
    """UMT5EncoderModel from Wan's original .pth, config inferred from the tensor shapes."""
    from transformers import UMT5Config, UMT5EncoderModel
    sd = torch.load(pth, map_location="cpu", weights_only=True)
    sd = {_t5_original_to_hf(k): (v.to(dtype) if dtype is not None else v).to(device) for k, v in sd.items()}
    if "shared.weight" not in sd:
        raise ValueError(f"{pth}: not a UMT5 encoder checkpoint (no token_embedding.weight)")
    vocab, d_model = sd["shared.weight"].shape
    buckets, heads = sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.block."))
    cfg = UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=d_model // heads, num_heads=heads, num_layers=layers,
                     d_ff=sd["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                     relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                     feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, is_encoder_decoder=False)
    with torch.device("meta"):
        model = UMT5EncoderModel(cfg)
    sd["encoder.embed_tokens.weight"] = sd["shared.weight"]   # tied
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(sd)), sorted(set(sd) - expected)
    if missing or unexpected:
        raise ValueError(f"{pth} does not match UMT5EncoderModel({d_model}x{layers}):\n  missing keys: {missing[:20]}"
                         f"\n  unexpected keys: {unexpected[:20]}")
    model.load_state_dict(sd, assign=True)
    return model


def load_text_encoder(source, dtype=None, device="cpu", max_length=512, quant="no", quantize_via="accelerator"):
    """TextEncoder from a diffusers pipeline root (text_encoder/ + tokenizer/), an original-layout folder
    (models_t5_umt5-xxl-enc-bf16.pth + google/umt5-xxl/ tokenizer) or a hub id. dtype None keeps the
    checkpoint's dtype. quant "int8" / "fp8": its Linears stored in 8 bits (quantize_8bit)."""
    from transformers import AutoTokenizer, UMT5EncoderModel
    src = str(source)
    if not os.path.exists(src):
        src = resolve_hub(src, TEXT_HUB_PATTERNS) if looks_like_hub_id(src) else src
    te_dir, tok_dir, pth = (os.path.join(src, p) for p in ("text_encoder", "tokenizer", T5_PTH))
    if os.path.isdir(te_dir):
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"{src}: has text_encoder/ but no tokenizer/ folder")
        for name in sorted(os.listdir(te_dir)):   # a truncated or foreign file: an error naming it, not transformers'
            if name.endswith(".safetensors"):
                with readers.open_safetensors(os.path.join(te_dir, name)):
                    pass
        import transformers
        dkey = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        model = UMT5EncoderModel.from_pretrained(te_dir, **{dkey: dtype or "auto"})
    elif os.path.isfile(pth):
        tok_dir = os.path.join(src, T5_TOKENIZER_DIR)
        if not os.path.isdir(tok_dir):
            raise FileNotFoundError(f"{src}: found {T5_PTH} but no tokenizer folder {T5_TOKENIZER_DIR}/")
        model = _load_t5_original(pth, dtype, "cpu")
    else:
        raise FileNotFoundError(f"no text encoder in {src!r}: looked for text_encoder/ + tokenizer/ (diffusers) "
                                f"and {T5_PTH} + {T5_TOKENIZER_DIR}/ (original layout)")
    return TextEncoder(quantize_8bit(model, quant, device, quantize_via), AutoTokenizer.from_pretrained(tok_dir), max_length)


def quantize_8bit(model, kind, device, quantize_via="accelerator"):
    """The UMT5 model (on the CPU) -> on `device`, its Linears stored in 8 bits when kind is "int8" / "fp8"
    (quant.quantize_linears, layer by layer: memory never exceeds the model's own size), quantised on the CPU or
    on the device (quantize_via). The layers transformers keeps in fp32 (UMT5's `wo`: its outputs overflow fp16;
    its forward also casts to wo's weight dtype) keep their precision."""
    if kind == "no":
        return model.to(device)
    model = model.to(device) if quantize_via == "accelerator" else model
    quant.quantize_linears(model, kind, skip=tuple(getattr(model, "_keep_in_fp32_modules", None) or ()))
    return model.to(device)


def negative_prompt(value):
    """The negative prompt a config asks for: None -> Wan's default (WAN_NEGATIVE_PROMPT), "" -> the empty prompt."""
    return WAN_NEGATIVE_PROMPT if value is None else value

# -----------------------------------------------------------------------------
# the demo's text encoder

TINY_TEXT_MARKER = "tiny_text_encoder"   # file in a teacher folder whose prompts TinyTextEncoder embeds (demo.py)


class TinyTextEncoder:
    """Deterministic stand-in for UMT5 with the tiny teacher: each word maps to a fixed random vector,
    EOS appended, rows after the prompt exactly zero."""

    def __init__(self, dim, max_length=512):
        self.dim, self.max_length = dim, max_length

    def encode(self, prompts):
        out = torch.zeros(len(prompts), self.max_length, self.dim)
        for i, p in enumerate(prompts):
            words = clean_prompt(p).lower().split()[: self.max_length - 1] + ["</s>"]
            for j, w in enumerate(words):
                seed = int.from_bytes(w.encode()[:8].ljust(8, b"\0"), "little") % (2**31) + len(w)
                out[i, j] = torch.randn(self.dim, generator=torch.Generator().manual_seed(seed))
        return out


def text_encoder(src, dtype, dev, dit=None, quant="no", quantize_via="accelerator"):
    """The teacher folder's text encoder: TinyTextEncoder for a demo.py teacher (TINY_TEXT_MARKER; its width from
    `dit`, or from the folder's DiT config), else UMT5 through load_text_encoder (quant: its 8-bit storage)."""
    if os.path.exists(os.path.join(src, TINY_TEXT_MARKER)):
        return TinyTextEncoder((dit if dit is not None else load_dit(src)).cfg.text_dim)
    return load_text_encoder(src, dtype=dtype, device=dev, quant=quant, quantize_via=quantize_via)
