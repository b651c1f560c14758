"""WanVAE against diffusers' AutoencoderKLWan (fp32, random weights), its loaders in both layouts, tiling, errors."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model_wan as mw
import vae_wan
from conftest import run_offline_hub, randomize_

TINY = dict(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
# the real channel pattern at a small width: shortcut convs, channel changes, 2 residual blocks per stage
WIDE = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
H, W = 32, 48   # non-square clips; latents are 4 x 6


def make_ref(kw, seed=0):
    """diffusers AutoencoderKLWan with every parameter random (RMS gammas included), eval mode."""
    from diffusers import AutoencoderKLWan
    torch.manual_seed(seed)
    return randomize_(AutoencoderKLWan(**kw), std=0.1, seed=seed).eval()


def ours_like(ref):
    m = vae_wan.WanVAE(vae_wan.vae_config_from_state_dict(ref.state_dict(), dict(ref.config))).eval()
    m.load_state_dict(ref.state_dict(), strict=True)
    return m


def ref_stats(ref):
    return (torch.tensor(ref.config.latents_mean).view(1, -1, 1, 1, 1),
            torch.tensor(ref.config.latents_std).view(1, -1, 1, 1, 1))


def clip(frames, seed=1):
    return torch.rand(1, 3, frames, H, W, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def parity(ours, ref, frames):
    """-> (encode, decode) max |ours - diffusers| relative to max |diffusers|, on a clip of `frames` frames."""
    mean, std = ref_stats(ref)
    x = clip(frames)
    enc = ours.encode(x)
    enc_ref = (ref.encode(x).latent_dist.mean - mean) / std
    assert enc.shape == enc_ref.shape == (1, 16, 1 + (frames - 1) // 4, H // 8, W // 8)
    z = torch.randn(enc.shape, generator=torch.Generator().manual_seed(2))
    dec = ours.decode(z)
    dec_ref = ref.decode(z * std + mean).sample   # clamped by diffusers
    assert dec.shape == dec_ref.shape == (1, 3, frames, H, W)
    return ((enc - enc_ref).abs().max() / enc_ref.abs().max()).item(), \
           ((dec - dec_ref).abs().max() / dec_ref.abs().max()).item()


@pytest.fixture(scope="module")
def tiny_ref():
    return make_ref(TINY)


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_parity_tiny(tiny_ref, frames):
    e, d = parity(ours_like(tiny_ref), tiny_ref, frames)
    assert e <= 1e-5 and d <= 1e-5, (e, d)


def test_parity_wide_channels():
    ref = make_ref(WIDE, seed=3)
    ours = ours_like(ref)
    assert any(".conv_shortcut." in k for k in ours.state_dict())
    for frames in (1, 5, 9):
        e, d = parity(ours, ref, frames)
        assert e <= 1e-5 and d <= 1e-5, (frames, e, d)


def test_real_config_on_meta():
    with torch.device("meta"):
        m = vae_wan.WanVAE()
    assert mw.num_params(m) == 126_892_531
    sd = m.state_dict()
    assert len(sd) == 194   # docs/wan21.md#weight-key-maps: 194 tensors each side
    orig = {to_original_key(k, 2) for k in sd}
    assert {"decoder.upsamples.4.shortcut.weight", "decoder.upsamples.11.resample.1.weight",
            "encoder.downsamples.8.time_conv.weight", "decoder.middle.1.to_qkv.weight", "conv2.bias"} <= orig
    assert "decoder.upsamples.11.time_conv.weight" not in orig
    assert sd["decoder.up_blocks.0.upsamplers.0.time_conv.weight"].shape == (768, 384, 3, 1, 1)
    assert sd["decoder.up_blocks.2.upsamplers.0.resample.1.weight"].shape == (96, 192, 3, 3)


# diffusers -> original keys (docs/wan21.md#weight-key-maps), restated here independently of model_wan's regex map
def to_original_key(key, R):
    """R residual blocks per encoder stage; decoder stages hold R+1 residual blocks and one upsampler."""
    parts = key.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return ".".join([{"quant_conv": "conv1", "post_quant_conv": "conv2"}[parts[0]]] + parts[1:])
    net, rest = parts[0], parts[1:]
    ends = {"conv_in": ["conv1"], "norm_out": ["head", "0"], "conv_out": ["head", "2"]}
    if rest[0] in ends:
        return ".".join([net] + ends[rest[0]] + rest[1:])
    if rest[0] == "mid_block":
        block = ["middle", {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}[f"{rest[1]}.{rest[2]}"]]
        tail = rest[3:]
    elif rest[0] == "down_blocks":
        block, tail = ["downsamples", rest[1]], rest[2:]
    else:   # up_blocks.{s}.resnets.{j} | up_blocks.{s}.upsamplers.0
        s, j = int(rest[1]), int(rest[3])
        block, tail = ["upsamples", str(s * (R + 2) + (j if rest[2] == "resnets" else R + 1))], rest[4:]
    residual = {"norm1": ["residual", "0"], "conv1": ["residual", "2"], "norm2": ["residual", "3"],
                "conv2": ["residual", "6"], "conv_shortcut": ["shortcut"]}
    return ".".join([net] + block + residual.get(tail[0], tail[:1]) + tail[1:])


def save_original(ref, path, R):
    sd = {to_original_key(k, R): v.clone() for k, v in ref.state_dict().items()}
    assert len(sd) == len(ref.state_dict())
    torch.save(sd, path)


def test_diffusers_folder_and_pipeline_root(tiny_ref, tmp_path):
    tiny_ref.save_pretrained(tmp_path / "vae")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline",
                                                           "vae": ["diffusers", "AutoencoderKLWan"]}))
    for src in (tmp_path / "vae", tmp_path, tmp_path / "vae" / "diffusion_pytorch_model.safetensors"):
        m = vae_wan.load_vae(src)
        assert m.cfg.dim_mult == (1, 1, 1, 1) and m.cfg.latents_std == tuple(tiny_ref.config.latents_std)
        e, d = parity(m, tiny_ref, 5)
        assert e <= 1e-5 and d <= 1e-5, (src, e, d)


def test_original_layout_folder_and_file():
    import tempfile
    ref = make_ref(WIDE, seed=4)
    with tempfile.TemporaryDirectory() as d:
        save_original(ref, os.path.join(d, vae_wan.VAE_PTH), R=2)
        for src in (d, os.path.join(d, vae_wan.VAE_PTH)):
            m = vae_wan.load_vae(src)
            assert m.cfg == vae_wan.WanVAEConfig(base_dim=8)   # inferred from shapes; Wan 2.1 latent constants
            e, dd = parity(m, ref, 9)
            assert e <= 1e-5 and dd <= 1e-5, (src, e, dd)


def test_hub_id_offline_cache(tiny_ref, tmp_path):
    """Hub ids (a diffusers pipeline repo and an original-layout repo) resolve through the offline cache."""
    cache = tmp_path / "hub"
    for repo in ("tiny-wan", "tiny-wan-orig"):
        snap = cache / f"models--someone--{repo}" / "snapshots" / ("a" * 40)
        snap.mkdir(parents=True)
        (cache / f"models--someone--{repo}" / "refs").mkdir()
        (cache / f"models--someone--{repo}" / "refs" / "main").write_text("a" * 40)
        if repo == "tiny-wan":
            tiny_ref.save_pretrained(snap / "vae")
            (snap / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
        else:
            save_original(tiny_ref, snap / vae_wan.VAE_PTH, R=1)
    tiny_ref.save_pretrained(tmp_path / "local")
    code = ("import vae_wan, torch\n"
            f"ref = vae_wan.load_vae({str(tmp_path / 'local')!r}).state_dict()\n"
            "for repo in ('someone/tiny-wan', 'someone/tiny-wan-orig'):\n"
            "    sd = vae_wan.load_vae(repo).state_dict()\n"
            "    print('OK' if sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd) else 'BAD', repo)\n"
            "try:\n    vae_wan.load_vae('someone/absent-wan')\nexcept FileNotFoundError as e:\n    print('ERR', e)\n")
    stdout = run_offline_hub(code, cache, tmp_path)
    assert "OK someone/tiny-wan\n" in stdout and "OK someone/tiny-wan-orig" in stdout, stdout
    assert "ERR 'someone/absent-wan'" in stdout and vae_wan.VAE_PTH in stdout


def test_bad_inputs(tiny_ref):
    m = ours_like(tiny_ref)
    for shape in [(1, 3, 4, 32, 48), (1, 3, 5, 30, 48), (1, 3, 5, 32, 44), (1, 4, 5, 32, 48), (3, 5, 32, 48)]:
        with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape)) + r"\)"):
            m.encode(torch.zeros(shape))
    for shape in [(1, 8, 2, 4, 6), (1, 16, 0, 4, 6), (16, 2, 4, 6)]:
        with pytest.raises(ValueError, match=r"\(" + ", ".join(map(str, shape)) + r"\)"):
            m.decode(torch.zeros(shape))
    for tile in [(60, 48), (64, 72), (64, 0)]:
        with pytest.raises(ValueError, match="tile"):
            m.decode(torch.zeros(1, 16, 1, 4, 6), tile=tile)


def test_loader_errors(tiny_ref, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder.*nowhere"):
        vae_wan.load_vae(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=f"diffusion_pytorch_model.*{vae_wan.VAE_PTH}"):
        vae_wan.load_vae(tmp_path / "empty")
    tiny_ref.save_pretrained(tmp_path / "vae")
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    sd = load_file(path)
    del sd["decoder.conv_out.bias"]
    sd["decoder.extra.weight"] = torch.zeros(1)
    save_file(sd, path)
    with pytest.raises(ValueError, match=r"(?s)missing keys \(1\).*decoder.conv_out.bias.*"
                                         r"unexpected keys \(1\).*decoder.extra.weight"):
        vae_wan.load_vae(tmp_path / "vae")
    tiny_ref.save_pretrained(tmp_path / "vae2")
    cfg = json.loads((tmp_path / "vae2" / "config.json").read_text())
    (tmp_path / "vae2" / "config.json").write_text(json.dumps({**cfg, "base_dim": 32}))
    with pytest.raises(ValueError, match="base_dim=32"):
        vae_wan.load_vae(tmp_path / "vae2")
    (tmp_path / "vae2" / "config.json").write_text(json.dumps({**cfg, "is_residual": True}))
    with pytest.raises(ValueError, match="is_residual"):
        vae_wan.load_vae(tmp_path / "vae2")


def test_dtype_and_meta_load(tiny_ref, tmp_path):
    """Latent constants are plain floats: they survive the meta build + assign and a cast."""
    tiny_ref.save_pretrained(tmp_path)
    m32, mb = vae_wan.load_vae(tmp_path), vae_wan.load_vae(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and p.device.type == "cpu" for p in mb.parameters())
    assert mb.cfg.latents_mean == vae_wan.WAN21_LATENTS_MEAN
    z = torch.randn(1, 16, 2, 4, 6, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = m32.decode(z), mb.decode(z)
        c = m32.to(torch.float64).decode(z)
    assert b.dtype == torch.float32 and c.dtype == torch.float32
    assert ((a - b).norm() / a.norm()).item() < 5e-2
    assert ((a - c).abs().max()).item() < 1e-5


def test_decode_cache_keeps_two_frames(tiny_ref):
    """What outlives a chunk is the cache: at most CACHE_T frames per conv, each owning its memory (a view
    would pin the whole chunk's activation), so decode memory does not grow with the number of frames."""
    m = ours_like(tiny_ref)
    x = m.post_quant_conv(torch.randn(1, 16, 3, 4, 6))
    cache = {}
    with torch.no_grad():
        for i in range(3):
            m.decoder(x[:, :, i:i + 1], cache)
    tensors = [v for v in cache.values() if isinstance(v, torch.Tensor)]
    assert len(tensors) >= 20
    for v in tensors:
        assert v.shape[2] <= vae_wan.CACHE_T
        assert v.untyped_storage().nbytes() == v.numel() * v.element_size()


def test_tiling_blend_is_exact_for_a_pointwise_decoder(tiny_ref):
    """Tile placement, ramps and normalisation: with a decoder that is pointwise in space, tiled == untiled."""
    m = ours_like(tiny_ref)

    def pointwise(x, cache=None, progress=None):   # (B,z,T,h,w) -> (B,3,1+4(T-1),8h,8w)
        y = x[:, :3].repeat_interleave(8, 3).repeat_interleave(8, 4)
        return torch.cat([y[:, :, :1], y[:, :, 1:].repeat_interleave(4, 2)], 2).float()

    m._decode_frames = pointwise
    z = torch.randn(1, 16, 3, 12, 17)   # irregular overlaps: tile starts 0, 4 and 0, 5, 9 at tile=(64, 40)
    with torch.no_grad():
        full = m.decode(z)
        for tile in [(64, 40), (64, 64), (32, 8), (128, 120)]:
            torch.testing.assert_close(m.decode(z, tile=tile), full, rtol=0, atol=1e-6)


def test_tiled_decode_close_to_untiled(tiny_ref):
    """Tiles change what the mid-block attention sees (one tile, not the whole frame), so tiled decoding is
    close, not equal; diffusers' tiled_decode with the same tiles is the yardstick."""
    m = ours_like(tiny_ref)
    mean, std = ref_stats(tiny_ref)
    z = torch.randn(1, 16, 2, 12, 16, generator=torch.Generator().manual_seed(6))   # 5 x 96 x 128
    with torch.no_grad():
        full = m.decode(z)
        assert torch.equal(m.decode(z, tile=(128, 64)), full)   # one tile covering it all: the untiled path
        tiled = m.decode(z, tile=(64, 32))                        # 64 px tiles, 32 px overlap
        tiny_ref.enable_tiling(64, 64, 32, 32)
        ref_tiled = tiny_ref.decode(z * std + mean).sample
        tiny_ref.use_tiling = False
    err, ref_err = (tiled - full).abs(), (ref_tiled - full).abs()
    # measured: ours max 1.9e-2, mean 1.2e-3; diffusers max 2.6e-2, mean 1.4e-3; output std 7.3e-2
    print(f"\ntiled vs untiled: ours max {err.max():.2e} mean {err.mean():.2e}; diffusers' tiling max "
          f"{ref_err.max():.2e} mean {ref_err.mean():.2e}; output std {full.std():.2e}")
    assert err.mean() < 0.05 * full.std()
    assert err.mean() <= 1.1 * ref_err.mean() and err.max() <= 1.5 * ref_err.max()
