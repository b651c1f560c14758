"""Causal student training (train side): the block-wise rollout (gradient only at each block's
exit forward, none across blocks), the keys' documented effects, config errors, exit steps on 2 gloo ranks, and
a tiny end-to-end ODE init (teacher trajectories + regression) followed by DMD from it."""
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import randomize_
from safetensors.torch import load_file

import cache
import data
import model_wan as mw
import vae_wan
import lora
import sample
import dmd
import checks
import train_dmd
import flow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [os.path.join(ROOT, "config", "tiny.py"), os.path.join(ROOT, "config", "tiny_causal.py")]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
STEPS = [1000.0, 757.0, 522.0]


def cfg(*overrides):
    return train_dmd.config([*TINY, *overrides])


def tiny_student(seed=0):
    return randomize_(mw.WanDiT(mw.PRESETS["tiny"]), std=0.05, seed=seed).eval()


class Recorder:
    """gen(x, t, ctx, kv_cache=, start_frame=) over a WanDiT, recording (start_frame, t, grad enabled) per call."""

    def __init__(self, model, causal):
        self.model, self.causal, self.calls = model, causal, []

    def __call__(self, x, t, ctx, kv_cache=None, start_frame=0):
        self.calls.append((start_frame, float(t[0]), torch.is_grad_enabled()))
        return self.model(x, t, ctx, causal=self.causal, kv_cache=kv_cache, start_frame=start_frame)


def rollout(model, Fn=6, causal=(2, False), exits=None, context_noise=0.0, grad_from=0, seed=0, noise=None):
    starts = mw.block_starts(Fn, *causal)
    exits = exits or [len(STEPS) - 1] * len(starts)
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(1, 16, Fn, 4, 4, generator=g) if noise is None else noise
    ctx = torch.randn(1, 5, 32, generator=g)
    rec = Recorder(model, causal)
    cache = model.new_kv_cache(1, Fn, 4)
    torch.manual_seed(seed)
    x_g, t_from, t_to = flow.causal_rollout(lambda x, t, s: rec(x, t, ctx, kv_cache=cache, start_frame=s), noise, STEPS,
                                            exits, starts, context_noise, grad_from)
    return x_g, t_from, t_to, rec.calls, starts


def test_gradient_only_at_exit_steps_and_none_across_blocks():
    model = tiny_student()
    exits = [2, 0, 1]
    x_g, t_from, t_to, calls, starts = rollout(model, exits=exits)
    assert starts == [0, 2, 4]
    grad_calls = [(s, t) for s, t, g in calls if g]
    assert grad_calls == [(s, STEPS[k]) for s, k in zip(starts, exits)]   # one forward with grad per block, at its exit
    # per block: exit-many no-grad steps, the exit, then the context pass (none after the last block)
    assert [s for s, _, _ in calls] == [0] * 4 + [2] * 2 + [4] * 2
    assert [t for s, t, g in calls if s == 0] == [1000.0, 757.0, 522.0, 0.0]
    assert (t_from, t_to) == (1000.0, 0.0)   # the score window spans every block's (exit, next) pair
    assert rollout(model, exits=[1, 1, 1])[1:3] == (757.0, 522.0)   # a shared exit: its own (from, to) pair
    # none across blocks: with every exit at step 0 each block's gradient forward reads the noise itself, and a
    # block's output has no gradient path to the noise (or the output) of the blocks before it
    noise = torch.randn(1, 16, 6, 4, 4, requires_grad=True)
    x_g = rollout(model, exits=[0, 0, 0], noise=noise)[0]
    for b, s in enumerate(starts):
        (gn,) = torch.autograd.grad(x_g[:, :, s:s + 2].square().sum(), noise, retain_graph=True)
        assert gn[:, :, s:s + 2].abs().sum() > 0
        assert torch.count_nonzero(gn[:, :, :s]) == 0 and torch.count_nonzero(gn[:, :, s + 2:]) == 0, b
    # the LoRA generator through train_dmd's velocity function: gradients reach the adapter, never the base
    lora.add_adapter(model, "generator", 4, 4)
    with torch.no_grad():
        for p in lora.trainable(model, "generator"):
            p.add_(0.01 * torch.randn_like(p))
    model.requires_grad_(False)
    for p in lora.trainable(model, "generator"):
        p.requires_grad_(True)
    G = lora.velocity_fn(model, "generator", lambda: torch.autocast("cpu", enabled=False), (2, False))
    cache = model.new_kv_cache(1, 6, 4)
    ctx = torch.randn(1, 5, 32)
    x_g, _, _ = flow.causal_rollout(lambda x, t, s: G(x, t, ctx, kv_cache=cache, start_frame=s), torch.randn(1, 16, 6, 4, 4),
                                    STEPS, [1, 2, 0], starts)
    x_g.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.trainable(model, "generator"))
    assert all(p.grad is None for n, p in model.named_parameters() if ".lora_" not in n)
    assert not any(k.requires_grad for k in cache.k + cache.v)


