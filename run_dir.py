"""
The run folder (output_dir) of train_dmd.py: one run at a time, never lost, never mixed with another.

- A lock: output_dir/run.lock, created atomically (O_EXCL, also on a filesystem that several nodes share) by rank 0,
  holding host, pid and start time; its mtime is a heartbeat refreshed every HEARTBEAT_S. A second start refuses in
  one line naming the holder. A stale lock is taken over with a notice: on this host when its process is gone (or
  its heartbeat stopped: the pid was reused), from another host only when its heartbeat is older than STALE_S.
- A start that resumes nothing, into a folder holding a run (numbered checkpoints) or any file a run writes there
  (RUN_FILES: log.jsonl, config.json, README.md, the student, ...: a crashed run's, or the user's own), refuses with
  the safe choices; overwrite_output_dir=True moves them aside into a sibling folder (a timestamp suffix), never
  deleting them. The teacher pairs (REUSED) stay: they are keyed by what made them, and a fresh start reuses them.
- The trainer's own checkpoints: checkpoint-NNNNNNN folders holding CHECKSUMS, written last into the temporary
  folder before its rename: the run's id and a sha256 per file. `latest` and rotation see only those (rotation only
  this run's); any other folder (checkpoint-best, a copy) is left alone. A resume verifies the sums first.
- log.jsonl: a partial last line (a kill or a full disk mid-write) is dropped with a warning.
- Refused and its kinds: the states of a run that the user resolves; train_dmd.py prints them as one line.
"""
import functools
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time

import torch

LOCK = "run.lock"
CHECKSUMS = "checksums.json"     # the completeness marker of a checkpoint folder (written last, before the rename)
NUMBERED = re.compile(r"^checkpoint-(\d{7})$")
RUN_FILES = ("log.jsonl", "config.json", "env.json", "README.md", "student.safetensors", "student_ema.safetensors",
             "transformer", "validation", "loss_curve.png", "preview.gif", "teacher_diversity.json", "tiny_teacher",
             ".hub_staging")   # what a run writes into output_dir besides its checkpoints
REUSED = ("teacher_ode", "teacher_data")   # the teacher pairs: named by what made them, reused by any start
HEARTBEAT_S = 60                 # the holder refreshes its lock's mtime this often
STALE_S = 10 * HEARTBEAT_S       # a lock from another host whose heartbeat is older than this is taken over
HALF_WRITTEN_S = 10              # an unreadable lock (its starter died writing it) older than this is taken over


class Refused(Exception):
    """A state of the run that the user resolves, not a bug: the folder in use, an old run in the way, a checkpoint
    that cannot resume, a run that diverged. train_dmd.py prints its message as one line (no traceback) and exits
    with `status`. Each kind below is also the built-in error it always was (what callers and tests catch)."""
    status = 2


class InUse(Refused, RuntimeError):
    """output_dir is held by another run (its lock)."""


class CannotWrite(Refused, OSError):
    """output_dir is read-only or full."""


class HoldsARun(Refused, FileExistsError):
    """A fresh start into a folder that holds a run."""


class NoCheckpoint(Refused, FileNotFoundError):
    """A checkpoint named by resume_from_checkpoint or export_from is not there."""


class CannotResume(Refused, ValueError):
    """A checkpoint that cannot resume this run: damaged, or written with keys this config changes."""


class StalePairs(Refused, ValueError):
    """The dataset's ODE pairs were made with another config (frames, student steps)."""


class Diverged(Refused, RuntimeError):
    """Non-finite losses or blown-up weights: the message names the last good checkpoint."""
    status = 1

# -----------------------------------------------------------------------------
# the lock

