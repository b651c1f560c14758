"""WanDiT against diffusers' WanTransformer3DModel (fp32), the loaders in every layout, presets, gradients."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model_wan as mw
import lora
from conftest import run_offline_hub, TINY_D, randomize_

# the original -> diffusers rename of diffusers' convert script (docs/wan21.md#weight-key-maps), restated independently of
# model_wan's own map: ordered str.replace, head.modulation before modulation, norm2/norm3 swap via a placeholder
CONVERT_RENAME = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("head.modulation", "scale_shift_table"), ("head.head", "proj_out"), ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
    ("norm2", "norm__placeholder"), ("norm3", "norm2"), ("norm__placeholder", "norm3"),
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"), ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k", "attn2.norm_k"),
]


def convert_rename(key):
    for a, b in CONVERT_RENAME:
        key = key.replace(a, b)
    return key


def inputs(F=3, H=8, W=12, text_dim=32, seed=1):
    """Batch 2 with different (fractional) timesteps and contexts padded to different lengths with zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, F, H, W, generator=g)
    t = torch.tensor([999.0, 37.25])
    ctx = torch.randn(2, 12, text_dim, generator=g)
    ctx[0, 5:] = 0
    ctx[1, 9:] = 0
    return x, t, ctx


def assert_parity(ref, ours, F, H, W):
    x, t, ctx = inputs(F, H, W, ref.config.text_dim)
    with torch.no_grad():
        a = ref(x, t, ctx).sample
        b = ours(x, t, ctx)
    assert b.shape == a.shape == x.shape and b.dtype == torch.float32
    err = (a - b).abs().max().item()
    assert err <= 1e-5 * a.abs().max().item(), f"max abs diff {err} (output scale {a.abs().max().item()})"


@pytest.mark.parametrize("F,H,W", [(1, 6, 10), (3, 8, 12), (5, 4, 16)])
def test_parity_diffusers_folder(ref_dit, tmp_path, F, H, W):
    ref_dit.save_pretrained(tmp_path / "transformer")
    ours = mw.load_dit(tmp_path / "transformer")
    assert ours.cfg.num_heads == 2 and ours.cfg.head_dim == 128 and ours.cfg.ffn_dim == 96
    assert_parity(ref_dit, ours, F, H, W)


def test_parity_small_head_dim(tmp_path):
    """head_dim 16: RoPE split 8/4/4 (t = d - 4(d//6)) as in diffusers."""
    from diffusers import WanTransformer3DModel
    ref = randomize_(WanTransformer3DModel(**{**TINY_D, "attention_head_dim": 16, "num_attention_heads": 3})).eval()
    ref.save_pretrained(tmp_path)
    assert_parity(ref, mw.load_dit(tmp_path), 3, 8, 12)


def test_parity_original_layout_and_prefixed_file(ref_dit, tmp_path):
    ref_sd = ref_dit.state_dict()
    ref_dit.save_pretrained(tmp_path / "d")
    ours = mw.load_dit(tmp_path / "d")
    mw.save_dit(ours, tmp_path / "orig", layout="original")
    orig_sd = load_file(tmp_path / "orig" / "diffusion_pytorch_model.safetensors")
    # the saved original keys are exactly what the convert script maps onto the diffusers keys
    assert {convert_rename(k) for k in orig_sd} == set(ref_sd)
    assert len(orig_sd) == len(ref_sd) == 15 + 2 * 27
    for k, v in orig_sd.items():
        assert torch.equal(v, ref_sd[convert_rename(k)]), k
    cfg = json.loads((tmp_path / "orig" / "config.json").read_text())
    assert "text_dim" not in cfg and "patch_size" not in cfg  # like the real original config: inferred from shapes
    assert_parity(ref_dit, mw.load_dit(tmp_path / "orig"), 3, 8, 12)
    # ComfyUI-style single file: original keys under model.diffusion_model., no config.json beside it
    single = tmp_path / "single" / "wan_comfy.safetensors"
    single.parent.mkdir()
    save_file({"model.diffusion_model." + k: v for k, v in orig_sd.items()}, single)
    m = mw.load_dit(single)   # num_heads inferred from head_dim 128
    assert m.cfg.num_heads == 2
    assert_parity(ref_dit, m, 1, 6, 10)
    # a diffusers-layout single file without a prefix
    save_file(ref_sd, tmp_path / "d_single.safetensors")
    assert_parity(ref_dit, mw.load_dit(tmp_path / "d_single.safetensors"), 1, 6, 10)


