"""train_dmd.py end to end on config/tiny.py: a run, exports, exact resume (also after SIGKILL), frozen teacher."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import model_wan as mw
import media
import text_encoders
import lora
import sample
import flow
import cache
import dmd
import checks
import data
import train_dmd
import validation
import publish

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "tiny.py")


def tiny_cfg(tmp_path, *overrides):
    return train_dmd.config([TINY, f"--output_dir={tmp_path}", *overrides])


def run(out, *args, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "train_dmd.py"), TINY, f"--output_dir={out}", *args]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


def final_state(out):
    ck = sorted(d for d in os.listdir(out) if d.startswith("checkpoint-") and not d.endswith(".tmp"))[-1]
    return torch.load(os.path.join(out, ck, "state.pt"), weights_only=True)


def tiny_teacher(seed=42):
    torch.manual_seed(seed)
    return mw.WanDiT(mw.PRESETS["tiny"]).eval()


def test_tiny_run_end_to_end(tmp_path, tiny_pipeline):
    out = tmp_path / "run"
    stdout = run(out, "--max_train_steps=6", "--checkpoint_step_interval=3", "--validation_step_interval=3",
                 "--checkpoints_total_limit=1")
    assert "step      6 | dmd" in stdout and "exported" in stdout
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs] == list(range(1, 7))
    for r in recs:
        assert all(torch.isfinite(torch.tensor(r[k])) for k in ("dmd_loss", "fake_score_loss", "g_abs", "x_g_std", "x_real_mean"))
    assert any(k.startswith("fake_score_loss_t") for k in recs[0])
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-0000006"]  # rotation
    assert json.load(open(out / "config.json"))["max_train_steps"] == 6
    for step in (3, 6):
        mp4s = [n for n in os.listdir(out / "validation" / f"step_{step}") if n.endswith(".mp4")]   # + contact_sheet.png
        assert len(mp4s) == 1 and media.read_mp4(str(out / "validation" / f"step_{step}" / mp4s[0]))[0].shape == (9, 64, 64, 3)
    # the exported student: adapter file (EMA weights) on the teacher == merged transformer/ folder
    x, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([757.0])
    ctx = text_encoders.pad_context([text_encoders.TinyTextEncoder(32).encode(["a red circle moving left"])[0, :6]]).to("cpu", torch.float32)
    teacher = tiny_teacher()
    assert sample.load_student(teacher, str(out)) == "adapter"   # folder -> student_ema.safetensors
    merged = mw.load_dit(out / "transformer")
    with torch.no_grad():
        a, b = teacher(x, t, ctx), merged(x, t, ctx)
        with lora.use_adapter(teacher, None):
            base = teacher(x, t, ctx)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - base).abs().max() > 0   # the student differs from the teacher
    # diffusers: the merged folder loads in WanTransformer3DModel, the adapter in WanPipeline.load_lora_weights
    from diffusers import WanPipeline, WanTransformer3DModel
    d = WanTransformer3DModel.from_pretrained(out / "transformer").eval()
    with torch.no_grad():
        torch.testing.assert_close(d(x, t, ctx).sample, b, rtol=1e-5, atol=1e-5)
    mw.save_dit(tiny_teacher(), tmp_path / "teacher")
    pipe = WanPipeline(tokenizer=tiny_pipeline.tokenizer, text_encoder=tiny_pipeline.text_encoder, vae=tiny_pipeline.vae,
                       scheduler=tiny_pipeline.scheduler,
                       transformer=WanTransformer3DModel.from_pretrained(tmp_path / "teacher").eval())
    pipe.load_lora_weights(str(out / "student_ema.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(x, t, ctx).sample, b, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_exact_resume_and_sigkill(tmp_path):
    common = ["--max_train_steps=6", "--checkpoint_step_interval=1", "--validation_step_interval=1000",
              "--checkpoints_total_limit=2", "--generator_update_interval=2", "--lr_warmup_steps=4"]
    run(tmp_path / "straight", *common)
    straight = final_state(tmp_path / "straight")
    # 3 steps, then a second process resumes to 6 (warmup only: the schedule does not depend on max_train_steps)
    run(tmp_path / "split", *common, "--max_train_steps=3", "--checkpoint_step_interval=3")
    p = run(tmp_path / "split", *common)
    assert "resumed from" in p
    for key in ("generator", "critic", "ema"):
        for a, b in zip(straight[key], final_state(tmp_path / "split")[key]):
            assert torch.equal(a, b), key
    # SIGKILL mid-run, then resume: still bit-identical
    long = ["--max_train_steps=40", "--checkpoint_step_interval=1", "--validation_step_interval=1000",
            "--checkpoints_total_limit=2", "--lr_scheduler=cosine_with_min_lr", "--generator_update_interval=3"]
    run(tmp_path / "straight40", *long)
    proc = run(tmp_path / "killed", *long, wait=False)
    deadline = time.time() + 120
    while not (tmp_path / "killed" / "checkpoint-0000005").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = final_state(tmp_path / "killed")["step"]
    assert killed_at < 40
    run(tmp_path / "killed", *long)
    for key in ("generator", "critic", "ema"):
        for a, b in zip(final_state(tmp_path / "straight40")[key], final_state(tmp_path / "killed")[key]):
            assert torch.equal(a, b), key


def test_sigterm_saves_and_exits(tmp_path):
    proc = run(tmp_path, "--max_train_steps=100000", "--checkpoint_step_interval=100000",
               "--validation_step_interval=100000", wait=False)
    deadline = time.time() + 120
    while not (tmp_path / "log.jsonl").exists() or os.path.getsize(tmp_path / "log.jsonl") == 0:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, out   # 143: a scheduler records an interrupted run
    assert "signal" in out and final_state(tmp_path)["step"] >= 1


def test_teacher_frozen_and_networks_separate(tmp_path):
    c = tiny_cfg(tmp_path, "--max_train_steps=3", "--validation_step_interval=1000", "--checkpoint_step_interval=1000")
    ref = {k: v.clone() for k, v in tiny_teacher().state_dict().items()}
    res = train_dmd.train(c)
    base = {k: v for k, v in res["base"].state_dict().items() if ".lora_" not in k}
    assert base.keys() == ref.keys() and all(torch.equal(base[k], ref[k]) for k in ref), "teacher changed"
    assert all(not p.requires_grad for n, p in res["base"].named_parameters() if ".lora_" not in n)
    # a critic loss reaches only critic parameters, a generator (DMD) loss only generator parameters
    base_m = res["base"]
    G = lora.velocity_fn(base_m, "generator", lambda: torch.autocast("cpu", enabled=False))
    Fk = lora.velocity_fn(base_m, "critic", lambda: torch.autocast("cpu", enabled=False))
    R = lora.velocity_fn(base_m, None, lambda: torch.autocast("cpu", enabled=False))
    ctx = torch.randn(1, 512, 32)
    base_m.zero_grad(set_to_none=True)
    x_g, t_from, t_to = flow.rollout(lambda x, t: G(x, t, ctx), torch.randn(1, 16, 3, 8, 8), [1000.0, 757.0, 522.0], 2)
    loss, _, _ = dmd.dmd_loss(x_g, torch.tensor([500.0]), R, Fk, ctx, torch.zeros_like(ctx), 3.0, 0.0)
    loss.backward()
    assert all(p.grad is not None for p in res["g_params"]) and all(p.grad is None for p in res["f_params"])
    base_m.zero_grad(set_to_none=True)
    dmd.critic_loss(Fk, x_g, torch.tensor([500.0]), ctx)[0].backward()
    assert all(p.grad is None for p in res["g_params"]) and all(p.grad is not None for p in res["f_params"])


def test_full_finetune_mode(tmp_path):
    res = train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=2", "--lora_rank=0", "--fake_score_lora_rank=0",
                                   "--validation_step_interval=1000", "--checkpoint_step_interval=1000"))
    assert res["generator"] is not res["base"] and res["critic"] is not res["base"]
    assert lora.adapter_names(res["critic"]) == [] and lora.adapter_names(res["base"]) == []
    student = mw.load_dit(tmp_path / "transformer")
    assert sample.load_student(tiny_teacher(), str(tmp_path)) == "full"
    assert any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), tiny_teacher().state_dict().values()))


def test_config_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        tiny_cfg(tmp_path, "--generator_update_intervall=5")
    assert "did you mean '--generator_update_interval'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tiny_cfg(tmp_path, "--max_train_steps=many")
    assert "max_train_steps: expected int" in capsys.readouterr().err
    for bad, match in (("--num_frame_per_block=1", "causal"), ("--context_noise=10", "causal"),
                       ("--independent_first_frame=True", "causal"), ("--validation_guidance=2.0", "no CFG"),
                       ("--validation_num_inference_steps=4", "validation_num_inference_steps"),
                       ("--real_data_loss_weight=1.0", "need latents"),
                       ("--rollout_mode=data", "need latents"), ("--rollout_mode=forward", "rollout_mode"), ("--dmd_denoising_steps=500,900", "decrease"),
                       ("--grad_clip_method=foo", "grad_clip_method")):
        with pytest.raises(ValueError, match=match):
            checks.check_config(tiny_cfg(tmp_path, bad))
    # a SimpleTuner config.json: implemented keys mapped, the rest named in one line (tests/test_simpletuner.py: the quickstart's)
    st = {"--model_family": "wan", "dmd_denoising_steps": "1000,757,522", "generator_update_interval": 1,
          "real_score_guidance_scale": 3.0, "fake_score_betas": [0.9, 0.999], "--validation_steps": 50,
          "optimizer": "adamw_bf16", "base_model_precision": "int8", "num_frame_per_block": 1}
    (tmp_path / "config.json").write_text(json.dumps(st))
    c = tiny_cfg(tmp_path, str(tmp_path / "config.json"))
    assert c["validation_step_interval"] == 50 and c["fake_score_betas"] == (0.9, 0.999) and c["optimizer"] == "adamw"
    assert c["num_frame_per_block"] == 0 and c["real_score_guidance_scale"] == 2.0   # bidirectional; standard CFG 3
    assert c["base_model_precision"] == "int8"   # ours by name since the 8-bit base (quant.py)
    checks.check_config(c)


def test_validation_steps_and_guidance_are_derived(tmp_path):
    """validation_num_inference_steps and validation_guidance follow from the student (its steps, no CFG): unset by
    default, and a value given (SimpleTuner's config.json sets both) must be the derived one."""
    c = tiny_cfg(tmp_path, "--dmd_denoising_steps=1000,500")
    assert (c["validation_num_inference_steps"], c["validation_guidance"]) == (None, None)
    checks.check_config(c)
    checks.check_config(tiny_cfg(tmp_path, "--dmd_denoising_steps=1000,500", "--validation_num_inference_steps=2",
                                 "--validation_guidance=1.0"))
    with pytest.raises(ValueError, match="must equal the number of dmd_denoising_steps"):
        checks.check_config(tiny_cfg(tmp_path, "--dmd_denoising_steps=1000,500", "--validation_num_inference_steps=3"))


def test_data_rollout_and_flow_matching_loss():
    """Data-latent mode: one forward with gradient at t_k* on the noised data latent; FM loss closed form."""
    x0 = torch.randn(2, 16, 1, 4, 4)
    exact = lambda x, t, ctx: (x - x0) / (t.view(-1, 1, 1, 1, 1) / 1000)   # noqa: E731  the exact velocity to x0
    x_g, t_from, t_to = dmd.data_rollout(exact, x0, None, [1000.0, 757.0, 522.0], 1)
    assert (t_from, t_to) == (757.0, 522.0)
    torch.testing.assert_close(x_g, x0, rtol=0, atol=1e-5)
    assert flow.flow_matching_loss(lambda x, t, ctx: torch.zeros_like(x), torch.zeros(4, 16, 1, 8, 8), None, 5.0) > 0.9
    assert flow.flow_matching_loss(lambda x, t, ctx: (x - x0[:1]) / (t.view(-1, 1, 1, 1, 1) / 1000),
                                        x0[:1].expand(3, -1, -1, -1, -1), None, 5.0) < 1e-8


@pytest.mark.slow
def test_log_keeps_one_line_per_step_after_resume(tmp_path):
    run(tmp_path, "--max_train_steps=4", "--checkpoint_step_interval=2", "--validation_step_interval=1000")
    with open(tmp_path / "log.jsonl", "a") as f:   # as if steps 5-6 ran and were lost to a kill after checkpoint 4
        f.write(json.dumps({"step": 5}) + "\n" + json.dumps({"step": 6}) + "\n")
    run(tmp_path, "--max_train_steps=6", "--checkpoint_step_interval=2", "--validation_step_interval=1000")
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name", ["tiny.py", "wan_dmd_3step.py", "wan_dmd_3step_14b.py"])
def test_shipped_configs_resolve(name):
    c = train_dmd.config([os.path.join(ROOT, "config", name)])
    assert checks.check_config(c) == [1000.0, 757.0, 522.0]
    if name == "wan_dmd_3step_14b.py":
        assert c["pretrained_model_name_or_path"].endswith("14B-Diffusers") and c["real_score_guidance_scale"] == 3.0


def test_headline_config_is_the_recipe():
    """config/wan_dmd_3step.py sets at most 20 keys, each one differing from train_dmd.py's default, among them the
    recipe (guidance interval, regression term, its pairs); simpletuner.py's notice names the same values."""
    import simpletuner
    scope = {}
    exec(open(os.path.join(ROOT, "config", "wan_dmd_3step.py")).read(), {"__file__": "x"}, scope)
    assert len(scope) <= 20 and all(k in train_dmd.DEFAULTS and v != train_dmd.DEFAULTS[k] for k, v in scope.items())
    assert {k: scope[k] for k in simpletuner.RECIPE} == simpletuner.RECIPE


def test_nonfinite_losses_skip_then_abort(tmp_path, monkeypatch, capsys):
    real = dmd.dmd_loss

    def nan_loss(*a, **k):
        loss, g, st = real(*a, **k)
        return loss * float("nan"), g, st

    monkeypatch.setattr(dmd, "dmd_loss", nan_loss)
    c = tiny_cfg(tmp_path, "--max_train_steps=10", "--max_nonfinite_steps=3", "--validation_step_interval=1000")
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row"):
        train_dmd.train(c)
    out = capsys.readouterr().out
    assert out.count("non-finite loss") == 3 and out.count("generator update skipped") == 3   # the critic still steps
    assert "critic update skipped" not in out and "generator and critic" not in out
    assert all(r.get("g_grad_norm") is None for r in map(json.loads, open(tmp_path / "log.jsonl")))   # no G update


def test_blown_up_weights_never_checkpointed(tmp_path, monkeypatch, capsys):
    """NaN gradients at the 3rd generator step blow the weights up (its loss was finite): that checkpoint and the
    later ones are skipped, so rotation keeps the last good one, and the abort names it."""
    real, calls = train_dmd.clip, []

    def nan_grads(params, method, value):   # the generator clips first in each step: calls 1, 3, 5, ...
        calls.append(1)
        if len(calls) == 5:
            for p in params:
                p.grad.fill_(float("nan"))
        return real(params, method, value)
    monkeypatch.setattr(train_dmd, "clip", nan_grads)
    c = tiny_cfg(tmp_path, "--max_train_steps=10", "--max_nonfinite_steps=2", "--checkpoint_step_interval=1",
                 "--checkpoints_total_limit=1", "--validation_step_interval=1000")
    with pytest.raises(RuntimeError, match="2 non-finite losses in a row.*last good checkpoint: .*checkpoint-0000002"):
        train_dmd.train(c)
    out = capsys.readouterr().out
    assert "step 3: non-finite loss (critic nan): critic update skipped" in out   # G stepped (into NaN), F did not
    assert "step 3: checkpoint skipped: non-finite generator weights, EMA, generator optimiser state;" in out
    assert "step 4: non-finite loss (dmd nan, critic nan): generator and critic update skipped" in out
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-0000002"]
    st = final_state(tmp_path)
    assert all(torch.isfinite(v).all() for k in ("generator", "critic", "ema") for v in st[k])


def test_train_on_a_diffusers_pipeline_folder(tiny_pipeline, tmp_path):
    """The real-model path: teacher, VAE and text encoder loaded from a pipeline folder, then sample.py."""
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    res = train_dmd.train(tiny_cfg(tmp_path / "out", f"--pretrained_model_name_or_path={tmp_path / 'pipe'}",
                                   "--height=32", "--width=48", "--num_training_frames=2", "--max_train_steps=2",
                                   "--validation_resolution=48x32", "--validation_num_video_frames=5"))
    assert res["base"].cfg.head_dim == 128
    paths = sample.generate(dict(model=str(tmp_path / "pipe"), ckpt=str(tmp_path / "out"), prompt="a cat", prompts_file="",
                                 negative_prompt=None, height=32, width=48, num_frames=5, num_inference_steps=3,
                                 guidance_scale=1.0, flow_shift=None, sampler="unipc", denoising_steps="", seed=0,
                                 batch_size=1, out=str(tmp_path / "s"), save_latents=False, fps=16, device="cpu",
                                 dtype="float32"))
    assert media.read_mp4(paths[0])[0].shape == (5, 32, 48, 3)


def test_resume_with_a_different_network_is_a_clear_error(tmp_path):
    train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=1", "--validation_step_interval=1000"))
    with pytest.raises(ValueError, match="with lora_rank=8, this config has lora_rank=4: these cannot change"):
        train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=2", "--lora_rank=4", "--validation_step_interval=1000"))


def test_lr_schedule_counts_trainer_steps_whatever_the_update_interval(tmp_path):
    """Cosine decay reaches its end at max_train_steps also when the generator updates every 2nd step
    (the scheduler steps per trainer step, not per generator update); the critic's fake_score_lr_scheduler likewise."""
    train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=4", "--lr_scheduler=cosine_with_min_lr", "--lr_min_ratio=0.1",
                             "--generator_update_interval=2", "--validation_step_interval=1000",
                             "--fake_score_lr_scheduler=cosine_with_min_lr"))
    lrs = [json.loads(line)["lr"] for line in open(tmp_path / "log.jsonl")]
    lam = train_dmd.lr_lambda(dict(train_dmd.DEFAULTS, lr_min_ratio=0.1, max_train_steps=4), "cosine_with_min_lr")
    assert lrs == pytest.approx([1e-4 * lam(s) for s in (1, 2, 3, 4)]) and lrs[-1] == pytest.approx(1e-5)
    assert final_state(tmp_path)["f_opt"]["param_groups"][0]["lr"] == pytest.approx(1e-5)   # fake_score_lr 1e-4 -> 10%


