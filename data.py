"""
Video and image datasets for DMD: sources, aspect buckets, a resumable bucket sampler, bad-file handling (the
clips are read by media.py); the cache of latents and embeddings (cache.py); the teacher that makes them
(load_teacher) and teacher-made data (section 6: samples and ODE pairs, with flow.py's samplers).

    datasets = [dict(instance_data_dir="clips/", num_frames=81, resolution=480, crop="center"),
                dict(instance_data_dir="stills/", repeats=2),
                dict(dataset_type="prompts", prompts_file="prompts.txt")]
    ds = MediaDataset(datasets, seed=1337)            # probes every file once, prints the bucket table
    loader = Loader(ds, batch_size=2, seed=1337, rank=rank, world_size=world_size, num_workers=4)
    for batch in loader: ...                          # {"video": (B,3,F,H,W) in [-1,1], "caption": [str], ...}
    ckpt["data"] = loader.state_dict()                # exact position: a resume continues with the next batch

Cache (section 4, cache.py): VAE latents and text embeddings, computed once and read back through the same sampler:

    cached = CachedDataset(ds, vae, text_encoder, rank=rank, world_size=world_size)   # builds what is missing
    loader = Loader(cached, batch_size=2, seed=1337)  # {"latents": (B,16,T,h,w), "context": (B,512,D), "caption"}

    python data.py CONFIG.py                                         # fill the caches of CONFIG's `datasets`
    python data.py CONFIG.py --make_teacher_data=prompts.txt --teacher_out=cache/teacher   # section 6
    python data.py CONFIG.py --make_ode_pairs=prompts.txt --teacher_out=cache/ode    # + trajectories (causal ODE init)
    python data.py --help                                            # these commands' flags
"""
import csv
import errno
import json
import math
import os
import time
import random
import sys
import textwrap
from collections import Counter, defaultdict

import torch

import flow
import lora
import media
import quant
from configurator import hub_file
from cache import CachedDataset, check_folders, digest, entry_meta, entry_ok, identity, trim, write_entry
from media import BadFile, frame_indices, load_frames, probe
import model_wan as mw
import progress
import readers
import text_encoders
import vae_wan

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
    minimum_image_size=None,           # a file of fewer than this² source pixels is skipped, with its reason (SimpleTuner's
                                       # meaning under pixel_area); None: resolution // 2 (480: below 320x180); 0: off
    repeats=0,                         # every sample is seen 1 + repeats times per epoch
    caption_dropout_probability=0.0,   # caption -> "" (the empty prompt) with this probability
    aspect_bucket_rounding=2,          # decimals of the aspect ratio (W/H) used for bucketing
    delete_problematic_images=False,   # delete damaged media files (zero bytes, undecodable, truncated); files skipped for
                                       # a setting (too small, too short), their format (16-bit, alpha, no video stream),
                                       # their caption or a bad symlink are never deleted
    cache_dir="",                      # latents + text embeddings; "" -> <instance_data_dir>/.cache (<prompts_file>.cache)
    compress_disk_cache=False,         # gzip the cache entries (readers detect it, so toggling it keeps the cache)
    vae_batch_size=1,                  # clips per VAE encode call while caching
)
LATER_KEYS = {"disable_bucket_pruning", "id"}   # SimpleTuner's dataset keys: id is a label; pruning is noticed below
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
    if c["minimum_image_size"] is None:   # a thumbnail would be upscaled > 2.6x per side into its bucket: never data
        c["minimum_image_size"] = c["resolution"] // 2
    return c


def bucket_area(resolution):
    # Wan's own sizes for 480/720; other values keep 480p's 832/480 shape: area = r^2 * 832/480
    return WAN_AREAS.get(resolution, round(resolution * resolution * 832 / 480))


def bucket_size(h, w, resolution, rounding):
    """Source (h, w) -> bucket (H, W): the rounded aspect ratio at the pixel area of `resolution`, sides multiples of 16."""
    ar = round(w / h, rounding) or 10.0 ** -rounding
    H = math.sqrt(bucket_area(resolution) / ar)
    return max(16, round(H / 16) * 16), max(16, round(H * ar / 16) * 16)



# -----------------------------------------------------------------------------
# sources: media files with captions, and prompt files