def test_sharded_original_folder(ref_dit, tmp_path):
    ref_dit.save_pretrained(tmp_path / "d")
    sd = {k: v for k, v in mw.load_dit(tmp_path / "d").state_dict().items()}
    keys = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    out = tmp_path / "sharded"
    out.mkdir()
    for name, ks in shards.items():
        save_file({k: sd[k].contiguous() for k in ks}, out / name)
    index = {"metadata": {}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (out / "config.json").write_text(json.dumps({"model_type": "t2v", "dim": 256, "num_heads": 2, "num_layers": 2}))
    assert_parity(ref_dit, mw.load_dit(out), 3, 8, 12)
    (out / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        mw.load_dit(out)


def test_pipeline_root_and_dtype(ref_dit, tmp_path):
    ref_dit.to(torch.bfloat16).save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    m = mw.load_dit(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())   # checkpoint dtype kept
    m32 = mw.load_dit(tmp_path, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m32.parameters())
    mb = mw.load_dit(tmp_path, dtype=torch.bfloat16)
    for n, p in mb.named_parameters():
        keep = any(part in mw.FP32_MODULES for part in n.split("."))
        assert p.dtype == (torch.float32 if keep else torch.bfloat16), n
    x, t, ctx = inputs()
    with torch.no_grad():
        a, b = m32(x, t, ctx), mb(x, t, ctx)
    assert b.dtype == torch.float32 and torch.isfinite(b).all()
    assert (a - b).abs().max() < 0.05 * a.abs().max()   # bf16 matmuls, fp32 residual


def test_presets_meta_counts_keys_shapes():
    from diffusers import WanTransformer3DModel
    expected = {"t2v-1.3B": 1_418_996_800, "t2v-14B": 14_288_491_584}
    for name, n in expected.items():
        cfg = mw.PRESETS[name]
        with torch.device("meta"):
            ours = mw.WanDiT(cfg)
            ref = WanTransformer3DModel(**{k: v for k, v in mw.diffusers_config(cfg).items() if k != "_class_name"})
        assert mw.num_params(ours) == n
        ours_shapes = {mw.original_to_diffusers_key(k): tuple(v.shape) for k, v in ours.state_dict().items()}
        ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
        assert ours_shapes == ref_shapes
        assert len(ours_shapes) == 15 + 27 * cfg.num_layers
        for k in ours.state_dict():
            assert mw.diffusers_to_original_key(mw.original_to_diffusers_key(k)) == k
            assert convert_rename(k) == mw.original_to_diffusers_key(k)


def test_gradients_and_checkpointing():
    torch.manual_seed(0)
    m = randomize_(mw.WanDiT(mw.PRESETS["tiny"]), std=0.1)
    x, t, ctx = inputs(text_dim=32)

    def grads(ckpt):
        m.gradient_checkpointing = ckpt
        m.zero_grad(set_to_none=True)
        m(x, t, ctx).square().mean().backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    g0 = grads(False)
    for n, p in m.named_parameters():
        assert g0[n] is not None and g0[n].abs().sum() > 0, f"no gradient reaches {n}"
    g1 = grads(True)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad,match", [
    (dict(x=torch.randn(2, 15, 3, 8, 12)), r"\(2, 15, 3, 8, 12\)"),
    (dict(x=torch.randn(2, 16, 3, 7, 12)), r"\(2, 16, 3, 7, 12\)"),
    (dict(x=torch.randn(2, 16, 3, 8, 13)), r"\(2, 16, 3, 8, 13\)"),
    (dict(x=torch.randn(16, 3, 8, 12)), r"\(16, 3, 8, 12\)"),
    (dict(ctx=torch.randn(2, 12, 31)), r"\(2, 12, 31\)"),
    (dict(ctx=torch.randn(3, 12, 32)), r"\(3, 12, 32\)"),
    (dict(t=torch.tensor(5.0)), r"\(\)"),
    (dict(t=torch.ones(2, 1)), r"\(2, 1\)"),
    (dict(t=torch.ones(3)), r"\(3,\)"),
])
def test_bad_input(bad, match):
    m = mw.WanDiT(mw.PRESETS["tiny"])
    x, t, ctx = inputs()
    x, t, ctx = bad.get("x", x), bad.get("t", t), bad.get("ctx", ctx)
    with pytest.raises(ValueError, match=match):
        m(x, t, ctx)


