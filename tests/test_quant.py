"""The 8-bit frozen base (quant.py, lora.Linear's 8-bit storage, base_model_precision): the formats' error bounds in
closed form, the 8-bit linear against F.linear on the dequantised weight (values and gradients), storage that casts
leave alone, streaming loads in both layouts equal to quantising in memory, the export merged into the
full-precision base, training (LoRA and full) and the UMT5 text encoder in 8 bits."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import lora
import model_wan as mw
import quant
import text_encoders
import train_dmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "tiny.py")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_error_bounds_in_closed_form(kind):
    """int8: |W - s q| <= s/2 per entry (s = row max / 127); fp8 e4m3: relative error <= 2^-4 for entries in its
    normal range (>= 2^-6 s), absolute <= 2^-10 s below (subnormal spacing 2^-9 s); the row max exact; zero rows."""
    torch.manual_seed(0)
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]   # rows of very different scales
    w[5] = 0
    q, s = quant.quantize(w, kind)
    assert q.dtype == (torch.int8 if kind == "int8" else torch.uint8) and s.dtype == torch.float32
    assert s[5] == 1 and (q[5] == 0).all()
    err = (quant.dequantize(q, s) - w).abs()
    torch.testing.assert_close(quant.dequantize(q, s).abs().amax(1), w.abs().amax(1), rtol=1e-6, atol=0)   # row max kept
    if kind == "int8":
        assert (err <= s[:, None] / 2 * (1 + 1e-6)).all()
    else:
        normal = w.abs() >= 2 ** -6 * s[:, None]
        assert (err[normal] <= 2 ** -4 * w.abs()[normal] * (1 + 1e-6)).all()
        assert (err[~normal] <= 2 ** -10 * s[:, None].expand_as(w)[~normal] * (1 + 1e-6)).all()
    assert torch.equal(quant.codes(q, torch.bfloat16).float(), quant.codes(q, torch.float32))   # codes exact in bf16


def test_fp8_matmul_in_closed_form(monkeypatch):
    """fp8-matmul: the forward is the product of the per-row e4m3-quantised input and the e4m3 weight, both scales
    applied (torch._scaled_mm; the CPU has it too), the backward the weight-only one (F.linear's input gradient on
    the dequantised weight). A device without it runs fp8 weight-only, and says so."""
    torch.manual_seed(0)
    q, s = quant.quantize(torch.randn(32, 48), "fp8-matmul")
    W = quant.dequantize(q, s)
    x, b = torch.randn(2, 5, 48, requires_grad=True), torch.randn(32)
    y = quant.linear(x, q, s, b, fp8_mm=True)
    sx = x.detach().abs().amax(-1, keepdim=True) / 448
    xq = (x.detach() / sx).to(torch.float8_e4m3fn).float() * sx
    torch.testing.assert_close(y, F.linear(xq, W, b), rtol=1e-5, atol=1e-5)
    assert (y - F.linear(x, W, b)).abs().max() > 1e-4   # the activations really went through e4m3
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g @ W, rtol=1e-5, atol=1e-5)
    assert quant.resolve("fp8-matmul", "cpu") == "fp8-matmul" and quant.resolve("int8", "cpu") == "int8"
    said = []
    monkeypatch.setattr(quant, "fp8_matmul_works", lambda device: False)
    assert quant.resolve("fp8-matmul", "cpu", say=said.append) == "fp8" and "weight-only" in said[0]


def test_bad_input_is_one_line():
    assert quant.parse_precision("int8-quanto") == "int8" and quant.parse_precision("FP8-torchao") == "fp8"
    assert quant.parse_precision("no_change") == "no"
    with pytest.raises(ValueError, match="base_model_precision='nf4'"):
        quant.parse_precision("nf4")
    with pytest.raises(ValueError, match="non-finite"):
        quant.quantize(torch.tensor([[1.0, float("nan")]]), "int8")
    with pytest.raises(ValueError, match="floating 2-D"):
        quant.quantize(torch.ones(3), "int8")


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_linear_equals_f_linear_on_the_dequantised_weight(kind):
    """Forward and the input's and bias's gradients equal F.linear with W = s q (fp32: to rounding)."""
    torch.manual_seed(0)
    q, s = quant.quantize(torch.randn(24, 40), kind)
    W = quant.dequantize(q, s)
    x, b = torch.randn(3, 5, 40, requires_grad=True), torch.randn(24, requires_grad=True)
    y = quant.linear(x, q, s, b)
    x2, b2 = x.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = F.linear(x2, W, b2)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g), y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad, rtol=1e-5, atol=1e-5)
    assert quant.linear(x.bfloat16(), q, s).dtype == torch.bfloat16


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_lora_on_an_8bit_base(kind):
    """lora.Linear with an 8-bit base and an adapter = a full-precision Linear holding the dequantised weight with the
    same adapter: outputs and adapter gradients; casts (.float(), cast(bf16), .to) leave the codes and scales
    alone; dequantize_base gives the dequantised weight back."""
    torch.manual_seed(0)
    ref = lora.Linear(16, 8)
    m8 = copy.deepcopy(ref)
    m8.to_8bit(kind)
    with torch.no_grad():
        ref.weight.copy_(quant.dequantize(m8.weight_q, m8.weight_scale))
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    for m in (ref, m8):
        m.lora_A["g"], m.lora_B["g"] = torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone())
        m.lora_scale["g"], m.adapter = 0.5, "g"
    x = torch.randn(6, 16)
    y, y8 = ref(x), m8(x)
    torch.testing.assert_close(y8, y, rtol=1e-5, atol=1e-5)
    y.square().sum().backward(), y8.square().sum().backward()
    torch.testing.assert_close(m8.lora_B["g"].grad, ref.lora_B["g"].grad, rtol=1e-5, atol=1e-4)
    assert m8.weight is None and not m8.weight_q.requires_grad
    codes = m8.weight_q.clone()
    m8.float().to(torch.bfloat16)
    assert torch.equal(m8.weight_q, codes) and m8.weight_q.dtype == codes.dtype   # integer storage: untouched
    model = mw.WanDiT(mw.PRESETS["tiny"])
    lora.quantize_base(model, kind)
    model.cast(torch.bfloat16)
    q = model.blocks[0].ffn[0]
    assert q.weight_scale.dtype == torch.float32 and q.bias.dtype == torch.bfloat16 and q.compute_dtype == torch.bfloat16
    assert lora.base_precision(model) == kind and model.blocks[0].norm3.weight.dtype == torch.float32
    lora.dequantize_base(model)
    assert lora.base_precision(model) == "no" and model.blocks[0].ffn[0].weight.dtype == torch.bfloat16


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_streaming_load_equals_quantising_in_memory(tmp_path, layout):
    """load_dit(quant=...) stores each block Linear in 8 bits as it is read (no full-precision copy of them in the
    state dict), in both layouts and both quantize_via: the same codes as quantize_base on the loaded model; the
    8-bit model's output stays near the full one (int8 < 1%, fp8 < 4% of the output's scale, tiny random DiT)."""
    torch.manual_seed(0)
    full = mw.WanDiT(mw.PRESETS["tiny"]).eval()
    mw.save_dit(full, str(tmp_path), layout=layout)
    files, _ = mw.find_dit_files(str(tmp_path))
    x, t, ctx = torch.randn(2, 16, 3, 8, 8), torch.tensor([300.0, 900.0]), torch.randn(2, 7, 32)
    ref = full(x, t, ctx)
    for kind, tol in (("int8", 0.01), ("fp8", 0.04)):
        sd = mw.read_state_dict(files, quant=kind)
        assert not any(mw.is_8bit_target(k) for k in sd) and sum(k.endswith("weight_q") for k in sd) == 20
        mem = copy.deepcopy(full)
        lora.quantize_base(mem, kind)
        for via in ("cpu", "accelerator"):
            m = mw.load_dit(str(tmp_path), quant=kind, quantize_via=via)
            assert m.state_dict().keys() == mem.state_dict().keys()
            for k, v in mem.state_dict().items():
                assert torch.equal(m.state_dict()[k], v), k
        y = m(x, t, ctx)
        assert (y - ref).abs().max() < tol * ref.abs().max()
        assert quant.nbytes(m) < 0.6 * quant.nbytes(full)


def test_merged_export_uses_the_full_precision_base():
    """merged_state_dict on an 8-bit base merges into the given full-precision weights (not their 8-bit copy), and
    says what it needs when they are missing; merge_adapter refuses an 8-bit base."""
    torch.manual_seed(0)
    full = mw.WanDiT(mw.PRESETS["tiny"])
    base_sd = {k: v.clone() for k, v in full.state_dict().items()}
    lora.add_adapter(full, "g", rank=4)
    for p in lora.adapter_parameters(full, "g"):
        torch.nn.init.normal_(p)
    m8 = copy.deepcopy(full)
    lora.quantize_base(m8, "int8")
    want = lora.merged_state_dict(full, "g")
    got = lora.merged_state_dict(m8, "g", base_sd)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with pytest.raises(ValueError, match="full-precision weight"):
        lora.merged_state_dict(m8, "g")
    with pytest.raises(ValueError, match="8 bits|int8 base"):
        lora.merge_adapter(m8, "g")


@pytest.mark.parametrize("kind", quant.KINDS)
def test_lora_dmd_on_an_8bit_base(tmp_path, kind):
    """A tiny LoRA DMD run with base_model_precision: the base is 8-bit during training, the LoRA file holds the
    adapter only, and the exported transformer/ is that adapter merged into the full-precision teacher."""
    out = tmp_path / kind
    c = train_dmd.config([TINY, f"--output_dir={out}", "--max_train_steps=2", "--validation_step_interval=100",
                          f"--base_model_precision={kind}", "--use_ema=False"])
    train_dmd.train(c)
    student = load_file(str(out / "student.safetensors"))
    assert student and all(".lora_" in k for k in student)
    assert f"{kind} weight-only" in (out / "README.md").read_text()   # the model card says how the base was stored
    torch.manual_seed(c["seed"])   # config/tiny's teacher, rebuilt from its seed as data.load_teacher builds it
    teacher = mw.WanDiT(mw.PRESETS["tiny"])
    mw.load_adapter(teacher, "generator", student)
    want = lora.merged_state_dict(teacher, "generator")
    got = mw.load_dit(str(out / "transformer")).state_dict()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0, msg=k)


def test_full_finetune_of_an_8bit_teacher(tmp_path):
    """lora_rank 0 with an int8 base: the teacher stays 8-bit, generator and critic are full fp32 copies of its
    dequantised weights (the teacher's function exactly), and the run exports full weights."""
    c = train_dmd.config([TINY, f"--output_dir={tmp_path}", "--max_train_steps=1", "--validation_step_interval=100",
                          "--base_model_precision=int8", "--lora_rank=0", "--fake_score_lora_rank=0"])
    dev, dt = torch.device("cpu"), torch.float32
    torch.manual_seed(c["seed"])
    base, gen, critic, _, _ = train_dmd.build_networks(c, dev, dt)
    assert lora.base_precision(base) == "int8" and lora.base_precision(gen) == "no" == lora.base_precision(critic)
    lin = base.blocks[1].self_attn.v
    assert torch.equal(gen.blocks[1].self_attn.v.weight, lin.base_weight(torch.float32))
    assert gen.blocks[1].self_attn.v.weight.requires_grad and not lin.weight_q.requires_grad
    train_dmd.train(c)
    assert any(k.endswith("to_v.weight") for k in load_file(str(tmp_path / "student_ema.safetensors")))


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_umt5_in_8bit(tmp_path, kind):
    """text_encoder_1_precision: UMT5's Linears stored in 8 bits except `wo` (transformers keeps it in fp32 and casts
    to its weight's dtype); the embeddings stay near the full model's."""
    from transformers import UMT5Config, UMT5EncoderModel
    from conftest import tiny_tokenizer
    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")).eval()
    te.save_pretrained(tmp_path / "text_encoder")
    tiny_tokenizer().save_pretrained(tmp_path / "tokenizer")
    full = text_encoders.load_text_encoder(str(tmp_path))
    q = text_encoders.load_text_encoder(str(tmp_path), quant=kind, quantize_via="cpu")
    kinds = {n.split(".")[-1]: type(m).__name__ for n, m in q.model.named_modules() if n.count(".") >= 5}
    assert kinds["wo"] == "Linear" and kinds["q"] == kinds["wi_0"] == "QuantLinear"
    prompts = ["a red circle moving left", "a blue square"]
    a, b = full.encode(prompts), q.encode(prompts)
    assert torch.equal(a == 0, b == 0)   # padded rows stay exactly zero
    assert (a - b).abs().max() < (0.02 if kind == "int8" else 0.08) * a.abs().max()


@pytest.mark.parametrize("kind", ["adapter", "full"])
def test_sampling_with_an_8bit_base(tiny_pipeline, tmp_path, kind):
    """sample.py --base_model_precision=int8: a LoRA student on the teacher streamed in 8 bits, or a full student
    stored in 8 bits once its weights are in; the latents equal the student sampler run by hand on that 8-bit DiT."""
    import flow
    import sample
    from safetensors.torch import save_file
    pipe = tmp_path / "pipe"
    tiny_pipeline.save_pretrained(pipe)
    dit = mw.load_dit(pipe)
    lora.add_adapter(dit, "g", rank=4)
    for p in lora.adapter_parameters(dit, "g"):
        torch.nn.init.normal_(p, std=0.05)
    if kind == "adapter":
        save_file(mw.adapter_state_dict(dit, "g"), tmp_path / "student.safetensors")
    else:
        lora.merge_adapter(dit, "g")
        save_file({k: v.contiguous() for k, v in mw.to_diffusers_state_dict(dit).items()}, tmp_path / "student.safetensors")
    cfg = dict(sample.config(["--device=cpu", "--dtype=float32"]), model=str(pipe), ckpt=str(tmp_path / "student.safetensors"),
               prompt="a red circle moving left", height=32, width=48, num_frames=5, out=str(tmp_path / "out"),
               save_latents=True, base_model_precision="int8-quanto", text_encoder_1_precision="int8")
    (path,) = sample.generate(cfg)
    lat = load_file(path.replace(".mp4", ".latents.safetensors"))["latents"]
    q = mw.load_dit(pipe, quant="int8") if kind == "adapter" else dit
    if kind == "adapter":
        mw.load_adapter(q, "g", load_file(str(tmp_path / "student.safetensors")))
    else:
        lora.quantize_base(q, "int8")
    x, gen = flow.initial_noise(1, 5, 32, 48, 0, "cpu")
    ctx = text_encoders.load_text_encoder(pipe, quant="int8").encode(["a red circle moving left"])
    with torch.no_grad(), lora.use_adapter(q, "g" if kind == "adapter" else None):
        ref = sample.sample_student(q, ctx, x, [1000.0, 757.0, 522.0], None, gen)
    torch.testing.assert_close(lat, ref, rtol=0, atol=1e-5)


def test_bf16_residual_stream():
    """residual_dtype bf16: the blocks receive (and gradient checkpointing keeps) bf16 inputs, compute in fp32, and
    the output stays near the fp32-residual model's (tiny random DiT: < 1% of the output's scale); gradients flow;
    a tiny run trains with it."""
    torch.manual_seed(0)
    m = mw.WanDiT(mw.PRESETS["tiny"])
    x, t, ctx = torch.randn(2, 16, 3, 8, 8), torch.tensor([300.0, 900.0]), torch.randn(2, 7, 32)
    ref = m(x, t, ctx)
    seen = []
    m.blocks[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    m.residual_dtype, m.gradient_checkpointing = torch.bfloat16, True
    y = m(x, t, ctx)
    assert seen == [torch.bfloat16] and y.dtype == torch.float32
    assert 0 < (y - ref).abs().max() < 0.01 * ref.abs().max()
    y.square().mean().backward()
    assert m.blocks[0].ffn[0].weight.grad.abs().sum() > 0


def test_activation_offload_gives_the_same_gradients():
    """activation_offload (the checkpointed block inputs kept in host memory, copied back for the recompute): the
    same output and gradients as plain gradient checkpointing, an adapter's included (here the host is the device:
    the copies are plain CPU copies; bench/memory_table.py counts what it saves on a GPU)."""
    torch.manual_seed(0)
    m = mw.WanDiT(mw.PRESETS["tiny"])
    lora.add_adapter(m, "g", rank=4)
    for p in lora.adapter_parameters(m, "g"):
        torch.nn.init.normal_(p, std=0.1)
    m.gradient_checkpointing = True
    x, t, ctx = torch.randn(2, 16, 3, 8, 8), torch.tensor([300.0, 900.0]), torch.randn(2, 7, 32)
    grads = []
    for offload in (False, True):
        m.activation_offload = offload
        with lora.use_adapter(m, "g"):
            y = m(x, t, ctx)
        y.square().mean().backward()
        grads.append((y.detach(), [p.grad.clone() for p in lora.adapter_parameters(m, "g")]))
        m.zero_grad()
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=0, atol=0)
    for a, b in zip(grads[1][1], grads[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.slow
def test_exact_resume_with_an_8bit_base(tmp_path):
    """A run on an int8 base stopped after step 1 and resumed equals the uninterrupted run bit for bit (the 8-bit base
    is rebuilt from the same weights: quantisation is deterministic)."""
    args = ["--validation_step_interval=100", "--checkpoint_step_interval=1", "--base_model_precision=int8"]
    for out, steps in ((tmp_path / "a", (2,)), (tmp_path / "b", (1, 2))):
        for n in steps:
            train_dmd.train(train_dmd.config([TINY, f"--output_dir={out}", f"--max_train_steps={n}", *args]))
    a, b = (load_file(str(tmp_path / d / "student_ema.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_an_8bit_block_compiles_whole():
    """torch.compile(fullgraph=True) of a DiT block on an int8 base with an adapter (CPU inductor): no graph break,
    the same output, gradients reach the adapter."""
    torch.manual_seed(0)
    m = mw.WanDiT(mw.PRESETS["tiny"])
    lora.quantize_base(m, "int8")
    lora.add_adapter(m, "g", rank=4)
    lora.set_adapter(m, "g")
    x, t, ctx = torch.randn(2, 16, 3, 8, 8), torch.tensor([300.0, 900.0]), torch.randn(2, 7, 32)
    ref = m(x, t, ctx)
    m.blocks[0] = torch.compile(m.blocks[0], fullgraph=True)
    y = m(x, t, ctx)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    y.square().mean().backward()
    assert lora.adapter_parameters(m, "g")[1].grad.abs().sum() > 0
