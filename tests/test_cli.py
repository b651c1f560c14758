"""What a newcomer meets first: sample.py on a student folder that train_dmd.py wrote (its config.json fixes the
teacher and size), one-line errors for missing weights, torch's thread count, the terminal log line."""
import io
import json
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys

import pytest
import torch

import configurator
from card import data_summary
import media
import model_wan as mw
import progress
import publish
from conftest import run_script
import sample
import text_encoders
import train_dmd
import vae_wan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def demo_teacher(folder):
    """A demo.py-style teacher folder: tiny DiT, tiny VAE, the TinyTextEncoder marker (no downloads)."""
    torch.manual_seed(0)
    mw.save_dit(mw.WanDiT(mw.PRESETS["tiny"]).eval(), os.path.join(folder, "transformer"))
    vae_wan.save_vae(vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)),
                     os.path.join(folder, "vae"))
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        f.write("{}")
    with open(os.path.join(folder, text_encoders.TINY_TEXT_MARKER), "w") as f:
        f.write("")
    return folder


def test_sample_uses_the_student_folders_config(tmp_path, capsys, monkeypatch):
    teacher = demo_teacher(str(tmp_path / "teacher"))
    out = str(tmp_path / "student")
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    train_dmd.train(train_dmd.config([os.path.join(ROOT, "config", "tiny.py"), f"--pretrained_model_name_or_path={teacher}",
                                      f"--output_dir={out}", "--max_train_steps=2", "--height=32", "--width=48",
                                      "--num_training_frames=2", "--validation_resolution=48x32",
                                      "--validation_num_video_frames=5", "--validation_diversity_seeds=0"]))
    # the loop's checkpoint-on-signal handlers end with it (they once outlived it: demo.py ignored Ctrl-C after DMD)
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
    capsys.readouterr()
    c = sample.config([f"--ckpt={out}", f"--out={tmp_path / 'samples'}"])
    assert (c["model"], c["height"], c["width"], c["num_frames"]) == (teacher, 32, 48, 5)
    assert "its config.json sets model=" in capsys.readouterr().out
    (path,) = sample.generate(c)
    assert media.read_mp4(path)[0].shape == (5, 32, 48, 3)
    assert "VAE decode" in capsys.readouterr().err   # the decode has its own progress bar
    c = sample.config([f"--ckpt={out}", "--num_frames=9"])   # the command line wins over the folder
    assert (c["num_frames"], c["height"]) == (9, 32)
    # publish.py's dry run on it (spelled --dry-run): the staged card loads this teacher folder and names the run
    monkeypatch.setattr(sys, "argv", ["publish.py", out, "--dry-run"])
    runpy.run_path(os.path.join(ROOT, "publish.py"), run_name="__main__")
    assert "README.md" in capsys.readouterr().out
    card = open(os.path.join(out, ".hub_staging", "final", "README.md")).read()
    assert "# student: a 3-step DMD student" in card and f'WanPipeline.from_pretrained("{teacher}"' in card


def test_sample_missing_teacher_is_one_line(tmp_path):
    c = sample.config([f"--model={tmp_path / 'no' / 'such'}", "--device=cpu"])
    with pytest.raises(SystemExit, match="point --model at a local copy") as e:
        sample.settings(c)
    assert "\n" not in str(e.value)
    json.dump({"pretrained_model_name_or_path": "tiny", "height": 64, "width": 64, "num_training_frames": 3},
              open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match="no tiny_teacher/ beside it: write it by exporting the run again"):
        sample.student_defaults(str(tmp_path))   # a tiny run from before tiny_teacher/: the way to write it
    assert sample.student_defaults(str(tmp_path), {"model"}) == dict(height=64, width=64, num_frames=9)
    os.makedirs(tmp_path / "tiny_teacher")
    assert sample.student_defaults(str(tmp_path))["model"] == str(tmp_path / "tiny_teacher")


