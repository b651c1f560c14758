"""
Video and image datasets for DMD: sources, reading, aspect buckets, a resumable bucket sampler, bad-file handling.

    datasets = [dict(instance_data_dir="clips/", num_frames=81, resolution=480, crop="center"),
                dict(instance_data_dir="stills/", repeats=2),
                dict(dataset_type="prompts", prompts_file="prompts.txt")]
    ds = MediaDataset(datasets, seed=1337)            # probes every file once, prints the bucket table
    loader = Loader(ds, batch_size=2, seed=1337, rank=rank, world_size=world_size, num_workers=4)
    for batch in loader: ...                          # {"video": (B,3,F,H,W) in [-1,1], "caption": [str], ...}
    ckpt["data"] = loader.state_dict()                # exact position: a resume continues with the next batch

Cache (section 4): VAE latents and text embeddings, computed once and read back through the same sampler:

    cached = CachedDataset(ds, vae, text_encoder, rank=rank, world_size=world_size)   # builds what is missing
    loader = Loader(cached, batch_size=2, seed=1337)  # {"latents": (B,16,T,h,w), "context": (B,512,D), "caption"}

    python data.py CONFIG.py                                         # fill the caches of CONFIG's `datasets`
    python data.py CONFIG.py --make_teacher_data=prompts.txt --teacher_out=cache/teacher   # section 6
    python data.py CONFIG.py --make_ode_pairs=prompts.txt --teacher_out=cache/ode    # + trajectories (causal ODE init)
"""
import csv
import hashlib
import json
import math
import os
import random
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F
from tqdm import tqdm

import model_wan as mw

