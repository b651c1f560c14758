"""
The user's input files read in one place, each fault a one-line error that names the file: text (prompts files,
captions, JSON lists of prompts; UTF-8) and safetensors weights (truncated downloads, HTML error pages or pickles
saved under a .safetensors name). Everything that reads such a file goes through here (data.py, sample.py,
model_wan.py, vae_wan.py, text_encoders.py), so no bare UnicodeDecodeError or "incomplete metadata" reaches a user.
Weights are written here too (write_safetensors): whole or not at all, readable as any other file the user writes.
"""
import json
import os


def read_text(path, what="file"):
    """A UTF-8 text file (a leading byte-order mark dropped) -> its text. A missing file is FileNotFoundError, bytes
    that are not UTF-8 a ValueError: both name `what` and the path (and the bad byte's line)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path!r}: no such file") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{what} {path!r}: not UTF-8 text (byte 0x{raw[e.start]:02x} on line {line}); save it as "
                         "UTF-8") from None


def read_lines(path, what="prompts file"):
    """A file of one prompt per line -> its non-empty lines, stripped; a file without one is a ValueError (a run on
    no prompts would train on something else or write nothing)."""
    path = os.fspath(path)
    lines = [line.strip() for line in read_text(path, what).splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{what} {path!r} has no prompt (empty or blank lines only): write one prompt per line")
    return lines


def read_json(path, what="file"):
    """A JSON file -> its value; bad bytes or bad JSON are a ValueError naming the file and the line."""
    path = os.fspath(path)
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r}: not valid JSON ({e.msg} on line {e.lineno}, column {e.colno})") from None


def safetensors_problem(path, error):
    """A safetensors reader's error on `path` -> what is wrong, in words a user can act on."""
    with open(path, "rb") as f:
        head = f.read(64)
    size = os.path.getsize(path)
    if size == 0:
        return "the file is empty (0 bytes)"
    if head[:2] == b"PK" or head[:1] == b"\x80":
        return "a torch pickle (.pt/.pth), not safetensors"
    if head.lstrip()[:1] == b"<":
        return "an HTML or XML page, not weights (a failed download?)"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the weights (run git lfs pull)"
    if head[8:9] != b"{":   # a safetensors file: 8 bytes of header length, then the JSON header
        return "not a safetensors file (no safetensors header at its start)"
    if "incomplete metadata" in str(error) or int.from_bytes(head[:8], "little") > size - 8:
        return f"truncated: {size:,} bytes, fewer than its header lists (an interrupted download or copy?)"
    return f"a damaged safetensors header ({error})"


def open_safetensors(path, device="cpu"):
    """safetensors.safe_open(path) (a context manager reading tensor by tensor) whose open error names the file."""
    from safetensors import SafetensorError, safe_open
    try:
        return safe_open(path, framework="pt", device=str(device))
    except SafetensorError as e:
        raise ValueError(f"{path}: cannot read the weights: {safetensors_problem(path, e)}") from None


def safetensors_keys(path):
    """The tensor names of a safetensors file, without reading the tensors."""
    with open_safetensors(path) as f:
        return list(f.keys())


def load_safetensors(path, device="cpu"):
    """A whole safetensors file -> {name: tensor}; a truncated or foreign file is one ValueError naming it."""
    with open_safetensors(path, device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def umask():
    """The process's umask (read without changing it where /proc says it)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old


def write_safetensors(tensors, path, metadata=None):
    """{name: tensor} -> a safetensors file at `path`, written under a temporary name and renamed (a kill leaves no
    half file under `path`), with the mode of any other file the process writes (safetensors alone gives 0600,
    which a teammate cannot read)."""
    from safetensors.torch import save_file
    tmp = f"{path}.{os.getpid()}.tmp"
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