def read_caption(path):
    """A sidecar caption file -> its text; not UTF-8: BadFile (the sample is skipped, the reason names the file)."""
    try:
        return readers.read_text(path, "caption").strip()
    except ValueError as e:
        raise BadFile(str(e)) from None


def metadata_captions(root):
    """metadata.jsonl / metadata.csv in root: columns file (or file_name) and caption (or text) -> {relpath: caption}."""
    caps = {}
    for name in ("metadata.jsonl", "metadata.csv"):
        p = os.path.join(root, name)
        if not os.path.exists(p):
            continue
        lines = readers.read_text(p, "dataset metadata").splitlines(keepends=True)
        try:
            rows = [json.loads(l) for l in lines if l.strip()] if name.endswith(".jsonl") else list(csv.DictReader(lines))
        except json.JSONDecodeError as e:
            raise ValueError(f"dataset metadata {p!r}: a line is not JSON ({e.msg})") from None
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
            os.stat(path)
        except OSError as e:   # never deleted: the link is the user's
            warn(path, "a symlink loop" if e.errno == errno.ELOOP else f"a dangling symlink (to {os.readlink(path)!r})"
                 if os.path.islink(path) else f"unreadable ({e.strerror})", media=False)
            continue
        try:
            side = os.path.splitext(path)[0] + ".txt"
            caption = read_caption(side) if os.path.exists(side) else meta.get(os.path.relpath(path, root))
            if caption is None:
                raise BadFile("missing caption")
        except BadFile as e:
            warn(path, str(e), media=False)   # the media is fine: fix the caption, never delete for it
            continue
        try:
            is_image = ext in IMAGE_EXT
            h, w, n = probe(path, is_image)
        except BadFile as e:   # damaged (zero bytes, undecodable, truncated): the only kind ever deleted
            warn(path, str(e), media=any(w in str(e) for w in ("zero-byte", "undecodable", "truncated")))
            continue
        m, nf = c["minimum_image_size"], 1 if is_image else c["num_frames"]
        if h * w < m * m or n < (nf - 1) * c["frame_interval"] + 1:   # a setting's reason, not damage: kept
            warn(path, f"too small ({w}x{h} = {w * h} px < minimum_image_size² = {m}² px; lower minimum_image_size to "
                 "keep it)" if h * w < m * m else f"too short ({n} frames < {nf} at interval {c['frame_interval']})",
                 media=False)
            continue
        H, W = bucket_size(h, w, c["resolution"], c["aspect_bucket_rounding"])
        samples.append(dict(file=path, caption=caption, bucket=(H, W, nf), n_src=n))
    return samples


