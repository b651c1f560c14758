"""What a newcomer meets first: sample.py on a student folder that train_dmd.py wrote (its config.json fixes the
teacher and size), one-line errors for missing weights, torch's thread count, the terminal log line."""
import json
import os

import pytest
import torch

import configurator
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


def test_sample_uses_the_student_folders_config(tmp_path, capsys):
    teacher = demo_teacher(str(tmp_path / "teacher"))
    out = str(tmp_path / "student")
    train_dmd.train(train_dmd.config([os.path.join(ROOT, "config", "tiny.py"), f"--pretrained_model_name_or_path={teacher}",
                                      f"--output_dir={out}", "--max_train_steps=2", "--height=32", "--width=48",
                                      "--num_training_frames=2", "--validation_resolution=48x32",
                                      "--validation_num_video_frames=5", "--validation_diversity_seeds=0"]))
    capsys.readouterr()
    c = sample.config([f"--ckpt={out}", f"--out={tmp_path / 'samples'}"])
    assert (c["model"], c["height"], c["width"], c["num_frames"]) == (teacher, 32, 48, 5)
    assert "its config.json sets model=" in capsys.readouterr().out
    (path,) = sample.generate(c)
    assert media.read_mp4(path)[0].shape == (5, 32, 48, 3)
    assert "VAE decode" in capsys.readouterr().err   # the decode has its own progress bar
    c = sample.config([f"--ckpt={out}", "--num_frames=9"])   # the command line wins over the folder
    assert (c["num_frames"], c["height"]) == (9, 32)


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