class Lock:
    """output_dir/run.lock, held by this process until release() (a heartbeat thread keeps its mtime fresh)."""

    def __init__(self, out_dir, say=print):
        self.path = os.path.join(out_dir, LOCK)
        self.me = {"host": socket.gethostname(), "pid": os.getpid(),
                   "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "token": os.urandom(8).hex()}
        self.made, d = [], os.path.abspath(out_dir)   # the folders this start creates: removed again if left empty
        while not os.path.exists(d):
            self.made.append(d)
            d = os.path.dirname(d)
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise CannotWrite(f"output_dir {out_dir}: cannot be made ({e.strerror}): give the run a writable "
                              "output_dir") from None
        while not self._create():
            holder = self._read()
            why = stale(holder, self.path)
            if why is None:
                raise InUse(f"output_dir {out_dir} is in use by another run: pid {holder.get('pid')} on host "
                                   f"{holder.get('host')}, started {holder.get('started')} ({self.path}); wait for "
                                   "it to end, or give this run another output_dir")
            say(f"notice: taking over the stale lock {self.path} ({why})")
            if self._read() == holder:   # still the stale one (another starter may have taken it over meanwhile)
                _remove(self.path)
        self.done = threading.Event()
        threading.Thread(target=self._beat, daemon=True).start()

    def _create(self):
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:   # a read-only folder, a full disk
            raise CannotWrite(f"output_dir {os.path.dirname(self.path)}: cannot write there ({e.strerror}): give the "
                          "run a writable output_dir") from None
        with os.fdopen(fd, "w") as f:
            json.dump(self.me, f)
        return True

    def _read(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):   # a lock half written by a killed starter: stale when its mtime is old
            return {"host": "?", "pid": -1, "started": "?"}

    def _beat(self):
        while not self.done.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self):
        """Remove the lock if it is still this process's, and the folders this start made if they stayed empty (a
        start that failed on a config error leaves nothing behind)."""
        self.done.set()
        if self._read().get("token") == self.me["token"]:
            _remove(self.path)
        for d in self.made:
            try:
                os.rmdir(d)
            except OSError:   # not empty: the run wrote into it
                break


def stale(holder, path):
    """-> why the lock `holder` (its JSON) at `path` is stale, or None while its holder may be alive."""
    if not holder:
        return "removed meanwhile"
    try:
        age = time.time() - os.path.getmtime(path)
    except OSError:
        return "removed meanwhile"
    if holder.get("pid") == -1:   # unreadable: a starter killed (or out of disk) between creating and writing it
        return f"unreadable, {age:.0f} s old" if age > HALF_WRITTEN_S else None
    if holder.get("host") != socket.gethostname():
        return f"its heartbeat stopped {age:.0f} s ago" if age > STALE_S else None
    pid = holder.get("pid", -1)
    if pid == os.getpid():
        return "left by this process"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"pid {pid} is gone"
    except (PermissionError, OverflowError, ValueError, TypeError):
        pass
    began = process_start(pid)   # a live holder (suspended, say) is never stale; a reused pid began after the lock
    if began is not None:
        try:
            locked = time.mktime(time.strptime(holder.get("started", ""), "%Y-%m-%d %H:%M:%S %z"))
        except (ValueError, OverflowError):
            locked = None
        if locked is not None:
            return f"pid {pid} is another process now (started after the lock)" if began > locked + 2 else None
    return f"pid {pid} alive but its heartbeat stopped {age:.0f} s ago (a reused pid)" if age > STALE_S else None