def scan_prompts(c, warn):
    """'prompts' dataset dict -> caption-only samples (bucket (0, 0, 0): no video)."""
    try:
        lines = readers.read_lines(c["prompts_file"])
    except (OSError, ValueError) as e:
        warn(c["prompts_file"], str(e), media=False)
        return []
    return [dict(file=None, caption=l, bucket=(0, 0, 0), n_src=0) for l in lines]

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
    *consumed*, not batches handed to prefetching workers, so state_dict() is exact for a resume. The DataLoader
    draws its workers' base seed from its own generator, seeded by (seed, epoch): a DataLoader without one draws
    from the global torch RNG whenever an epoch's iterator starts, and a resumed run starts one where the
    uninterrupted run did not (its noise then differs)."""

    def __init__(self, dataset, batch_size, seed=0, rank=0, world_size=1, num_workers=0, drop_last=True):
        self.sampler = BucketBatchSampler(dataset, batch_size, seed, rank, world_size, drop_last)
        self.seed, self.generator = seed, torch.Generator()
        self.dl = torch.utils.data.DataLoader(dataset, batch_sampler=self.sampler, num_workers=num_workers,
                                              collate_fn=collate, persistent_workers=num_workers > 0,
                                              generator=self.generator)
        self.epoch, self.index = 0, 0

    def __iter__(self):
        while True:
            self.sampler.epoch, self.sampler.index = self.epoch, self.index
            self.generator.manual_seed(int(digest(self.seed, self.epoch)[:15], 16))   # the workers' seeds (unused by
            # the data, whose draws come from (seed, epoch, index)), never the global RNG
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

def load_teacher(c, dev, dtype, dit=True, text=True, with_vae=True):
    """The teacher of a train_dmd config -> (its DiT, frozen, or None; its VAE (fp32); its text encoder or None).
    "tiny": a random tiny DiT, VAE and TinyTextEncoder built from c["seed"] (the tests' teacher; the same seed
    gives the same VAE, so the same cache identity); "random:<preset>": real size, random weights, built on the
    device (memory and speed checks); else a teacher folder or hub id. text=False leaves UMT5 unloaded (the
    trainer loads it only to encode its prompts); a demo.py teacher's TinyTextEncoder is made all the same.
    With a separate teacher (teacher_model_name_or_path) this is the student's base, checked against it first."""
    check_teacher_matches(c)   # before any weights load: the real score must read this model's latents and embeddings
    src = c["pretrained_model_name_or_path"]
    if src == "tiny":
        torch.manual_seed(c["seed"])
        base = quantized(mw.WanDiT(mw.PRESETS["tiny"]).to(dev), c, dev)
        vae = vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)).to(dev)
        te = text_encoders.TinyTextEncoder(base.cfg.text_dim)
    elif src.startswith("random:"):   # real architecture, random weights, built on the device
        preset = src.split(":", 1)[1]
        if preset not in mw.PRESETS:
            raise ValueError(f"{src!r}: unknown preset {preset!r}; have {sorted(mw.PRESETS)}")
        torch.manual_seed(c["seed"])
        with torch.device(dev):
            base = quantized(mw.WanDiT(mw.PRESETS[preset]).cast(dtype), c, dev)
            vae = vae_wan.WanVAE(vae_wan.WanVAEConfig())
        te = text_encoders.TinyTextEncoder(base.cfg.text_dim)
    else:
        base = mw.load_dit(src, dtype=dtype, device=dev, quant=quant.resolve(c.get("base_model_precision", "no"), dev),
                           quantize_via=c.get("quantize_via", "accelerator")) if dit else None
        vae = vae_wan.load_vae(src, dtype=torch.float32, device=dev) if with_vae else None
        tiny = os.path.exists(os.path.join(src, text_encoders.TINY_TEXT_MARKER))
        te = text_encoders.text_encoder(src, dtype, dev, base, **text_precision(c, dev)) if text or tiny else None
    if base is not None:
        base.requires_grad_(False).eval()
    return (base if dit else None), vae, te


def real_score_source(c):
    """The real score's model: teacher_model_name_or_path, or the student's base (pretrained_model_name_or_path)."""
    return c.get("teacher_model_name_or_path") or c["pretrained_model_name_or_path"]


def teacher_config(c):
    """The config the real score's model loads with: teacher_model_name_or_path in place of the student's base, its
    8-bit storage teacher_model_precision (empty: base_model_precision) -> c itself when there is no separate teacher."""
    if not c.get("teacher_model_name_or_path"):
        return c
    return dict(c, pretrained_model_name_or_path=c["teacher_model_name_or_path"], teacher_model_name_or_path="",
                base_model_precision=c.get("teacher_model_precision") or c.get("base_model_precision", "no"))


def load_real_score(c, dev, dtype):
    """The separate teacher's DiT (teacher_model_name_or_path: frozen, 8-bit per teacher_config, never given an
    adapter; its VAE and text encoder are not loaded: the student's serve, check_teacher_matches says they agree), or
    None when the real score is the student's base."""
    if not c.get("teacher_model_name_or_path"):
        return None
    check_teacher_matches(c)
    return load_teacher(teacher_config(c), dev, dtype, text=False, with_vae=False)[0]


