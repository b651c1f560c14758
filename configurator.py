"""
nanoGPT-style configuration for the entry scripts. A script keeps its defaults as plain assignments
between two fence lines (`# ----...`), each explained by the comment on its line, and calls

    config = configure(globals(), __file__)

which applies, in order, any config files given as positional arguments (plain Python assignments,
exec'd) and command-line overrides, checks every key against the defaults and every value against the default's
type, prints `--help` (the usage line and the fenced block), and returns the resolved {key: value} dict (also
written back into the script's globals). The command line takes the spellings people type: `--key=value`,
`--key value`, `--flag` alone (a bool: True), true/false/yes/no/on/off/1/0 in any case, `-` for `_` in a key, a
comma list for a list key. An unknown key, a bad value or a missing file is one line naming the closest key (exit
status 2, as argparse), never a traceback.

`--print_config` prints the resolved config as JSON and exits (nothing else runs). A script's own command flags
outside a config (data.py's commands, publish.py's --dry_run) are a `name = dict(key=default,  # description)`
read by `command_flags`. `describe` gives every key's description (tests check that none is missing).
`script_defaults(path)` reads another script's defaults without importing it (data.py's commands take
train_dmd.py's config); `pick_threads` chooses torch's CPU threads for every entry script; `redact` is what every
file a run writes holds of its config and command line (no secret); `hub_file` reads a file-valued key's
"hf://datasets/OWNER/NAME/path" through the hub cache.
"""
import ast
import contextlib
import difflib
import io
import json
import os
import re
import sys
import tokenize

FENCE = "# " + "-" * 77
BOOLS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def _fenced(lines, path):
    """-> (first, last) line index of the defaults block: the lines between the first two fence lines."""
    fences = [i for i, line in enumerate(lines) if line.startswith(FENCE)]
    if len(fences) < 2:
        raise RuntimeError(f"{path}: no fenced defaults block (two lines starting with {FENCE[:12]}...)")
    return fences[0] + 1, fences[1]


def _defaults_source(path):
    """The lines between the first two fence lines of the script (its defaults block)."""
    lines = _read_lines(path)
    a, b = _fenced(lines, path)
    return lines[a:b]


def default_keys(path):
    keys = []
    for node in ast.parse("\n".join(_defaults_source(path))).body:
        if isinstance(node, ast.Assign):
            keys += [t.id for t in node.targets if isinstance(t, ast.Name)]
    return keys


def script_defaults(path):
    """{key: default} of a script's fenced defaults block, executed on its own (plain assignments)."""
    scope = {}
    exec(compile("\n".join(_defaults_source(path)), path, "exec"), {}, scope)
    return {k: scope[k] for k in default_keys(path)}