def process_start(pid):
    """-> when process `pid` started (seconds since the epoch) from /proc, or None where /proc cannot say."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass

# -----------------------------------------------------------------------------
# the start: lock, then the fresh-start check

def claim(c, main=True, say=print):
    """Rank 0 (main) takes output_dir's lock, then refuses a start that would write a fresh run over an old one (or
    moves the old one aside with overwrite_output_dir) -> the Lock (None on other ranks): release() it at the end."""
    if not main:
        return None
    out = c["output_dir"]
    lock = Lock(out, say)
    try:
        if not c.get("export_from"):
            fresh_start_check(out, c["resume_from_checkpoint"], c.get("overwrite_output_dir", False), say)
    except BaseException:
        lock.release()
        raise
    return lock


def fresh_start_check(out, spec, overwrite, say=print):
    """A start that resumes nothing (spec '' or `latest` with no checkpoint of its own) into a folder holding a run
    (numbered checkpoint folders) or a file a run writes (RUN_FILES: a crashed run's, the user's own): refuse in one
    line, or with overwrite move them aside. overwrite_output_dir only acts on such a start; a resume says so."""
    named = named_checkpoint(out, spec) if spec and spec != "latest" else None
    if named and os.path.realpath(os.path.dirname(os.path.normpath(named))) != os.path.realpath(out):
        spec = ""   # another folder's checkpoint: the run in `out` is not resumed, so this is a fresh start into it
    elif named or spec == "latest" and checkpoints(out):
        if overwrite:
            say(f"notice: overwrite_output_dir=True does nothing here: this start resumes (resume_from_checkpoint="
                f"{spec!r}); a fresh run takes resume_from_checkpoint='' as well")
        if named:
            newer_check(out, named)
        return
    runs = sorted(d for d in os.listdir(out) if NUMBERED.match(d))
    files = [n for n in RUN_FILES if os.path.lexists(os.path.join(out, n))]
    if not runs and not files:
        return
    if not overwrite:
        legacy = [d for d in runs if not os.path.exists(os.path.join(out, d, CHECKSUMS))]
        what = (f"holds a run ({', '.join(runs[-2:] + files[:2])}): a fresh start would mix with "
                "it. Resume it (resume_from_checkpoint='latest' or a checkpoint folder), give this run another "
                "output_dir" if runs or "log.jsonl" in files else
                f"holds files a run writes ({', '.join(files[:4])}) and no checkpoint to resume: a start would "
                "overwrite them. Give this run another output_dir")
        raise HoldsARun(
            f"output_dir {out} {what}, or overwrite_output_dir=True (moves them into a sibling folder, deletes "
            "nothing)" + (f"; {legacy[-1]} has no {CHECKSUMS} (an older version wrote it): resume_from_checkpoint="
                          f"{os.path.join(out, legacy[-1])} resumes it" if legacy and not spec else ""))
    aside = move_aside(out)
    say(f"overwrite_output_dir: what {out} held moved to {aside}" + (
        f" ({', '.join(n for n in REUSED if os.path.exists(os.path.join(out, n)))} kept: reused)"
        if any(os.path.exists(os.path.join(out, n)) for n in REUSED) else ""))

def move_aside(out):
    """Everything in `out` but its lock and the reusable teacher pairs (REUSED) into a new sibling folder
    <out>.old-<time> (of the resolved folder: `.` or a symlink too) -> that folder. Nothing is deleted; a folder that
    is a mount of its own (a move would cross filesystems) is refused in one line."""
    real = os.path.realpath(out)
    aside = f"{real}.old-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(aside):
        aside += "_"
    if os.stat(real).st_dev != os.stat(os.path.dirname(real)).st_dev:
        raise CannotWrite(f"overwrite_output_dir: {out} is a mount of its own; its run cannot move into a sibling "
                          "folder: move it out yourself, or give this run another output_dir")
    os.makedirs(aside)
    for name in os.listdir(out):
        if name != LOCK and name not in REUSED:
            os.rename(os.path.join(out, name), os.path.join(aside, name))
    return aside


def newer_check(out, named):
    """Resuming `named` (a checkpoint of `out`) while `out` holds newer checkpoints: training would replace them
    one by one. Refuse, naming the two safe ways (branch into another folder; move the newer ones aside)."""
    m = NUMBERED.match(os.path.basename(os.path.normpath(named)))
    newer = [os.path.basename(d) for d in checkpoints(out) if m and int(d[-7:]) > int(m.group(1))]
    if newer:
        raise HoldsARun(f"resume_from_checkpoint={named}: {out} holds newer checkpoints ({', '.join(newer[-3:])}) "
                        "that training from it would replace. To branch from it, give this run another output_dir "
                        f"(resume_from_checkpoint={os.path.abspath(named)} works from there); to go back for good, "
                        "move the newer checkpoints out of the folder first")

# -----------------------------------------------------------------------------
# checkpoints: the trainer's own, their checksums

def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_checksums(folder, run_id, step):
    """The completeness marker of a checkpoint folder: the run's id, its step, the sha256 of every file in it."""
    files = {}
    for d, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(d, n)
            files[os.path.relpath(p, folder)] = sha256(p)
    with open(os.path.join(folder, CHECKSUMS), "w") as f:
        json.dump({"run_id": run_id, "step": step, "files": dict(sorted(files.items()))}, f, indent=1)