VIDEO_EXT = {".mp4", ".webm", ".mov", ".mkv"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp"}
SIDE_EXT = {".txt", ".jsonl", ".csv"}   # captions and metadata, never samples

# -----------------------------------------------------------------------------
# one dataset dict; unknown keys are errors that name the key
DEFAULTS = dict(
    dataset_type="video",              # "video" (a folder of videos/images), "prompts" (captions only), "latents" (teacher-made)
    instance_data_dir="",              # folder of media; captions from a sidecar .txt or metadata.jsonl/.csv
    prompts_file="",                   # dataset_type "prompts": a text file, one prompt per line
    num_frames=121,                    # rounded down to 4k+1 (Wan's VAE packs 1 + 4k frames)
    frame_interval=1,                  # take every frame_interval-th source frame
    resolution=480,                    # pixel-area bucket: 480 -> 480*832 px, 720 -> 720*1280 px
    resolution_type="pixel_area",      # the only kind supported
    crop=False,                        # False: resize to the bucket; "center"/"random": cover the bucket, then crop
    minimum_image_size=0,              # shorter source side in px under which a file is skipped (0: off)
    repeats=0,                         # every sample is seen 1 + repeats times per epoch
    caption_dropout_probability=0.0,   # caption -> "" (the empty prompt) with this probability
    aspect_bucket_rounding=2,          # decimals of the aspect ratio (W/H) used for bucketing
    delete_problematic_images=False,   # delete media files that fail (never caption files)
    cache_dir="",                      # latents + text embeddings; "" -> <instance_data_dir>/.cache (<prompts_file>.cache)
    compress_disk_cache=False,         # gzip the cache entries (readers detect it, so toggling it keeps the cache)
    vae_batch_size=1,                  # clips per VAE encode call while caching
)
LATER_KEYS = {"disable_bucket_pruning", "id"}   # the seed's: id is a label; pruning is noticed below
WAN_AREAS = {480: 480 * 832, 720: 720 * 1280}   # Wan 2.1's 480p and 720p sizes

# -----------------------------------------------------------------------------
# config and geometry

def dataset_config(d):
    unknown = set(d) - set(DEFAULTS) - LATER_KEYS
    if unknown:
        raise ValueError(f"unknown dataset key(s): {sorted(unknown)}")
    c = {**DEFAULTS, **{k: v for k, v in d.items() if k in DEFAULTS}}
    if d.get("disable_bucket_pruning"):
        print("data: notice: disable_bucket_pruning has no effect here: buckets are never pruned, except that a "
              "bucket with fewer samples than the batch size is skipped (a notice names it)")
    if c["resolution_type"] != "pixel_area":
        raise ValueError(f"resolution_type {c['resolution_type']!r}: only 'pixel_area' is supported")
    if c["crop"] not in (False, "center", "random"):
        raise ValueError(f"crop {c['crop']!r}: False, 'center' or 'random'")
    if c["dataset_type"] not in ("video", "prompts", "latents"):
        raise ValueError(f"dataset_type {c['dataset_type']!r}: 'video', 'prompts' or 'latents' (a teacher-made cache_dir)")
    if c["dataset_type"] == "latents" and not c["cache_dir"]:
        raise ValueError("dataset_type 'latents' needs cache_dir (the folder written by --make_teacher_data)")
    c["cache_dir"] = c["cache_dir"] or (os.path.join(c["instance_data_dir"], ".cache") if c["dataset_type"] == "video"
                                        else c["prompts_file"] + ".cache")
    n = 4 * ((max(int(c["num_frames"]), 1) - 1) // 4) + 1
    if n != c["num_frames"] and c["dataset_type"] == "video":
        print(f"data: num_frames {c['num_frames']} -> {n} (Wan's VAE needs 4k+1 frames)")
    c["num_frames"] = n
    return c


def bucket_area(resolution):
    # Wan's own sizes for 480/720; other values keep 480p's 832/480 shape: area = r^2 * 832/480
    return WAN_AREAS.get(resolution, round(resolution * resolution * 832 / 480))


def bucket_size(h, w, resolution, rounding):
    """Source (h, w) -> bucket (H, W): the rounded aspect ratio at the pixel area of `resolution`, sides multiples of 16."""
    ar = round(w / h, rounding) or 10.0 ** -rounding
    H = math.sqrt(bucket_area(resolution) / ar)
    return max(16, round(H / 16) * 16), max(16, round(H * ar / 16) * 16)


def frame_indices(n_src, num_frames, interval, rng):
    """Which source frames to take: num_frames of them, interval apart, from a random start. None if too short."""
    span = (num_frames - 1) * interval + 1
    if n_src < span:
        return None
    start = rng.randint(0, n_src - span)
    return list(range(start, start + span, interval))

# -----------------------------------------------------------------------------
# decoding (PyAV for videos and images alike: images are 1-frame streams of the image2 demuxers)

class BadFile(Exception):
    pass


def probe(path, is_image):
    """Open a file and decode its first frame -> (h, w, n_frames). Raises BadFile(reason)."""
    import av
    if os.path.getsize(path) == 0:
        raise BadFile("zero-byte file")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise BadFile("no video stream (unsupported)")
            stream = container.streams.video[0]
            first = next(container.decode(stream), None)
            if first is None:
                raise BadFile("no decodable frame (truncated or undecodable)")
            fmt = first.format
            if is_image and max(c.bits for c in fmt.components) > 8:
                # 16-bit stills are usually linear/HDR/scientific data: the tone curve to 8-bit sRGB is a guess
                raise BadFile(f"16-bit image ({fmt.name})")
            if any(c.is_alpha for c in fmt.components):
                # opaque alpha is harmless; real transparency would need a guessed background (black? white?)
                a = first.to_ndarray(format="rgba")[..., 3]
                if a.min() < 255:
                    raise BadFile(f"transparent alpha ({fmt.name})")
            n = 1 if is_image else stream.frames or count_packets(path)   # mkv/webm headers carry no count
            return first.height, first.width, n
    except BadFile:
        raise
    except (av.FFmpegError, OSError, ValueError, StopIteration, IndexError, RuntimeError) as e:
        raise BadFile(f"undecodable ({type(e).__name__}: {e})")


def count_packets(path):
    import av
    with av.open(path) as container:
        return sum(1 for p in container.demux(video=0) if p.size)


def load_frames(path, indices, size, crop, rng):
    """Decode source frames `indices` -> float32 (3, F, H, W) in [-1, 1], RGB, resized (and cropped) to size=(H, W)."""
    import av
    # decodes from the first frame (no seek: exact frame indices without trusting timestamps); fine for clips
    want, out = set(indices), []
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in want:
                # swscale converts any pixel format (yuv 8/10-bit, gray, pal8; opaque alpha dropped) with the
                # frame's own matrix and range tags (BT.601/709, limited/full)
                rgb = torch.from_numpy(frame.to_ndarray(format="rgb24"))          # (h, w, 3) uint8
                out.append(resize_crop(rgb.permute(2, 0, 1)[None].float(), size, crop, rng))  # (1, 3, H, W)
                if len(out) == len(indices):
                    break
    if len(out) < len(indices):
        raise BadFile(f"decoded {len(out)} of {len(indices)} frames (truncated)")
    video = torch.cat(out).permute(1, 0, 2, 3)                                      # (3, F, H, W) in [0, 255]
    return (video / 127.5 - 1).clamp_(-1, 1)


def resize_crop(x, size, crop, rng):
    """x (1, 3, h, w) float -> (1, 3, H, W): plain resize, or cover + center/random crop."""
    H, W = size
    h, w = x.shape[-2:]
    if not crop:
        return F.interpolate(x, size=(H, W), mode="bilinear", antialias=True, align_corners=False)
    s = max(H / h, W / w)
    rh, rw = max(H, round(h * s)), max(W, round(w * s))
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)  # (1, 3, rh, rw)
    if crop == "center":
        top, left = (rh - H) // 2, (rw - W) // 2
    else:   # drawn once per sample (rng is the sample's own), so every frame gets the same crop
        rng.offsets = rng.offsets or (rng.randint(0, rh - H), rng.randint(0, rw - W))
        top, left = rng.offsets
    return x[..., top:top + H, left:left + W]

# -----------------------------------------------------------------------------
# sources: media files with captions, and prompt files

def read_text(path):
    with open(path, "rb") as f:
        try:
            return f.read().decode("utf-8").strip()
        except UnicodeDecodeError:
            raise BadFile(f"caption not UTF-8 ({os.path.basename(path)})")


def metadata_captions(root):
    """metadata.jsonl / metadata.csv in root: columns file (or file_name) and caption (or text) -> {relpath: caption}."""
    caps = {}
    for name in ("metadata.jsonl", "metadata.csv"):
        p = os.path.join(root, name)
        if not os.path.exists(p):
            continue
        with open(p, encoding="utf-8") as f:
            rows = [json.loads(l) for l in f if l.strip()] if name.endswith(".jsonl") else list(csv.DictReader(f))
        for r in rows:
            caps[os.path.normpath(r.get("file", r.get("file_name", "")))] = r.get("caption", r.get("text"))
    return caps


def list_media(root):
    """All files under root (hidden ones skipped), sorted so every rank sees the same order."""
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        out += [os.path.join(d, f) for f in sorted(files) if not f.startswith(".")]
    return out


def scan_folder(c, warn):
    """One 'video' dataset dict -> list of samples {file, caption, bucket=(H, W, F), n_src}."""
    root = c["instance_data_dir"]
    if not os.path.isdir(root):
        raise ValueError(f"instance_data_dir {root!r} is not a folder")
    meta, samples = metadata_captions(root), []
    for path in list_media(root):
        ext = os.path.splitext(path)[1].lower()
        if ext in SIDE_EXT:
            continue
        if ext not in VIDEO_EXT | IMAGE_EXT:
            warn(path, f"unsupported file type {ext or '(none)'}", media=False)
            continue
        try:
            side = os.path.splitext(path)[0] + ".txt"
            caption = read_text(side) if os.path.exists(side) else meta.get(os.path.relpath(path, root))
            if caption is None:
                raise BadFile("missing caption")
        except BadFile as e:
            warn(path, str(e), media=False)   # the media is fine: fix the caption, never delete for it
            continue
        try:
            is_image = ext in IMAGE_EXT
            h, w, n = probe(path, is_image)
            if min(h, w) < c["minimum_image_size"]:
                raise BadFile(f"too small ({w}x{h} < minimum_image_size {c['minimum_image_size']})")
            nf = 1 if is_image else c["num_frames"]
            if n < (nf - 1) * c["frame_interval"] + 1:
                raise BadFile(f"too short ({n} frames < {nf} at interval {c['frame_interval']})")
        except BadFile as e:
            warn(path, str(e), media=True)
            continue
        H, W = bucket_size(h, w, c["resolution"], c["aspect_bucket_rounding"])
        samples.append(dict(file=path, caption=caption, bucket=(H, W, nf), n_src=n))
    return samples


def scan_prompts(c, warn):
    """'prompts' dataset dict -> caption-only samples (bucket (0, 0, 0): no video)."""
    try:
        lines = read_text(c["prompts_file"]).splitlines()
    except (OSError, BadFile) as e:
        warn(c["prompts_file"], str(e), media=False)
        return []
    return [dict(file=None, caption=l.strip(), bucket=(0, 0, 0), n_src=0) for l in lines if l.strip()]

def scan_latents(c, warn):
    """'latents' dataset dict -> the sample entries of its cache_dir (written by make_teacher_data)."""
    if not os.path.isdir(c["cache_dir"]):
        raise ValueError(f"cache_dir {c['cache_dir']!r} is not a folder")
    samples = []
    for name in sorted(os.listdir(c["cache_dir"])):
        path = os.path.join(c["cache_dir"], name)
        if not name.endswith(".safetensors") or name.startswith("text_"):
            continue
        try:
            meta, (_, T, h, w) = entry_meta(path)
        except Exception as e:
            warn(path, f"unreadable cache entry ({e})", media=False)
            continue
        if meta.get("kind") == "sample":
            samples.append(dict(file=path, caption=meta["caption"], bucket=(8 * h, 8 * w, 4 * (T - 1) + 1), n_src=T))
    return samples

# -----------------------------------------------------------------------------
# dataset: index -> sample; every random choice comes from (seed, epoch, index), so workers and resumes agree

class MediaDataset(torch.utils.data.Dataset):

    def __init__(self, datasets, seed=0, verbose=True):
        if isinstance(datasets, dict):
            datasets = [datasets]
        self.seed, self.configs, self.samples = seed, [dataset_config(d) for d in datasets], []
        self.problems = Counter()   # skip reason -> count

        def warn(path, reason, media):   # c: the dataset dict being scanned (the loop below)
            self.problems[reason.split(" (")[0]] += 1
            deleted = ""
            if media and c["delete_problematic_images"] and os.path.exists(path):
                os.remove(path)
                deleted = " (deleted)"
            print(f"data: warning: {path}: {reason}{deleted}")

        for k, c in enumerate(self.configs):
            scan = {"video": scan_folder, "prompts": scan_prompts, "latents": scan_latents}[c["dataset_type"]]
            found = scan(c, warn)
            for s in found:
                s["dataset"] = k
            self.samples += found * (1 + c["repeats"])
        if self.problems:
            print(f"data: skipped {sum(self.problems.values())} file(s): " +
                  ", ".join(f"{n} {r}" for r, n in sorted(self.problems.items())))
        if not self.samples:
            raise ValueError("data: no usable sample in " +
                             ", ".join(c["instance_data_dir"] or c["prompts_file"] for c in self.configs))
        self.buckets = defaultdict(list)   # (H, W, F) -> sample indices
        for i, s in enumerate(self.samples):
            self.buckets[s["bucket"]].append(i)
        if verbose:
            print_buckets(self.buckets)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        """key = (index, epoch) -> {"video": (3, F, H, W) in [-1, 1] (absent for prompts), "caption", "file"}.
        A file that breaks after the probe (damaged mid-stream) is replaced by the next sample of its bucket:
        the batch still needs this shape."""
        i, epoch = key
        b = self.buckets[self.samples[i]["bucket"]]
        start = b.index(i)
        for k in range(len(b)):
            j = b[(start + k) % len(b)]
            try:
                return self.load(j, epoch)
            except Exception as e:
                print(f"data: warning: {self.samples[j]['file']}: {e}; using the next sample of its bucket")
        raise ValueError(f"data: no sample of bucket {self.samples[i]['bucket']} could be read")

    def load(self, i, epoch):
        s, rng = self.samples[i], random.Random(f"{self.seed}-{epoch}-{i}")
        c = self.configs[s["dataset"]]
        caption = "" if rng.random() < c["caption_dropout_probability"] else s["caption"]
        out = dict(caption=caption, file=s["file"])
        if s["file"] is not None:
            H, W, nf = s["bucket"]
            idx = frame_indices(s["n_src"], nf, c["frame_interval"], rng)
            rng.offsets = None   # the random crop, drawn on the first frame
            out["video"] = load_frames(s["file"], idx, (H, W), c["crop"], rng)   # (3, F, H, W)
        return out


def print_buckets(buckets):
    print("data: buckets (H x W x F: samples)")
    for (H, W, nf), idx in sorted(buckets.items()):
        name = "prompts only" if H == 0 else f"{H:5d} x {W:5d} x {nf:3d}"
        print(f"  {name}: {len(idx)}")


def collate(items):
    """List of dataset items (one bucket) -> {"video": (B, 3, F, H, W) | "latents": (B, 16, T, h, w),
    "context": (B, 512, D), "caption": [B], "file": [B]} (the tensors the items have)."""
    batch = dict(caption=[x["caption"] for x in items], file=[x["file"] for x in items])
    for k in ("video", "latents", "context", "trajectory", "trajectory_t"):
        if k in items[0]:
            batch[k] = torch.stack([x[k] for x in items])
    return batch

# -----------------------------------------------------------------------------
# cache (section 4): one safetensors file per sample under its dataset's cache_dir, named by a hash of
# everything that changes its content: the source bytes, the caption, the bucket and reading settings, the
# seed (it picks the clip's start and random crop: one fixed clip per file), and the VAE and text-encoder
# identities. A changed setting names another file (rebuilt); an unchanged one finds its file (reused).
# Stale files are left in place. Entries: {"latents": (16, T, h, w) fp32 normalised, "context": (n, D)
# trimmed to the real tokens} + metadata {kind, caption}; the empty and negative prompts: text_<hash>.

TEXT_LEN = 512   # Wan's text length: contexts are zero-padded to it on load


def digest(*parts):
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def file_digest(path, index=None):
    """sha256 of the file's bytes. `index` ({path: [size, mtime_ns, digest]}, kept in each cache_dir's
    digests.json) skips re-reading a file whose size and modification time are unchanged."""
    st = os.stat(path)
    known = None if index is None else index.get(os.path.abspath(path))
    if known and known[:2] == [st.st_size, st.st_mtime_ns]:
        return known[2]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if index is not None:
        index[os.path.abspath(path)] = [st.st_size, st.st_mtime_ns, h.hexdigest()]
    return h.hexdigest()


def digest_index(cache_dir, index=None):
    """Read (index None) or write (atomically) a cache_dir's digests.json."""
    path = os.path.join(cache_dir, "digests.json")
    if index is None:
        try:
            with open(path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(index, f)
    os.replace(tmp, path)


def identity(net):
    """A short hash naming an encoder: class, config, dtype and a slice of the first, middle and last weights.
    Cheap (no full pass over 11 GB of UMT5), and any other checkpoint differs in practice."""
    m = getattr(net, "model", net)   # TextEncoder wraps transformers' UMT5EncoderModel
    cfg = getattr(m, "cfg", None) or getattr(m, "config", None)
    cfg = {k: v for k, v in cfg.to_dict().items() if k not in ("_name_or_path", "transformers_version")} \
        if hasattr(cfg, "to_dict") else cfg
    h = hashlib.sha256(f"{type(net).__name__} {cfg!r}".encode())
    if isinstance(m, torch.nn.Module):
        sd = list(m.state_dict().values())
        h.update(str(sd[0].dtype).encode())   # a bf16 encoder's outputs differ from an fp32 one's
        for t in sd[:1] + sd[len(sd) // 2: len(sd) // 2 + 1] + sd[-1:]:
            h.update(t.detach().flatten()[:65536].float().cpu().numpy().tobytes())
    else:   # TinyTextEncoder: its settings are its identity
        h.update(repr(sorted(vars(net).items())).encode())
    return h.hexdigest()[:16]


def trim(e):
    """(L, D) embedding -> its real rows (mw.trim_context), fp32 on the CPU, as the cache stores them."""
    return mw.trim_context(e).float().cpu().contiguous()


def pad(e, n=TEXT_LEN):
    return mw.pad_context([e], n)[0]


def write_entry(path, tensors, compress=False, **meta):
    """safetensors (gzip-compressed when `compress`) via a temporary name and a rename: a killed writer
    leaves no half entry under `path`."""
    import gzip
    from safetensors.torch import save
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    raw = save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=meta)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(gzip.compress(raw, compresslevel=3) if compress else raw)
    os.replace(tmp, path)


def read_entry(path):
    """A cache entry, gzip-compressed or not -> (metadata dict, {name: tensor})."""
    import gzip
    from safetensors.torch import load
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":   # gzip magic: compress_disk_cache
        raw = gzip.decompress(raw)
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]).get("__metadata__", {}), load(raw)


