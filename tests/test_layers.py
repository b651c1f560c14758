"""The shape of the code (README.md "Files"): the import graph runs one way, down the layers below (no circle,
nothing sideways), and files and functions stay a size a person reads on one screen. Pure source checks (ast), no
imports of the project: they run in a second."""
import ast
import fnmatch
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> layer; a module may import only modules of strictly lower layers (inside functions too). Root modules by
# name, bench scripts as "bench/<name>" ("bench/*": every bench script not named before it).
LAYERS = {
    "configurator": 0, "media": 0, "simpletuner": 0, "causal": 0, "sparse_attn": 0, "readers": 0, "quant": 0,
    "ulysses": 0, "run_dir": 0, "progress": 0,
    "lora": 1,
    "model_wan": 2,
    "vae_wan": 3, "text_encoders": 3, "flow": 3,
    "cache": 4,
    "sample": 5, "data": 5, "dmd": 5, "checks": 5, "card": 5,
    "parallel": 6, "networks": 6, "publish": 6, "quality": 6, "validation": 6, "run_state": 6,
    "train_dmd": 7,
    "bench/common": 8,
    "demo": 9, "bench/*": 9,
    "bench/bench_teacher_size": 10,   # builds on demo.py's stages
}
SETUP_FILES = {"setup.py", "conftest.py", "noxfile.py"}   # root files that are packaging, not project modules
MAX_FILE_LINES = 800
MAX_FUNCTION_LINES = 80


def project_modules():
    """{module name: path} of the root *.py (setup files aside) and bench/*.py."""
    mods = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        if os.path.basename(path) not in SETUP_FILES:
            mods[os.path.basename(path)[:-3]] = path
    for path in sorted(glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        mods["bench/" + os.path.basename(path)[:-3]] = path
    return mods


def layer_of(module):
    if module in LAYERS:
        return LAYERS[module]
    return next((v for k, v in LAYERS.items() if "*" in k and fnmatch.fnmatch(module, k)), None)


def imported_names(tree):
    """Every import in a module, at any depth (functions, `if __name__` blocks): `import x`, `import x.y as z`,
    `from x import y` (y kept too: `from bench import bench_dit`), __import__("x") and importlib.import_module("x")
    -> [(line, top-level name, names imported from it)]."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0], ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.append((node.lineno, node.module.split(".")[0], tuple(a.name for a in node.names)))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (isinstance(node.func, ast.Name) and node.func.id == "__import__"
                   or isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")):
            out.append((node.lineno, node.args[0].value.split(".")[0], ()))
    return out


def resolve(name, members, mods):
    """An imported top-level name -> the project modules it means: a root module by its name, a bench script by its
    name (bench scripts put the root and bench/ on sys.path) or as `from bench import <name>`; [] for the rest."""
    if name in mods:
        return [name]
    if "bench/" + name in mods:
        return ["bench/" + name]
    if name == "bench":
        return ["bench/" + m for m in members if "bench/" + m in mods]
    return []


def project_imports(mods):
    """-> [(importer, line, imported)] over every project module, each project import once per line."""
    edges = []
    for mod, path in mods.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for line, name, members in imported_names(tree):
            edges += [(mod, line, target) for target in resolve(name, members, mods) if target != mod]
    return sorted(set(edges))


def test_every_module_has_a_layer():
    missing = [m for m in project_modules() if layer_of(m) is None]
    assert not missing, f"project modules missing from LAYERS in {__file__}: {', '.join(missing)}"


def test_imports_go_down_the_layers():
    mods = project_modules()
    bad = []
    for mod, line, target in project_imports(mods):
        a, b = layer_of(mod), layer_of(target)
        if a is not None and b is not None and b >= a:
            kind = "sideways" if a == b else "upward"
            where = f"{os.path.relpath(mods[mod], ROOT)}:{line}"
            bad.append(f"  {where}: {mod} (layer {a}) imports {target} (layer {b}), {kind}")
    assert not bad, ("imports that do not go strictly down the layers (LAYERS in tests/test_layers.py):\n"
                     + "\n".join(bad))


def test_file_sizes():
    big = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        with open(path) as f:
            n = len(f.read().splitlines())
        if n > MAX_FILE_LINES:
            big.append(f"  {os.path.relpath(path, ROOT)}: {n} lines")
    assert not big, f"files over {MAX_FILE_LINES} lines:\n" + "\n".join(big)


def test_function_sizes():
    """Every def (methods and nested functions too, each by its own span from its def line to its last line)."""
    long = []
    for path in sorted(glob.glob(os.path.join(ROOT, "*.py")) + glob.glob(os.path.join(ROOT, "bench", "*.py"))):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append((os.path.relpath(path, ROOT), node.lineno, node.name, n))
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines:\n" + "\n".join(
        f"  {p}:{line} {name}: {n} lines" for p, line, name, n in sorted(long))


def test_the_import_scan_sees_every_form():
    """The scanner itself: top-level, aliased, dotted, from-, nested and dynamic imports, and what they resolve to."""
    src = ("import flow\nimport model_wan as mw\nimport os.path\nfrom sample import sample_student\n"
           "def f():\n    import train_dmd\n    return __import__('configurator')\n"
           "if __name__ == '__main__':\n    from common import gb\n    from bench import bench_dit\n")
    names = [(line, name) for line, name, _ in imported_names(ast.parse(src))]
    assert sorted(names) == [(1, "flow"), (2, "model_wan"), (3, "os"), (4, "sample"), (6, "train_dmd"),
                             (7, "configurator"), (9, "common"), (10, "bench")]
    mods = {"flow": "", "sample": "", "bench/common": "", "bench/bench_dit": ""}
    assert resolve("common", ("gb",), mods) == ["bench/common"]
    assert resolve("bench", ("bench_dit",), mods) == ["bench/bench_dit"]
    assert resolve("os", (), mods) == [] and resolve("flow", (), mods) == ["flow"]
    assert layer_of("bench/bench_dit") == LAYERS["bench/*"] and layer_of("bench/common") == LAYERS["bench/common"] and layer_of("nonexistent") is None
