"""teacher_model_name_or_path: a separate, larger teacher gives the real score (and everything else that reads the
teacher); the generator and the critic keep sharing the student's base. Tiny Wan DiTs built and saved here."""
import json
import os

import pytest
import torch

import cache
import card
import checks
import data
import flow
import dmd
import lora
import model_wan as mw
import train_dmd
import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "tiny.py")
BIG = mw.WanConfig(dim=128, ffn_dim=192, num_heads=2, num_layers=3, text_dim=32)   # the tiny student is 64 x 2 layers


def save_teacher(path, cfg=BIG, seed=7):
    """A random Wan DiT of `cfg` saved as a diffusers pipeline root holding only its transformer/ -> its path (str)."""
    torch.manual_seed(seed)
    mw.save_dit(mw.WanDiT(cfg).eval(), path / "transformer")
    (path / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline"}))
    return str(path)


def cfg(tmp_path, *overrides):
    return train_dmd.config([TINY, f"--output_dir={tmp_path / 'run'}", "--validation_teacher_steps=4", *overrides])


def setup(c):
    return train_dmd.setup(c, flow.rollout_steps(checks.check_config(c), c["warp_denoising_step"], c["timestep_shift"]))


def test_default_is_the_student_base(tmp_path):
    c = cfg(tmp_path)
    assert data.teacher_config(c) is c and data.real_score_source(c) == "tiny" and data.load_real_score(c, "cpu",
                                                                                                         torch.float32) is None
    assert card.teacher_rows(c, "tiny") == ["| base model (teacher) | `tiny` |"]


def test_separate_teacher_gives_the_real_score(tmp_path):
    """The key loads a different-size teacher; R is it (DMD's x_real against a manual computation with the teacher
    loaded by hand); the generator and the critic are adapters of the student's base; the teacher has no adapter."""
    t = save_teacher(tmp_path / "big")
    r = setup(cfg(tmp_path, f"--teacher_model_name_or_path={t}"))
    assert r.teacher.cfg.dim == 128 and r.teacher.cfg.num_layers == 3 and r.base.cfg.dim == 64
    assert r.gen is r.base and r.critic is r.base and r.g_adapter == "generator" and r.f_adapter == "critic"
    assert lora.adapter_names(r.teacher) == [] and not any(p.requires_grad for p in r.teacher.parameters())
    manual = mw.load_dit(t).eval()
    x_g, ctx, neg = torch.randn(1, 16, 3, 8, 8), torch.randn(1, 512, 32), torch.randn(1, 512, 32)
    tt, w = torch.tensor([600.0]), 3.0
    torch.manual_seed(0)
    _, _, st = dmd.dmd_loss(x_g, tt, r.R, r.Fk, ctx, neg, w, 0.0)
    torch.manual_seed(0)
    sig = (tt / 1000).view(-1, 1, 1, 1, 1)
    x_t = (1 - sig) * x_g + sig * torch.randn_like(x_g)
    with torch.no_grad():
        x_c, x_u = x_t - sig * manual(x_t, tt, ctx), x_t - sig * manual(x_t, tt, neg)
    torch.testing.assert_close(st["x_real"], x_c + w * (x_c - x_u), rtol=1e-5, atol=1e-5)
    with torch.no_grad(), lora.use_adapter(r.base, None):   # not the student's base
        assert not torch.allclose(r.base(x_t, tt, ctx), manual(x_t, tt, ctx), atol=1e-3)


def test_mismatched_teacher_refused_before_loading(tmp_path, monkeypatch):
    """Other latent channels or another text dim: one line naming the key, before any weights are read."""
    def no_loading(*a, **k):
        raise AssertionError("weights loaded before the teacher check")
    for name, bad, what in (("ch", dict(in_dim=32, out_dim=32), "latent channels"), ("txt", dict(text_dim=48), "text dim")):
        t = save_teacher(tmp_path / name, mw.WanConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=1,
                                                       **{"text_dim": 32, **bad}))
        monkeypatch.setattr(mw, "WanDiT", no_loading)   # the "tiny" student's base is built, the teacher's read
        monkeypatch.setattr(mw, "load_dit", no_loading)
        with pytest.raises(ValueError, match=f"teacher_model_name_or_path=.*its {what}") as e:
            train_dmd.train(cfg(tmp_path, f"--teacher_model_name_or_path={t}"))
        assert "\n" not in str(e.value)
        monkeypatch.undo()


def test_missing_teacher_is_one_line_before_any_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="teacher_model_name_or_path='/no/such/teacher': no such folder"):
        checks.check_inputs(cfg(tmp_path, "--teacher_model_name_or_path=/no/such/teacher"))


def test_teacher_stored_in_8_bits(tmp_path):
    """teacher_model_precision (or, empty, base_model_precision) stores the separate teacher's Linears in 8 bits; the
    student's base keeps its own setting."""
    t = save_teacher(tmp_path / "big")
    eight = lambda m: any(n.endswith("weight_q") for n, _ in m.named_parameters()) or any(   # noqa: E731
        n.endswith("weight_q") for n, _ in m.named_buffers())
    r = setup(cfg(tmp_path, f"--teacher_model_name_or_path={t}", "--teacher_model_precision=int8"))
    assert eight(r.teacher) and not eight(r.base)
    c = cfg(tmp_path, f"--teacher_model_name_or_path={t}", "--base_model_precision=int8")
    assert data.teacher_config(c)["base_model_precision"] == "int8"
    assert eight(data.load_real_score(c, "cpu", torch.float32))
    assert card.teacher_rows(c, "tiny")[1].endswith("stored int8 weight-only |")   # the model card says so
    with pytest.raises(ValueError, match="teacher_model_precision"):
        checks.check_config(cfg(tmp_path, "--teacher_model_precision=nf4"))


def test_collapse_signal_pairs_card_and_export_use_the_right_models(tmp_path):
    """A short run with a separate teacher: the collapse signal's reference is the teacher's (its cache key names it);
    ODE pairs come from it (a saved copy of the tiny base gives the default's pairs exactly, a different teacher
    others); the model card names both; the export is the student's size (merged into the student's base)."""
    t = save_teacher(tmp_path / "big")
    c = cfg(tmp_path, f"--teacher_model_name_or_path={t}", "--max_train_steps=2", "--validation_step_interval=2",
            "--checkpoint_step_interval=2")
    train_dmd.train(c)
    out = tmp_path / "run"
    div = json.load(open(out / "teacher_diversity.json"))
    assert div["settings"]["teacher"] == t and div["mean"] > 0
    assert validation.teacher_settings(c, [c["validation_prompt"]])["teacher"] == t
    assert mw.load_dit(out / "transformer").cfg.dim == 64   # the student's size
    readme = open(out / "README.md").read()
    assert f"| teacher (real score) | `{t}`" in readme and "base model (student)" in readme
    same = save_teacher(tmp_path / "same", mw.PRESETS["tiny"], seed=42)   # config/tiny.py's seed: the "tiny" base's weights
    pairs = {}
    for name, teacher in (("default", ""), ("same", same), ("big", t)):
        cc = cfg(tmp_path, f"--teacher_model_name_or_path={teacher}")
        d = data.make_teacher_data(cc, ["a red circle moving left"], str(tmp_path / f"pairs_{name}"), 4, 2.0,
                                   ode_pairs=True)
        pairs[name] = cache.read_entry(os.path.join(d, os.listdir(d)[0]))[1]["trajectory"]
    torch.testing.assert_close(pairs["same"], pairs["default"])
    assert not torch.allclose(pairs["big"][1:], pairs["default"][1:], atol=1e-3)
