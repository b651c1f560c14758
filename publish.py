"""
Everything a train_dmd.py run writes for people and other programs: its log (log.jsonl, wandb, the terminal line),
its exported student (export), the hub upload (the final student, and each
checkpoint as it is written, from a background thread, resumable), the model card, webhooks (Discord-style or raw
JSON, background thread, bounded queue) and the run's artefacts (env.json, loss_curve.png, a contact sheet per
validation step, preview.gif, drawn by media.py: no PIL or matplotlib at run time).

  python publish.py OUTPUT_DIR --dry_run     # build OUTPUT_DIR/.hub_staging/final (the exact upload) and list it
  python publish.py OUTPUT_DIR               # push a finished run (e.g. one trained offline) to its hub_model_id
  python publish.py OUTPUT_DIR --hub_model_id=me/name --model_card_private=True   # the publishing keys given here

train_dmd.train makes one `Publisher` per run; on ranks other than 0 every method is a no-op. Nothing here
raises into training once it has started: a failing hub or webhook endpoint costs one warning, not the run.
"""
import base64
import glob
import json
import os
import platform
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid

import numpy as np
from tqdm import tqdm

import data
import flow
import lora
import media
import model_wan as mw
import readers
import run_dir
import sample
import text_encoders
import vae_wan
from card import duration, model_card, run_name
from configurator import redact


def read_log(out_dir, say=lambda *a: None):
    """log.jsonl's records; a partial line (a kill or a full disk mid-write) is left out (said by open_log)."""
    return run_dir.read_jsonl(os.path.join(out_dir, "log.jsonl"), say)


# panels of loss_curve.png, left to right then top to bottom: (title, [(label, log.jsonl key), ...]); the last two
# are the validations' collapse signal (validation.py), one marked point per validation
PANELS = [("dmd loss", [("dmd", "dmd_loss"), ("ode", "ode_loss"), ("+ ode regression", "ode_regression_loss"),
                        ("+ real data", "real_data_loss")]), ("fake score loss", [("critic", "fake_score_loss")]),
          ("|g|", [("|g|", "g_abs")]), ("grad norm", [("G generator", "g_grad_norm"), ("F critic", "f_grad_norm")]),
          ("val diversity / teacher", [("mean", "diversity_ratio"), ("worst", "diversity_ratio_min")]),
          ("val diversity", [("student", "diversity"), ("teacher", "teacher_diversity")])]


def loss_curve(records):
    """log.jsonl records -> uint8 image of the PANELS in a 2x3 grid, each with its legend (the first panel holds the
    DMD loss and its added terms, or the ODE-init regression loss of objective="ode_init"). A record's generator
    statistics are placed at the step they come from (gen_step), drawn once each."""
    panels = []
    for i, (title, keys) in enumerate(PANELS):
        series = []
        for label, k in keys:
            at = {r.get("gen_step", r["step"]) if k in GENERATOR_KEYS else r["step"]: float(r[k])
                  for r in records if r.get(k) is not None}
            series.append((label, sorted(at), [at[x] for x in sorted(at)]))
        panels.append(media.line_plot(title, series, markers=i >= 4))
    return np.concatenate([np.concatenate(panels[:3], 1), np.concatenate(panels[3:], 1)], 0)


GENERATOR_KEYS = ("dmd_loss", "ode_loss", "ode_regression_loss", "real_data_loss", "g_abs", "g_grad_norm")   # at gen_step


def videos_of(folder):
    """The validation mp4s of one step folder -> (sorted paths, uint8 (F,H,W,3) videos)."""
    paths = sorted(glob.glob(os.path.join(folder, "*.mp4")))
    return paths, [media.read_mp4(p)[0] for p in paths]


def sheet_labels(paths):
    """Validation mp4 names (validation.py: NN_<weights>_<prompt slug>.mp4) -> contact-sheet row labels
    "<weights>: <prompt>", e.g. "ema: a cat walks on the grass"."""
    parts = [os.path.basename(p)[:-len(".mp4")].split("_", 2) for p in paths]
    return [f"{p[1]}: {p[2].replace('_', ' ')}" if len(p) == 3 else " ".join(p) for p in parts]