def test_tuple_items_widen_like_scalars():
    import configurator
    assert configurator._check("fake_score_betas", (0, 0.999), (0.9, 0.999)) == (0.0, 0.999)   # Self-Forcing's betas
    with pytest.raises(TypeError, match=r"fake_score_betas\[0\]"):
        configurator._check("fake_score_betas", ("a", 0.999), (0.9, 0.999))


def test_collapse_signal_logged_cached_and_warned(tmp_path):
    """validation.py's collapse signal: diversity = mean pairwise RMS latent distance; a run logs the student's beside
    the teacher's (measured once, cached in teacher_diversity.json and read back on resume) and warns below
    diversity_warn_ratio."""
    z = torch.zeros(1, 16, 1, 2, 2)
    assert validation.diversity(torch.cat([z, z + 1])) == pytest.approx(1.0)
    assert validation.diversity(torch.cat([z, z + 1, z + 3])) == pytest.approx(2.0)   # pairs 1, 3, 2
    out = tmp_path / "run"
    stdout = run(out, "--max_train_steps=2", "--validation_step_interval=1", "--checkpoint_step_interval=1",
                 "--diversity_warn_ratio=100")
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in recs] == [1, 2] and all(r["diversity"] > 0 for r in recs)
    assert all(r["diversity_ratio"] == pytest.approx(r["diversity"] / r["teacher_diversity"]) for r in recs)
    assert len({r["teacher_diversity"] for r in recs}) == 1 and "mode collapse" in stdout
    cached = json.load(open(out / "teacher_diversity.json"))
    assert cached["mean"] == recs[0]["teacher_diversity"] and cached["settings"]["seeds"] == 4
    cached["mean"] = 123.0   # resume: the reference comes from the file, not from a new measurement
    json.dump(cached, open(out / "teacher_diversity.json", "w"))
    run(out, "--max_train_steps=3", "--validation_step_interval=1", "--checkpoint_step_interval=1")
    assert json.loads(open(out / "log.jsonl").read().splitlines()[-1])["teacher_diversity"] == 123.0
    run(tmp_path / "off", "--max_train_steps=1", "--validation_diversity_seeds=1")
    assert "diversity" not in json.loads(open(tmp_path / "off" / "log.jsonl").readline())


