"""
Video and image datasets for DMD: sources, reading, aspect buckets, a resumable bucket sampler, bad-file handling.

    datasets = [dict(instance_data_dir="clips/", num_frames=81, resolution=480, crop="center"),
                dict(instance_data_dir="stills/", repeats=2),
                dict(dataset_type="prompts", prompts_file="prompts.txt")]
    ds = MediaDataset(datasets, seed=1337)            # probes every file once, prints the bucket table
    loader = Loader(ds, batch_size=2, seed=1337, rank=rank, world_size=world_size, num_workers=4)
    for batch in loader: ...                          # {"video": (B,3,F,H,W) in [-1,1], "caption": [str], ...}
    ckpt["data"] = loader.state_dict()                # exact position: a resume continues with the next batch

Not here yet (issue 5): the latent/text-embedding cache (section 4) and teacher-made data (section 6).
"""
import csv
import json
import math
import os
import random
from collections import Counter, defaultdict

import torch
import torch.nn.functional as F

VIDEO_EXT = {".mp4", ".webm", ".mov", ".mkv"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".webp"}
SIDE_EXT = {".txt", ".jsonl", ".csv"}   # captions and metadata, never samples

# -----------------------------------------------------------------------------
# one dataset dict; unknown keys are errors that name the key
DEFAULTS = dict(
    dataset_type="video",              # "video" (a folder of videos and/or images) or "prompts" (captions only)
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
)
LATER_KEYS = {"cache_dir", "compress_disk_cache", "disable_bucket_pruning", "vae_batch_size", "id"}  # section 4
WAN_AREAS = {480: 480 * 832, 720: 720 * 1280}   # Wan 2.1's 480p and 720p sizes

# -----------------------------------------------------------------------------
# config and geometry

def dataset_config(d):
    unknown = set(d) - set(DEFAULTS) - LATER_KEYS
    if unknown:
        raise ValueError(f"unknown dataset key(s): {sorted(unknown)}")
    c = {**DEFAULTS, **{k: v for k, v in d.items() if k in DEFAULTS}}
    if c["resolution_type"] != "pixel_area":
        raise ValueError(f"resolution_type {c['resolution_type']!r}: only 'pixel_area' is supported")
    if c["crop"] not in (False, "center", "random"):
        raise ValueError(f"crop {c['crop']!r}: False, 'center' or 'random'")
    if c["dataset_type"] not in ("video", "prompts"):
        raise ValueError(f"dataset_type {c['dataset_type']!r}: 'video' or 'prompts'")
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
            found = scan_prompts(c, warn) if c["dataset_type"] == "prompts" else scan_folder(c, warn)
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
    """List of dataset items (one bucket) -> {"video": (B, 3, F, H, W), "caption": [B], "file": [B]}."""
    batch = dict(caption=[x["caption"] for x in items], file=[x["file"] for x in items])
    if "video" in items[0]:
        batch["video"] = torch.stack([x["video"] for x in items])
    return batch

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
