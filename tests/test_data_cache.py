"""data.py's cache (latents + text embeddings), teacher-made data and train_dmd.py on a real video folder,
with the tiny VAE and TinyTextEncoder on small clips written here with PyAV."""
import json
import os
import subprocess
import sys

import pytest
import torch

av = pytest.importorskip("av")
import cache  # noqa: E402
import data  # noqa: E402
import train_dmd  # noqa: E402
from test_data import moving_square, write_video  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "tiny.py")


@pytest.fixture(scope="module")
def encoders():
    c = train_dmd.config([TINY])
    _, vae, te = data.load_teacher(c, torch.device("cpu"), torch.float32, dit=False)
    return c, vae, te


def clips(root, n=2, frames=9, hw=(32, 32)):
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        write_video(os.path.join(root, f"c{i}.mp4"), moving_square(frames, *hw), caption=f"a red circle moving left {i}")
    return str(root)


def ds(root, **kw):   # 5 frames at interval 2 = the whole 9-frame clip: no random start
    return dict(dict(instance_data_dir=str(root), resolution=16, num_frames=5, frame_interval=2), **kw)


def cached(d, enc, **kw):
    _, vae, te = enc
    return cache.CachedDataset(data.MediaDataset(d, seed=0, verbose=False), vae, te, **kw)


def test_cache_reuse_invalidation_and_content(tmp_path, encoders):
    root = clips(tmp_path / "v")
    a = cached(ds(root), encoders)
    cache_dir = os.path.join(root, ".cache")
    assert a.built == 2 and len([n for n in os.listdir(cache_dir) if n.endswith(".safetensors")]) == 3   # + the empty prompt
    # the entry == the VAE's latents of the clip (exactly as long as asked) + TinyTextEncoder's embedding
    media = data.MediaDataset(ds(root), seed=0, verbose=False)
    _, vae, te = encoders
    item = a[(0, 0)]
    with torch.no_grad():
        ref = vae.encode(media[(0, 0)]["video"][None])[0]                      # (16, 2, 2, 2)
    assert item["latents"].shape == (16, 2, 2, 2)
    torch.testing.assert_close(item["latents"], ref, rtol=1e-5, atol=1e-5)
    emb = te.encode([item["caption"]])[0]                                      # (512, D), zero after the prompt
    assert item["context"].shape == (512, 32) and torch.equal(item["context"], emb)
    n = len(item["caption"].split()) + 1                                       # words + EOS
    assert item["context"][:n].abs().sum(-1).min() > 0 and item["context"][n:].abs().sum() == 0
    assert cache.CachedDataset.read(a.entries[0])["context"].shape == (n, 32)   # stored trimmed
    # unchanged -> reused; a changed setting -> rebuilt
    assert cached(ds(root), encoders).built == 0
    assert cached(ds(root, num_frames=9, frame_interval=1), encoders).built == 2
    assert cached(ds(root, resolution=32), encoders).built == 2
    assert cached(ds(root, resolution=32), encoders).built == 0
    write_video(os.path.join(root, "c1.mp4"), 255 - moving_square(9, 32, 32), caption="a red circle moving left 1")
    assert cached(ds(root), encoders).built == 1                               # new content -> that file only
    # digests.json: an unchanged file (size, mtime) is not re-read; the recorded digest is used as is
    index = json.load(open(os.path.join(cache_dir, "digests.json")))
    assert len(index) == 2
    index[os.path.abspath(os.path.join(root, "c0.mp4"))][2] = "0" * 64
    json.dump(index, open(os.path.join(cache_dir, "digests.json"), "w"))
    assert cached(ds(root), encoders).built == 1                               # the fake digest -> a new key


def test_compressed_cache(tmp_path, encoders):
    """compress_disk_cache gzips the entries; readers detect it, so toggling the setting keeps the cache."""
    root = clips(tmp_path / "v")
    plain = cached(ds(root), encoders)
    sizes = {e: os.path.getsize(e) for e in plain.entries}
    gz = cached(ds(root, cache_dir=str(tmp_path / "gz"), compress_disk_cache=True), encoders)
    assert gz.built == 2
    for e in gz.entries:
        with open(e, "rb") as f:
            assert f.read(2) == b"\x1f\x8b"
    assert sum(os.path.getsize(e) for e in gz.entries) < sum(sizes.values())
    for i in range(2):
        a, b = plain[(0, i)], gz[(0, i)]
        assert torch.equal(a["latents"], b["latents"]) and torch.equal(a["context"], b["context"])
    assert cached(ds(root, cache_dir=str(tmp_path / "gz"), compress_disk_cache=False), encoders).built == 0