def test_teacher_data_anchor_one_key_away(tmp_path):
    """teacher_data_samples: the teacher's own samples of the training prompts are made once into
    output_dir/teacher_data and feed the real-data term; a resumed run reuses them; contradictory keys are errors."""
    out = tmp_path / "run"
    args = ["--teacher_data_samples=2", "--teacher_data_steps=4", "--real_data_loss_weight=0.5",
            "--validation_diversity_seeds=0"]
    run(out, "--max_train_steps=2", *args)
    entries = sorted(n for n in os.listdir(out / "teacher_data") if n.startswith("teacher_"))
    assert len(entries) == 2   # 1 prompt (the validation prompt) x 2 seeds
    t = cache.read_entry(str(out / "teacher_data" / entries[0]))[1]
    assert t["latents"].shape == (16, 3, 8, 8) and torch.isfinite(t["latents"]).all()
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all(r["real_data_loss"] > 0 for r in recs)
    stamps = {n: os.stat(out / "teacher_data" / n).st_mtime_ns for n in entries}
    run(out, "--max_train_steps=3", *args)
    assert {n: os.stat(out / "teacher_data" / n).st_mtime_ns for n in entries} == stamps   # made once
    with pytest.raises(ValueError, match="teacher_data_samples"):
        checks.check_config(tiny_cfg(tmp_path, "--teacher_data_samples=2"))   # without real_data_loss_weight