def test_pick_threads(monkeypatch):
    assert configurator.pick_threads(3) == (3, "as set")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert configurator.pick_threads(0)[0] == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))   # busier than the machine: 1 thread
    assert configurator.pick_threads(0)[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert configurator.pick_threads(0)[0] == cores


def test_log_line_dashes_and_no_cpu_memory(tmp_path, capsys):
    pub = publish.Publisher(dict(train_dmd.DEFAULTS, output_dir=str(tmp_path)), main=True)
    pub.open_log(0)
    pub.log({"step": 1, "fake_score_loss": 0.5, "f_grad_norm": 0.1, "lr": 1e-5, "s_per_step": 0.2, "peak_mem_gb": 0.0}, 1)
    pub.log({"step": 2, "dmd_loss": float("nan"), "lr": 1e-5, "s_per_step": 0.2, "peak_mem_gb": 3.25}, 2)
    pub.close_log()
    first, second = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "| dmd - |" in first and "|g| - |" in first and "gnorm G - F 1.00e-01" in first and "mem" not in first
    assert "dmd nan" in second and "mem 3.2 GB" in second   # a real non-finite loss still reads nan


def test_command_line_spellings(tmp_path, capsys):
    """--key value, --flag alone, bool words in any case, dashes for underscores, comma lists: what people type."""
    script = tmp_path / "s.py"
    script.write_text(f"# {'-' * 77}\nlr = 1e-4  # lr\nname = 'a'  # name\nuse_ema = True  # ema\nfast = False  # fast\n"
                      f"targets = ('q', 'k')  # modules\nseed = 0  # seed\n# {'-' * 77}\n")
    g = dict(lr=1e-4, name="a", use_ema=True, fast=False, targets=("q", "k"), seed=0)
    c = configure_(g, script, ["--lr", "3e-4", "--use-ema=FALSE", "--fast", "--name", "a cat", "--targets=q,v,o",
                               "--seed", "-1"])
    assert c == dict(lr=3e-4, name="a cat", use_ema=False, fast=True, targets=("q", "v", "o"), seed=-1)
    assert configure_(g, script, ["--fast", "no", "--use_ema", "Yes"])["fast"] is False
    assert configure_(g, script, ["--fast", "--seed=3"])["fast"] is True   # a flag before another flag: True
    for argv, err in ((["--sed=3"], "unknown key 'sed'; did you mean '--seed'?"), (["--use_ema=maybe"], "true or false"),
                      (["--lr"], "--lr needs a value"), (["--name", "a", "cat"], "no config file 'cat'"),
                      (["--seed=1.5"], "seed: expected int")):
        with pytest.raises(SystemExit) as e:
            configure_(g, script, argv)
        line = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err in line and "\n" not in line and line.startswith("s.py: error:")



def test_bad_config_files_are_one_line(tmp_path, capsys):
    """A config file that is not UTF-8, not Python or not JSON: one line naming the file (before: a traceback)."""
    script = tmp_path / "s.py"
    script.write_text(f"# {'-' * 77}\nseed = 0  # seed\n# {'-' * 77}\n")
    (tmp_path / "latin1.py").write_bytes("prompt = 'caf\xe9'\n".encode("latin-1"))
    (tmp_path / "syntax.py").write_text("seed = (1,\n")
    (tmp_path / "bad.json").write_text('{"seed": 1,}')
    for name, err in (("latin1.py", "not UTF-8 text (byte 0xe9"), ("syntax.py", "line 1"), ("bad.json", "not JSON")):
        with pytest.raises(SystemExit) as e:
            configure_(dict(seed=0), script, [str(tmp_path / name)])
        line = capsys.readouterr().err.strip()
        assert e.value.code == 2 and err in line and name in line and "\n" not in line

def configure_(g, script, argv):
    return configurator.configure(dict(g), str(script), argv)


def test_entry_points_have_their_own_help(capsys):
    """data.py lists its own commands (not the trainer's keys); publish.py refuses a mistyped --dry-run."""
    trainer = os.path.join(ROOT, "train_dmd.py")
    with pytest.raises(SystemExit):
        configurator.configure(dict(train_dmd.DEFAULTS), trainer, ["--help"], commands=(os.path.join(ROOT, "data.py"), "commands"))
    out = capsys.readouterr().out
    assert "python data.py" in out and "--make_ode_pairs=''" in out and "--teacher_mp4=False" in out
    assert "lora_rank" not in out and "python train_dmd.py --help" in out
    c = configurator.configure(dict(train_dmd.DEFAULTS), trainer, [os.path.join(ROOT, "config", "tiny.py"),
                               "--make_teacher_data", "p.txt", "--teacher_mp4"], commands=(os.path.join(ROOT, "data.py"), "commands"))
    assert (c["make_teacher_data"], c["teacher_mp4"], c["teacher_steps"], c["pretrained_model_name_or_path"]) == ("p.txt", True, 50, "tiny")
    publish_py = os.path.join(ROOT, "publish.py")
    flags, words = configurator.command_flags(publish_py, "flags", ["out/x", "--dry-run", "--hub-model-id=me/x"])
    assert (flags["dry_run"], flags["hub_model_id"], flags["model_card_private"], words) == (True, "me/x", False, ["out/x"])
    with pytest.raises(SystemExit):
        configurator.command_flags(publish_py, "flags", ["out/x", "--dryrun"])
    assert "did you mean '--dry_run'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configurator.command_flags(publish_py, "flags", ["-h"])
    assert "--dry_run=False" in capsys.readouterr().out


def test_every_key_has_a_description():
    """--help explains every key of every entry script: a comment on (or indented under) each default line."""
    for script in ("train_dmd.py", "sample.py", "demo.py"):
        path = os.path.join(ROOT, script)
        docs = configurator.describe(path)
        assert list(docs) == configurator.default_keys(path)
        missing = [k for k, v in docs.items() if not v.strip()]
        assert not missing, f"{script}: keys without a description: {missing}"
    for script, name in (("data.py", "commands"), ("publish.py", "flags")):
        docs = configurator.describe(os.path.join(ROOT, script), name)
        assert docs and all(v.strip() for v in docs.values()), (script, docs)
    docs = configurator.describe(os.path.join(ROOT, "train_dmd.py"))
    assert "generator steps" in docs["ema_start_step"] and "original-layout" in docs["lora_targets"]
    assert "random weights at real size" in docs["pretrained_model_name_or_path"]   # a continued comment is read whole


def test_prompts_file_from_the_hub(tmp_path, monkeypatch):
    """prompts_file="hf://datasets/OWNER/NAME/path" reads through hf_hub_download; unreadable: one line with the fix."""
    import huggingface_hub
    import data
    local = tmp_path / "p.txt"
    local.write_text("a red fox\n\na blue bird\n")
    calls = []

    def fake(repo_id, filename, repo_type=None, revision=None):
        calls.append((repo_id, filename, repo_type, revision))
        return str(local)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    c = dict(train_dmd.DEFAULTS, prompts_file="hf://datasets/someone/prompts@v1/sets/p.txt")
    assert data.read_prompts(c)[0] == ["a red fox", "a blue bird"]
    assert calls == [("someone/prompts", "sets/p.txt", "dataset", "v1")]
    assert configurator.hub_file("hf://someone/model/p.txt") == str(local) and calls[-1][2] == "model"
    assert configurator.hub_file(str(local)) == str(local)   # a local path is not touched
    assert data_summary(c) == "data-free DMD: 2 training prompts (`hf://datasets/someone/prompts@v1/sets/p.txt`), no videos"

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError) as e:
        data.read_prompts(c)
    msg = str(e.value)
    assert "\n" not in msg and "sets/p.txt" in msg and "HF_HUB_OFFLINE" in msg and "hf download someone/prompts" in msg
    assert "the training prompts of `hf://datasets/someone" in data_summary(c)   # the model card, offline: named
    with pytest.raises(ValueError, match="hf://datasets/OWNER/NAME"):
        configurator.hub_file("hf://datasets/only-one")