def entry_meta(path):
    """Metadata and the latents' shape (or None) without reading the tensors of an uncompressed entry."""
    from safetensors import safe_open
    with open(path, "rb") as f:
        gz = f.read(2) == b"\x1f\x8b"
    if gz:
        meta, t = read_entry(path)
        return meta, tuple(t["latents"].shape) if "latents" in t else None
    with safe_open(path, "pt") as f:
        return f.metadata() or {}, tuple(f.get_slice("latents").get_shape()) if "latents" in f.keys() else None


def entry_ok(path):
    """True for a complete, readable entry; a corrupt or partial one is deleted (and so rebuilt)."""
    if not os.path.exists(path):
        return False
    try:
        if read_entry(path)[0].get("kind") in ("sample", "text"):
            return True
    except Exception:
        pass
    print(f"data: warning: {path}: corrupt or partial cache entry, rebuilding")
    os.remove(path)
    return False


def encode_text(te, prompts):
    return [trim(e) for e in te.encode(prompts)]


class CachedDataset(torch.utils.data.Dataset):
    """A MediaDataset's samples as cached latents + text embeddings, with the same buckets (so the same
    BucketBatchSampler/Loader and resume). Builds missing entries on construction, split across ranks:
    this rank does every world_size-th missing entry; `check` then requires all of them (after a barrier)."""

    def __init__(self, media, vae, text_encoder, rank=0, world_size=1, device="cpu", negative_prompt=None, check=True):
        self.media, self.buckets, self.seed = media, media.buckets, media.seed
        self.vae_id, self.text_id = identity(vae), identity(text_encoder)
        self.broken, self.built, hashes = set(), 0, {}
        self.entries = []
        indexes = {c["cache_dir"]: digest_index(c["cache_dir"]) for c in media.configs if c["dataset_type"] == "video"}
        for s in media.samples:
            c = media.configs[s["dataset"]]
            if c["dataset_type"] == "latents":
                made_by = entry_meta(s["file"])[0].get("text")
                if made_by != self.text_id:   # its context came from another text encoder: not silently mixed
                    raise ValueError(f"{s['file']}: made with text encoder {made_by}, this run's is {self.text_id}")
                self.entries.append(s["file"])
                continue
            if c["dataset_type"] == "video" and s["file"] not in hashes:
                hashes[s["file"]] = file_digest(s["file"], indexes[c["cache_dir"]])
            key = digest(hashes.get(s["file"]), s["caption"], s["bucket"], self.vae_id if s["file"] else None,
                         self.text_id, self.seed if s["file"] else None,
                         *[c[k] for k in ("resolution", "num_frames", "frame_interval", "crop", "aspect_bucket_rounding")])
            self.entries.append(os.path.join(c["cache_dir"], key + ".safetensors"))
        self.hashes = hashes
        for d, index in indexes.items():
            if rank == 0:
                digest_index(d, index)
        self.compress = {c["cache_dir"]: bool(c["compress_disk_cache"]) for c in media.configs}
        self.build(vae, text_encoder, rank, world_size, device)
        texts = {"empty": ""} if negative_prompt is None else {"empty": "", "negative": negative_prompt}
        for name, prompt in texts.items():   # tiny: every rank computes them (same bytes, atomic renames)
            for d in sorted({c["cache_dir"] for c in media.configs}):
                path = os.path.join(d, f"text_{digest(prompt, self.text_id)}.safetensors")
                if not entry_ok(path):
                    write_entry(path, {"context": encode_text(text_encoder, [prompt])[0]}, self.compress.get(d, False),
                                kind="text", prompt=prompt)
            setattr(self, name, self.read(path)["context"])
        if check:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.barrier()
            missing = [p for p in set(self.entries) if not os.path.exists(p)]
            if missing:
                raise RuntimeError(f"data: {len(missing)} cache entries missing (e.g. {missing[0]}); run every rank")

    def build(self, vae, te, rank, world_size, device):
        first = {}   # entry -> its first sample (repeats share an entry); split over all entries: stable across ranks
        for i, p in enumerate(self.entries):
            if self.media.configs[self.media.samples[i]["dataset"]]["dataset_type"] != "latents":
                first.setdefault(p, i)
        todo = [i for i in list(first.values())[rank::world_size] if not entry_ok(self.entries[i])]
        if not todo:
            return
        groups = defaultdict(list)   # bucket -> sample indices: one VAE batch has one shape
        for i in todo:
            groups[self.media.samples[i]["bucket"]].append(i)
        bar = tqdm(total=len(todo), desc=f"cache latents+text (rank {rank})", dynamic_ncols=True)
        for bucket, idx in sorted(groups.items()):
            n = max(1, self.media.configs[self.media.samples[idx[0]]["dataset"]]["vae_batch_size"]) if bucket[0] else 64
            for j in range(0, len(idx), n):
                self.encode(idx[j:j + n], vae, te, device)
                bar.update(len(idx[j:j + n]))
        bar.close()

    @torch.no_grad()
    def encode(self, idx, vae, te, device):
        samples = [self.media.samples[i] for i in idx]
        videos, ok = [], []
        for i, s in zip(idx, samples):
            if s["file"] is None:
                ok.append(i)
                continue
            c = self.media.configs[s["dataset"]]
            rng = random.Random(f"{self.seed}-{self.hashes[s['file']]}")   # the cached clip's start and crop
            rng.offsets = None
            try:
                frames = frame_indices(s["n_src"], s["bucket"][2], c["frame_interval"], rng)
                videos.append(load_frames(s["file"], frames, s["bucket"][:2], c["crop"], rng))   # (3, F, H, W)
                ok.append(i)
            except Exception as e:   # damaged after the probe: left out, its bucket's next sample stands in
                print(f"data: warning: {s['file']}: {e}; not cached")
                self.broken.add(i)
        lat = vae.encode(torch.stack(videos).to(device)).cpu() if videos else None   # (B, 16, T, h, w)
        ctx = encode_text(te, [self.media.samples[i]["caption"] for i in ok])
        k = 0
        for i, e in zip(ok, ctx):
            t = {"context": e}
            if self.media.samples[i]["file"] is not None:
                t["latents"], k = lat[k], k + 1
            cfg = self.media.configs[self.media.samples[i]["dataset"]]
            write_entry(self.entries[i], t, cfg["compress_disk_cache"], kind="sample", caption=self.media.samples[i]["caption"])
            self.built += 1

    @staticmethod
    def read(path):
        return read_entry(path)[1]

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, key):
        """key = (index, epoch) -> {"latents": (16, T, h, w) (absent for prompts), "context": (512, D), "caption",
        "file"}. Caption dropout (drawn as MediaDataset draws it) -> the empty prompt's embedding."""
        i, epoch = key
        if i in self.broken:
            b = self.buckets[self.media.samples[i]["bucket"]]
            ok = [j for j in b[b.index(i):] + b[:b.index(i)] if j not in self.broken]
            if not ok:
                raise ValueError(f"data: no sample of bucket {self.media.samples[i]['bucket']} could be cached")
            i = ok[0]
        s, rng = self.media.samples[i], random.Random(f"{self.seed}-{epoch}-{i}")
        drop = rng.random() < self.media.configs[s["dataset"]]["caption_dropout_probability"]
        t = self.read(self.entries[i])
        out = dict(caption="" if drop else s["caption"], file=s["file"], context=pad(self.empty if drop else t["context"]))
        for k in ("latents", "trajectory", "trajectory_t"):   # trajectories: ODE pairs (make_teacher_data)
            if k in t:
                out[k] = t[k]
        return out