def test_teacher_ode_pairs_one_key_away(tmp_path):
    """teacher_data_samples with ode_regression_weight: the teacher's ODE pairs of the training prompts are made once
    into output_dir/teacher_ode with the real score's guidance interval (a bound gives other entries than none), and
    the regression term trains on them."""
    out = tmp_path / "run"
    args = ["--teacher_data_samples=2", "--teacher_data_steps=4", "--ode_regression_weight=0.5",
            "--validation_diversity_seeds=0", "--real_score_guidance_max_timestep=600"]
    run(out, "--max_train_steps=2", *args)
    entries = sorted(n for n in os.listdir(out / "teacher_ode") if n.startswith("ode_"))
    assert len(entries) == 2 and not os.path.exists(out / "teacher_data")
    t = cache.read_entry(str(out / "teacher_ode" / entries[0]))[1]
    assert t["trajectory"].shape == (3, 16, 3, 8, 8) and t["trajectory_t"].tolist() == [1000.0, 757.0, 522.0]
    recs = [json.loads(line) for line in open(out / "log.jsonl")]
    assert all(r["ode_regression_loss"] > 0 and "real_data_loss" not in r for r in recs)
    c = tiny_cfg(tmp_path, *args)
    made = {name: data.make_teacher_data(c, ["a red circle"], str(tmp_path / name), 4, g, ode_pairs=True,
                                         guidance_max_t=m) for name, g, m in (("cond", 1.0, 1000.0),
                                         ("everywhere", 4.0, 1000.0), ("bounded", 4.0, 600.0))}
    names = {k: os.listdir(d)[0] for k, d in made.items()}
    assert len(set(names.values())) == 3   # the bound is part of the entry's key
    t = {k: cache.read_entry(os.path.join(made[k], n))[1] for k, n in names.items()}
    # t = 1000 and 757: the conditional pass alone above the bound; below it guided, so another sample
    torch.testing.assert_close(t["bounded"]["trajectory"][:2], t["cond"]["trajectory"][:2])
    assert not torch.allclose(t["bounded"]["trajectory"][1], t["everywhere"]["trajectory"][1])
    assert not torch.allclose(t["bounded"]["latents"], t["cond"]["latents"])