def preview(videos, max_width=640, max_frames=48):
    """Validation videos side by side (at most 4) -> uint8 (F,H,W,3) frames for preview.gif."""
    videos = videos[:4]
    vs = [media.shrink(v, max(16, max_width // len(videos)), max_frames) for v in videos]
    n = min(len(v) for v in vs)
    h = min(v.shape[1] for v in vs)
    return np.concatenate([v[:n, :h] for v in vs], axis=2)

# -----------------------------------------------------------------------------
# the run's student: the exported files at its end (validation samples: validation.py)

def export(c, gen, g_adapter, ema, step):
    """The student (EMA weights when used) as (a) student[_ema].safetensors — the LoRA adapter in diffusers/PEFT
    keys, or full weights; its metadata names the trainer `step` (the model card reads it) — and (b) merged full
    weights in diffusers transformer/ layout with config.json. Rank 0 writes (train_dmd gathers FSDP's sharded
    weights into a CPU copy there first, every rank taking part)."""
    name = "student_ema.safetensors" if ema is not None else "student.safetensors"
    path, meta = os.path.join(c["output_dir"], name), {"format": "pt", "step": str(step)}
    if g_adapter is not None:   # the teacher base stays untouched: the merge is computed into a copy
        readers.write_safetensors(mw.adapter_state_dict(gen, g_adapter), path, meta)
        dt = gen.blocks[0].self_attn.q.compute_dtype   # an 8-bit base: merged into the full-precision teacher weights
        full = data.full_precision_base(c, dt) if lora.base_precision(gen) != "no" else None
        merged = lora.merged_state_dict(gen, g_adapter, full)
    else:
        readers.write_safetensors(mw.to_diffusers_state_dict(gen), path, meta)
        merged = None
    mw.save_dit(gen, os.path.join(c["output_dir"], "transformer"), layout="diffusers", state_dict=merged)
    if c.get("pretrained_model_name_or_path") == "tiny":   # a caller may pass only the keys export reads
        write_tiny_teacher(c)
    print(f"exported {path} and {os.path.join(c['output_dir'], 'transformer')}/ (step {step})")


def write_tiny_teacher(c):
    """The "tiny" teacher exists only in memory, built from the run's seed: written beside its student as a teacher
    folder (OUTPUT_DIR/tiny_teacher: DiT, VAE, the TinyTextEncoder marker; about 1 MB), so that the run folder
    samples on its own (sample.py --ckpt=OUTPUT_DIR). A real teacher (hub id or folder) is never copied."""
    import torch
    folder = os.path.join(c["output_dir"], sample.TINY_TEACHER)
    with torch.random.fork_rng(devices=[]):   # the build seeds torch: the caller's random stream stays as it was
        base, vae, _ = data.load_teacher(dict(c, base_model_precision="no"), torch.device("cpu"), torch.float32,
                                         text=False)
    mw.save_dit(base, os.path.join(folder, "transformer"), layout="diffusers")
    vae_wan.save_vae(vae, os.path.join(folder, "vae"))
    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    shift = flow.teacher_layout_shift("tiny")[1]
    for name, text in (("model_index.json", json.dumps({"_class_name": "WanPipeline (train_dmd.py tiny teacher)"})),
                       (os.path.join("scheduler", "scheduler_config.json"), json.dumps({"flow_shift": shift})),
                       (text_encoders.TINY_TEXT_MARKER, "prompts are embedded by text_encoders.TinyTextEncoder\n")):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)


def exported_step(out):
    """The trainer step of the student file in `out` (sample.py's choice: EMA first), from its metadata -> int, or
    None (no student, or one exported before the step was recorded)."""
    from safetensors import safe_open
    for name in ("student_ema.safetensors", "student.safetensors"):
        if os.path.exists(os.path.join(out, name)):
            with safe_open(os.path.join(out, name), "pt") as f:
                step = (f.metadata() or {}).get("step")
            return int(step) if step else None
    return None


def next_commands(c, argv):
    """What to type after a run (rank 0 prints them): sample the student, export an earlier checkpoint's, publish.
    argv: the run's command-line words (secrets redacted) -> lines."""
    q, out = shlex.quote, c["output_dir"]
    ckpts = sorted(n for n in os.listdir(out) if n.startswith("checkpoint-") and n[11:].isdigit()) if os.path.isdir(out) else []
    words = [w for w in redact(list(argv)) if not w.startswith("--export_from")]
    lines = [f"python sample.py --ckpt={q(out)} --prompt={q(c['validation_prompt'])}   # sample the student"]
    if len(ckpts) > 1:
        lines.append(f"python train_dmd.py {shlex.join(words)} --export_from={ckpts[0]}   # export an earlier "
                     "checkpoint's student instead")
    lines.append(f"python publish.py {q(out)} --dry_run   # build and list the hub upload (model card, student, samples)")
    if not c["push_to_hub"]:
        hub = c["hub_model_id"] or f"me/{os.path.basename(os.path.normpath(out))}"
        lines.append(f"python publish.py {q(out)} --hub_model_id={q(hub)}   # push it to the hub" + (
            " (me: your hub user name; --model_card_private=True for a private repo)" if not c["hub_model_id"] else ""))
    return ["next:"] + ["  " + line for line in lines]


def print_next_commands(c, argv):
    """next_commands, printed by rank 0 at the end of `python train_dmd.py ...`."""
    if int(os.environ.get("RANK", "0")) == 0:
        print("\n".join(next_commands(c, argv)))

# -----------------------------------------------------------------------------
# environment

def git_commit(folder=os.path.dirname(os.path.abspath(__file__))):
    """HEAD of the library's git checkout ("+dirty" with local changes), else "unknown"."""
    try:
        head = subprocess.run(["git", "-C", folder, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment():
    import importlib.metadata as md
    import torch
    versions = {}
    for p in ("torch", "safetensors", "transformers", "huggingface_hub", "tqdm", "numpy", "av", "diffusers", "wandb"):
        try:
            versions[p] = md.version(p)
        except md.PackageNotFoundError:
            pass
    cuda = torch.cuda.is_available()
    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
            "world_size": int(os.environ.get("WORLD_SIZE", 1)), "git_commit": git_commit(), "packages": versions,
            "argv": redact(sys.argv), "hostname": platform.node(), "time": time.strftime("%Y-%m-%d %H:%M:%S %z")}

# -----------------------------------------------------------------------------
# webhooks (SimpleTuner's webhook_config: {"webhook_type": "discord", "webhook_url": ...} or
# {"webhook_type": "raw", "callback_url": ...}, optional "message_prefix" and "log_level")

LEVELS = {"critical": 0, "error": 1, "warning": 2, "info": 3, "debug": 4}


def load_webhook_config(spec):
    """A path to a JSON file, a JSON string or a dict -> a checked dict (errors name what is missing)."""
    if isinstance(spec, str):
        if spec.lstrip().startswith("{"):
            try:
                spec = json.loads(spec)
            except ValueError as e:
                raise ValueError(f"webhook_config: not valid JSON ({e}): give a JSON object or a file of one") from None
        else:
            spec = readers.read_json(spec, "webhook_config")
    if not isinstance(spec, dict):
        raise ValueError(f"webhook_config: a JSON object with webhook_type and its URL, not a {type(spec).__name__}")
    kind = spec.get("webhook_type")
    if kind not in ("discord", "raw"):
        raise ValueError(f"webhook_config: webhook_type must be 'discord' or 'raw', got {kind!r}")
    key = "webhook_url" if kind == "discord" else "callback_url"
    if not (spec.get("webhook_url") or spec.get("callback_url")):   # either name of the URL, whatever the type
        raise ValueError(f"webhook_config: a {kind} webhook needs {key!r}")
    if spec.get("log_level", "info") not in LEVELS:
        raise ValueError(f"webhook_config: log_level must be one of {list(LEVELS)}, got {spec['log_level']!r}")
    return spec


def multipart(fields, files):
    """fields {name: str}, files {name: (filename, bytes, mime)} -> (body, content type)."""
    b = uuid.uuid4().hex
    parts = [f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\nContent-Type: application/json\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts += [f'--{b}\r\nContent-Disposition: form-data; name="{k}"; filename="{fn}"\r\nContent-Type: {mime}\r\n\r\n'.encode()
              + data + b"\r\n" for k, (fn, data, mime) in files.items()]
    return b"".join(parts) + f"--{b}--\r\n".encode(), f"multipart/form-data; boundary={b}"


class Webhook:
    """Posts events from a background thread through a bounded queue (the oldest message is dropped when it is
    full); each request has a timeout; a failure is counted and reported once, never raised."""

    def __init__(self, cfg, project, maxsize=64, timeout=10.0):
        self.kind = cfg["webhook_type"]
        self.url = cfg.get("webhook_url") or cfg.get("callback_url")
        # the only part of the URL we print: Discord's path holds a secret, a user:password@ is dropped
        self.host = urllib.parse.urlsplit(self.url).netloc.rpartition("@")[2]
        self.prefix = f"`({cfg.get('message_prefix') or project})` "
        self.job = project
        self.level = LEVELS[cfg.get("log_level", "info")]
        self.timeout = float(cfg.get("timeout", timeout))
        self.q = queue.Queue(maxsize)
        self.sent = self.failed = self.dropped = 0
        self.thread = threading.Thread(target=self._work, name="webhook", daemon=True)
        self.thread.start()

    def send(self, event, message, level="info", image=None, **fields):
        """Queue one message; image: (filename, bytes) attached where the target takes files."""
        if LEVELS[level] > self.level:
            return
        item = (event, message, level, image, fields, int(time.time()))
        while True:
            try:
                return self.q.put_nowait(item)
            except queue.Full:
                try:
                    self.q.get_nowait()
                    self.dropped += 1
                    if self.dropped == 1:
                        print(f"warning: webhook {self.host} is behind: dropping the oldest queued messages")
                except queue.Empty:
                    pass

    def request(self, event, message, level, image, fields, ts):
        """-> (body bytes, content type) of one message."""
        if self.kind == "discord":
            payload = {"content": (self.prefix + message)[:2000]}
            if image is None:
                return json.dumps(payload).encode(), "application/json"
            mime = "image/gif" if image[0].endswith(".gif") else "image/png"
            return multipart({"payload_json": json.dumps(payload)}, {"files[0]": (image[0], image[1], mime)})
        payload = {"message_type": event, "message": message, "level": level, "job_id": self.job, "timestamp": ts,
                   **fields}
        if image is not None:
            payload["images"] = [base64.b64encode(image[1]).decode()]
        return json.dumps(payload, default=str).encode(), "application/json"

    def _work(self):
        while True:
            item = self.q.get()
            if item is None:
                return
            try:
                body, ctype = self.request(*item)
                req = urllib.request.Request(self.url, data=body, method="POST",
                                             headers={"Content-Type": ctype, "User-Agent": "wan-dmd"})
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    r.read()
                self.sent += 1
            except Exception as e:   # noqa: BLE001 -- a notification must never reach training
                self.failed += 1
                if self.failed == 1:
                    print(f"warning: webhook {self.host}: {type(e).__name__}: {redact(str(e))[:200]} (training goes on; "
                          "later failures are only counted)")

    def close(self, deadline=10.0):
        """Deliver what is queued within `deadline` seconds, then stop; -> messages not delivered."""
        end = time.time() + deadline
        try:
            self.q.put(None, timeout=deadline)
        except queue.Full:
            pass
        self.thread.join(max(0.0, end - time.time()))
        left = self.q.qsize() if self.thread.is_alive() else 0   # the thread stays a daemon: exit does not wait
        if left or self.failed or self.dropped:
            print(f"webhook {self.host}: {self.sent} sent, {self.failed} failed, {self.dropped} dropped"
                  + (f", {left} undelivered after the {deadline:.0f} s deadline" if left else ""))
        return left

# -----------------------------------------------------------------------------
# hub: folders are staged under OUTPUT_DIR/.hub_staging/NAME (hard links, so a checkpoint rotated away locally
# still uploads) and removed once uploaded; what is left there after a crash or without network is retried at
# the next checkpoint and at the next start. upload_folder skips files the hub already holds.

def link_tree(src, dst):
    """Copy a file or folder by hard links (a copy where links are not possible)."""
    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if os.path.isdir(src):
        shutil.copytree(src, dst, copy_function=link, dirs_exist_ok=True)
    else:
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        link(src, dst)


def build_folder(staging, name, files):
    """files: {path in the upload: local file or folder ("" = the folder's contents)} -> staging/NAME.tmp, by hard
    links; renamed to NAME once complete, so a crash never leaves a half-staged folder to upload."""
    tmp = os.path.join(staging, name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for rel, src in files.items():
        link_tree(src, os.path.join(tmp, rel))
    return tmp


def stage_folder(staging, name, files):
    """build_folder, then rename NAME.tmp -> NAME (replacing an older NAME) -> the folder."""
    tmp, final = build_folder(staging, name, files), os.path.join(staging, name)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


class HubUploader:
    """One background thread uploading the staged folders in order: checkpoint-N to checkpoints/checkpoint-N,
    "final" to the repo root. The token comes from huggingface_hub (HF_TOKEN or the cached login), never printed."""

    def __init__(self, repo_id, private, staging, quiet=False):
        """quiet: no warning on a failed upload (publish.py says it itself, from `error`)."""
        from huggingface_hub import HfApi
        self.repo_id, self.private, self.staging, self.quiet, self.error = repo_id, private, staging, quiet, None
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        os.makedirs(staging, exist_ok=True)
        self.q = queue.Queue()
        self.cv = threading.Condition()   # guards `current`: the staged folder being uploaded is never replaced
        self.current, self.repo_ready, self.failures, self.uploaded = None, False, 0, []
        self.thread = threading.Thread(target=self._work, name="hub-upload", daemon=True)
        self.thread.start()

    def pending(self):
        return sorted(n for n in os.listdir(self.staging) if not n.endswith(".tmp"))   # "checkpoint-*" < "final"

    def stage(self, name, files, keep=None):
        """Stage `files` as NAME without waiting for an upload in progress (unless it is NAME's own). keep: the newest
        `keep` staged checkpoints stay, older ones not being uploaded are dropped (their disk space is freed)."""
        tmp, final = build_folder(self.staging, name, files), os.path.join(self.staging, name)
        with self.cv:
            self.cv.wait_for(lambda: self.current != name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            ckpts = [n for n in self.pending() if n.startswith("checkpoint-")]
            for n in ckpts[: max(0, len(ckpts) - keep)] if keep else []:
                if n != self.current:
                    print(f"warning: hub: {n} was never uploaded and is dropped from the queue (newer ones wait)")
                    shutil.rmtree(os.path.join(self.staging, n), ignore_errors=True)
        return final

    def kick(self):
        """Ask the thread to (re)try every staged folder."""
        self.q.put("go")

    def _work(self):
        while self.q.get() == "go":
            for name in self.pending():
                folder = os.path.join(self.staging, name)
                with self.cv:
                    if not os.path.isdir(folder):
                        continue
                    self.current = name
                try:
                    if not self.repo_ready:
                        self.api.create_repo(self.repo_id, private=self.private, exist_ok=True)
                        self.repo_ready = True
                    self.api.upload_folder(repo_id=self.repo_id, folder_path=folder,
                                           path_in_repo="" if name == "final" else f"checkpoints/{name}",
                                           commit_message=f"wan-dmd: {name}")
                    shutil.rmtree(folder, ignore_errors=True)
                    self.uploaded.append(name)
                    print(f"hub: uploaded {name} to {self.repo_id}")
                except Exception as e:   # noqa: BLE001 -- no network, no token, hub down: the run goes on
                    self.failures += 1
                    self.error = f"{type(e).__name__}: {redact(str(e).splitlines()[0])[:200] if str(e) else ''}"
                    if self.failures == 1 and not self.quiet:
                        print(f"warning: hub upload to {self.repo_id} failed ({self.error}); training goes on, the upload "
                              f"stays staged in {self.staging} and is retried at the next checkpoint and the next "
                              "start (python publish.py OUTPUT_DIR pushes a finished run)")
                    break   # the hub is probably unreachable: wait for the next kick
                finally:
                    with self.cv:
                        self.current = None
                        self.cv.notify_all()

    def close(self, timeout=None):
        """Finish the queued uploads (up to `timeout` seconds) and stop the thread."""
        self.q.put("stop")
        self.thread.join(timeout)

# -----------------------------------------------------------------------------
# the run's side effects, called by train_dmd.train

def write_card(c, steps=None):
    """Write README.md (the model card) and preview.gif in output_dir -> {path in the upload: local path} of what
    push_to_hub uploads: student file(s), config, env, log, loss curve, preview, the last validation step's mp4s."""
    out = c["output_dir"]
    if steps is None:   # as train_dmd.train computes them (after the optional warp)
        steps = flow.rollout_steps(flow.parse_steps(c["dmd_denoising_steps"]), c["warp_denoising_step"], c["timestep_shift"])
    at = exported_step(out)   # the card, the preview and the final losses describe the exported student's step
    steps_dirs = sorted(glob.glob(os.path.join(out, "validation", "step_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
    steps_dirs = [d for d in steps_dirs if at is None or int(d.rsplit("_", 1)[1]) <= at]
    prompts, files = [c["validation_prompt"]], {}
    if c.get("validation_prompt_library") and os.path.exists(c["validation_prompt_library"]):
        with open(c["validation_prompt_library"]) as f:
            lib = json.load(f)
        prompts += list(lib.values()) if isinstance(lib, dict) else list(lib)
    if steps_dirs:
        paths, videos = videos_of(steps_dirs[-1])
        if videos:
            media.write_gif(os.path.join(out, "preview.gif"), preview(videos), fps=8)
            files.update({f"samples/{os.path.basename(p)}": p for p in paths[:8]})
    for name in ("student_ema.safetensors", "student.safetensors", "config.json", "env.json", "log.jsonl",
                 "loss_curve.png", "preview.gif"):
        if os.path.exists(os.path.join(out, name)):
            files[name] = os.path.join(out, name)
    for p in glob.glob(os.path.join(out, sample.TINY_TEACHER, "**", "*"), recursive=True):   # a tiny run's teacher
        if os.path.isfile(p):
            files[os.path.relpath(p, out)] = p
    if c.get("push_merged_to_hub", True) or c["lora_rank"] == 0:
        for p in glob.glob(os.path.join(out, "transformer", "*")):
            files[f"transformer/{os.path.basename(p)}"] = p
    env = json.load(open(os.path.join(out, "env.json"))) if os.path.exists(os.path.join(out, "env.json")) else environment()
    records = [r for r in read_log(out) if at is None or r["step"] <= at]
    card = model_card(c, steps, records, env, sorted(files) + ["README.md"], prompts, at)
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write(card)
    files["README.md"] = os.path.join(out, "README.md")
    return files


def stage_final(c, hub=None, steps=None):
    """write_card, then stage its files as .hub_staging/final (queued on `hub`; hub=None: a dry run) -> the folder."""
    files = write_card(c, steps)
    if hub is None:
        return stage_folder(os.path.join(c["output_dir"], ".hub_staging"), "final", files)
    return hub.stage("final", files)


class Publisher:
    """Rank 0's publishing for one run; with main=False every method does nothing. After __init__ (which raises
    config errors, before any training), no method raises: failures print a warning."""

    def __init__(self, c, main=True):
        self.c, self.main, self.webhook, self.hub, self.t0 = c, main, None, None, time.time()
        if not main:
            return
        if c["webhook_config"]:
            self.webhook = Webhook(load_webhook_config(c["webhook_config"]), run_name(c))
        out = c["output_dir"]
        os.makedirs(out, exist_ok=True)
        if c["push_to_hub"] or c["push_checkpoints_to_hub"]:
            self.hub = HubUploader(c["hub_model_id"], c["model_card_private"], os.path.join(out, ".hub_staging"))
            if self.hub.pending():
                print(f"hub: resuming {len(self.hub.pending())} staged upload(s): {', '.join(self.hub.pending())}")
                self.hub.kick()
        self.notify("start", f"training started: {c['pretrained_model_name_or_path']} -> {len(str(c['dmd_denoising_steps']).split(','))}-step "
                    f"student, {c['max_train_steps']} steps, output {out}", max_train_steps=c["max_train_steps"])

    def notify(self, event, message, level="info", image=None, **fields):
        if self.webhook is not None:
            self.webhook.send(event, message, level, image, **fields)

    def _safe(self, what, fn, *a):
        if not self.main:
            return None
        try:
            return fn(*a)
        except Exception as e:   # noqa: BLE001 -- publishing never stops training
            print(f"warning: {what} failed: {type(e).__name__}: {redact(str(e))}")
            return None

    def validation(self, step):
        """Contact sheet beside the step's mp4s, loss_curve.png, a webhook message with the sheet."""
        def run():
            folder = os.path.join(self.c["output_dir"], "validation", f"step_{step}")
            paths, videos = videos_of(folder)
            records = self.write_loss_curve()
            if not videos:
                return
            small = [media.shrink(v, 160, 8) for v in videos]
            sheet = media.contact_sheet(small, scale=max(1, 96 // small[0].shape[1]), labels=sheet_labels(paths))
            media.write_png(os.path.join(folder, "contact_sheet.png"), sheet)
            rec = (records or [{}])[-1]
            self.notify("validation", f"validation at step {step}: {len(videos)} video(s) | dmd "
                        f"{rec.get('dmd_loss', float('nan')):.3e} | fake {rec.get('fake_score_loss', float('nan')):.4f}",
                        image=("contact_sheet.png", media.png_bytes(sheet)), step=step,
                        **{k: rec[k] for k in ("dmd_loss", "fake_score_loss", "g_abs") if k in rec})
        self._safe("validation artefacts", run)

    def write_loss_curve(self):
        """loss_curve.png from log.jsonl -> the records read."""
        records = read_log(self.c["output_dir"])
        if records:
            media.write_png(os.path.join(self.c["output_dir"], "loss_curve.png"), loss_curve(records))
        return records

    def checkpoint(self, step, path):
        def run():
            self.notify("checkpoint", f"checkpoint at step {step}: {os.path.basename(path)}", step=step)
            if self.hub is not None and self.c["push_checkpoints_to_hub"]:
                self.hub.stage(os.path.basename(path), {"": path}, keep=self.c["checkpoints_total_limit"])
                self.hub.kick()
        self._safe("checkpoint upload", run)

    def finish(self, steps):
        """Model card, preview, the final upload (waited for), the finish message; then the webhook is flushed."""
        def run():
            records = self.write_loss_curve()
            url = None
            if self.hub is not None and self.c["push_to_hub"]:
                folder = stage_final(self.c, self.hub, steps)
                print(f"hub: uploading {folder} to {self.c['hub_model_id']} ...")
                self.hub.kick()
            else:
                write_card(self.c, steps)
            if self.hub is not None:
                self.hub.close()
                if "final" in self.hub.uploaded:
                    url = redact(f"{self.hub.api.endpoint.rstrip('/')}/{self.c['hub_model_id']}")
                left = self.hub.pending()
                if left:
                    print(f"hub: {len(left)} upload(s) not done ({', '.join(left)}): they stay in "
                          f"{self.hub.staging}; a resumed run or `python publish.py {self.c['output_dir']}` retries them")
            gif = os.path.join(self.c["output_dir"], "preview.gif")
            rec = (records or [{}])[-1]
            self.notify("finish", f"training finished at step {rec.get('step', '?')} in {duration(time.time() - self.t0)}"
                        + (f": {url}" if url else f": {self.c['output_dir']}"),
                        image=("preview.gif", open(gif, "rb").read()) if os.path.exists(gif) else None,
                        url=url, step=rec.get("step"))
        self._safe("publishing", run)
        self.close()

    def failed(self, exc):
        def run():
            line = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            self.notify("failure", f"training failed: {line}", level="error", error=line)
        self._safe("failure notification", run)
        self.close()

    def open_log(self, step, run_id=None):
        """After the run's setup: config.json and env.json (write_run_files); log.jsonl in append mode, its lines of
        steps lost since the resumed checkpoint (at `step`) dropped; wandb (run_id: the run's id, kept in its
        checkpoints, so that a resumed run continues the same wandb run)."""
        self.log_f = self.wandb = None
        if not self.main:
            return
        self.write_run_files()
        if self.c["report_to"] == "wandb":
            import wandb
            self.wandb = wandb.init(project=self.c["tracker_project_name"], name=self.c["tracker_run_name"] or None,
                                    config=redact(self.c), id=run_id, resume="allow")
        path = os.path.join(self.c["output_dir"], "log.jsonl")
        if os.path.exists(path):   # a partial last line is dropped with a warning
            kept = [rec for rec in read_log(self.c["output_dir"], print) if rec.get("step", 0) <= step]
            with open(path + ".tmp", "w") as f:   # then renamed: a kill mid-write leaves the old log whole
                f.writelines(json.dumps(rec) + "\n" for rec in kept)
            os.replace(path + ".tmp", path)
        self.log_f = open(path, "a")

    def write_run_files(self):
        """config.json (secrets redacted) and env.json, written by open_log once the run's setup has succeeded, never
        before: a start that fails (a bad key, teacher, prompts file or resume) leaves an existing run's files alone."""
        for name, value in (("config.json", redact(self.c)), ("env.json", environment())):
            with open(os.path.join(self.c["output_dir"], name), "w") as f:
                json.dump(value, f, indent=2, default=str)

    def log(self, rec, step, objective="dmd", quiet=False):
        """One JSONL record, one wandb record and (unless quiet) one terminal line per log interval."""
        if not self.main:
            return
        self.log_f.write(json.dumps(rec) + "\n")
        self.log_f.flush()
        if self.wandb is not None:
            self.wandb.log(rec, step=step)
        if quiet:
            return

        def f(key, spec):   # "-": no value this step (no generator update); a non-finite loss still reads "nan"
            v = rec.get(key)
            return "-" if v is None else format(v, spec)
        mem = f" | mem {rec['peak_mem_gb']:.1f} GB" if rec.get("peak_mem_gb") else ""   # CUDA only
        gen = f" G@{rec['gen_step']}" if "gen_step" in rec else ""   # the generator step the G statistics are from
        gen += "".join(f" + {name} {f(k, '.3e')}" for name, k in (("ode reg", "ode_regression_loss"),
                                                                  ("real", "real_data_loss")) if k in rec)
        tqdm.write(f"step {step:6d} | {objective} {f(objective + '_loss', '.3e')}{gen} | fake {f('fake_score_loss', '.4f')} "
                   f"| |g| {f('g_abs', '.3e')} | gnorm G {f('g_grad_norm', '.2e')} F {f('f_grad_norm', '.2e')} "
                   f"| lr {rec['lr']:.2e} | t {f('score_t', '5.1f')} | {rec['s_per_step']:.2f} s/step{mem}")

    def close_log(self):
        if getattr(self, "log_f", None) is not None:
            self.log_f.close()
            self.log_f = None
        if getattr(self, "wandb", None) is not None:
            self.wandb.finish()
            self.wandb = None

    def close(self):
        if self.webhook is not None:
            self.webhook.close()
            self.webhook = None
        if self.hub is not None and self.hub.thread.is_alive():
            self.hub.close(timeout=30)


def run_config(args):
    """publish.py's positional words -> the run folder's config.json with output_dir the folder; a missing folder,
    no config.json or no exported student: a ValueError naming it and the fix."""
    if len(args) != 1:
        raise ValueError(f"expected one train_dmd.py output folder, got {len(args)}: {args}")
    out = args[0]
    if not os.path.isdir(out):
        raise ValueError(f"{out}: no such folder: give a train_dmd.py output_dir (e.g. out/tiny_dmd)")
    if not os.path.isfile(os.path.join(out, "config.json")):
        raise ValueError(f"{out}: no config.json: not a train_dmd.py output folder (a run writes it once it starts)")
    cfg = readers.read_json(os.path.join(out, "config.json"), "run config")
    if not isinstance(cfg, dict):
        raise ValueError(f"{os.path.join(out, 'config.json')}: a JSON {type(cfg).__name__}, not the object of keys a run writes")
    cfg = {**cfg, "output_dir": out}
    if not any(os.path.exists(os.path.join(out, n)) for n in ("student_ema.safetensors", "student.safetensors")):
        if run_dir.checkpoints(out):
            raise ValueError(f"{out}: no exported student (student_ema.safetensors) to publish: export its newest "
                             f"checkpoint's first with `{sample.train_command(out, '--export_from=latest')}`")
        raise ValueError(f"{out}: no exported student (student_ema.safetensors) and no checkpoint: the run stopped "
                         f"before its first; train it again with `{sample.train_command(out, '--overwrite_output_dir=True')}`")
    return cfg


def check_hub_id(cfg, given, push):
    """hub_model_id must be USER/NAME; a push needs one (from --hub_model_id or config.json)."""
    hub_id = str(cfg.get("hub_model_id") or "")
    where = "--hub_model_id" if given else f"{os.path.join(cfg['output_dir'], 'config.json')}'s hub_model_id"
    if not hub_id and push:
        raise ValueError(f"{os.path.join(cfg['output_dir'], 'config.json')} has no hub_model_id: give --hub_model_id=USER/NAME")
    if hub_id and not re.fullmatch(r"[^/\s]+/[^/\s]+", hub_id):
        raise ValueError(f"{where}={hub_id!r}: not the hub's USER/NAME form: give e.g. --hub_model_id=me/"
                         f"{hub_id.strip('/').split('/')[-1] or run_name(cfg)}")


if __name__ == "__main__":   # python publish.py OUTPUT_DIR [--dry_run] [--hub_model_id=user/name ...]
    from configurator import command_flags, fail
    # the flags, read from this line by command_flags (default and description); the publishing keys given here
    # replace config.json's for this push (the file is left as it is)
    flags = dict(dry_run=False,   # build OUTPUT_DIR/.hub_staging/final (the exact upload) and list it; push nothing
                 hub_model_id="",   # "user/name" on the hub (created if needed); default: config.json's
                 model_card_private=False,   # create the hub repo private; default: config.json's
                 model_card_note="",   # a paragraph added to the model card; default: config.json's
                 push_merged_to_hub=True)   # with LoRA: also upload the merged transformer/; default: config.json's
    argv = sys.argv[1:]
    flags, args = command_flags(__file__, "flags", argv, usage="OUTPUT_DIR [--dry_run] [--hub_model_id=user/name] "
                                "[--model_card_private] ...   (push a finished run to the hub)")
    given = {w[2:].split("=")[0].replace("-", "_") for w in argv if w.startswith("--")}
    try:   # every mistake: one line before anything is staged
        cfg = {**run_config(args), **{k: v for k, v in flags.items() if k in given and k != "dry_run"}}
        check_hub_id(cfg, "hub_model_id" in given, push=not flags["dry_run"])
    except ValueError as e:
        fail("publish.py", str(e))
    if flags["dry_run"]:
        staged = stage_final(cfg)
        for root, _, names in sorted(os.walk(staged)):
            for n in sorted(names):
                p = os.path.join(root, n)
                print(f"{os.path.getsize(p):>12,d}  {os.path.relpath(p, staged)}")
    else:
        hub = HubUploader(cfg["hub_model_id"], cfg.get("model_card_private", False), os.path.join(args[0], ".hub_staging"),
                          quiet=True)
        stage_final(cfg, hub)
        hub.kick()
        hub.close()
        if hub.pending():
            sys.exit(f"publish.py: error: the upload to {cfg['hub_model_id']} did not finish ({hub.error or 'stopped'}): "
                     f"it stays staged in {hub.staging}; retry with: python publish.py {shlex.join(redact(argv))}")
        print(f"hub: {cfg['hub_model_id']} holds the student and its model card")