# -----------------------------------------------------------------------------
# sampling: one shape per batch, shuffled by (seed, epoch), sharded by rank, resumable at (epoch, index)

def epoch_batches(buckets, batch_size, seed, epoch, rank, world_size, drop_last=True):
    """-> this rank's list of batches (lists of sample indices) for `epoch`; every rank gets the same count."""
    rng = random.Random(f"{seed}-epoch-{epoch}")
    batches = []
    for key in sorted(buckets):
        idx = list(buckets[key])
        rng.shuffle(idx)
        batches += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)
                    if not drop_last or j + batch_size <= len(idx)]
    rng.shuffle(batches)
    n = len(batches) // world_size   # equal counts keep DDP ranks in step
    return batches[rank::world_size][:n]


class BucketBatchSampler(torch.utils.data.Sampler):
    """Yields one epoch of batches of (index, epoch) keys, starting at (self.epoch, self.index)."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, drop_last=True):
        self.buckets, self.batch_size, self.seed = dataset.buckets, batch_size, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch, self.index = 0, 0
        small = {k: len(v) for k, v in self.buckets.items() if drop_last and len(v) < batch_size}
        if small and rank == 0:
            print(f"data: buckets with fewer than {batch_size} samples are never drawn: {small}")
        if not len(self):
            raise ValueError(f"data: no full batch of {batch_size} in any bucket for {world_size} rank(s)")

    def batches(self, epoch):
        return epoch_batches(self.buckets, self.batch_size, self.seed, epoch, self.rank, self.world_size, self.drop_last)

    def __len__(self):
        return len(self.batches(self.epoch))

    def __iter__(self):
        epoch, start = self.epoch, self.index
        for b in self.batches(epoch)[start:]:
            yield [(i, epoch) for i in b]
        self.epoch, self.index = epoch + 1, 0


class Loader:
    """DataLoader over a BucketBatchSampler, iterated forever (train by steps). The position counts batches
    *consumed*, not batches handed to prefetching workers, so state_dict() is exact for a resume."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=0, drop_last=True):
        self.sampler = BucketBatchSampler(dataset, batch_size, seed, rank, world_size, drop_last)
        self.dl = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                              collate_fn=collate, persistent_workers=num_workers > 0)
        self.epoch, self.index = 0, 0

    def __iter__(self):
        while True:
            self.sampler.epoch, self.sampler.index = self.epoch, self.index
            n = len(self.sampler.batches(self.epoch))
            for batch in self.dl:
                self.index += 1
                if self.index == n:
                    self.epoch, self.index = self.epoch + 1, 0
                yield batch
            if n == 0:
                return

    def state_dict(self):
        return dict(epoch=self.epoch, index=self.index)

    def load_state_dict(self, sd):
        self.epoch, self.index = int(sd["epoch"]), int(sd["index"])

