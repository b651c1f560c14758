"""What a newcomer meets first: sample.py on a student folder that train_dmd.py wrote (its config.json fixes the
teacher and size), one-line errors for missing weights, torch's thread count, the terminal log line."""
import json
import os
import runpy
import signal
import sys

import pytest
import torch

import configurator
from card import data_summary
import media
import model_wan as mw
import publish
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
    assert sample.student_defaults(str(tmp_path)) == dict(height=64, width=64, num_frames=9)   # no folder: no model


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
    assert configurator.command_flags(publish_py, "flags", ["out/x", "--dry-run"]) == ({"dry_run": True}, ["out/x"])
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
