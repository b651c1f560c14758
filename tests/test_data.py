"""data.py on small real files written here with PyAV: frames, interval, resize/crop, buckets, colours,
bad files, sharding, exact resume, prompt-only source, caption dropout."""
import itertools
import json
import os

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
import data  # noqa: E402


def write_video(path, frames, codec="libx264", pix_fmt="yuv420p", fmt=None, caption="a clip"):
    """frames (F, H, W, 3) uint8 RGB -> a file (any codec/pixel format); sidecar caption beside it."""
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=8)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = pix_fmt
        if codec == "libx264":
            s.options = {"crf": "10"}
        for fr in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(fr, format="rgb24" if fr.ndim == 3 and fr.shape[2] == 3 else
                                                       {4: "rgba"}.get(fr.shape[-1], "gray"))))
        c.mux(s.encode())
    if caption is not None:
        open(os.path.splitext(str(path))[0] + ".txt", "w").write(caption)
    return path


def write_image(path, img, pix_fmt="rgb24", caption="a picture", fmt="rgb24"):
    codec = {".png": "png", ".jpg": "mjpeg", ".webp": "libwebp"}[os.path.splitext(str(path))[1]]
    with av.open(str(path), "w", format="image2") as c:
        s = c.add_stream(codec, rate=1)
        s.height, s.width = (img.height, img.width) if isinstance(img, av.VideoFrame) else img.shape[:2]
        s.pix_fmt = pix_fmt
        frame = img if isinstance(img, av.VideoFrame) else av.VideoFrame.from_ndarray(img, format=fmt)
        c.mux(s.encode(frame))
        c.mux(s.encode())
    if caption is not None:
        open(os.path.splitext(str(path))[0] + ".txt", "w").write(caption)
    return path


def solid(h, w, rgb, n=1):
    return np.broadcast_to(np.array(rgb, np.uint8), (n, h, w, 3)).copy()


def moving_square(n, h=32, w=48, step=2, size=8):
    """A white 8x8 square on black, moving `step` px right per frame: frame i has its left edge at step*i."""
    v = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        v[i, 12:12 + size, step * i:step * i + size] = 255
    return v


def square_x(frame):
    """frame (3, H, W) in [-1, 1] -> left edge of the square (column centroid - 3.5)."""
    col = (frame.mean(0) > 0).float().sum(0)   # (W,)
    return float((col * torch.arange(len(col))).sum() / col.sum()) - 3.5


def cfg(root, **kw):
    return dict(dict(instance_data_dir=str(root), resolution=32, num_frames=1), **kw)

# -----------------------------------------------------------------------------

def test_bucket_geometry():
    assert data.bucket_size(480, 832, 480, 2) == (480, 832)        # Wan's 480p
    assert data.bucket_size(720, 1280, 720, 2) == (720, 1280)       # Wan's 720p
    for h, w in [(1080, 1920), (1920, 1080), (500, 500), (300, 1200)]:
        H, W = data.bucket_size(h, w, 480, 2)
        assert H % 16 == 0 and W % 16 == 0
        assert abs(H * W / (480 * 832) - 1) < 0.1 and abs(W / H - w / h) < 0.15
    assert data.dataset_config(dict(num_frames=120))["num_frames"] == 117
    with pytest.raises(ValueError, match="bogus"):
        data.dataset_config(dict(bogus=1))