def test_load_errors(ref_dit, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mw.load_dit(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        mw.load_dit(tmp_path / "empty")
    sd = mw.to_diffusers_state_dict(mw.WanDiT(mw.WanConfig(dim=256, num_heads=2, ffn_dim=96, num_layers=2, text_dim=32)))
    sd.pop("blocks.1.attn2.norm_k.weight")
    sd["blocks.1.attn2.extra.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as e:
        mw.load_dit(tmp_path / "bad.safetensors")
    assert "cross_attn.norm_k.weight" in str(e.value) and "extra" in str(e.value)
    save_file({"foo.weight": torch.zeros(2)}, tmp_path / "notwan.safetensors")
    with pytest.raises(ValueError, match="not a Wan DiT"):
        mw.load_dit(tmp_path / "notwan.safetensors")


def test_hub_id_offline_cache(ref_dit, tmp_path):
    """A hub id resolves through huggingface_hub's cache with HF_HUB_OFFLINE=1 (no network here)."""
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-wan" / "snapshots" / ("a" * 40)
    ref_dit.save_pretrained(snap / "transformer")
    (snap / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    (cache / "models--someone--tiny-wan" / "refs").mkdir()
    (cache / "models--someone--tiny-wan" / "refs" / "main").write_text("a" * 40)
    code = ("import model_wan as mw, sys\n"
            "m = mw.load_dit('someone/tiny-wan'); print('OK', m.cfg.num_layers)\n"
            "try:\n    mw.load_dit('someone/absent-wan')\nexcept FileNotFoundError as e:\n    print('ERR', e)\n")
    stdout = run_offline_hub(code, cache, tmp_path)
    assert "OK 2" in stdout
    assert "ERR 'someone/absent-wan'" in stdout and "diffusion_pytorch_model" in stdout


@pytest.mark.slow
def test_compile_matches_eager():
    torch.manual_seed(0)
    m = randomize_(mw.WanDiT(mw.PRESETS["tiny"]), std=0.1).eval()
    lora.add_adapter(m, "g", rank=4)
    for _, lin in lora.lora_modules(m):
        if "g" in lin.lora_B:
            torch.nn.init.normal_(lin.lora_B["g"], std=0.1)
    x, t, ctx = inputs()
    with torch.no_grad(), lora.use_adapter(m, "g"):
        eager = m(x, t, ctx)
        for b in m.blocks:
            b.compile(fullgraph=True)   # a block must trace without graph breaks
        compiled = m(x, t, ctx)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4 * eager.abs().max().item())


def test_bf16_load_keeps_fp32_modules_exact(ref_dit, tmp_path):
    """dtype=bf16 must not round the time MLPs, modulation tables and affine norms on the way in."""
    ref_dit.save_pretrained(tmp_path)
    m32, mb = mw.load_dit(tmp_path), mw.load_dit(tmp_path, dtype=torch.bfloat16)
    sd32 = m32.state_dict()
    for k, v in mb.state_dict().items():
        if any(part in mw.FP32_MODULES for part in k.split(".")):
            assert v.dtype == torch.float32 and torch.equal(v, sd32[k]), k
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, sd32[k].to(torch.bfloat16)), k


def test_text_len_cuts_padding_and_survives_save_load(tmp_path):
    """A model trained with text_len n sees exactly n context rows whatever the caller pads to (512 by default);
    text_len is saved in both layouts; cutting non-zero rows is an error, shorter contexts pass unchanged."""
    import dataclasses
    torch.manual_seed(0)
    cfg = dataclasses.replace(mw.PRESETS["tiny"], text_len=8)
    m = mw.WanDiT(cfg).eval()
    x, t = torch.randn(1, 16, 1, 4, 4), torch.tensor([500.0])
    words = torch.randn(1, 5, 32)
    pad = lambda n: torch.cat([words, torch.zeros(1, n - 5, 32)], 1)   # noqa: E731
    with torch.no_grad():
        want = m(x, t, pad(8))
        assert torch.equal(m(x, t, pad(512)), want)                     # zero rows past 8 are cut
        assert not torch.allclose(m(x, t, pad(6)), want)                # shorter: passed as given (diffusers' way)
        full = mw.WanDiT(mw.PRESETS["tiny"]).eval()
        full.load_state_dict(m.state_dict())
        assert not torch.allclose(full(x, t, pad(512)), want)           # 512 rows attend differently: it matters
    with pytest.raises(ValueError, match="text_len=8"):
        m(x, t, torch.randn(1, 512, 32))
    for layout in ("diffusers", "original"):
        mw.save_dit(m, tmp_path / layout, layout=layout)
        assert mw.load_dit(tmp_path / layout).cfg.text_len == 8
    mw.save_dit(full, tmp_path / "d512")
    assert "text_len" not in json.load(open(tmp_path / "d512" / "config.json"))   # real exports stay diffusers' own
