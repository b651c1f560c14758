"""
The three networks of DMD built from a train_dmd config: the frozen base the generator and the critic train on
(LoRA adapters "generator" and "critic" sharing it, or full fp32 copies of it), with VSA gates and generator_init
applied. The real score is this base with no adapter, unless teacher_model_name_or_path names a separate teacher
(data.load_real_score; docs/teacher.md).
"""
import copy

import torch

import data
import lora
import model_wan as mw
import sample


def build_networks(c, dev, dtype):
    """-> (base DiT holding the teacher (+ LoRA adapters), generator module, critic module, vae, text encoder or
    None: UMT5 is loaded later, used once and freed, in encode_prompts)."""
    base, vae, te = data.load_teacher(c, dev, dtype, text=False)
    base.gradient_checkpointing = c["gradient_checkpointing"]
    base.residual_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c["residual_dtype"]]   # full copies keep these
    base.activation_offload = c["activation_offload"]
    gen = critic = base
    sparse = (c["attention_sparsity"], tuple(c["sparse_cube"]), c["sparse_remainder"])
    if c["lora_rank"] > 0:   # VSA gates (when sparse) before the adapter: they are LoRA targets of the generator
        if sparse[0]:
            mw.enable_sparse_attention(base, *sparse[:2], adapter="generator", remainder=sparse[2])
        lora.add_adapter(base, "generator", c["lora_rank"], c["lora_alpha"], (*c["lora_targets"], "self_attn.gate_compress"))
    else:   # an 8-bit teacher's full copies start from its dequantised weights (the teacher's function exactly)
        gen = lora.dequantize_base(copy.deepcopy(base)).float()
        if sparse[0]:
            mw.enable_sparse_attention(gen, *sparse[:2], remainder=sparse[2])
    if c["generator_init"]:   # e.g. the causal ODE-init student (before the critic adapter: the critic stays the teacher's)
        kind = "adapter" if gen is base else "full"
        try:   # a LoRA file replaces the generator adapter (its own rank); full weights fill the full copy
            sample.load_student(gen, c["generator_init"], adapter="generator", kind=kind, sparse=sparse)
        except ValueError as e:
            raise ValueError(f"generator_init: {e}: use lora_rank {'= 0' if kind == 'adapter' else '> 0'} "
                             "(a LoRA file sets its own rank; full weights need a full generator copy)") from None
    if c["fake_score_lora_rank"] > 0:
        lora.add_adapter(base, "critic", c["fake_score_lora_rank"], c["fake_score_lora_alpha"], tuple(c["lora_targets"]))
    else:
        critic = mw.enable_sparse_attention(lora.dequantize_base(copy.deepcopy(base)).float(), None)   # no VSA gates
        if "generator" in lora.adapter_names(critic):
            lora.delete_adapter(critic, "generator")
    for m in {id(gen): gen, id(critic): critic}.values():
        if m is not base:
            for n, p in m.named_parameters():
                p.requires_grad_(".lora_" not in n)
    return base, gen, critic, vae, te