@pytest.mark.parametrize("codec,pix,ext", [("ffv1", "yuv444p", ".mkv"), ("libx264", "yuv420p", ".mp4")])
def test_frame_count_and_interval(tmp_path, codec, pix, ext):
    write_video(tmp_path / f"sq{ext}", moving_square(20), codec, pix)
    ds = data.MediaDataset(cfg(tmp_path, num_frames=5, frame_interval=3), seed=0)
    assert ds.samples[0]["n_src"] == 20
    starts = set()
    for epoch in range(6):
        v = ds[(0, epoch)]["video"]
        assert v.shape == (3, 5, 32, 48) and v.dtype == torch.float32       # source is already its bucket
        xs = [square_x(v[:, k]) for k in range(5)]
        idx = [x / 2 for x in xs]                                           # 2 px per source frame
        assert all(abs(b - a - 3) < 0.3 for a, b in zip(idx, idx[1:])), idx  # every 3rd frame
        starts.add(round(idx[0]))
        assert 0 <= round(idx[0]) <= 20 - 13
        assert torch.equal(v, ds[(0, epoch)]["video"])                       # same (seed, epoch) -> same frames
    assert len(starts) > 1                                                   # the start moves with the epoch


def test_too_short_video_skipped(tmp_path, capsys):
    write_video(tmp_path / "short.mp4", moving_square(8))
    write_video(tmp_path / "long.mp4", moving_square(20))
    ds = data.MediaDataset(cfg(tmp_path, num_frames=9, frame_interval=2))    # needs 17 frames
    out = capsys.readouterr().out
    assert [os.path.basename(s["file"]) for s in ds.samples] == ["long.mp4"]
    assert "short.mp4: too short" in out and "skipped 1 file(s)" in out


@pytest.mark.parametrize("name,codec,pix", [
    ("h264.mp4", "libx264", "yuv420p"), ("mpeg4.mp4", "mpeg4", "yuv420p"), ("ten.mkv", "ffv1", "yuv420p10le"),
    ("yuv444.mkv", "ffv1", "yuv444p"), ("vp9.webm", "libvpx-vp9", "yuv420p"), ("prores.mov", "prores", "yuv422p10le"),
    ("rgb.png", "png", "rgb24"), ("still.jpg", "mjpeg", "yuvj420p"), ("still.webp", "libwebp", "yuv420p")])
def test_colour_red(tmp_path, name, codec, pix):
    red = solid(32, 48, (255, 0, 0), n=5)
    if name.endswith((".mp4", ".mkv", ".webm", ".mov")):
        write_video(tmp_path / name, red, codec, pix)
    else:
        write_image(tmp_path / name, red[0], pix)
    v = data.MediaDataset(cfg(tmp_path))[(0, 0)]["video"]                    # (3, 1, 32, 48)
    mean = v.mean(dim=(1, 2, 3))
    assert torch.allclose(mean, torch.tensor([1.0, -1.0, -1.0]), atol=0.05), mean


def test_colour_gray_palette_opaque_alpha(tmp_path):
    write_image(tmp_path / "gray.png", np.full((32, 48), 100, np.uint8), "gray", fmt="gray")
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 1], rgba[..., 3] = 255, 255                                   # green, fully opaque alpha: kept
    write_image(tmp_path / "opaque.png", rgba, "rgba", fmt="rgba")
    idx = np.zeros((32, 48), np.uint8)
    pal = np.zeros((256, 4), np.uint8)
    pal[0] = [255, 0, 0, 255]                                                # palette bytes are A, R, G, B: blue
    write_image(tmp_path / "pal.png", av.VideoFrame.from_ndarray((idx, pal), format="pal8"), "pal8")
    ds = data.MediaDataset(cfg(tmp_path))
    got = {os.path.basename(ds[(i, 0)]["file"]): ds[(i, 0)]["video"].mean(dim=(1, 2, 3)) for i in range(len(ds))}
    g = 100 / 127.5 - 1
    assert torch.allclose(got["gray.png"], torch.tensor([g, g, g]), atol=0.02)
    assert torch.allclose(got["opaque.png"], torch.tensor([-1.0, 1.0, -1.0]), atol=0.02)
    assert torch.allclose(got["pal.png"], torch.tensor([-1.0, -1.0, 1.0]), atol=0.02)