def test_corrupt_entry_rebuilt_and_rank_split(tmp_path, encoders, capsys):
    root = clips(tmp_path / "v", n=3)
    assert cached(ds(root), encoders, rank=0, world_size=2, check=False).built == 2   # entries 0 and 2 of 3
    assert cached(ds(root), encoders, rank=1, world_size=2, check=False).built == 1
    a = cached(ds(root), encoders)
    assert a.built == 0
    good = cache.CachedDataset.read(a.entries[1])["latents"].clone()
    with open(a.entries[1], "r+b") as f:                                       # a partial write
        f.truncate(os.path.getsize(a.entries[1]) // 2)
    b = cached(ds(root), encoders)
    assert b.built == 1 and "corrupt or partial cache entry" in capsys.readouterr().out
    assert torch.equal(b[(1, 0)]["latents"], good)


def cut_off_clip(path, frames=9, hw=(32, 32), keep=5):
    """media.py's mp4 remuxed with the header first (faststart), then cut at the start of packet `keep`: the probe
    passes (the header counts every frame), decoding stops early."""
    import media
    tmp = str(path) + ".tmp.mp4"
    media.write_mp4(tmp, torch.from_numpy(moving_square(frames, *hw)).permute(3, 0, 1, 2) / 127.5 - 1)
    with av.open(tmp) as src, av.open(str(path), "w", options={"movflags": "faststart"}) as dst:
        s = dst.add_stream_from_template(src.streams.video[0])
        for p in src.demux(src.streams.video[0]):
            if p.dts is not None:
                p.stream = s
                dst.mux(p)
    os.remove(tmp)
    with av.open(str(path)) as f:
        cut = [p.pos for p in f.demux(f.streams.video[0]) if p.dts is not None][keep]
    os.truncate(path, cut)
    open(os.path.splitext(str(path))[0] + ".txt", "w").write("a cut off clip")
    assert media.probe(str(path), False)[2] == frames


def test_clip_cut_off_mid_stream_is_skipped_once(tmp_path, encoders, capsys, monkeypatch):
    """A clip broken after the probe: decoded once, recorded with its reason, left out of the sampler's buckets on
    every later start (never counted as cached, never a 'cache entries missing' error); the rest trains."""
    root = clips(tmp_path / "v", n=2)
    cut_off_clip(tmp_path / "v" / "c2.mp4")
    a = cached(ds(root), encoders)
    out = capsys.readouterr().out
    assert a.built == 2 and len(a.skipped) == 1 and out.count("c2.mp4: decoded") == 1 and "(truncated)" in out
    assert sorted(i for b in a.buckets.values() for i in b) == [0, 1]   # the sampler's index: the 2 good clips
    batches = [b["file"] for _, b in zip(range(4), data.Loader(a, batch_size=1, seed=0))]
    assert not any(f[0].endswith("c2.mp4") for f in batches)
    reads = []
    monkeypatch.setattr(cache, "load_frames", lambda *x: reads.append(x))
    b = cached(ds(root), encoders)   # a second start: nothing decoded, the same one line
    assert reads == [] and b.built == 0 and a.skipped == b.skipped and b.buckets == a.buckets
    again = capsys.readouterr().out
    assert again.count("c2.mp4: decoded 3 of 5 frames (truncated); skipped (not cached)") == 1 and again.count("\n") == 1


def test_caption_dropout_gives_empty_prompt(tmp_path, encoders):
    root = clips(tmp_path / "v")
    _, _, te = encoders
    a = cached(ds(root, caption_dropout_probability=1.0), encoders)
    item = a[(0, 3)]
    assert item["caption"] == "" and torch.equal(item["context"], te.encode([""])[0])
    assert item["latents"].shape == (16, 2, 2, 2)
    b = cached(ds(root, caption_dropout_probability=0.5), encoders)             # same draws as MediaDataset
    media = data.MediaDataset(ds(root, caption_dropout_probability=0.5), seed=0, verbose=False)
    assert [b[(i, e)]["caption"] for i in range(2) for e in range(8)] == [media[(i, e)]["caption"] for i in range(2) for e in range(8)]


def test_teacher_data_round_trip(tmp_path, encoders):
    c, vae, te = encoders
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\na cat\n")
    out = str(tmp_path / "teacher")
    c = dict(c, height=32, width=32, num_training_frames=2)
    data.make_teacher_data(c, str(prompts), out, steps=2, guidance=2.0, mp4=True, rank=1, world_size=2)
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) == 1   # rank 1 of 2: prompt 1 only
    data.make_teacher_data(c, str(prompts), out, steps=2, guidance=2.0, mp4=True)
    mtimes = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    data.make_teacher_data(c, str(prompts), out, steps=2, guidance=2.0)            # resumable: nothing rewritten
    assert {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)} == mtimes
    assert len([f for f in mtimes if f.endswith(".mp4")]) == 3
    a = cached(dict(dataset_type="latents", cache_dir=out), encoders)
    assert a.built == 0 and len(a) == 3
    items = [a[(i, 0)] for i in range(3)]
    assert [x["caption"] for x in items] == ["a red circle moving left", "a blue square moving up", "a cat"]
    for x in items:
        assert x["latents"].shape == (16, 2, 4, 4) and torch.isfinite(x["latents"]).all()
        assert torch.equal(x["context"], te.encode([x["caption"]])[0])
    batch = next(iter(data.Loader(a, batch_size=3, seed=0)))
    assert batch["latents"].shape == (3, 16, 2, 4, 4) and batch["context"].shape == (3, 512, 32)