# -----------------------------------------------------------------------------
# encoders, teacher-made data (section 6), and the caching command

def load_models(c, dit=False):
    """train_dmd config -> (teacher DiT or None, VAE, text encoder, device). The tiny teacher is built exactly
    as train_dmd.build_networks builds it (same seed: same tiny VAE, so the same cache identity)."""
    import train_dmd
    dev = torch.device(c["device"] if c["device"] != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if dev.type == "cuda" and c["mixed_precision"] == "bf16" else torch.float32
    src = c["pretrained_model_name_or_path"]
    if src == "tiny" or src.startswith("random:"):
        base, _, _, vae, te = train_dmd.build_networks(c, dev, dtype)
        return (base if dit else None), vae, te, dev
    base = mw.load_dit(src, dtype=dtype, device=dev).requires_grad_(False) if dit else None
    te = train_dmd.text_encoder(src, dtype, dev, base)
    return base, mw.load_vae(src, dtype=torch.float32, device=dev), te, dev


def cache_datasets(c, rank=0, world_size=1):
    """`python data.py CONFIG.py`: build this rank's share of the cache of every dataset in c["datasets"]."""
    if not c["datasets"]:
        raise ValueError("no `datasets` in the config: nothing to cache")
    media = MediaDataset(c["datasets"], seed=c["seed"], verbose=rank == 0)
    _, vae, te, dev = load_models(c)
    neg = mw.WAN_NEGATIVE_PROMPT if c["negative_prompt"] is None else c["negative_prompt"]
    cached = CachedDataset(media, vae, te, rank, world_size, dev, negative_prompt=neg, check=False)
    print(f"data: rank {rank}/{world_size}: {cached.built} entries built, "
          f"{len(set(cached.entries)) - cached.built} already cached or another rank's")
    return cached


def ode_schedule(n, shift, layout, record):
    """The teacher's n-step schedule with the grid point nearest each timestep of `record` (0-1000 scale) moved
    onto it, so the sampler passes exactly through the student's timesteps -> (sigmas (n+1,), timesteps (n,),
    indices of the recorded steps). t = 1000 stays the first grid point (σ0 = 1 − 1e-6: its state is the noise)."""
    import sample
    sigmas, timesteps = sample.flow_schedule(n, shift, layout)
    sig, timesteps = sigmas.double(), timesteps.double()   # float: a snapped step keeps its exact t
    idx = []
    for t in record:
        j = int((sig[:n] - t / 1000).abs().argmin())
        if j in idx or (idx and j < idx[-1]):
            raise ValueError(f"teacher_steps={n} is too coarse to pass through the student's timesteps {record}")
        if j > 0:
            sig[j], timesteps[j] = t / 1000, t
        idx.append(j)
    if not bool((sig[1:] < sig[:-1]).all()):
        raise ValueError(f"teacher_steps={n}: snapping onto {record} breaks the schedule's order; use more steps")
    return sig.float(), timesteps, idx


@torch.no_grad()
def make_teacher_data(c, prompts_file, out_dir, steps=50, guidance=5.0, shift=None, mp4=False, rank=0, world_size=1,
                      ode_pairs=False):
    """Teacher samples (sample.py's UniPC sampler with CFG) of every prompt, written as cache entries
    out_dir/teacher_<i>_<hash>.safetensors {latents (16, T, h, w), context (n, D)} + caption, at the config's
    height x width x num_training_frames, seed c["seed"] + i. Resumable: entries already written are skipped.
    Load the result with dict(dataset_type="latents", cache_dir=out_dir).
    ode_pairs: also the trajectory (the causal student's ODE init, CausVid/Self-Forcing): "trajectory" (K, 16, T,
    h, w), the sampler's state at each of the K student timesteps (train_dmd's rollout steps, warp included;
    the schedule of ode_schedule passes through them: the state is the one the teacher is evaluated at),
    and "trajectory_t" (K,) those timesteps; "latents" stays the final x0."""
    import sample
    import train_dmd
    with open(prompts_file, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    base, vae, te, dev = load_models(c, dit=True)
    src = c["pretrained_model_name_or_path"]
    layout = "diffusers" if src == "tiny" else sample.resolve_model_dir(src)[1]
    if shift is None:
        shift = 3.0 if src == "tiny" else sample.reference_shift(*sample.resolve_model_dir(src))
    H, W, Fn = c["height"], c["width"], 4 * (c["num_training_frames"] - 1) + 1
    text_id, model_id = identity(te), identity(base)
    neg = mw.WAN_NEGATIVE_PROMPT if c["negative_prompt"] is None else c["negative_prompt"]
    neg_ctx = te.encode([neg]).to(dev) if guidance > 1 else None
    bf16 = dev.type == "cuda" and c["mixed_precision"] == "bf16"
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)
    dit = train_dmd.velocity_fn(base, None, autocast)   # None: the teacher's own weights, no adapter
    sigmas, timesteps = sample.flow_schedule(steps, shift, layout)
    record = None
    if ode_pairs:
        record = train_dmd.rollout_steps(train_dmd.check_config(c), c["warp_denoising_step"], c["timestep_shift"])
        sigmas, timesteps, rec_idx = ode_schedule(steps, shift, layout, record)
    todo = [(i, p) for i, p in enumerate(prompts) if i % world_size == rank]
    written = 0
    for i, p in tqdm(todo, desc=f"teacher data (rank {rank})", dynamic_ncols=True):
        key = digest(p, c["seed"] + i, steps, guidance, shift, H, W, Fn, model_id, text_id, neg if guidance > 1 else None,
                     *([record] if record else []))
        path = os.path.join(out_dir, f"{'ode' if record else 'teacher'}_{i:06d}_{key}.safetensors")
        if entry_ok(path):
            continue
        ctx = te.encode([p]).to(dev)
        x, _ = sample.initial_noise(1, Fn, H, W, c["seed"] + i, dev)
        velocity = sample.guided(dit, ctx, neg_ctx, guidance)
        states, ticks = [], [0]
        if record:   # the state at each recorded step is the x the sampler evaluates the teacher at
            def velocity(x_, t_, v=velocity):
                if len(states) < len(record) and ticks[0] == rec_idx[len(states)]:
                    states.append(x_[0].float().cpu())
                ticks[0] += 1
                return v(x_, t_)
        lat = sample.unipc_sample(velocity, x, sigmas.to(dev), timesteps.to(dev))   # (1, 16, T, h, w)
        t = {"latents": lat[0].float(), "context": trim(ctx[0])}
        if record:
            t.update(trajectory=torch.stack(states), trajectory_t=torch.tensor(record, dtype=torch.float32))
        write_entry(path, t, kind="sample", caption=p, text=text_id)
        if mp4:
            sample.write_mp4(path[: -len(".safetensors")] + ".mp4", vae.decode(lat.float())[0])
        written += 1
    print(f"data: teacher {'ODE pairs' if record else 'data'}: {written} written, {len(todo) - written} already there -> {out_dir}")
    return out_dir


if __name__ == "__main__":
    # python data.py CONFIG.py [--key=value ...]: train_dmd.py's config (its `datasets`, teacher, seed);
    # torchrun sets RANK/WORLD_SIZE and each rank caches its share. The flags below are data.py's own.
    import ast
    import sys
    import train_dmd
    from configurator import configure
    own = dict(make_teacher_data="",   # a prompts file: write teacher samples instead of caching `datasets`
               make_ode_pairs="",      # the same, with the trajectories at the student's steps (causal ODE init)
               teacher_out="",         # their cache_dir (default: <prompts file>.teacher)
               teacher_steps=50, teacher_guidance=5.0, teacher_shift=None, teacher_mp4=False)
    rest = []
    for a in sys.argv[1:]:
        k, _, v = a[2:].partition("=")
        if a.startswith("--") and k in own:
            try:
                own[k] = ast.literal_eval(v)
            except (ValueError, SyntaxError):
                own[k] = v
        else:
            rest.append(a)
    c = configure(dict(vars(train_dmd)), train_dmd.__file__, rest, json_map=train_dmd.map_simpletuner)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prompts = own["make_teacher_data"] or own["make_ode_pairs"]
    if prompts:
        make_teacher_data(c, prompts, own["teacher_out"] or prompts + (".ode" if own["make_ode_pairs"] else ".teacher"),
                          own["teacher_steps"], own["teacher_guidance"], own["teacher_shift"], own["teacher_mp4"], rank, world,
                          ode_pairs=bool(own["make_ode_pairs"]))
    else:
        cache_datasets(c, rank, world)