class FakeWandb:   # stands in for the wandb module: records what the run logs
    def __init__(self):
        self.logged = []

    def init(self, **kw):
        return self

    def log(self, rec, step):
        self.logged.append((step, dict(rec)))

    def finish(self):
        pass


@pytest.mark.parametrize("interval,log_interval", [(5, 5), (2, 4), (1, 1), (3, 2)])
def test_generator_statistics_on_every_log_line(tmp_path, capsys, monkeypatch, interval, log_interval):
    """Generator steps fall on 0-based steps divisible by generator_update_interval, log lines on 1-based multiples
    of log_interval: (5, 5) and (2, 4) never meet. Every log line carries the latest generator step's statistics
    and gen_step, the 1-based step they come from, in log.jsonl, wandb and the terminal line."""
    wandb = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=10", f"--generator_update_interval={interval}",
                             f"--log_interval={log_interval}", "--validation_step_interval=1000",
                             "--validation_diversity_seeds=0", "--checkpoint_step_interval=1000", "--report_to=wandb"))
    recs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    steps = list(range(log_interval, 11, log_interval))
    assert [r["step"] for r in recs] == steps and [s for s, _ in wandb.logged] == steps
    for r, (_, w) in zip(recs, wandb.logged):
        assert r["gen_step"] == 1 + (r["step"] - 1) // interval * interval and w == r
        assert all(math.isfinite(r[k]) for k in ("dmd_loss", "g_abs", "g_grad_norm", "x_g_std", "fake_score_loss"))
    by_gen = {}
    for r in recs:   # lines of one generator step repeat its statistics; different steps differ
        by_gen.setdefault(r["gen_step"], []).append(tuple(r[k] for k in ("dmd_loss", "g_abs", "g_grad_norm")))
    assert all(len(set(v)) == 1 for v in by_gen.values()) and len({v[0] for v in by_gen.values()}) == len(by_gen)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("step ")]
    assert [f"G@{r['gen_step']} " in ln and "dmd nan" not in ln for r, ln in zip(recs, lines)] == [True] * len(recs)