def test_exit_steps_keys():
    n = 3
    # same_step_across_blocks: one draw for all blocks; bidirectional (1 block): the bidirectional trainer's draw
    for step in range(20):
        ks = dmd.exit_steps(42, step, 0, n, 7, same=True)
        assert len(set(ks)) == 1
        g = torch.Generator().manual_seed((42 * 100003 + step) * 2 + 0)
        assert dmd.exit_steps(42, step, 0, n, 1) == [int(torch.randint(n, (1,), generator=g))]
    per_block = [dmd.exit_steps(42, step, 0, n, 7, same=False) for step in range(20)]
    assert any(len(set(ks)) > 1 for ks in per_block) and all(len(ks) == 7 for ks in per_block)
    assert per_block == [dmd.exit_steps(42, step, 0, n, 7, same=False) for step in range(20)]   # deterministic
    assert dmd.exit_steps(42, 0, 0, n, 7, same=False) != dmd.exit_steps(42, 0, 1, n, 7, same=False) or \
        dmd.exit_steps(42, 1, 0, n, 7, same=False) != dmd.exit_steps(42, 1, 1, n, 7, same=False)
    # last_step_only: always the last
    assert dmd.exit_steps(42, 5, 0, n, 4, same=False, last_only=True) == [n - 1] * 4


def test_context_noise_and_block_layout_change_the_rollout():
    model = tiny_student()
    clean, *_, calls0, _ = rollout(model, context_noise=0.0)
    noisy, *_, calls1, _ = rollout(model, context_noise=500.0)
    assert torch.equal(clean[:, :, :2], noisy[:, :, :2])            # block 0 sees no context
    assert not torch.allclose(clean[:, :, 2:], noisy[:, :, 2:])     # later blocks read the context-noised cache
    assert [t for _, t, _ in calls1 if t not in STEPS] == [500.0, 500.0]   # the cache passes run at t = context_noise
    # num_frame_per_block / independent_first_frame set the blocks the generator runs
    _, _, _, calls, starts = rollout(model, Fn=5, causal=(2, True))
    assert starts == [0, 1, 3] and sorted({s for s, _, _ in calls}) == starts
    one = rollout(model, Fn=5, causal=(0, False))[3]
    assert {s for s, _, _ in one} == {0}


def test_longer_rollout_keeps_the_last_frames():
    model = tiny_student()
    x_g, _, _, calls, starts = rollout(model, Fn=6, grad_from=2)            # 3 blocks, the loss sees the last 4 frames
    assert [s for s, _, g in calls if g] == [2, 4]                          # no gradient forward before the window
    assert torch.equal(dmd.keep_last_frames(x_g, 4), x_g[:, :, 2:])
    torch.manual_seed(0)
    vae = vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)).eval()
    kept = dmd.keep_last_frames(x_g, 4, vae)
    assert kept.shape[2] == 4 and torch.equal(kept[:, :, 1:], x_g[:, :, 3:])
    with torch.no_grad():   # the first kept frame: decoded up to it, its last pixel frame encoded as an image latent
        ref = vae.encode(vae.decode(x_g[:, :, :3])[:, :, -1:])
    torch.testing.assert_close(kept[:, :, :1], ref)
    assert dmd.keep_last_frames(x_g, 6, vae) is x_g