def test_resize_crop_and_buckets(tmp_path):
    # three aspect ratios, four stills each; resolution 64 -> area round(64*64*832/480) = 7100 px
    for (h, w) in [(60, 80), (80, 60), (50, 150)]:
        for k in range(4):
            write_image(tmp_path / f"{h}x{w}_{k}.png", solid(h, w, (0, 0, 255))[0])
    for crop in (False, "center", "random"):
        ds = data.MediaDataset(cfg(tmp_path, resolution=64, crop=crop), seed=1)
        assert len(ds.buckets) == 3
        for (H, W, nf), idx in ds.buckets.items():
            assert H % 16 == 0 and W % 16 == 0 and nf == 1 and len(idx) == 4
            assert abs(H * W / 7100 - 1) < 0.25
            assert ds[(idx[0], 0)]["video"].shape == (3, 1, H, W)
        loader = data.Loader(ds, batch_size=2, seed=1)
        batches = list(itertools.islice(loader, 6))
        assert loader.state_dict() == dict(epoch=1, index=0)
        shapes = [b["video"].shape for b in batches]
        assert len(set(shapes)) == 3 and all(s[0] == 2 for s in shapes)     # one shape per batch
        assert sorted(f for b in batches for f in b["file"]) == sorted(s["file"] for s in ds.samples)


def test_crop_content(tmp_path):
    img = np.zeros((64, 192, 3), np.uint8)                                   # red | green | blue, 64 px each
    img[:, :64, 0] = 255
    img[:, 64:128, 1] = 255
    img[:, 128:, 2] = 255
    write_image(tmp_path / "wide.png", img)
    # aspect 3 at area 1775 -> H 24.3 -> 32, W 72.9 -> 80: the bucket is 2.5:1, so cover (32x96) then crop 16 px
    red_width = {}
    for crop in (False, "center", "random"):
        ds = data.MediaDataset(cfg(tmp_path, crop=crop), seed=2)
        assert ds.samples[0]["bucket"] == (32, 80, 1)
        for epoch in range(3):
            v = ds[(0, epoch)]["video"][:, 0]                                # (3, 32, 80)
            assert v.shape == (3, 32, 80)
            assert v[0, :, 0].mean() > 0.9 and v[2, :, -1].mean() > 0.9 and v[1, :, 40].mean() > 0.9
            red_width.setdefault(crop, set()).add(int((v[0, 16] > 0).sum()))
    assert red_width[False] == {27}                                           # 80/3 columns: resized, not cropped
    assert red_width["center"] == {24}                                        # 32 - 8 cropped on the left
    assert all(16 <= w <= 32 for w in red_width["random"]) and len(red_width["random"]) > 1