@pytest.mark.slow
def test_generator_statistics_survive_a_resume(tmp_path):
    """A log line after a resume and before the next generator step shows the statistics the checkpoint kept, as the
    uninterrupted run does (interval 3: generator steps 1, 4, 7; the resumed steps 5-6 have none)."""
    common = ["--generator_update_interval=3", "--log_interval=2", "--validation_step_interval=1000",
              "--validation_diversity_seeds=0"]
    run(tmp_path / "straight", *common, "--max_train_steps=6")
    run(tmp_path / "split", *common, "--max_train_steps=4", "--checkpoint_step_interval=4")
    run(tmp_path / "split", *common, "--max_train_steps=6")
    a, b = (json.loads(open(tmp_path / d / "log.jsonl").read().splitlines()[-1]) for d in ("straight", "split"))
    assert b["gen_step"] == 4 and {k: v for k, v in a.items() if k != "s_per_step"} == \
        {k: v for k, v in b.items() if k != "s_per_step"}


def test_export_from_a_checkpoint(tmp_path, capsys):
    """--export_from=checkpoint-2 after a 4-step run: the exported adapter is checkpoint 2's EMA weights (not the
    final ones), the merged transformer/ matches it, the file and the model card name step 2; no training."""
    out = tmp_path / "run"
    common = ["--max_train_steps=4", "--checkpoint_step_interval=2", "--validation_step_interval=2",
              "--validation_diversity_seeds=2", "--validation_teacher_steps=2"]
    train_dmd.train(tiny_cfg(out, *common))
    final = load_file(out / "student_ema.safetensors")
    log = open(out / "log.jsonl").read()

    def expected(ckpt):   # the checkpoint's EMA weights as an adapter file, built as train_dmd builds the generator
        teacher = tiny_teacher()
        lora.add_adapter(teacher, "generator", 8, 8, tuple(train_dmd.DEFAULTS["lora_targets"]))
        st = torch.load(out / ckpt / "state.pt", weights_only=True)
        validation.swap_in(lora.trainable(teacher, "generator"), st["ema"])
        return teacher, mw.adapter_state_dict(teacher, "generator")
    _, at4 = expected("checkpoint-0000004")
    assert final.keys() == at4.keys() and all(torch.equal(final[k], at4[k]) for k in final)
    capsys.readouterr()
    train_dmd.train(tiny_cfg(out, *common, "--export_from=checkpoint-2"))
    stdout = capsys.readouterr().out
    teacher, at2 = expected("checkpoint-0000002")
    exported = load_file(out / "student_ema.safetensors")
    assert exported.keys() == at2.keys() and all(torch.equal(exported[k], at2[k]) for k in exported)
    assert any(not torch.equal(exported[k], final[k]) for k in exported)
    x, t = torch.randn(1, 16, 3, 8, 8), torch.tensor([757.0])
    ctx = torch.randn(1, 512, teacher.cfg.text_dim)
    with torch.no_grad(), lora.use_adapter(teacher, "generator"):
        torch.testing.assert_close(mw.load_dit(out / "transformer")(x, t, ctx), teacher(x, t, ctx), rtol=1e-5, atol=1e-5)
    assert publish.exported_step(out) == 2 and "(step 2)" in stdout and "diversity" in stdout
    assert "| exported at | step 2 of 4 (EMA weights" in (out / "README.md").read_text()
    assert open(out / "log.jsonl").read() == log   # nothing trained, nothing logged, no checkpoint written
    assert sorted(d for d in os.listdir(out) if d.startswith("checkpoint-")) == ["checkpoint-0000002", "checkpoint-0000004"]
    with pytest.raises(FileNotFoundError, match="export_from='checkpoint-7': no state.pt there"):
        train_dmd.train(tiny_cfg(out, *common, "--export_from=checkpoint-7"))