def test_training_rollout_exiting_last_equals_sample_student():
    """The trainer's call of flow.causal_rollout (its block function, every exit last) and sample.py's
    sample_student (its KV cache and block plumbing) give the same samples bit for bit."""
    model = tiny_student()
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(1, 16, 5, 4, 4, generator=g), torch.randn(1, 5, 32, generator=g)
    for causal, cn in (((2, True), 0.0), ((1, False), 250.0)):
        starts = mw.block_starts(5, *causal)
        with torch.no_grad():
            rec, cache = Recorder(model, causal), model.new_kv_cache(1, 5, 4)
            ours = flow.causal_rollout(lambda x_, t, s: rec(x_, t, ctx, kv_cache=cache, start_frame=s), x, STEPS,
                                       [2] * len(starts), starts, cn, generator=torch.Generator().manual_seed(1))[0]
            cz = dict(num_frame_per_block=causal[0], independent_first_frame=causal[1], context_noise=cn)
            ref = sample.sample_student(model, ctx, x, STEPS, cz, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(ours, ref, rtol=0, atol=0)


@pytest.mark.parametrize("overrides,match", [
    (["--causal=False", "--num_frame_per_block=2"], "causal=True"),
    (["--causal=False", "--independent_first_frame=True"], "causal=True"),
    (["--causal=False", "--same_step_across_blocks=False"], "causal=True"),
    (["--causal=False", "--context_noise=100"], "causal=True"),
    (["--causal=False", "--num_training_frames=6", "--dmd_loss_frames=4"], "causal=True"),
    (["--num_training_frames=31", "--num_frame_per_block=3"], "31 latent frames"),
    (["--num_frame_per_block=3", "--independent_first_frame=True", "--num_training_frames=7",
      "--validation_num_video_frames=81"], "validation_num_video_frames"),
    (["--num_training_frames=6", "--dmd_loss_frames=3"], "dmd_loss_frames"),
    (["--context_noise=1000"], "context_noise"),
    (["--sp_size=2"], "sequence parallelism"),
    (["--rollout_mode=data"], "rollout_mode"),
    (["--objective=ode_init"], "make_ode_pairs"),
    (["--ode_regression_weight=0.25"], "make_ode_pairs"),
    (["--objective=ode_init", "--ode_regression_weight=0.25",
      "--datasets=[{'dataset_type': 'latents', 'cache_dir': 'x'}]"], "ode_regression_weight is a DMD term"),
    (["--ode_regression_weight=-1"], ">= 0"),
    (["--objective=ode"], "objective"),
])
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        checks.check_config(cfg(*overrides))


def test_defaults_are_bidirectional():
    c = train_dmd.config([TINY[0]])
    assert not c["causal"] and checks.check_config(c) == STEPS
    checks.check_config(cfg("--num_training_frames=6", "--dmd_loss_frames=4"))   # causal: valid
    checks.check_config(cfg("--num_frame_per_block=3", "--independent_first_frame=True", "--num_training_frames=7",
                               "--validation_num_video_frames=25"))


@pytest.mark.slow
def test_exit_steps_identical_on_two_gloo_ranks():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           os.path.join("tests", "dist_checks.py"), "causal_exits"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env=ENV)
    assert p.returncode == 0 and "causal_exits ok" in p.stdout, p.stdout[-3000:] + p.stderr[-4000:]


def run(*args):
    p = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=ENV)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p.stdout