def conditioning(src):
    """What a teacher must share with the student, from small config files only (no weights are read): the DiT's
    latent channels in and out, text dim and text length, the VAE's latent constants, the text encoder's kind
    -> {name: value} (a value None: not declared, not compared)."""
    if src == "tiny" or src.startswith("random:"):
        cfg = mw.PRESETS.get("tiny" if src == "tiny" else src.split(":", 1)[1])
        if cfg is None:
            return {}   # load_teacher names the unknown preset
        return {"latent channels": (cfg.in_dim, cfg.out_dim), "text dim": cfg.text_dim, "text length": cfg.text_len,
                "VAE": None, "text encoder": f"TinyTextEncoder({cfg.text_dim})"}   # built, not read: VAE from seed
    root = src
    if not os.path.exists(src):
        root = mw.resolve_hub(src, ["model_index.json", "config.json", "*/config.json", text_encoders.TINY_TEXT_MARKER])
    root = os.path.dirname(root) if os.path.isfile(root) else root
    read = lambda *p: readers.read_json(os.path.join(root, *p), "config") if os.path.exists(os.path.join(root, *p)) else {}  # noqa: E731
    dit = read("transformer", "config.json") or read("config.json")
    vae, te = read("vae", "config.json"), read("text_encoder", "config.json")
    vae_keys = ("z_dim", "latents_mean", "latents_std")
    return {"latent channels": (dit.get("in_channels", dit.get("in_dim", 16)), dit.get("out_channels", dit.get("out_dim", 16))),
            "text dim": dit.get("text_dim", 4096), "text length": dit.get("text_len", 512),
            "VAE": tuple(vae.get(k) for k in vae_keys) if vae else None,
            "text encoder": (f"TinyTextEncoder({dit.get('text_dim', 4096)})"
                             if os.path.exists(os.path.join(root, text_encoders.TINY_TEXT_MARKER)) else
                             tuple(te.get(k) for k in ("model_type", "d_model", "vocab_size", "num_layers")) if te else None)}


def check_teacher_matches(c):
    """A separate teacher (teacher_model_name_or_path) must share the student's latent space and text conditioning
    (VAE, text encoder, latent channels, text dim): the student's VAE and prompt embeddings feed it. Checked on the
    config files, before any weights load; a mismatch is one line."""
    t, s = c.get("teacher_model_name_or_path"), c["pretrained_model_name_or_path"]
    if not t:
        return
    mine, theirs = conditioning(s), conditioning(t)
    for k, v in theirs.items():
        if v is not None and mine.get(k) is not None and v != mine[k]:
            raise ValueError(f"teacher_model_name_or_path={t!r}: its {k} {v} differs from the student's base {s!r} "
                             f"({mine[k]}): the real score must read the student's latents and prompt embeddings; use a "
                             "teacher of the same family (Wan 2.1 T2V 14B for the 1.3B), or leave the key empty")


def quantized(base, c, dev):
    """A teacher built in memory ("tiny", "random:<preset>") with base_model_precision applied (lora.quantize_base)."""
    kind = quant.resolve(c.get("base_model_precision", "no"), dev)
    if kind != "no":
        lora.quantize_base(base, kind)
    return base


def full_precision_base(c, dtype):
    """The teacher's base weights at full precision (native keys, on the CPU, FP32_MODULES in fp32): what the
    export of a student trained on an 8-bit base merges its adapter into (lora.merged_state_dict)."""
    src = c["pretrained_model_name_or_path"]
    if src == "tiny" or src.startswith("random:"):   # rebuilt from the seed as load_teacher built it
        base = load_teacher(dict(c, base_model_precision="no"), "cpu", dtype, text=False)[0]
        return base.state_dict()
    return mw.read_state_dict(mw.find_dit_files(src)[0], dtype)


def text_precision(c, dev):
    """The text encoder's 8-bit settings of a config -> keywords of text_encoders.load_text_encoder."""
    return dict(quant=quant.resolve(c.get("text_encoder_1_precision", "no"), dev, "text_encoder_1_precision"),
                quantize_via=c.get("quantize_via", "accelerator"))


def read_prompts(c):
    """A train_dmd config's prompts -> (training prompts, validation prompts); no training prompts with `datasets`
    (the cached captions are the contexts)."""
    val = [c["validation_prompt"]]
    if c["validation_prompt_library"]:
        lib = readers.read_json(c["validation_prompt_library"], "validation_prompt_library")
        val += list(lib.values()) if isinstance(lib, dict) else list(lib)
    if c["datasets"]:
        return [], val
    return (readers.read_lines(hub_file(c["prompts_file"])) if c["prompts_file"] else val), val


def encode_prompts(c, te, prompts, dev, dtype):
    """The trainer's prompts encoded once (te None: UMT5 of the teacher, loaded here and freed after) -> list of
    trimmed (n_i, D) CPU tensors."""
    if te is None:
        te = text_encoders.load_text_encoder(c["pretrained_model_name_or_path"], dtype=dtype, device=dev, **text_precision(c, dev))
    out = []
    for i in range(0, len(prompts), 16):
        emb = te.encode(prompts[i:i + 16]).cpu()
        out += [text_encoders.trim_context(e).clone() for e in emb]
    return out


