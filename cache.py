"""
The data cache (data.py section 4): VAE latents and text embeddings computed once per sample and read back
through the same buckets, sampler and resume as the media they come from; the entry format shared with the
teacher-made data (data.make_teacher_data).

    cached = CachedDataset(media_dataset, vae, text_encoder, rank=rank, world_size=world_size)   # builds the missing
    loader = data.Loader(cached, batch_size=2, seed=1337)  # {"latents": (B,16,T,h,w), "context": (B,512,D), "caption"}
"""
import hashlib
import json
import os
import random

from collections import defaultdict

import torch

import progress
import text_encoders
from media import frame_indices, load_frames

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
    """(L, D) embedding -> its real rows (text_encoders.trim_context), fp32 on the CPU, as the cache stores them."""
    return text_encoders.trim_context(e).float().cpu().contiguous()


def pad(e, n=TEXT_LEN):
    return text_encoders.pad_context([e], n)[0]


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


def broken_path(entry):
    """The marker beside an entry whose clip broke after the probe (its text: the reason). The entry's name hashes the
    file's bytes: a repaired file gets another name and is tried again."""
    return entry[: -len(".safetensors")] + ".broken"


def encode_text(te, prompts):
    return [trim(e) for e in te.encode(prompts)]


class CachedDataset(torch.utils.data.Dataset):
    """A MediaDataset's samples as cached latents + text embeddings, with the same buckets (so the same
    BucketBatchSampler/Loader and resume). Builds missing entries on construction, split across ranks:
    this rank does every world_size-th missing entry; `check` then requires all of them (after a barrier)."""

    def __init__(self, media, vae, text_encoder, rank=0, world_size=1, device="cpu", negative_prompt=None, check=True):
        self.media, self.buckets, self.seed = media, media.buckets, media.seed
        self.vae_id, self.text_id = identity(vae), identity(text_encoder)
        self.built, self.skipped, hashes = 0, {}, {}   # skipped: entry -> why its clip could not be cached
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
            missing = [p for p in set(self.entries) if not os.path.exists(p) and not os.path.exists(broken_path(p))]
            if missing:
                raise RuntimeError(f"data: {len(missing)} cache entries missing (e.g. {missing[0]}); run every rank")
        self.skip_broken()

    def skip_broken(self):
        """Samples whose clip broke after the probe (a marker written by the rank that tried to cache it) leave the
        buckets, so the sampler never draws them: one line per file with its reason."""
        bad = set()
        for i, p in enumerate(self.entries):
            if p not in self.skipped and os.path.exists(broken_path(p)):
                with open(broken_path(p)) as f:
                    self.skipped[p] = f.read().strip()
                print(f"data: warning: {self.media.samples[i]['file']}: {self.skipped[p]}; skipped (not cached)")
            if p in self.skipped:
                bad.add(i)
        self.buckets = {k: [i for i in v if i not in bad] for k, v in self.media.buckets.items()}
        self.buckets = {k: v for k, v in self.buckets.items() if v}
        if not self.buckets:
            raise ValueError("data: no sample could be cached (every file is broken)")

    def build(self, vae, te, rank, world_size, device):
        first = {}   # entry -> its first sample (repeats share an entry); split over all entries: stable across ranks
        for i, p in enumerate(self.entries):
            if self.media.configs[self.media.samples[i]["dataset"]]["dataset_type"] != "latents":
                first.setdefault(p, i)
        todo = [i for i in list(first.values())[rank::world_size]
                if not os.path.exists(broken_path(self.entries[i])) and not entry_ok(self.entries[i])]
        if not todo:
            return
        groups = defaultdict(list)   # bucket -> sample indices: one VAE batch has one shape
        for i in todo:
            groups[self.media.samples[i]["bucket"]].append(i)
        bar = progress.bar(total=len(todo), desc=f"cache latents+text (rank {rank})")
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
            except Exception as e:   # damaged after the probe (cut off mid-stream): recorded, never decoded again
                tmp = f"{broken_path(self.entries[i])}.{os.getpid()}.tmp"   # skip_broken reads it (every rank and start)
                with open(tmp, "w") as f:
                    f.write(str(e))
                os.replace(tmp, broken_path(self.entries[i]))
        if not ok:
            return
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
        s, rng = self.media.samples[i], random.Random(f"{self.seed}-{epoch}-{i}")
        drop = rng.random() < self.media.configs[s["dataset"]]["caption_dropout_probability"]
        t = self.read(self.entries[i])
        out = dict(caption="" if drop else s["caption"], file=s["file"], context=pad(self.empty if drop else t["context"]))
        for k in ("latents", "trajectory", "trajectory_t"):   # trajectories: ODE pairs (make_teacher_data)
            if k in t:
                out[k] = t[k]
        return out


def check_folders(datasets):
    """Each dataset's folder (and a latents dataset's cache_dir) is there, before any model loads: one
    FileNotFoundError naming the key, the path and where relative paths start."""
    for d in datasets:
        for key in ("instance_data_dir", "cache_dir") if d.get("dataset_type") == "latents" else ("instance_data_dir",):
            if d.get(key) and not str(d[key]).startswith("hf://") and not os.path.isdir(d[key]):
                raise FileNotFoundError(f"datasets: {key}={d[key]!r} is not a folder (relative paths are from the "
                                        f"working folder {os.getcwd()})")