def marker(folder):
    """-> a checkpoint folder's CHECKSUMS record, or None (no marker, or an unreadable one)."""
    try:
        with open(os.path.join(folder, CHECKSUMS)) as f:
            m = json.load(f)
        return m if isinstance(m, dict) and isinstance(m.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def checkpoints(out_dir, run_id=None):
    """The trainer's own complete checkpoint folders in out_dir (of run `run_id` when given), oldest first."""
    if not os.path.isdir(out_dir):
        return []
    found = []
    for d in sorted(os.listdir(out_dir)):   # a symlink or a copy under a numbered name is not the trainer's own
        m = NUMBERED.match(d) and not os.path.islink(os.path.join(out_dir, d)) and marker(os.path.join(out_dir, d))
        if m and (run_id is None or m.get("run_id") == run_id):
            found.append(os.path.join(out_dir, d))
    return found


def make_room(final, run_id, say=print):
    """Before a checkpoint is renamed into `final`: an older checkpoint of this run there is replaced (removed);
    any other folder under that name (an older version's, a copy, the user's) is moved aside, never deleted."""
    if not os.path.lexists(final):
        return
    m = marker(final) if not os.path.islink(final) else None
    if m and m.get("run_id") == run_id:
        shutil.rmtree(final)
        return
    aside = f"{final}.not-this-run-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(final, aside)
    say(f"warning: {final} was not written by this run: moved to {aside} to make room for this run's checkpoint")


def rotate(out_dir, limit, run_id):
    """Keep the newest `limit` (at least 1) checkpoints of this run; nothing else in out_dir is touched."""
    own = checkpoints(out_dir, run_id)
    for d in own[: max(0, len(own) - max(1, limit))]:
        shutil.rmtree(d, ignore_errors=True)


def verify(folder):
    """-> None when every file CHECKSUMS lists has its sum, else one line naming the first bad file; a folder
    without CHECKSUMS (an explicit path: a copy, an older version's checkpoint) is not verified."""
    m = marker(folder)
    if m is None:
        return None
    for rel, digest in m["files"].items():
        p = os.path.join(folder, rel)
        if not os.path.exists(p):
            return f"{p}: missing"
        if sha256(p) != digest:
            return f"{p}: damaged (its sha256 differs from the one recorded when it was written)"
    return None


def named_checkpoint(out_dir, spec, key="resume_from_checkpoint"):
    """A checkpoint named by `key`: a folder, or "checkpoint-N" (N unpadded too) in out_dir -> its folder; one
    without state.pt: NoCheckpoint naming both."""
    name = os.path.basename(os.path.normpath(spec))
    path = spec
    if not os.path.exists(spec) and name.startswith("checkpoint-") and name[11:].isdigit():
        path = os.path.join(out_dir, f"checkpoint-{int(name[11:]):07d}")
    if not os.path.exists(os.path.join(path, "state.pt")):
        raise NoCheckpoint(f"{key}={spec!r}: no state.pt there ({path})")
    return path


def load(path):
    """torch.load(weights_only=True) of a checkpoint file; unreadable: CannotResume (a ValueError) naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CannotResume(f"{path}: missing") from None
    except Exception as e:   # noqa: BLE001 -- truncated, zeroed, empty: torch's own text advises an unsafe load
        raise CannotResume(f"{path}: cannot be read ({type(e).__name__}: truncated or damaged)") from None

# -----------------------------------------------------------------------------
# log.jsonl

def read_jsonl(path, say=print):
    """The records of a JSONL log; a line that is not JSON (a partial last line) is dropped with a warning."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except ValueError:
                say(f"warning: {path}: line {i} is not a complete record (a kill or a full disk mid-write): dropped")
    return out


def locked(train):
    """A decorator: while train(c) runs, rank 0 holds c["output_dir"]'s lock (claim), released however it ends."""
    @functools.wraps(train)
    def run(c, *args, **kwargs):
        lock = claim(c, main=int(os.environ.get("RANK", "0")) == 0)
        try:
            return train(c, *args, **kwargs)
        finally:
            if lock is not None:
                lock.release()
    return run