def training_inputs(c, prompts, te, vae, env, dev, dtype):
    """The trainer's inputs: with `datasets`, cached latents + caption embeddings (built here on first use) read in
    bucket batches, one shard per data-parallel group (the ranks of a sequence-parallel group read the same batches);
    the prompts (read_prompts) and the negative prompt embedded once (te None: UMT5, loaded and freed here)
    -> (loader or None, training embeddings, validation prompts, their embeddings, [the negative prompt's])."""
    train_prompts, val_prompts = prompts
    loader = None
    if c["datasets"]:
        te = te or text_encoders.load_text_encoder(c["pretrained_model_name_or_path"], dtype=dtype, device=dev,
                                                   **text_precision(c, dev))
        cached = CachedDataset(MediaDataset(c["datasets"], seed=c["seed"]), vae, te, rank=env.rank,
                               world_size=env.world, device=dev)
        loader = Loader(cached, c["train_batch_size"], seed=c["seed"], rank=env.dp_rank, world_size=env.dp_size,
                        num_workers=c["dataloader_num_workers"])
    neg = text_encoders.negative_prompt(c["negative_prompt"])
    embeds = encode_prompts(c, te, train_prompts + val_prompts + [neg], dev, dtype)
    n = len(train_prompts)
    return loader, embeds[:n], val_prompts, embeds[n:-1], embeds[-1:]


def teacher_anchor(c, rank=0, world_size=1):
    """train_dmd's teacher_data_samples > 0: the teacher's own samples (DMD1's regression anchor, docs/method.md#the-regression-term) feed the
    real-data term, and with ode_regression_weight > 0 they are ODE pairs (their trajectories at the student's steps)
    for the regression term. Made once: every training prompt x teacher_data_samples seeds, flow UniPC
    teacher_data_steps steps at the real score's guidance (standard CFG real_score_guidance_scale + 1, only at t <=
    real_score_guidance_max_timestep), written by make_teacher_data into output_dir/teacher_data (teacher_ode for
    pairs; this rank's share; resumable, reused by a rerun) -> the `datasets` entry that reads them (every rank must
    have finished its share before they are read)."""
    prompts = read_prompts(dict(c, datasets=[]))[0] * c["teacher_data_samples"]   # line i has seed c["seed"] + i
    pairs = c["ode_regression_weight"] > 0
    out = os.path.join(c["output_dir"], "teacher_ode" if pairs else "teacher_data")
    make_teacher_data(c, prompts, out, c["teacher_data_steps"], c["real_score_guidance_scale"] + 1, rank=rank,
                      world_size=world_size, ode_pairs=pairs, guidance_max_t=c["real_score_guidance_max_timestep"])
    return dict(dataset_type="latents", cache_dir=out)


def cache_datasets(c, rank=0, world_size=1):
    """`python data.py CONFIG.py`: build this rank's share of the cache of every dataset in c["datasets"]."""
    if not c["datasets"]:
        raise ValueError("no `datasets` in the config: nothing to cache")
    media_ds = MediaDataset(c["datasets"], seed=c["seed"], verbose=rank == 0)
    dev = mw.pick_device(c["device"])
    _, vae, te = load_teacher(c, dev, mw.pick_dtype(c["mixed_precision"], dev), dit=False)
    neg = text_encoders.negative_prompt(c["negative_prompt"])
    cached = CachedDataset(media_ds, vae, te, rank, world_size, dev, negative_prompt=neg, check=False)
    print(f"data: rank {rank}/{world_size}: {cached.built} entries built, {len(cached.skipped)} skipped (broken), "
          f"{len(set(cached.entries)) - cached.built - len(cached.skipped)} already cached or another rank's")
    return cached