def _commands_node(path, name):
    """The `name = dict(...)` call in a script (at any depth: data.py keeps it under `if __name__`)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
                and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "dict"):
            return node.value
    raise RuntimeError(f"{path}: no `{name} = dict(...)`")


def describe(path, name=None):
    """{key: description} of a script's keys: the comment on its default's line(s), continued by the indented
    comment-only lines under it; the fenced block's assignments, or with name the keywords of `name = dict(...)`."""
    lines = _read_lines(path)
    comments = {}   # line number (1-based) -> comment text; tokenize: a "#" inside a string is no comment
    for tok in tokenize.generate_tokens(io.StringIO("\n".join(lines) + "\n").readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    if name is None:
        a, b = _fenced(lines, path)
        spans = [([t.id for t in n.targets if isinstance(t, ast.Name)], a + n.lineno, a + n.end_lineno)
                 for n in ast.parse("\n".join(lines[a:b])).body if isinstance(n, ast.Assign)]
    else:
        spans = [([kw.arg], kw.value.lineno, kw.value.end_lineno) for kw in _commands_node(path, name).keywords]
    out = {}
    for keys, first, last in spans:
        text = [comments[i] for i in range(first, last + 1) if i in comments]
        while last < len(lines) and lines[last].lstrip().startswith("#") and lines[last][:1].isspace():
            last += 1   # an indented comment-only line continues the description (lines[last] is line last + 1)
            text.append(comments.get(last, ""))
        out.update({k: " ".join(t for t in text if t) for k in keys})
    return out


def command_defaults(path, name):
    """{key: default} of a script's `name = dict(key=literal, ...)`, read from its source."""
    return {kw.arg: ast.literal_eval(kw.value) for kw in _commands_node(path, name).keywords}


def _check(key, value, default):
    """Type check against the default: ints widen to floats, None accepts anything, tuples/lists interchange."""
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        if not (isinstance(default, bool) and isinstance(value, bool)):
            raise TypeError(f"{key}: expected {type(default).__name__}, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default and len(value) == len(default):   # items checked like scalars: (0, 0.999) -> (0.0, 0.999)
            return type(default)(_check(f"{key}[{i}]", v, d) for i, (v, d) in enumerate(zip(value, default)))
        return type(default)(value)
    if not isinstance(value, type(default)):
        raise TypeError(f"{key}: expected {type(default).__name__} (default {default!r}), got {value!r}")
    return value


def fail(prog, message):
    """A config error as the command line shows it: one line (exit status 2, as argparse), no traceback."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f"; did you mean {'--' + close[0]!r}?" if close else ""
    return f"unknown key {key!r}{hint} (see --help)"


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text   # a bare string, e.g. --prompt=a cat


def _value(key, text, default):
    """Command-line text -> a value of the default's type (checked by _check after)."""
    if isinstance(default, bool):
        if text.strip().lower() not in BOOLS:
            raise TypeError(f"{key}: expected true or false (or yes/no, on/off, 1/0), got {text!r}")
        return BOOLS[text.strip().lower()]
    if isinstance(default, str) and not text.startswith(("'", '"')):
        return text
    value = _parse_value(text)
    if isinstance(default, (list, tuple)) and default and isinstance(value, str) and value[:1] not in "[({":
        value = [_parse_value(v.strip()) for v in value.split(",") if v.strip()]   # a comma list of scalars: a,b,c
    return value


def read_argv(argv, defaults, prog):
    """Command-line words -> [(key, value) or (None, positional word)] in the order given. A word after `--key`
    (without "=") is its value unless the key is a bool, which takes it only when it is a bool word."""
    out, i = [], 0
    while i < len(argv):
        word, i = argv[i], i + 1
        if not word.startswith("--"):
            out.append((None, word))
            continue
        key, eq, text = word[2:].partition("=")
        key = key.replace("-", "_")
        if key not in defaults:
            fail(prog, _unknown(key, list(defaults)))
        if not eq and isinstance(defaults[key], bool):   # --flag alone, or --flag false
            take = i < len(argv) and argv[i].lower() in BOOLS
            text, i = (argv[i], i + 1) if take else ("true", i)
        elif not eq:
            if i >= len(argv) or argv[i].startswith("--"):
                fail(prog, f"--{key} needs a value: --{key}=VALUE or --{key} VALUE")
            text, i = argv[i], i + 1
        try:
            out.append((key, _check(key, _value(key, text, defaults[key]), defaults[key])))
        except TypeError as e:
            fail(prog, str(e))
    return out


def _read_file(path, json_map, prog):
    """A config file -> its {name: value} (plain Python exec'd, or .json through json_map / json.load)."""
    if not os.path.isfile(path):
        fail(prog, f"no config file {path!r} (words without -- are config files; a value with spaces needs quotes: "
                   "--prompt='a red fox')")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        fail(prog, f"config file {path!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); save it "
                   "as UTF-8")
    if path.endswith(".json"):
        if json_map:
            try:
                return json_map(path)
            except (ValueError, OSError) as e:   # a foreign config's own mistakes (missing files, bad JSON): one line
                fail(prog, str(e))
        try:
            return json.loads(text)
        except ValueError as e:
            fail(prog, f"config file {path!r}: not JSON: {e}")
    scope = {}
    try:
        code = compile(text, path, "exec")
    except SyntaxError as e:
        fail(prog, f"config file {path!r}, line {e.lineno}: {e.msg} (a config file is plain Python assignments)")
    try:
        exec(code, {"__file__": os.path.abspath(path)}, scope)   # __file__ lets a config build on another one beside it
    except Exception as e:   # the file's own code failed (1/0, a missing environment variable): one line naming it
        tb, line = e.__traceback__, "?"
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == path:
                line = tb.tb_lineno
            tb = tb.tb_next
        fail(prog, f"config file {path!r}, line {line}: {type(e).__name__}: {e}")
    return {k: v for k, v in scope.items() if not (k.startswith("_") or callable(v) or type(v).__name__ == "module")}


def _flag_lines(path, name):
    docs = describe(path, name)
    return [f"--{k}={v!r}".ljust(32) + f"# {docs.get(k, '')}" for k, v in command_defaults(path, name).items()]


def configure(g, script_path, argv=None, json_map=None, commands=None):
    """g: the script's globals (its defaults); json_map: path -> dict of our keys, how `.json` config files are read
    (e.g. a SimpleTuner config). commands: (path, name) of a script's own `name = dict(...)` flags added to
    script_path's keys (data.py's commands on train_dmd.py's config): --help lists those, the result holds them too."""
    argv = sys.argv[1:] if argv is None else list(argv)
    keys = default_keys(script_path)
    defaults = {k: g[k] for k in keys}
    prog = os.path.basename(commands[0] if commands else script_path)
    extra = command_defaults(*commands) if commands else {}
    if "-h" in argv or "--help" in argv:
        print(f"usage: python {prog} [CONFIG.py ...] [--key=value | --key value | --flag ...] [--print_config]\n")
        if commands:
            print("\n".join(_flag_lines(*commands)) + f"\n\nand every key of {os.path.basename(script_path)}'s config "
                  f"(the teacher, datasets, seed, ...): python {os.path.basename(script_path)} --help")
        else:
            print("\n".join(line for line in _defaults_source(script_path) if line.strip()))
        sys.exit(0)
    show = "--print_config" in argv
    cfg = {**defaults, **extra}
    with contextlib.redirect_stdout(sys.stderr if show else sys.stdout):   # --print_config: stdout is the JSON alone
        _apply(cfg, defaults, argv, json_map, prog)
    g.update(cfg)
    if show:
        print(json.dumps(redact(cfg), indent=2, default=str, ensure_ascii=False))
        sys.exit(0)
    return cfg


def _apply(cfg, defaults, argv, json_map, prog):
    """Config files and --key=value into cfg, in the order given (configure)."""
    keys = list(defaults)
    for key, value in read_argv([a for a in argv if a != "--print_config"], cfg, prog):
        if key is not None:
            cfg[key] = value
            continue
        for k, v in _read_file(value, json_map, prog).items():
            if k not in defaults:
                fail(prog, f"{value}: " + _unknown(k, keys))
            try:
                cfg[k] = _check(k, v, defaults[k])
            except TypeError as e:
                fail(prog, f"{value}: {e}")


def command_flags(path, name, argv=None, usage=""):
    """A script's own flags, `name = dict(key=default,  # description, ...)` in path, read from argv (sys.argv[1:]
    when None) with configure's spellings -> (flags dict, positional words); --help prints usage and the flags."""
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = os.path.basename(path)
    if "-h" in argv or "--help" in argv:
        print(f"usage: python {prog} {usage}\n\n" + "\n".join(_flag_lines(path, name)))
        sys.exit(0)
    flags, words = command_defaults(path, name), []
    for key, value in read_argv(argv, flags, prog):
        if key is None:
            words.append(value)
        else:
            flags[key] = value
    return flags, words


def pick_threads(n=0):
    """torch's CPU threads -> (count, why). n > 0: n. 0: OMP_NUM_THREADS when set, else the cores this process may
    run on (sched_getaffinity) less the load already on them (1-minute load average): on a busy 2-core machine a
    2-thread torch job ran 30x slower than a 1-thread one (threads waiting on each other behind other work)."""
    if n > 0:
        return n, "as set"
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"])), "OMP_NUM_THREADS"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load))), f"{cores} core(s) available, load {load:.1f}"


def hub_file(path):
    """A file-valued key (prompts_file) -> a local path. "hf://datasets/OWNER/NAME/path/in/repo" (hf://OWNER/NAME/...:
    a model repo; NAME@REVISION pins one) is fetched once into the hub cache by hf_hub_download (HF_HUB_OFFLINE and
    the token honoured); any other path comes back as it is. Unreadable: one line naming the file and the fix."""
    if not path.startswith("hf://"):
        return path
    parts = path[len("hf://"):].split("/")
    kind = parts.pop(0)[:-1] if parts[0] in ("datasets", "models", "spaces") else "model"
    if len(parts) < 3 or not all(parts):
        raise ValueError(f"{path!r}: a hub file is hf://datasets/OWNER/NAME/path/to/file (or hf://OWNER/NAME/... for a model repo)")
    repo, _, revision = "/".join(parts[:2]).partition("@")
    name = "/".join(parts[2:])
    from huggingface_hub import hf_hub_download
    try:
        return hf_hub_download(repo, name, repo_type=kind, revision=revision or None)
    except Exception as e:   # noqa: BLE001 -- offline, missing, gated: the same one line with the fix
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no")
        raise FileNotFoundError(
            f"{path}: {name} of the {kind} repo {repo} is not in the hub cache and could not be downloaded ("
            + ("HF_HUB_OFFLINE is set" if offline else f"{type(e).__name__}") + f"): fetch it once where the hub is "
            f"reachable (hf download {repo} {name} --repo-type {kind} --local-dir prompts) and give the local path, "
            f"e.g. prompts/{name.rsplit('/', 1)[-1]}") from None

# -----------------------------------------------------------------------------
# secrets: a webhook URL or a token given inline (config file or --key=value) is used by the run, never written

SECRET_KEY = re.compile(r"token|secret|passw|api_?key|credential|auth|webhook_url|callback_url", re.I)
URL = re.compile(r"([a-z][a-z0-9+.-]*://)([^/?#\s@'\"]*@)?([^/?#\s'\"]*)([^\s'\"]*)", re.I)
HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
REDACTED = "<redacted>"


def redact(value, key=""):
    """A copy of a config value (dict, list, tuple, inline JSON, an argv item "--key=value", text) without secrets:
    the value of a secret-named key (a URL keeps its scheme and host), the path of any webhook's URL (a "hook" in its
    host or path: Discord's, Slack's, ...) wherever it appears, any URL's user:password@, hf_ tokens. Every
    written copy of the config and argv goes through it (config.json, checkpoints, env.json, wandb, printed URLs)."""
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v, key) for v in value)
    if not isinstance(value, str):
        return value
    if value.startswith("--") and "=" in value:
        k, _, v = value.partition("=")
        return f"{k}={redact(v, k[2:])}"
    if value.lstrip()[:1] in ("{", "["):   # inline JSON, e.g. webhook_config='{"webhook_url": ...}'
        try:
            return json.dumps(redact(json.loads(value), key))
        except ValueError:
            pass
    secret = bool(SECRET_KEY.search(key))
    if secret and value and not URL.match(value):
        return REDACTED
    value = URL.sub(lambda m: m[1] + (REDACTED + "@" if m[2] else "") + m[3]   # a webhook's URL: its path is the token
                    + ("/" + REDACTED if (secret or "hook" in (m[3] + m[4]).lower()) and m[4] else m[4]), value)
    return HF_TOKEN.sub("hf_" + REDACTED, value)