def train(out, cfg, *args):
    cmd = [sys.executable, os.path.join(ROOT, "train_dmd.py"), TINY, str(cfg), f"--output_dir={out}",
           "--validation_step_interval=1000", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout + p.stderr


def final_state(out):
    ck = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and not d.endswith(".tmp"))[-1]
    return torch.load(os.path.join(out, ck, "state.pt"), weights_only=True)


@pytest.mark.slow
def test_train_from_video_folder(tmp_path):
    root = clips(tmp_path / "v", n=3, frames=9, hw=(48, 48))
    cut_off_clip(tmp_path / "v" / "c3.mp4", hw=(48, 48))                           # skipped: the others train
    cfg = tmp_path / "data_cfg.py"
    cfg.write_text(f"datasets = [dict(instance_data_dir={root!r}, resolution=32, num_frames=9)]\n")
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), TINY, str(cfg)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)                  # the caching command
    assert p.returncode == 0 and "3 entries built, 1 skipped (broken), 0 already" in p.stdout, p.stdout + p.stderr
    for mode in ("backward", "data"):
        out = tmp_path / mode
        log = train(out, cfg, "--max_train_steps=3", "--real_data_loss_weight=0.5", f"--rollout_mode={mode}")
        assert "cache latents" not in log and log.count("c3.mp4: decoded") == 1       # reused, nothing computed
        recs = [json.loads(line) for line in open(out / "log.jsonl")]
        assert [r["step"] for r in recs] == [1, 2, 3]
        for r in recs:
            assert all(torch.isfinite(torch.tensor(r[k])) for k in ("dmd_loss", "fake_score_loss", "real_data_loss"))
        assert final_state(out)["data"] == {"epoch": 1, "index": 0}                  # 3 steps x 1 batch = 3 samples
    with pytest.raises(subprocess.CalledProcessError):
        subprocess.run([sys.executable, os.path.join(ROOT, "train_dmd.py"), TINY, "--real_data_loss_weight=1.0",
                        f"--output_dir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, check=True, timeout=120)


@pytest.mark.slow
def test_exact_resume_with_dataset(tmp_path):
    root = clips(tmp_path / "v", n=3, frames=9, hw=(48, 48))
    cfg = tmp_path / "data_cfg.py"
    cfg.write_text(f"datasets = [dict(instance_data_dir={root!r}, resolution=32, num_frames=9, "
                   "caption_dropout_probability=0.3)]\nreal_data_loss_weight = 0.5\nrollout_mode = 'data'\n")
    common = ["--max_train_steps=4", "--checkpoint_step_interval=1", "--generator_update_interval=2"]
    train(tmp_path / "straight", cfg, *common)
    train(tmp_path / "split", cfg, *common, "--max_train_steps=2")
    assert "resumed from" in train(tmp_path / "split", cfg, *common)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["data"] == b["data"] == {"epoch": 1, "index": 1}   # 4 batches (the critic reuses G's), 3 per epoch
    for key in ("generator", "critic", "ema"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key


def test_exact_resume_mid_epoch_with_workers(tmp_path):
    """A resume in the middle of an epoch, with loader workers: bit-identical to the uninterrupted run (the loader's
    iterators draw their seeds from its own generator, never from the global RNG the noise comes from)."""
    root = clips(tmp_path / "v", n=3, frames=9, hw=(48, 48))   # one bucket, 3 batches of 1 per epoch
    d = [dict(instance_data_dir=root, resolution=32, num_frames=9)]

    def run(out, steps):
        c = train_dmd.config([TINY, f"--output_dir={out}", f"--max_train_steps={steps}", "--checkpoint_step_interval=1",
                              "--validation_step_interval=1000", "--validation_diversity_seeds=0",
                              "--real_data_loss_weight=0.5", "--rollout_mode=data", "--dataloader_num_workers=2"])
        return train_dmd.train(dict(c, datasets=d))
    run(tmp_path / "straight", 5)             # 1 batch per step (the critic reuses the generator's): 5 = 1 epoch + 2
    run(tmp_path / "split", 2)                # stopped at batch 2 of epoch 0
    assert final_state(tmp_path / "split")["data"] == {"epoch": 0, "index": 2}
    run(tmp_path / "split", 5)
    a, b = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert a["data"] == b["data"] == {"epoch": 1, "index": 2}
    for key in ("generator", "critic", "ema"):
        for x, y in zip(a[key], b[key]):
            assert torch.equal(x, y), key