def ode_schedule(n, shift, layout, record):
    """The teacher's n-step schedule with the grid point nearest each timestep of `record` (0-1000 scale) moved
    onto it, so the sampler passes exactly through the student's timesteps -> (sigmas (n+1,), timesteps (n,),
    indices of the recorded steps). t = 1000 stays the first grid point (σ0 = 1 − 1e-6: its state is the noise)."""
    sigmas, timesteps = flow.flow_schedule(n, shift, layout)
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
                      ode_pairs=False, guidance_max_t=1000.0):
    """Teacher samples (sample.py's UniPC sampler with CFG; the real score's model: teacher_model_name_or_path when
    set) of every prompt, written as cache entries
    out_dir/teacher_<i>_<hash>.safetensors {latents (16, T, h, w), context (n, D)} + caption, at the config's
    height x width x num_training_frames, seed c["seed"] + i. Resumable: entries already written are skipped.
    Load the result with dict(dataset_type="latents", cache_dir=out_dir).
    ode_pairs: also the trajectory (the causal student's ODE init, CausVid/Self-Forcing): "trajectory" (K, 16, T,
    h, w), the sampler's state at each of the K student timesteps (flow.rollout_steps, as train_dmd rolls out: warp
    included; the schedule of ode_schedule passes through them: the state is the one the teacher is evaluated at),
    and "trajectory_t" (K,) those timesteps; "latents" stays the final x0. guidance_max_t < 1000: CFG only at t <=
    it (flow.guided), as DMD's real score with real_score_guidance_max_timestep."""
    if isinstance(prompts_file, (list, tuple)):   # the prompts themselves (teacher_anchor)
        prompts = list(prompts_file)
    else:
        prompts = readers.read_lines(prompts_file)
    dev = mw.pick_device(c["device"])
    dtype = mw.pick_dtype(c["mixed_precision"], dev)
    real = load_real_score(c, dev, dtype)   # a separate teacher: its DiT with the student's VAE and text encoder
    base, vae, te = load_teacher(c, dev, dtype, dit=real is None)
    base, src = (base if real is None else real), real_score_source(c)
    layout, ref_shift = flow.teacher_layout_shift(src)
    shift = ref_shift if shift is None else shift
    H, W, Fn = c["height"], c["width"], 4 * (c["num_training_frames"] - 1) + 1
    text_id, model_id = identity(te), identity(base)
    neg = text_encoders.negative_prompt(c["negative_prompt"])
    neg_ctx = te.encode([neg]).to(dev) if guidance > 1 else None
    autocast = mw.autocast_fn(dtype, dev)

    def dit(x, t, ctx):   # the teacher's own weights in fp32 out
        with autocast():
            return base(x, t, ctx).float()
    sigmas, timesteps = flow.flow_schedule(steps, shift, layout)
    record = None
    if ode_pairs:   # the student's steps as train_dmd rolls out (warp included)
        record = flow.rollout_steps(flow.parse_steps(c["dmd_denoising_steps"]), c["warp_denoising_step"], c["timestep_shift"])
        sigmas, timesteps, rec_idx = ode_schedule(steps, shift, layout, record)
    todo = [(i, p) for i, p in enumerate(prompts) if i % world_size == rank]
    written, t0 = 0, time.perf_counter()
    for i, p in progress.bar(todo, desc=f"teacher data (rank {rank})"):
        key = digest(p, c["seed"] + i, steps, guidance, shift, H, W, Fn, model_id, text_id, neg if guidance > 1 else None,
                     *([record] if record else []), *([guidance_max_t] if guidance_max_t < 1000 else []))
        path = os.path.join(out_dir, f"{'ode' if record else 'teacher'}_{i:06d}_{key}.safetensors")
        if entry_ok(path):
            continue
        ctx = te.encode([p]).to(dev)
        x, _ = flow.initial_noise(1, Fn, H, W, c["seed"] + i, dev)
        velocity = flow.guided(dit, ctx, neg_ctx, guidance, guidance_max_t)
        states, ticks = [], [0]
        if record:   # the state at each recorded step is the x the sampler evaluates the teacher at
            def velocity(x_, t_, v=velocity):
                if len(states) < len(record) and ticks[0] == rec_idx[len(states)]:
                    states.append(x_[0].float().cpu())
                ticks[0] += 1
                return v(x_, t_)
        lat = flow.unipc_sample(velocity, x, sigmas.to(dev), timesteps.to(dev))   # (1, 16, T, h, w)
        t = {"latents": lat[0].float(), "context": trim(ctx[0])}
        if record:
            t.update(trajectory=torch.stack(states), trajectory_t=torch.tensor(record, dtype=torch.float32))
        write_entry(path, t, kind="sample", caption=p, text=text_id)
        if mp4:
            media.write_mp4(path[: -len(".safetensors")] + ".mp4", vae.decode(lat.float())[0])
        written += 1
    print(f"data: teacher {'ODE pairs' if record else 'data'}: {written} written, {len(todo) - written} already there -> "
          f"{out_dir} [{time.perf_counter() - t0:.0f}s]")
    return out_dir


