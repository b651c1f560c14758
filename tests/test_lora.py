"""Multi-adapter LoRA on one frozen base: identity at init, switching, merge, gradients, export to diffusers."""
import pytest
import torch
from safetensors.torch import save_file

import model_wan as mw
import lora
from conftest import randomize_
from test_model import inputs


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return randomize_(mw.WanDiT(mw.PRESETS["tiny"]), std=0.1, seed=seed).eval()


def randomize_adapter_(model, name, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, name):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_fresh_adapter_is_identity_and_targets():
    m = tiny_model()
    x, t, ctx = inputs()
    with torch.no_grad():
        base = m(x, t, ctx)
    params = lora.add_adapter(m, "gen", rank=4, alpha=8)
    # 10 target Linears per block by default, an A and a B each
    assert len(params) == 2 * 10 * m.cfg.num_layers
    with torch.no_grad(), lora.use_adapter(m, "gen"):
        assert torch.equal(m(x, t, ctx), base)
    targeted = {n for n, lin in lora.lora_modules(m) if "gen" in lin.lora_scale}
    assert "blocks.0.self_attn.q" in targeted and "blocks.1.ffn.2" in targeted and "text_embedding.0" not in targeted
    lora.add_adapter(m, "qv", rank=2, targets=("self_attn.q", "self_attn.v"))
    assert {n for n, lin in lora.lora_modules(m) if "qv" in lin.lora_scale} == {
        f"blocks.{i}.self_attn.{p}" for i in range(2) for p in "qv"}
    with pytest.raises(ValueError, match="already exists"):
        lora.add_adapter(m, "gen", rank=4)
    with pytest.raises(ValueError, match="no Linear matched"):
        lora.add_adapter(m, "none", targets=("nonexistent",))
    with pytest.raises(ValueError, match="unknown adapter"):
        lora.set_adapter(m, "critic")


def test_switching_and_merge():
    m = tiny_model()
    x, t, ctx = inputs()
    lora.add_adapter(m, "gen", rank=4, alpha=8)
    lora.add_adapter(m, "critic", rank=3, alpha=3)
    randomize_adapter_(m, "gen", seed=1)
    randomize_adapter_(m, "critic", seed=2)
    with torch.no_grad():
        base = m(x, t, ctx)
        with lora.use_adapter(m, "gen"):
            y_gen = m(x, t, ctx)
            with lora.use_adapter(m, "critic"):
                y_critic = m(x, t, ctx)
            assert torch.equal(m(x, t, ctx), y_gen)   # context restores the outer choice
        assert torch.equal(m(x, t, ctx), base)       # none = the base model
    assert (y_gen - base).abs().max() > 1e-3 and (y_critic - base).abs().max() > 1e-3
    assert (y_gen - y_critic).abs().max() > 1e-3
    # merged == unmerged, against a hand-built reference W + (alpha/r) B A
    ref = tiny_model()
    with torch.no_grad():
        for (n, lin), (_, rlin) in zip(lora.lora_modules(m), lora.lora_modules(ref)):
            if "gen" in lin.lora_scale:
                rlin.weight += 2.0 * lin.lora_B["gen"] @ lin.lora_A["gen"]
        y_ref = ref(x, t, ctx)
    torch.testing.assert_close(y_gen, y_ref, rtol=1e-5, atol=1e-5)
    lora.merge_adapter(m, "gen")
    assert lora.adapter_names(m) == ["critic"]
    with torch.no_grad():
        torch.testing.assert_close(m(x, t, ctx), y_gen, rtol=1e-5, atol=1e-5)
    lora.delete_adapter(m, "critic")
    assert lora.adapter_names(m) == []


def test_gradients_reach_only_the_active_adapter():
    m = tiny_model()
    x, t, ctx = inputs()
    for p in m.parameters():
        p.requires_grad_(False)
    gen = lora.add_adapter(m, "gen", rank=4)
    critic = lora.add_adapter(m, "critic", rank=4)
    randomize_adapter_(m, "gen")
    with lora.use_adapter(m, "gen"):
        m(x, t, ctx).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gen), "every generator LoRA param gets a gradient"
    assert all(p.grad is None for p in critic)
    assert all(p.grad is None for n, p in m.named_parameters() if ".lora_" not in n)
    # gradient checkpointing gives the same adapter gradients
    g0 = [p.grad.clone() for p in gen]
    m.zero_grad(set_to_none=True)
    m.gradient_checkpointing = True
    m.train()
    with lora.use_adapter(m, "gen"):
        m(x, t, ctx).square().mean().backward()
    for a, p in zip(g0, gen):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


def test_export_loads_into_diffusers_pipeline(tiny_pipeline, tmp_path):
    pytest.importorskip("peft")
    from diffusers import WanPipeline
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    ours = mw.load_dit(tmp_path / "pipe")          # pipeline root -> transformer/
    lora.add_adapter(ours, "student", rank=4, alpha=16)   # scale 4, folded into lora_B on export
    randomize_adapter_(ours, "student", std=0.05, seed=3)
    sd = mw.adapter_state_dict(ours, "student")
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in sd
    assert "transformer.blocks.1.ffn.net.2.lora_B.weight" in sd
    assert "transformer.blocks.0.attn2.to_out.0.lora_B.weight" in sd
    save_file(sd, tmp_path / "student_lora.safetensors")
    pipe = WanPipeline.from_pretrained(tmp_path / "pipe")
    x, t, ctx = inputs(text_dim=32)
    with torch.no_grad():
        before = pipe.transformer(x, t, ctx).sample
        pipe.load_lora_weights(str(tmp_path / "student_lora.safetensors"), adapter_name="student")
        after = pipe.transformer(x, t, ctx).sample
        with lora.use_adapter(ours, "student"):
            mine = ours(x, t, ctx)
        base = ours(x, t, ctx)
    torch.testing.assert_close(base, before, rtol=1e-5, atol=1e-5)
    assert (after - before).abs().max() > 1e-3
    torch.testing.assert_close(mine, after, rtol=1e-5, atol=1e-5 * after.abs().max().item())


def test_checkpointing_replays_the_adapter_of_the_forward():
    """Backward runs after use_adapter has restored its choice (and another adapter ran in between):
    the checkpoint recompute must still use the adapter active during the forward."""
    m = tiny_model()
    x, t, ctx = inputs()
    for p in m.parameters():
        p.requires_grad_(False)
    gen = lora.add_adapter(m, "gen", rank=4)
    lora.add_adapter(m, "critic", rank=4)
    randomize_adapter_(m, "gen", seed=5)
    randomize_adapter_(m, "critic", seed=6)
    with lora.use_adapter(m, "gen"):
        m(x, t, ctx).square().mean().backward()
    ref = [p.grad.clone() for p in gen]
    m.zero_grad(set_to_none=True)
    m.gradient_checkpointing = True
    with lora.use_adapter(m, "gen"):
        loss = m(x, t, ctx).square().mean()
    with torch.no_grad(), lora.use_adapter(m, "critic"):
        m(x, t, ctx)
    loss.backward()
    for a, p in zip(ref, gen):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)