def test_bad_files(tmp_path, capsys):
    good = write_image(tmp_path / "good.png", solid(32, 48, (0, 255, 0))[0])
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("zero")
    b = open(write_video(tmp_path / "full.mp4", moving_square(9), caption="x"), "rb").read()
    os.remove(tmp_path / "full.mp4"); os.remove(tmp_path / "full.txt")
    (tmp_path / "trunc.mp4").write_bytes(b[: len(b) // 2])
    (tmp_path / "trunc.txt").write_text("trunc")
    (tmp_path / "junk.mkv").write_bytes(b"not a video at all" * 50)
    (tmp_path / "junk.txt").write_text("junk")
    (tmp_path / "anim.gif").write_bytes(b"GIF89a")
    write_video(tmp_path / "short.mkv", moving_square(3), "ffv1", "yuv444p")
    write_image(tmp_path / "tiny.png", solid(8, 8, (9, 9, 9))[0])
    write_image(tmp_path / "deep.png", np.full((32, 48, 3), 30000, np.uint16), "rgb48be", fmt="rgb48le")
    rgba = np.zeros((32, 48, 4), np.uint8)
    rgba[..., 3] = 100
    write_image(tmp_path / "alpha.png", rgba, "rgba", fmt="rgba")
    write_image(tmp_path / "nocap.png", solid(32, 48, (1, 2, 3))[0], caption=None)
    write_image(tmp_path / "latin1.png", solid(32, 48, (1, 2, 3))[0])
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with av.open(str(tmp_path / "audio.mkv"), "w") as c:                    # no video stream
        s = c.add_stream("pcm_s16le", rate=8000)
        f = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        f.sample_rate = 8000
        c.mux(s.encode(f)); c.mux(s.encode())
    (tmp_path / "audio.txt").write_text("audio")
    bad = {"zero.mp4": "zero-byte", "trunc.mp4": "undecodable", "junk.mkv": "undecodable", "anim.gif": "unsupported",
           "short.mkv": "too short", "tiny.png": "too small", "deep.png": "16-bit", "alpha.png": "transparent alpha",
           "nocap.png": "missing caption", "latin1.png": "not UTF-8", "audio.mkv": "no video stream"}

    ds = data.MediaDataset(cfg(tmp_path, num_frames=5, minimum_image_size=16))
    out = capsys.readouterr().out
    assert [s["file"] for s in ds.samples] == [str(good)]
    lines = [l for l in out.splitlines() if "warning:" in l]
    assert len(lines) == len(bad)
    for name, reason in bad.items():
        assert any(name in l and reason in l for l in lines), (name, out)
    assert f"skipped {len(bad)} file(s)" in out
    assert all(os.path.exists(tmp_path / n) for n in bad)                    # left alone by default

    data.MediaDataset(cfg(tmp_path, num_frames=5, minimum_image_size=16, delete_problematic_images=True))
    deleted = {"zero.mp4", "trunc.mp4", "junk.mkv"}                          # damaged files only: a setting's reason
    kept = set(bad) - deleted                                                # (too short, too small), a format or a
                                                                             # caption problem is no damage
    for name in bad:
        assert os.path.exists(tmp_path / name) == (name in kept), name
    assert os.path.exists(good)


def test_no_usable_sample(tmp_path):
    (tmp_path / "zero.mp4").write_bytes(b"")
    (tmp_path / "zero.txt").write_text("zero")
    with pytest.raises(ValueError, match="no usable sample"):
        data.MediaDataset(cfg(tmp_path))


def test_metadata_captions_and_several_datasets(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(); b.mkdir()
    write_image(a / "x.png", solid(32, 48, (0, 0, 0))[0], caption=None)
    write_image(a / "y.png", solid(32, 48, (0, 0, 0))[0], caption="sidecar wins")
    (a / "metadata.jsonl").write_text(json.dumps(dict(file="x.png", caption="from jsonl")) + "\n")
    write_image(b / "z.jpg", solid(48, 32, (0, 0, 0))[0], "yuvj420p", caption=None)
    (b / "metadata.csv").write_text("file,caption\nz.jpg,\"from csv, quoted\"\n")
    ds = data.MediaDataset([cfg(a), cfg(b, repeats=2)])
    caps = sorted(s["caption"] for s in ds.samples)
    assert caps == ["from csv, quoted"] * 3 + ["from jsonl", "sidecar wins"]


def test_rank_sharding(tmp_path):
    for k in range(8):
        write_image(tmp_path / f"{k}.png", solid(32, 48, (k, k, k))[0], caption=f"c{k}")
    write_image(tmp_path / "tall.png", solid(48, 32, (0, 0, 0))[0])          # a second bucket (1 sample)
    ds = data.MediaDataset(cfg(tmp_path), seed=3)
    seen = []
    for rank in range(2):
        loader = data.Loader(ds, batch_size=2, seed=3, rank=rank, world_size=2)
        seen.append([f for b in itertools.islice(loader, 2) for f in b["file"]])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(s["file"] for s in ds.samples if s["bucket"][0] == 32)


def test_exact_resume_with_workers(tmp_path):
    for k in range(6):
        write_image(tmp_path / f"w{k}.png", solid(32, 48, (40 * k, 0, 0))[0], caption=f"wide {k}")
        write_image(tmp_path / f"t{k}.png", solid(48, 32, (0, 40 * k, 0))[0], caption=f"tall {k}")
    ds = data.MediaDataset(cfg(tmp_path, crop="random", caption_dropout_probability=0.3), seed=7)
    a = data.Loader(ds, batch_size=2, seed=7, num_workers=2)                 # 6 batches per epoch
    it = iter(a)
    for _ in range(4):
        next(it)                                                             # workers have prefetched beyond this
    sd = a.state_dict()
    assert sd == dict(epoch=0, index=4)
    rest = [next(it) for _ in range(5)]                                      # crosses into epoch 1
    b = data.Loader(ds, batch_size=2, seed=7, num_workers=0)
    b.load_state_dict(sd)
    again = list(itertools.islice(b, 5))
    for x, y in zip(rest, again):
        assert x["file"] == y["file"] and x["caption"] == y["caption"]
        assert torch.equal(x["video"], y["video"])
    assert b.state_dict() == a.state_dict() == dict(epoch=1, index=3)


def test_prompt_source_and_caption_dropout(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"prompt {k}" for k in range(400)) + "\n\n")
    ds = data.MediaDataset(dict(dataset_type="prompts", prompts_file=str(prompts), caption_dropout_probability=0.25))
    assert len(ds) == 400 and list(ds.buckets) == [(0, 0, 0)]
    loader = data.Loader(ds, batch_size=8, seed=0)
    batches = list(itertools.islice(loader, 50))                             # one epoch
    assert all("video" not in b and len(b["caption"]) == 8 for b in batches)
    caps = [c for b in batches for c in b["caption"]]
    dropped = caps.count("")
    assert 0.18 < dropped / len(caps) < 0.32
    assert sorted(c for c in caps if c) == sorted(set(c for c in caps if c))  # each prompt once per epoch
    again = [c for b in itertools.islice(data.Loader(ds, batch_size=8, seed=0), 50) for c in b["caption"]]
    assert again == caps                                                     # seeded


def test_colour_matrix_tag_honoured(tmp_path):
    # a BT.709-tagged stream: read with the BT.601 matrix, (200, 255, 0) would come back as about (202, 255, 11)
    rgb = solid(32, 48, (200, 255, 0))[0]
    with av.open(str(tmp_path / "bt709.mkv"), "w") as c:
        s = c.add_stream("ffv1", rate=8)
        s.height, s.width, s.pix_fmt = 32, 48, "yuv444p"
        s.codec_context.colorspace = 1                                       # AVCOL_SPC_BT709
        c.mux(s.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv444p",
                                                                                 dst_colorspace="itu709")))
        c.mux(s.encode())
    (tmp_path / "bt709.txt").write_text("bt709")
    v = data.MediaDataset(cfg(tmp_path))[(0, 0)]["video"]
    want = torch.tensor([200, 255, 0]) / 127.5 - 1
    assert torch.allclose(v.mean(dim=(1, 2, 3)), want, atol=2 / 127.5)


def test_damaged_after_probe_falls_back_within_bucket(tmp_path, capsys):
    for k in range(2):
        write_video(tmp_path / f"v{k}.mkv", moving_square(9), "ffv1", "yuv444p", caption=f"v{k}")
    ds = data.MediaDataset(cfg(tmp_path, num_frames=5))
    (tmp_path / "v0.mkv").write_bytes(b"")                                   # broken after the index was built
    item = ds[(0, 0)]
    assert item["file"].endswith("v1.mkv") and item["caption"] == "v1" and item["video"].shape == (3, 5, 32, 48)
    assert "v0.mkv" in capsys.readouterr().out
    (tmp_path / "v1.mkv").write_bytes(b"")
    with pytest.raises(ValueError, match="could be read"):
        ds[(0, 0)]