def test_resume_with_changed_settings(tmp_path, monkeypatch, capsys):
    """On resume the new config is compared with the checkpoint's: keys a run cannot change are one error naming
    them; the others are applied (the optimisers' lr and AdamW settings, the scheduler's base lr) and announced; a
    run already at max_train_steps says so; wandb continues the same run (its id kept in the checkpoint)."""
    inits = []

    class Run:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass
    monkeypatch.setitem(sys.modules, "wandb", SimpleNamespace(init=lambda **k: inits.append(k) or Run()))
    common = ["--validation_step_interval=1000", "--validation_diversity_seeds=0", "--report_to=wandb"]
    train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=2", "--use_ema=False", *common))
    with pytest.raises(ValueError, match=r"written with lora_rank=8, use_ema=False, this config has lora_rank=4, use_ema=True: these cannot change"):
        train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=3", "--lora_rank=4", "--use_ema=True", *common))
    capsys.readouterr()
    new = ["--max_train_steps=3", "--use_ema=False", "--learning_rate=5e-5", "--fake_score_lr=2e-5",
           "--adam_weight_decay=0.0", *common]
    train_dmd.train(tiny_cfg(tmp_path, *new))
    out = capsys.readouterr().out
    for line in ("resume: learning_rate 0.0001 -> 5e-05 (applied)", "resume: fake_score_lr 0.0001 -> 2e-05 (applied)",
                 "resume: adam_weight_decay 0.01 -> 0.0 (applied)", "resume: max_train_steps 2 -> 3 (applied)"):
        assert out.count(line) == 1, line
    st = final_state(tmp_path)
    assert [(g["lr"], g["weight_decay"]) for g in st["g_opt"]["param_groups"]] == [(5e-5, 0.0)]
    assert [g["lr"] for g in st["f_opt"]["param_groups"]] == [2e-5] and st["g_sched"]["base_lrs"] == [5e-5]
    assert json.loads(open(tmp_path / "log.jsonl").read().splitlines()[-1])["lr"] == 5e-5
    train_dmd.train(tiny_cfg(tmp_path, *new))   # already at max_train_steps
    out = capsys.readouterr().out
    assert "is at step 3, max_train_steps=3: nothing to train" in out and "(applied)" not in out and "step      " not in out
    assert len(inits) == 3 and {k["id"] for k in inits} == {st["run_id"]} and all(k["resume"] == "allow" for k in inits)