if __name__ == "__main__":
    # python data.py CONFIG.py [--key=value ...]: train_dmd.py's config (its `datasets`, teacher, seed), read from
    # train_dmd.py's defaults block without importing the trainer; torchrun sets RANK/WORLD_SIZE and each rank caches
    # its share. The commands below are data.py's own (python data.py --help lists them).
    from configurator import configure, fail, script_defaults
    import simpletuner
    if {"-h", "--help"} & set(sys.argv[1:]):   # first the keys of a dataset dict, as DEFAULTS above lists them
        keys = open(__file__).read().split("\nDEFAULTS = dict(\n", 1)[1].split("\n)\n", 1)[0]
        print("a dataset dict's keys (train_dmd.py's `datasets = [dict(...), ...]`):\n" + textwrap.dedent(keys) + "\n")
    commands = dict(make_teacher_data="",   # a prompts file (or hf://datasets/...): write teacher samples instead of caching `datasets`
                    make_ode_pairs="",      # the same, with the trajectories at the student's steps (causal ODE init)
                    teacher_out="",         # their cache_dir (default: <prompts file>.teacher or .ode, in the working folder for hf://)
                    teacher_steps=50,       # UniPC steps of the teacher's sampler
                    teacher_guidance=5.0,   # the teacher's CFG scale, standard form: uncond + g*(cond - uncond)
                    teacher_shift=None,     # flow shift of its schedule; None: the teacher's own (scheduler config)
                    teacher_guidance_max_timestep=1000.0,   # CFG only at t <= this (0-1000), conditional above: the
                                                            # config's real_score_guidance_max_timestep for DMD's pairs
                    teacher_mp4=False)      # also decode each sample to an mp4 beside it (to look at them)
    trainer = os.path.join(os.path.dirname(os.path.abspath(__file__)), "train_dmd.py")
    defaults = script_defaults(trainer)
    c = configure(dict(defaults), trainer, json_map=lambda p: simpletuner.read_config(p, defaults),
                  commands=(__file__, "commands"))
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    prompts = c["make_teacher_data"] or c["make_ode_pairs"]
    try:   # the inputs first: a mistake is one line (exit status 2), before any model loads or a folder is made
        if c["make_teacher_data"] and c["make_ode_pairs"]:
            raise ValueError("--make_teacher_data and --make_ode_pairs: give one of them (one kind of teacher data per "
                             "command)")
        for key in ("pretrained_model_name_or_path", "teacher_model_name_or_path"):
            if c.get(key):
                mw.check_source(c[key], key)
        check_folders(c["datasets"])
        if prompts:
            readers.read_lines(hub_file(prompts))
            out = c["teacher_out"] or (os.path.basename(prompts) if prompts.startswith("hf://") else prompts) + (
                ".ode" if c["make_ode_pairs"] else ".teacher")   # hf://: here, not in the hub cache
            try:
                os.makedirs(out, exist_ok=True)
            except OSError as e:
                raise ValueError(f"teacher_out {out!r}: cannot be made ({e.strerror}): give a writable folder") from None
        elif not c["datasets"]:
            raise ValueError("the config has no `datasets`: nothing to cache (python data.py CONFIG.py caches a "
                             "config's datasets; --make_teacher_data=PROMPTS.txt writes teacher samples; --help)")
    except (FileNotFoundError, ValueError) as e:
        fail("data.py", str(e))
    if prompts:
        make_teacher_data(c, hub_file(prompts), out, c["teacher_steps"], c["teacher_guidance"], c["teacher_shift"],
                          c["teacher_mp4"], rank, world, ode_pairs=bool(c["make_ode_pairs"]),
                          guidance_max_t=c["teacher_guidance_max_timestep"])
    else:
        cache_datasets(c, rank, world)
