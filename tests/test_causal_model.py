"""Causal (block-wise) Wan student: block mask, KV cache, per-frame t, rolling window,
streamed VAE decode and the causal sample.py path. Tiny fp32 models with random weights (no path hidden)."""
import json

import pytest
import torch
from conftest import randomize_
from safetensors.torch import save_file

import model_wan as mw
import media
import vae_wan
import text_encoders
import sample
import flow

CTX = 5


def tiny(num_layers=2, seed=0):
    cfg = mw.WanConfig(**{**mw.PRESETS["tiny"].__dict__, "num_layers": num_layers})
    return randomize_(mw.WanDiT(cfg), seed=seed).eval()


def inputs(B=2, Fn=5, H=4, W=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 16, Fn, H, W, generator=g), torch.rand(B, generator=g) * 1000,
            torch.randn(B, CTX, 32, generator=g))


def per_frame_t(tb, starts, Fn):
    """(B, blocks) timesteps -> (B, Fn): each frame gets its block's t."""
    ends = starts[1:] + [Fn]
    return torch.cat([tb[:, i:i + 1].expand(-1, e - s) for i, (s, e) in enumerate(zip(starts, ends))], 1)


def test_block_starts_and_mask_equal_hand_built():
    assert mw.block_starts(21, 3, False) == [0, 3, 6, 9, 12, 15, 18]
    assert mw.block_starts(21, 4, True) == [0, 1, 5, 9, 13, 17]
    assert mw.block_starts(21, 0, False) == [0] and mw.block_starts(21, 0, True) == [0, 1]
    assert mw.block_starts(1, 3, True) == [0]
    for bad in ((21, 4, False), (21, 3, True), (5, -1, False)):
        with pytest.raises(ValueError, match="num_frame_per_block"):
            mw.block_starts(*bad)
    for Fn, tpf, nb, first in ((5, 2, 2, True), (6, 3, 2, False), (4, 1, 0, True), (3, 2, 0, False)):
        blocks = [0] if first else []          # hand-built: block id of each frame
        rest = Fn - len(blocks)
        blocks += [len(blocks) + i // (nb or rest) for i in range(rest)]
        L = Fn * tpf
        ref = torch.zeros(L, L, dtype=torch.bool)
        for q in range(L):
            for k in range(L):
                ref[q, k] = blocks[k // tpf] <= blocks[q // tpf]
        assert torch.equal(mw.block_causal_mask(Fn, tpf, nb, first), ref), (Fn, tpf, nb, first)


def test_one_block_equals_bidirectional():
    m = tiny()
    x, t, ctx = inputs()
    with torch.no_grad():
        ref = m(x, t, ctx)
        assert torch.equal(m(x, t, ctx, causal=(0, False)), ref)              # one block: no mask at all
        assert torch.equal(m(x, t, ctx, causal=(5, False)), ref)
        tf = t[:, None].expand(-1, 5).contiguous()                           # per-frame modulation path
        torch.testing.assert_close(m(x, tf, ctx, causal=(0, False)), ref, rtol=0, atol=1e-5)
        # a one-block cache forward is the bidirectional pass too
        cache = m.new_kv_cache(2, 5, 6)
        torch.testing.assert_close(m(x, t, ctx, causal=(0, False), kv_cache=cache), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal,Fn", [((2, True), 5), ((2, False), 6), ((0, True), 4)])
def test_kv_cache_generation_equals_whole_clip(causal, Fn):
    """Block by block with the cache (two steps per block, then the context pass overwriting the block's
    entries) == one whole-clip masked pass with per-frame t, earlier blocks fed at their context values."""
    torch.manual_seed(0)
    m = tiny()
    x, _, ctx = inputs(Fn=Fn)
    B = x.shape[0]
    starts = mw.block_starts(Fn, *causal)
    cache = m.new_kv_cache(B, Fn, 6)
    fed, t_fed = torch.zeros_like(x), torch.zeros(B, len(starts))   # what each block was last written with
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i, (s, e) in enumerate(zip(starts, starts[1:] + [Fn])):
            xb = x[:, :, s:e]
            m(xb, torch.full((B,), 900.0), ctx, causal=causal, kv_cache=cache, start_frame=s)   # step 1
            t2 = torch.rand(B, generator=g) * 1000
            out = m(xb, t2, ctx, causal=causal, kv_cache=cache, start_frame=s)                # step 2
            fed[:, :, s:e], t_fed[:, i] = xb, t2
            ref = m(fed[:, :, :e], per_frame_t(t_fed[:, :i + 1], starts[:i + 1], e), ctx, causal=causal)
            torch.testing.assert_close(out, ref[:, :, s:e], rtol=0, atol=1e-5)
            xc = torch.randn(xb.shape, generator=g)                                            # context pass
            m(xc, torch.full((B,), 10.0), ctx, causal=causal, kv_cache=cache, start_frame=s)
            fed[:, :, s:e], t_fed[:, i] = xc, 10.0
    assert (cache.start, cache.end) == (0, Fn)


def test_future_frames_cannot_change_past_outputs():
    m = tiny()
    x, t, ctx = inputs(Fn=5)
    causal = (2, True)                                  # blocks [0] [1,2] [3,4]
    tf = torch.rand(2, 5) * 1000
    x2, tf2 = x.clone(), tf.clone()
    x2[:, :, 3:] += torch.randn_like(x2[:, :, 3:])
    tf2[:, 3:] = 17.0
    with torch.no_grad():
        a, b = m(x, tf, ctx, causal=causal), m(x2, tf2, ctx, causal=causal)
    assert torch.equal(a[:, :, :3], b[:, :, :3])       # bit-identical
    assert not torch.allclose(a[:, :, 3:], b[:, :, 3:])
    # and no gradient from an early block's output into later frames
    xg = x.clone().requires_grad_(True)
    m(xg, tf, ctx, causal=causal)[:, :, :3].square().sum().backward()
    assert xg.grad[:, :, 3:].abs().max() == 0 and xg.grad[:, :, :3].abs().max() > 0


def test_gradient_stays_in_its_block_and_checkpointing_matches():
    m = tiny()
    x, t, ctx = inputs(Fn=4)
    causal = (2, False)
    cache = m.new_kv_cache(2, 4, 6)
    x0 = x[:, :, :2].clone().requires_grad_(True)
    m(x0, t, ctx, causal=causal, kv_cache=cache, start_frame=0)          # written WITH grad: stored detached
    x1 = x[:, :, 2:].clone().requires_grad_(True)
    out = m(x1, t, ctx, causal=causal, kv_cache=cache, start_frame=2)
    m(x1.detach(), torch.zeros(2), ctx, causal=causal, kv_cache=cache, start_frame=2)   # later overwrite: no version error
    out.square().sum().backward()
    assert x0.grad is None and x1.grad.abs().max() > 0
    # gradient checkpointing on the whole-clip causal pass: the same gradients
    tf = torch.rand(2, 4) * 1000
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        m(x, tf, ctx, causal=causal).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    m.gradient_checkpointing = False
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_rolling_window():
    """Window of 4 frames, blocks of 2: the block at frame 4 sees frames 2..5 only. With one layer the k/v of a
    frame depend on that frame alone, so a fresh cache that starts at frame 2 is the reference."""
    m = tiny(num_layers=1)
    x, t, ctx = inputs(Fn=6)
    causal, tpf = (2, False), 6
    roll, full = m.new_kv_cache(2, 4, tpf), m.new_kv_cache(2, 6, tpf)
    with torch.no_grad():
        for s in (0, 2):
            for c in (roll, full):
                m(x[:, :, s:s + 2], t, ctx, causal=causal, kv_cache=c, start_frame=s)
        kept = roll.k[0][:, 2 * tpf:4 * tpf].clone()                  # frames 2,3 before the roll
        out = m(x[:, :, 4:], t, ctx, causal=causal, kv_cache=roll, start_frame=4)
        assert (roll.start, roll.end) == (2, 6)
        assert torch.equal(roll.k[0][:, :2 * tpf], kept)               # shifted to the front, bit-identical
        no_roll = m(x[:, :, 4:], t, ctx, causal=causal, kv_cache=full, start_frame=4)
        ref_cache = m.new_kv_cache(2, 4, tpf)
        ref_cache.start = ref_cache.end = 2
        m(x[:, :, 2:4], t, ctx, causal=causal, kv_cache=ref_cache, start_frame=2)
        ref = m(x[:, :, 4:], t, ctx, causal=causal, kv_cache=ref_cache, start_frame=4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert not torch.allclose(out, no_roll, atol=1e-4)                 # frames 0,1 really left the window
    with pytest.raises(ValueError, match="continue the KV cache"):    # frames 0,1 were rolled out
        m(x[:, :, :2], t, ctx, causal=causal, kv_cache=roll, start_frame=0)
    m.cfg.rope_max_len = 5                                             # RoPE positions run out: clear error
    with pytest.raises(ValueError, match="rope_max_len"):
        m(x[:, :, 4:], t, ctx, causal=causal, kv_cache=roll, start_frame=4)


def test_bad_inputs():
    m = tiny()
    x, t, ctx = inputs(Fn=4)
    cache = m.new_kv_cache(2, 4, 6)
    with pytest.raises(ValueError, match="num_frame_per_block=3"):
        m(x, t, ctx, causal=(3, False))
    with pytest.raises(ValueError, match="exactly one block"):
        m(x, t, ctx, causal=(2, False), kv_cache=cache)
    with pytest.raises(ValueError, match="exactly one block"):
        m(x[:, :, :2], t, ctx, causal=(2, False), kv_cache=cache, start_frame=1)
    with pytest.raises(ValueError, match="continue the KV cache"):    # a gap: block 0 not written yet
        m(x[:, :, :2], t, ctx, causal=(2, False), kv_cache=cache, start_frame=2)
    with pytest.raises(ValueError, match=r"t must have shape \(2,\)"):
        m(x[:, :, :2], torch.rand(2, 2), ctx, causal=(2, False), kv_cache=cache)
    with pytest.raises(ValueError, match="per latent frame"):
        m(x, torch.rand(2, 3), ctx, causal=(2, False))
    with pytest.raises(ValueError, match="one timestep per sample"):  # per-frame t on the bidirectional path
        m(x, torch.rand(2, 4), ctx)
    with pytest.raises(ValueError, match="needs causal"):
        m(x[:, :, :2], t, ctx, kv_cache=cache)
    with pytest.raises(ValueError, match="needs a kv_cache"):
        m(x, t, ctx, causal=(2, False), start_frame=2)
    with pytest.raises(ValueError, match="tokens per frame"):
        m(x[:, :, :2], t, ctx, causal=(2, False), kv_cache=m.new_kv_cache(2, 4, 12))
    with pytest.raises(ValueError, match="dtype"):
        m(x[:, :, :2], t, ctx, causal=(2, False), kv_cache=m.new_kv_cache(2, 4, 6, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="does not fit"):
        m.new_kv_cache(2, 1, 6).write_slots(0, 2)
    m.sp_group = object()
    with pytest.raises(ValueError, match="sequence parallelism"):
        m.check_causal_inputs(x, t, (2, False), None, 0)


def tiny_vae(seed=0):
    cfg = vae_wan.WanVAEConfig(base_dim=8, dim_mult=(1, 1, 1, 1), num_res_blocks=1)
    return randomize_(vae_wan.WanVAE(cfg), std=0.05, seed=seed).eval()


def test_streamed_vae_decode_equals_whole_clip():
    vae = tiny_vae()
    lat = torch.randn(1, 16, 5, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = vae.decode(lat)
        cache = {}
        parts = [vae.decode_stream(lat[:, :, s:e], cache) for s, e in ((0, 1), (1, 3), (3, 5))]
    assert [p.shape[2] for p in parts] == [1, 8, 8]
    torch.testing.assert_close(torch.cat(parts, 2), whole, rtol=0, atol=1e-5)


def test_mp4_writer_streams(tmp_path):
    video = torch.linspace(-1, 1, 9).view(1, 9, 1, 1).expand(3, 9, 16, 16).clone()
    w = media.Mp4Writer(str(tmp_path / "s.mp4"), fps=16)
    w.write(video[:, :1])
    w.write(video[:, 1:5])
    w.write(video[:, 5:])
    frames, fps = media.read_mp4(w.close())
    ref, _ = media.read_mp4(media.write_mp4(str(tmp_path / "w.mp4"), video, 16))
    assert frames.shape == (9, 16, 16, 3) and fps == 16 and (frames == ref).all()
    want = ((video + 1) * 127.5).round().permute(1, 2, 3, 0).numpy()          # independent of the writer's code
    assert abs(frames.astype(float) - want).max() <= 3                         # H.264 crf 17 on flat grey frames


@pytest.fixture
def causal_student(tiny_pipeline, tmp_path):
    """A pipeline folder plus a causal student folder: full random weights and train_dmd's config.json keys."""
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    dit = randomize_(mw.load_dit(tmp_path / "pipe"), seed=3)
    folder = tmp_path / "student"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in mw.to_diffusers_state_dict(dit).items()}, folder / "student.safetensors")
    cfg = {"causal": True, "num_frame_per_block": 2, "independent_first_frame": True, "context_noise": 0,
           "num_training_frames": 3, "dmd_denoising_steps": "1000,600"}
    (folder / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "pipe", folder, dit


def test_causal_sample_streams_and_rolls(causal_student, tmp_path):
    pipe, folder, dit = causal_student
    from safetensors.torch import load_file
    kw = dict(model=str(pipe), ckpt=str(folder), prompt="a red circle moving left", prompts_file="",
              negative_prompt=None, height=32, width=48, num_frames=17, num_inference_steps=3, guidance_scale=1.0,
              flow_shift=None, sampler="unipc", denoising_steps="", seed=7, batch_size=1, save_latents=True,
              fps=16, device="cpu", dtype="float32")
    # 17 frames = 5 latent frames, blocks [0] [1,2] [3,4], window 3: the last block rolls the cache
    (p_stream,) = sample.generate({**kw, "stream": True, "out": str(tmp_path / "a")})
    (p_whole,) = sample.generate({**kw, "stream": False, "out": str(tmp_path / "b")})
    lat = load_file(p_stream.replace(".mp4", ".latents.safetensors"))["latents"]
    assert lat.shape == (1, 16, 5, 4, 6)
    assert torch.equal(lat, load_file(p_whole.replace(".mp4", ".latents.safetensors"))["latents"])
    fs, fw = media.read_mp4(p_stream)[0], media.read_mp4(p_whole)[0]
    assert fs.shape == fw.shape == (17, 32, 48, 3)
    assert abs(fs.astype(float) - fw.astype(float)).mean() < 1.0      # same video up to float error and H.264
    # by hand: the same sampler with steps from config.json, window 3; and the first blocks do not depend on
    # how long the clip is (they are generated before the later ones exist)
    x, gen = flow.initial_noise(1, 17, 32, 48, 7, "cpu")
    ctx = text_encoders.load_text_encoder(pipe).encode(["a red circle moving left"])
    with torch.no_grad():
        cz = dict(num_frame_per_block=2, independent_first_frame=True, context_noise=0.0, window=3)
        ref = sample.sample_student(dit, ctx, x, [1000.0, 600.0], cz, gen)
        _, gen2 = flow.initial_noise(1, 17, 32, 48, 7, "cpu")     # the generator in the same state
        short = sample.sample_student(dit, ctx, x[:, :, :3], [1000.0, 600.0], cz, gen2)
    torch.testing.assert_close(lat, ref, rtol=0, atol=1e-5)
    assert torch.equal(short, ref[:, :, :3])
    with pytest.raises(ValueError, match="num_frames=13"):             # 4 latent frames do not fit [0] + 2-frame blocks
        sample.generate({**kw, "num_frames": 13, "stream": False, "out": str(tmp_path / "c")})
    with pytest.raises(ValueError, match="stream=True needs a causal student"):
        sample.generate({**kw, "ckpt": "", "denoising_steps": "1000", "stream": True, "out": str(tmp_path / "d")})


def test_read_causal_config(tmp_path):
    assert sample.read_causal_config(str(tmp_path)) is None                      # no config.json: bidirectional
    (tmp_path / "config.json").write_text(json.dumps({"causal": False, "num_frame_per_block": 3}))
    assert sample.read_causal_config(str(tmp_path)) is None
    cfg = {"causal": True, "num_frame_per_block": 3, "independent_first_frame": False, "context_noise": 0,
           "num_training_frames": 21, "dmd_denoising_steps": "1000,750,500,250", "warp_denoising_step": True,
           "timestep_shift": 5.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    c = sample.read_causal_config(str(tmp_path / "student.safetensors"))        # a file: its folder's config.json
    steps = [float(1000 * flow.shift_sigmas(torch.tensor(t) / 1000, 5.0)) for t in (1000.0, 750.0, 500.0, 250.0)]
    assert c["dmd_denoising_steps"] == ",".join(map(str, steps)) and c["window"] == 21
    del cfg["context_noise"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="context_noise"):
        sample.read_causal_config(str(tmp_path))


def test_gradient_checkpointing_with_the_cache():
    """A rollout-like sequence (grad forward per block, then a no-grad context pass overwriting that block):
    the same gradients with checkpointing (the recompute re-reads the cache, writes nothing); an error if the
    cache was reset between the forward and backward."""
    m = tiny()
    x, t, ctx = inputs(Fn=6)
    causal = (2, False)
    cache = m.new_kv_cache(2, 6, 6)
    grads = []
    for ckpt in (False, True):
        m.zero_grad()
        m.gradient_checkpointing = ckpt
        cache.reset()
        outs = []
        for s in (0, 2, 4):
            outs.append(m(x[:, :, s:s + 2], t, ctx, causal=causal, kv_cache=cache, start_frame=s))
            with torch.no_grad():
                m(outs[-1], torch.zeros(2), ctx, causal=causal, kv_cache=cache, start_frame=s)
        torch.cat(outs, 2).square().mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    cache.reset()
    out = m(x[:, :, :2], t, ctx, causal=causal, kv_cache=cache)
    cache.reset()
    with pytest.raises(RuntimeError, match="KV cache rolled, was reset"):
        out.sum().backward()