def test_starter_prompts_ship_with_the_headline_config():
    scope = {}
    exec(open(os.path.join(ROOT, "config", "wan_dmd_3step.py")).read(), {"__file__": "x"}, scope)
    with open(os.path.join(ROOT, scope["prompts_file"]), encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)


def test_packaging_installs_dependencies_only():
    """pip install -e . puts no generic top-level name (data, sample, publish, ...) on the venv's path; the declared
    license has its file; wandb is an extra."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)
    assert project["tool"]["setuptools"] == {"py-modules": [], "packages": []}
    assert project["project"]["license"] == "Apache-2.0" and project["project"]["license-files"] == ["LICENSE"]
    with open(os.path.join(ROOT, "LICENSE")) as f:
        head = f.read(200).split()
    assert head[:4] == ["Apache", "License", "Version", "2.0,"]
    assert project["project"]["optional-dependencies"]["wandb"] == ["wandb"]


def shell_commands(markdown):
    """The commands of a markdown text's shell code blocks (```bash, ```sh, ```shell or untagged), each as printed
    (a line continued by a trailing backslash joined with the next), and its inline `python ...` spans."""
    out, block, lang = [], None, ""
    for line in markdown.splitlines():
        if block is None:
            out += re.findall(r"`(python [^`]+)`", line)
        if line.lstrip().startswith("```"):
            if block is None:
                block, lang = [], line.strip()[3:].strip()
            else:
                if lang in ("", "bash", "sh", "shell"):
                    joined = "\n".join(block).replace("\\\n", " ")
                    out += [c.strip() for c in joined.splitlines() if c.strip() and not c.strip().startswith("#")]
                block = None
            continue
        if block is not None:
            block.append(line)
    return out


def sandbox(tmp_path):
    """A folder laid out as a fresh clone (the root scripts, config/, prompts/ linked) to run commands in."""
    box = tmp_path / "clone"
    box.mkdir()
    for name in os.listdir(ROOT):
        if name.endswith(".py") or name in ("config", "prompts"):
            os.symlink(os.path.join(ROOT, name), box / name)
    return box


def run_printed(cmd, cwd, **env):
    """A printed command run by bash as printed, `python` being this interpreter -> CompletedProcess."""
    assert cmd.startswith("python "), cmd
    e = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **env}
    return subprocess.run(["bash", "-c", f"{shlex.quote(sys.executable)} {cmd[len('python '):]}"], cwd=cwd, env=e,
                          capture_output=True, text=True, timeout=600)


def test_printed_commands_work(tmp_path):
    """Every cheap command the README prints (the tiny config, sample.py / publish.py --dry_run on its run folder),
    the commands a tiny run ends with and the ones its model card prints run as printed, in a fresh clone's layout,
    offline: the tiny run samples from its folder alone (its teacher in tiny_teacher/)."""
    box = sandbox(tmp_path)
    readme = shell_commands(open(os.path.join(ROOT, "README.md")).read())
    def cheap(c):   # the tiny config alone, and sample.py / publish.py --dry_run on its folder (a push needs the hub)
        w = c.split()
        return (w[:3] == ["python", "train_dmd.py", "config/tiny.py"] and not (len(w) > 3 and w[3].endswith(".py"))
                or w[:2] in (["python", "sample.py"], ["python", "publish.py"]) and "out/tiny_dmd" in c
                and (w[1] == "sample.py" or "--dry_run" in c))
    tiny = [c for c in readme if cheap(c)]
    assert any(c.startswith("python train_dmd.py config/tiny.py") for c in tiny), "README: no tiny training command"
    tiny.sort(key=lambda c: not c.startswith("python train_dmd.py config/tiny.py"))   # the run first, then its users
    ran = {}
    for cmd in tiny:
        p = run_printed(cmd, box)
        assert p.returncode == 0, f"README command failed: {cmd}\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
        ran.setdefault(cmd.split()[1], p)
    for p in ran.values():   # a log file: step lines and whole progress lines, no bar redraws
        assert "\r" not in p.stdout + p.stderr, p.args
    # the model card's wan-dmd commands (the card of the run folder, not pushed)
    card = shell_commands(open(box / "out" / "tiny_dmd" / "README.md").read())
    assert any(c.startswith("python sample.py") for c in card), card
    for cmd in card:
        p = run_printed(cmd, box)
        assert p.returncode == 0, f"model card command failed: {cmd}\n{p.stderr[-2000:]}"
        assert "1 mp4 in out/samples" in p.stdout and "\r" not in p.stdout + p.stderr
    # the run's own closing lines: the next commands, each run as printed (the push against a hub that is down)
    nxt = ran["train_dmd.py"].stdout.split("\nnext:\n")[1].splitlines()
    cmds = [line.strip() for line in nxt if line.startswith("  python ")]
    assert [c.split()[1] for c in cmds] == ["sample.py", "train_dmd.py", "publish.py", "publish.py"], cmds
    for cmd in cmds:
        if "--hub_model_id=" in cmd:
            p = run_printed(cmd, box, HF_HUB_OFFLINE="0", HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_" + "x" * 20)
            assert p.returncode == 1 and "did not finish" in p.stderr, p.stderr   # flags taken; only the network failed
            continue
        p = run_printed(cmd, box)
        assert p.returncode == 0, f"next command failed: {cmd}\n{p.stderr[-2000:]}"
    assert "--export_from=checkpoint-" in cmds[1]


run_main = run_script


def test_mistakes_are_one_line_before_any_model(tmp_path, monkeypatch, capsys):
    """Each mistake a newcomer makes: one line on stderr naming the key or file and the fix, exit status 1 or 2,
    nothing built (the output folder never made), no traceback."""
    import huggingface_hub.constants
    import importlib.util
    monkeypatch.chdir(ROOT)   # the configs' prompts/ paths, as from a clone
    tiny = ["config/tiny.py", f"--output_dir={tmp_path / 'never'}"]
    (tmp_path / "empty.txt").write_text("\n \n")
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cases = [   # (argv, what the line must say)
        (tiny + ["--prompts_file=no_such_prompts.txt"], "prompts_file: prompts file 'no_such_prompts.txt': no such file"),
        (tiny + [f"--prompts_file={tmp_path / 'empty.txt'}"], "has no prompt (empty or blank lines only): write one"),
        (["config/wan_dmd_3step.py", f"--output_dir={tmp_path / 'never'}"],
         "pretrained_model_name_or_path='Wan-AI/Wan2.1-T2V-1.3B-Diffusers': not a local folder and not in the hub cache "
         "(HF_HUB_OFFLINE is set): download it once"),
        (tiny + ["--height=50"], "height and width must be multiples of 16, got 50x64"),
        (tiny + ["--dmd_denoising_steps=1000,2000"], "dmd_denoising_steps must decrease within (0, 1000], got '1000,2000'"),
        (tiny + ["--report_to=wandb"], "report_to='wandb' but wandb is not installed: pip install wandb"),
        (tiny + ["--max_train_steps=-5"], "max_train_steps must be an integer >= 0"),
        (tiny + ["--webhook_config=no_hook.json"], "webhook_config 'no_hook.json': no such file"),
        (tiny + ['--webhook_config={"webhook_type": "nope", "webhook_url": "x"}'], "webhook_type must be 'discord' or"),
        (tiny + ["--webhook_config={not json"], "webhook_config: not valid JSON"),
        (tiny + ["--height=-64"], "height and width must be multiples of 16, got -64x64"),
        (tiny + ["--width=0"], "height and width must be multiples of 16, got 64x0"),
        (tiny + ["--num_training_frames=0"], "num_training_frames must be an integer >= 1"),
        (tiny + ["--validation_resolution=64"], "validation_resolution must be WIDTHxHEIGHT"),
        (tiny + ["--validation_num_video_frames=10"], "validation_num_video_frames must be 4k+1"),
        (tiny + ["--lora_targets=foo"], "lora_targets: 'foo' name no Linear of the Wan DiT"),
        (tiny + ["--generator_init=no_such_run"], "generator_init='no_such_run': no such file or folder"),
        (tiny + ["--checkpoints_total_limit=0"], "checkpoints_total_limit must be a positive integer"),
        (tiny + [str(tmp_path / "ds.py")], "datasets: instance_data_dir='/nonexistent' is not a folder"),
        (tiny + [str(tmp_path / "raise.py")], "raise.py', line 2: ZeroDivisionError: division by zero"),
    ] + ([(tiny + ["--device=cuda"], "device='cuda': this torch")] if not torch.cuda.is_available() else [])
    (tmp_path / "ds.py").write_text('datasets = [dict(instance_data_dir="/nonexistent")]\n')
    (tmp_path / "raise.py").write_text("seed = 1\nx = 1 / 0\n")
    for argv, says in cases:
        code, out, err = run_main("train_dmd.py", argv, monkeypatch, capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and says in err, (argv, code, out, err)
        assert not (tmp_path / "never").exists()
    # sample.py: a --ckpt that is not there is named (not the teacher); a student folder's broken config.json
    code, out, err = run_main("sample.py", [f"--ckpt={tmp_path / 'no_run'}"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and f"--ckpt='{tmp_path / 'no_run'}': no such file or folder" in err
    run = tmp_path / "run"
    run.mkdir()
    for text, says in (("{}", "lacks pretrained_model_name_or_path, height, width, num_training_frames"),
                       ("{\"height\": 32,\n", "not valid JSON"), ("[1, 2]", "holds a JSON list")):
        (run / "config.json").write_text(text)
        code, out, err = run_main("sample.py", [f"--ckpt={run}"], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and str(run / "config.json") in err and says in err, err
    # a size that cannot fit is refused before anything is allocated
    json.dump({"pretrained_model_name_or_path": str(tmp_path), "height": 32, "width": 32, "num_training_frames": 3},
              open(run / "config.json", "w"))
    code, out, err = run_main("sample.py", [f"--ckpt={run}", "--height=100000", "--width=100000", "--device=cpu"],
                              monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "size 9x100000x100000" in err and "smaller --height" in err, err
    assert "GiB" in err and "this machine's RAM" in err
    (tmp_path / "a_file").write_text("")   # an --out that cannot be made: named before any model loads
    code, out, err = run_main("sample.py", [f"--ckpt={run}", f"--out={tmp_path / 'a_file' / 'videos'}", "--device=cpu"],
                              monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot be made" in err and "writable folder" in err, err


def test_run_refusals_are_one_line(tmp_path, monkeypatch, capsys):
    """What the run itself refuses (run_dir.Refused) prints as the command line shows a config mistake: one line,
    no traceback; exit status 2 (1 for a run that diverged). A named checkpoint that is not there, and a launch that
    cannot give fsdp or sp_size, are refused before any model loads (nothing on stdout)."""
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    tiny = ["config/tiny.py", f"--output_dir={out}", "--validation_step_interval=1000",
            "--validation_diversity_seeds=0"]
    assert run_main("train_dmd.py", tiny + ["--max_train_steps=2", "--checkpoint_step_interval=1"],
                    monkeypatch, capsys)[0] == 0

    def refused(argv, says, status=2, before_models=False):
        code, stdout, err = run_main("train_dmd.py", tiny + argv, monkeypatch, capsys)
        assert code == status and err.count("\n") == 1 and err.startswith("train_dmd.py: error: ") and says in err, err
        assert not before_models or stdout == "", stdout
    refused(["--max_train_steps=3", "--resume_from_checkpoint="], "holds a run (checkpoint-0000001, checkpoint-0000002")
    refused(["--resume_from_checkpoint=checkpoint-9"], f"no state.pt there ({out / 'checkpoint-0000009'})",
            before_models=True)
    refused(["--export_from=nowhere"], "export_from='nowhere': no state.pt there", before_models=True)
    refused(["--fsdp=True"], "fsdp=True needs torchrun", before_models=True)
    refused(["--sp_size=2"], "sp_size=2 needs several processes", before_models=True)
    refused(["--max_train_steps=3", "--resume_from_checkpoint=latest", "--lora_rank=4"],
            "these cannot change when a run resumes", before_models=True)   # from the checkpoint's config.json
    refused(["--max_train_steps=8", "--learning_rate=1e10", "--fake_score_lr=1e10", "--checkpoint_step_interval=1"],
            f"the last good checkpoint: {out / 'checkpoint-0000002'}", status=1)
    (tmp_path / "a_file").write_text("")
    code, _, err = run_main("train_dmd.py", tiny[:1] + [f"--output_dir={tmp_path / 'a_file' / 'run'}"], monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "cannot be made" in err and "writable output_dir" in err, err
    for argv, says in ((["config/tiny.py"], "the config has no `datasets`: nothing to cache"),
                       (["config/tiny.py", "--make_ode_pairs=nothing.txt"], "prompts file 'nothing.txt': no such file"),
                       (["config/tiny.py", "--make_teacher_data=prompts/wan_dmd_starter.txt",
                         f"--teacher_out={tmp_path / 'a_file' / 'pairs'}"], "teacher_out")):
        code, _, err = run_main("data.py", argv, monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("data.py: error: ") and says in err, err
    (out / "run.lock").write_text(json.dumps({"host": "node-7", "pid": 1, "started": "2026-01-01 00:00:00 +0000"}))
    refused(["--max_train_steps=3"], "is in use by another run: pid 1 on host node-7")


def test_data_py_checks_the_teacher_before_making_folders(tmp_path, monkeypatch, capsys):
    """data.py with a teacher this machine cannot read: one line before any folder is made (before: a 73-line
    traceback, and <prompts file>.teacher/ made in the clone)."""
    import huggingface_hub.constants
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\n")
    code, out, err = run_main("data.py", [os.path.join(ROOT, "config/wan_dmd_3step.py"), f"--make_teacher_data={prompts}"],
                              monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "not in the hub cache" in err, err
    assert os.listdir(tmp_path) == ["p.txt"]


def test_own_json_config_round_trips(tmp_path, monkeypatch, capsys):
    """train_dmd.py's own JSON (--print_config's, a run's config.json) given back as a config file is read as ours:
    no SimpleTuner conversion (before: the guidance 3 became 2 with a SimpleTuner notice)."""
    monkeypatch.chdir(ROOT)
    code, first, _ = run_main("train_dmd.py", ["config/tiny.py", "--print_config"], monkeypatch, capsys)
    (tmp_path / "run.json").write_text(first)
    code, again, err = run_main("train_dmd.py", [str(tmp_path / "run.json"), "--print_config"], monkeypatch, capsys)
    assert code == 0 and json.loads(again) == json.loads(first) and "SimpleTuner" not in err, err


def test_print_config_is_json_alone(tmp_path, monkeypatch, capsys):
    """--print_config > run.json gives a file that parses: the notices of a config's reading go to stderr."""
    st = tmp_path / "st.json"
    st.write_text(json.dumps({"real_score_guidance_scale": 3.0, "optimizer": "adamw_bf16", "lr_warmup_steps": "5"}))
    code, out, err = run_main("train_dmd.py", [str(st), os.path.join(ROOT, "config", "tiny.py"), "--print_config"],
                              monkeypatch, capsys)
    assert code == 0 and json.loads(out)["real_score_guidance_scale"] == 2.0 and "notice: SimpleTuner" in err


def test_progress_in_a_log_file():
    """A progress bar writing to a file (not a terminal) prints whole lines, no carriage returns: its first state,
    at most one line per LOG_EVERY_S, and its last."""
    f = io.StringIO()
    for _ in progress.bar(range(1000), file=f, desc="teacher data"):
        pass
    lines = f.getvalue().splitlines()
    assert "\r" not in f.getvalue() and f.getvalue().endswith("\n")
    assert 1 <= len(lines) <= 3 and "1000/1000" in lines[-1] and lines[-1].startswith("teacher data: 100%")
    quiet = io.StringIO()
    for _ in progress.bar(range(3), file=quiet, disable=True):
        pass
    assert quiet.getvalue() == ""
