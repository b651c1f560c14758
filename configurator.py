"""
nanoGPT-style configuration for the entry scripts. A script keeps its defaults as plain assignments
between two fence lines (`# ----...`) and calls

    config = configure(globals(), __file__)

which applies, in order, any config files given as positional arguments (plain Python assignments,
exec'd) and `--key=value` overrides, checks every key against the defaults (an unknown key is an error
that names the closest known key) and every value against the default's type, prints `--help`, and
returns the resolved {key: value} dict (also written back into the script's globals).

`--print_config` prints the resolved config as JSON and exits (nothing else runs). `script_defaults(path)` reads
another script's defaults without importing it (data.py's commands take train_dmd.py's config); `pick_threads`
chooses torch's CPU threads for every entry script; `redact` is what every file a run writes holds of its
config and command line (no secret).
"""
import ast
import difflib
import json
import os
import re
import sys

FENCE = "# " + "-" * 77


def _defaults_source(path):
    """The lines between the first two fence lines of the script (its defaults block)."""
    with open(path) as f:
        lines = f.read().splitlines()
    fences = [i for i, line in enumerate(lines) if line.startswith(FENCE)]
    if len(fences) < 2:
        raise RuntimeError(f"{path}: no fenced defaults block (two lines starting with {FENCE[:12]}...)")
    return lines[fences[0] + 1: fences[1]]


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


def _unknown(key, known):
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return KeyError(f"unknown config key {key!r}{hint} (see --help)")


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text   # a bare string, e.g. --prompt=a cat


def configure(g, script_path, argv=None, json_map=None):
    """json_map: path -> dict of our keys, how `.json` config files are read (e.g. a SimpleTuner config)."""
    argv = sys.argv[1:] if argv is None else argv
    show = "--print_config" in argv
    argv = [a for a in argv if a != "--print_config"]
    keys = default_keys(script_path)
    defaults = {k: g[k] for k in keys}
    if "-h" in argv or "--help" in argv:
        print(f"usage: python {script_path.rsplit('/', 1)[-1]} [CONFIG.py ...] [--key=value ...] [--print_config]\n")
        print("\n".join(line for line in _defaults_source(script_path) if line.strip()))
        sys.exit(0)
    cfg = dict(defaults)
    for arg in argv:
        if not arg.startswith("--"):
            scope = {}
            if arg.endswith(".json") and json_map:
                scope = json_map(arg)
            elif arg.endswith(".json"):
                with open(arg) as f:
                    scope = json.load(f)
            else:
                with open(arg) as f:   # __file__ lets a config build on another one beside it
                    exec(compile(f.read(), arg, "exec"), {"__file__": os.path.abspath(arg)}, scope)
            for k, v in scope.items():
                if k.startswith("_") or callable(v) or type(v).__name__ == "module":
                    continue
                if k not in defaults:
                    raise _unknown(k, keys)
                cfg[k] = _check(k, v, defaults[k])
            continue
        if "=" not in arg:
            raise ValueError(f"expected --key=value, got {arg!r}")
        k, text = arg[2:].split("=", 1)
        if k not in defaults:
            raise _unknown(k, keys)
        value = text if isinstance(defaults[k], str) and not text.startswith(("'", '"')) else _parse_value(text)
        cfg[k] = _check(k, value, defaults[k])
    g.update(cfg)
    if show:
        print(json.dumps(cfg, indent=2, default=str, ensure_ascii=False))
        sys.exit(0)
    return cfg


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

# -----------------------------------------------------------------------------
# secrets: a webhook URL or a token given inline (config file or --key=value) is used by the run, never written

SECRET_KEY = re.compile(r"token|secret|passw|api_?key|credential|auth|webhook_url|callback_url", re.I)
URL = re.compile(r"([a-z][a-z0-9+.-]*://)([^/?#\s@'\"]*@)?([^/?#\s'\"]*)([^\s'\"]*)", re.I)
HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}")
REDACTED = "<redacted>"


def redact(value, key=""):
    """A copy of a config value (dict, list, tuple, inline JSON, an argv item "--key=value", text) without secrets:
    the value of a secret-named key (a URL keeps its scheme and host), any URL's user:password@, hf_ tokens. Every
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
    value = URL.sub(lambda m: m[1] + (REDACTED + "@" if m[2] else "") + m[3]
                    + ("/" + REDACTED if secret and m[4] else m[4]), value)
    return HF_TOKEN.sub("hf_" + REDACTED, value)