@pytest.mark.slow
def test_ode_init_then_dmd_end_to_end(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle moving left\na blue square moving up\n")
    ode_dir = tmp_path / "ode"
    # (a) teacher trajectories at the student's steps, stored like the latent cache
    run("data.py", *TINY, f"--make_ode_pairs={prompts}", f"--teacher_out={ode_dir}", "--teacher_steps=8")
    files = sorted(os.listdir(ode_dir))
    assert len(files) == 2 and all(f.startswith("ode_") for f in files)
    _, t = cache.read_entry(str(ode_dir / files[0]))
    assert t["trajectory"].shape == (3, 16, 4, 8, 8) and t["latents"].shape == (16, 4, 8, 8)
    assert t["trajectory_t"].tolist() == STEPS
    c = cfg()
    _, _, te = data.load_teacher(c, torch.device("cpu"), torch.float32, dit=False)
    x, _ = flow.initial_noise(1, 13, 64, 64, c["seed"], "cpu")
    torch.testing.assert_close(t["trajectory"][0], x[0])              # t = 1000: the teacher's initial noise
    # (b) regression of the causal student on them: the generator alone (full fine-tune, as the references)
    ds = f"--datasets=[{{'dataset_type': 'latents', 'cache_dir': '{ode_dir}'}}]"
    out = run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'init'}", "--objective=ode_init", ds, "--lora_rank=0",
              "--max_train_steps=4", "--checkpoint_step_interval=2", "--validation_step_interval=4")
    assert "step      4 | ode" in out and "exported" in out
    recs = [json.loads(line) for line in open(tmp_path / "init" / "log.jsonl")]
    assert all(r["ode_loss"] > 0 and "fake_score_loss" not in r and "dmd_loss" not in r for r in recs)
    assert os.listdir(tmp_path / "init" / "validation" / "step_4")
    init = load_file(tmp_path / "init" / "student_ema.safetensors")
    # (c) DMD from the ODE-init student: 0 steps exports exactly the init, 2 steps train it
    run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'dmd0'}", f"--generator_init={tmp_path / 'init'}",
        "--lora_rank=0", "--max_train_steps=0")
    for k, v in load_file(tmp_path / "dmd0" / "student_ema.safetensors").items():
        assert torch.equal(v, init[k]), k
    out = run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'dmd'}", f"--generator_init={tmp_path / 'init'}",
              "--lora_rank=0", "--max_train_steps=2", "--validation_step_interval=2", "--num_training_frames=6",
              "--dmd_loss_frames=4", "--independent_first_frame=False")
    assert "step      2 | dmd" in out
    exported = load_file(tmp_path / "dmd" / "student_ema.safetensors")
    assert any(not torch.equal(v, init[k]) for k, v in exported.items())
    conf = json.load(open(tmp_path / "dmd" / "config.json"))
    assert conf["causal"] is True and conf["num_frame_per_block"] == 2 and conf["independent_first_frame"] is False
    assert conf["context_noise"] == 0 and conf["num_training_frames"] == 6
    # sample.py reads that folder as a causal student
    assert sample.read_causal_config(str(tmp_path / "dmd")) == {"num_frame_per_block": 2, "independent_first_frame": False,
                                                                 "context_noise": 0.0, "window": 6,
                                                                 "dmd_denoising_steps": "1000.0,757.0,522.0"}
    # (d) DMD with the regression on the same trajectories as an added term (ode_regression_weight): both logged
    out = run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'anchored'}", ds, "--ode_regression_weight=0.5",
              "--max_train_steps=2", "--validation_step_interval=1000", "--log_interval=1")
    assert "step      2 | dmd" in out and "+ ode reg" in out   # the console line shows the term
    recs = [json.loads(line) for line in open(tmp_path / "anchored" / "log.jsonl")]
    assert all(r["dmd_loss"] > 0 and r["ode_regression_loss"] > 0 and "fake_score_loss" in r for r in recs), recs


@pytest.mark.slow
def test_causal_resume_is_exact(tmp_path):
    common = ["--checkpoint_step_interval=2", "--validation_step_interval=1000", "--context_noise=100",
              "--num_training_frames=6", "--dmd_loss_frames=4"]
    run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'straight'}", "--max_train_steps=4", *common)
    run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'split'}", "--max_train_steps=2", *common)
    assert "resumed from" in run("train_dmd.py", *TINY, f"--output_dir={tmp_path / 'split'}", "--max_train_steps=4", *common)
    a, b = (torch.load(tmp_path / d / "checkpoint-0000004" / "state.pt", weights_only=True) for d in ("straight", "split"))
    for key in ("generator", "critic", "ema"):
        assert all(torch.equal(x, y) for x, y in zip(a[key], b[key])), key
