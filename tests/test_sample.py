"""Text encoder, samplers and sample.py against diffusers (tiny pipeline, fp32) and closed forms."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import model_wan as mw
import media
import vae_wan
import text_encoders
import lora
import sample
import flow
from configurator import configure
from conftest import run_script


@pytest.fixture
def pipe_dir(tiny_pipeline, tmp_path):
    tiny_pipeline.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_text_encoder_matches_diffusers(tiny_pipeline, pipe_dir):
    prompts = ["a red circle moving left", "  a   blue &amp;amp; green square moving up the video  "]
    ref, _ = tiny_pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    te = text_encoders.load_text_encoder(pipe_dir)
    ours = te.encode(prompts)
    assert ours.shape == (2, 512, 32)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    n_tokens = [6, 10]   # words + EOS; "&amp;amp;" unescapes twice to "&" (one token)
    for i, n in enumerate(n_tokens):
        assert ours[i, :n].abs().sum(-1).min() > 0 and ours[i, n:].abs().max() == 0
    empty = te.encode([""])   # the empty prompt: EOS only, then exact zeros
    assert empty[0, 0].abs().sum() > 0 and empty[0, 1:].abs().max() == 0


# Wan's original T5 names (docs/wan21.md#weight-key-maps), restated independently of model_wan: HF -> original
def hf_to_original_t5(key):
    if key == "shared.weight":
        return "token_embedding.weight"
    if key == "encoder.final_layer_norm.weight":
        return "norm.weight"
    parts = key.split(".")
    i, rest = parts[2], ".".join(parts[3:])
    table = {"layer.0.layer_norm.weight": "norm1.weight", "layer.1.layer_norm.weight": "norm2.weight",
             "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
             "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight", "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
             "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight"}
    for p in "qkvo":
        table[f"layer.0.SelfAttention.{p}.weight"] = f"attn.{p}.weight"
    return f"blocks.{i}.{table[rest]}"


def test_text_encoder_original_layout(tiny_pipeline, tmp_path):
    te_ref = tiny_pipeline.text_encoder
    sd = {hf_to_original_t5(k): v for k, v in te_ref.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert len(sd) == 2 + 10 * te_ref.config.num_layers
    torch.save(sd, tmp_path / sample.text_encoders.T5_PTH)
    tiny_pipeline.tokenizer.save_pretrained(tmp_path / "google" / "umt5-xxl")
    prompts = ["a cat moving right", "the dog"]
    ref, _ = tiny_pipeline.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=512)
    torch.testing.assert_close(text_encoders.load_text_encoder(tmp_path).encode(prompts), ref, rtol=0, atol=1e-6)


def run_sample(pipe_dir, tmp_path, **kw):
    cfg = dict(model=str(pipe_dir), ckpt="", prompt="a red circle moving left", prompts_file="", negative_prompt=None,
               height=32, width=48, num_frames=5, num_inference_steps=6, guidance_scale=4.0, flow_shift=None,
               sampler="unipc", denoising_steps="", seed=7, batch_size=1, out=str(tmp_path / "out"),
               save_latents=True, fps=16, device="cpu", dtype="float32")
    cfg.update(kw)
    paths = sample.generate(cfg)
    from safetensors.torch import load_file
    return paths, [load_file(p.replace(".mp4", ".latents.safetensors"))["latents"] for p in paths]


@pytest.mark.parametrize("neg,steps,guidance", [("a blue square", 6, 4.0), ("", 5, 1.0), (None, 4, 5.0)])
def test_teacher_sampling_matches_diffusers(tiny_pipeline, pipe_dir, tmp_path, neg, steps, guidance):
    from diffusers import WanPipeline
    paths, (ours,) = run_sample(pipe_dir, tmp_path, negative_prompt=neg, num_inference_steps=steps, guidance_scale=guidance)
    pipe = WanPipeline.from_pretrained(pipe_dir)
    ref = pipe(prompt="a red circle moving left", negative_prompt=text_encoders.WAN_NEGATIVE_PROMPT if neg is None else neg,
               height=32, width=48, num_frames=5, num_inference_steps=steps, guidance_scale=guidance,
               generator=torch.Generator("cpu").manual_seed(7), output_type="latent").frames
    assert ours.shape == ref.shape == (1, 16, 2, 4, 6)
    err = (ours - ref).abs().max().item()
    assert err <= 1e-4, err
    frames, fps = media.read_mp4(paths[0])
    assert frames.shape == (5, 32, 48, 3) and fps == 16


def velocity_to(x0):
    """The exact flow velocity toward a known x0 along x_σ = (1−σ)x0 + σε: v = (x − x0)/σ."""
    return lambda x, t: (x - x0) / (t.view(-1, 1, 1, 1, 1) / 1000)


@pytest.mark.parametrize("n,shift,layout", [(1, 1.0, "diffusers"), (2, 3.0, "diffusers"), (7, 5.0, "original"),
                                            (50, 3.0, "diffusers")])
def test_unipc_matches_diffusers_scheduler(n, shift, layout):
    from diffusers import UniPCMultistepScheduler
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 2, 4, 6, generator=g)
    W = torch.randn(16, 16, generator=g) * 0.3

    def velocity(x, t):   # a nonlinear, time-dependent field so that every UniPC term matters
        return torch.tanh(torch.einsum("oc,bcfhw->bofhw", W, x)) * (1 + t.view(-1, 1, 1, 1, 1) / 1000)

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    if layout == "diffusers":
        sched.set_timesteps(n)
    else:   # the original Wan schedule through diffusers' class (docs/wan21.md#the-scheduler)
        sched.set_timesteps(sigmas=np.linspace(0.999, 0, n + 1)[:-1])
    sigmas, timesteps = flow.flow_schedule(n, shift, layout)
    assert torch.equal(timesteps, sched.timesteps)
    torch.testing.assert_close(sigmas, sched.sigmas, rtol=0, atol=1e-7)
    ref = x.clone()
    for t in sched.timesteps:
        ref = sched.step(velocity(ref, t.float().expand(2)), t, ref).prev_sample
    ours = flow.unipc_sample(velocity, x.clone(), sigmas, timesteps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)


def test_samplers_exact_on_a_straight_flow():
    """With the exact velocity toward x0, every sampler lands on x0 (closed form)."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 1, 4, 4, generator=g), torch.randn(2, 16, 1, 4, 4, generator=g)
    sigmas, timesteps = flow.flow_schedule(5, 3.0)
    v = velocity_to(x0)
    torch.testing.assert_close(flow.euler_sample(v, noise.clone(), sigmas), x0, rtol=0, atol=1e-5)
    torch.testing.assert_close(flow.unipc_sample(lambda x, t: v(x, sigmas[(timesteps == t[0]).nonzero()[0]].expand(2) * 1000),
                                                   noise.clone(), sigmas, timesteps), x0, rtol=0, atol=1e-5)


def test_student_sampler_two_steps_by_hand():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 16, 2, 4, 4, generator=g)
    A = torch.randn(16, 16, generator=g) * 0.2
    v = lambda x, t: torch.einsum("oc,bcfhw->bofhw", A, x) + t.view(-1, 1, 1, 1, 1) / 1000   # noqa: E731
    gen = torch.Generator().manual_seed(11)
    out = flow.rollout(v, x.clone(), [1000.0, 400.0], generator=gen)[0]
    # by hand: x0 = x − 1.0·v(x, 1000); x1 = 0.6·x0 + 0.4·ε (ε the generator's next draw); x0' = x1 − 0.4·v(x1, 400)
    eps = torch.randn(x.shape, generator=torch.Generator().manual_seed(11))
    x0 = x - (torch.einsum("oc,bcfhw->bofhw", A, x) + 1.0)
    x1 = 0.6 * x0 + 0.4 * eps
    ref = x1 - 0.4 * (torch.einsum("oc,bcfhw->bofhw", A, x1) + 0.4)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_student_mode_with_exported_adapter(pipe_dir, tmp_path):
    dit = mw.load_dit(pipe_dir)
    lora.add_adapter(dit, "g", rank=4, alpha=8)
    for p in lora.adapter_parameters(dit, "g"):
        torch.nn.init.normal_(p, std=0.05)
    save_file(mw.adapter_state_dict(dit, "g"), tmp_path / "student.safetensors")
    paths, (lat,) = run_sample(pipe_dir, tmp_path, ckpt=str(tmp_path), num_frames=9)   # folder -> student.safetensors
    assert lat.shape == (1, 16, 3, 4, 6)
    # same as the sampler run by hand on our DiT with the adapter active, same noise convention
    x, gen = flow.initial_noise(1, 9, 32, 48, 7, "cpu")
    ctx = text_encoders.load_text_encoder(pipe_dir).encode(["a red circle moving left"])
    with torch.no_grad(), lora.use_adapter(dit, "g"):
        ref = sample.sample_student(dit, ctx, x, [1000.0, 757.0, 522.0], None, gen)
    torch.testing.assert_close(lat, ref, rtol=0, atol=1e-5)
    frames, fps = media.read_mp4(paths[0])
    assert frames.shape == (9, 32, 48, 3)


def test_mp4_round_trip(tmp_path):
    t = torch.linspace(-1, 1, 9)
    video = t.view(1, 9, 1, 1).expand(3, 9, 32, 48).clone()
    video[0] = -video[0]
    frames, fps = media.read_mp4(media.write_mp4(str(tmp_path / "v.mp4"), video, fps=16))
    assert frames.shape == (9, 32, 48, 3) and fps == 16
    expect = ((video.permute(1, 2, 3, 0) + 1) * 127.5).numpy()
    assert np.abs(frames.astype(np.float32) - expect).mean() < 3.0   # H.264 yuv420p, crf 17


def test_bad_inputs(pipe_dir, tmp_path):
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    dit = mw.load_dit(pipe_dir)
    with pytest.raises(Exception, match="(?i)safetensors|header|deserializ"):
        sample.load_student(dit, str(bad))
    with pytest.raises(FileNotFoundError, match="student"):
        sample.load_student(dit, str(tmp_path))
    sd = mw.to_diffusers_state_dict(dit)
    sd["proj_out.weight"] = torch.zeros(3, 3)
    save_file(sd, tmp_path / "wrong.safetensors")
    with pytest.raises(ValueError, match="proj_out|head.head"):
        sample.load_student(dit, str(tmp_path / "wrong.safetensors"))
    import shutil
    shutil.rmtree(pipe_dir / "text_encoder")
    with pytest.raises(FileNotFoundError, match="text_encoder"):
        text_encoders.load_text_encoder(pipe_dir)
    with pytest.raises(ValueError, match="denoising_steps"):
        run_sample(pipe_dir, tmp_path, denoising_steps="500,900")


def test_configurator(tmp_path, capsys):
    script = tmp_path / "s.py"
    script.write_text("# " + "-" * 77 + "\nlr = 1e-4  # learning rate\nname = 'a'\nsteps = [1, 2]\nneg = None\n"
                      "flag = False\n" + "# " + "-" * 77 + "\n")
    g = {"lr": 1e-4, "name": "a", "steps": [1, 2], "neg": None, "flag": False}
    cfgfile = tmp_path / "c.py"
    cfgfile.write_text("lr = 3\nsteps = (4, 5)\n")
    cfg = configure(g, str(script), [str(cfgfile), "--name=hello world", "--neg=", "--flag=True"])
    assert cfg == {"lr": 3.0, "name": "hello world", "steps": [4, 5], "neg": "", "flag": True}
    with pytest.raises(SystemExit):
        configure(g, str(script), ["--step=3"])
    assert "did you mean '--steps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configure(g, str(script), ["--flag=3"])
    assert "flag: expected true or false" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        configure(g, str(script), ["--help"])
    assert "learning rate" in capsys.readouterr().out


def test_student_steps_as_trained(tmp_path):
    """sample.py samples a student on the timesteps it was trained on (its train_dmd config.json, warped when
    warp_denoising_step was set), SimpleTuner's DMD quickstart's 1000,757,522 without one."""
    import json
    assert sample.student_steps(str(tmp_path)) == sample.STUDENT_STEPS.replace(",", ".0,") + ".0"
    json.dump({"dmd_denoising_steps": "1000,750,500,250"}, open(tmp_path / "config.json", "w"))
    assert sample.student_steps(str(tmp_path / "student.safetensors")) == "1000.0,750.0,500.0,250.0"
    json.dump({"dmd_denoising_steps": "1000,750,500,250", "warp_denoising_step": True, "timestep_shift": 5.0},
              open(tmp_path / "config.json", "w"))
    warped = [float(t) for t in sample.student_steps(str(tmp_path)).split(",")]
    want = [1000 * 5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25)]      # σ' = 5σ / (1 + 4σ)
    assert max(abs(a - b) for a, b in zip(warped, want)) < 1e-3


def test_demo_teacher_folder(tmp_path):
    """A demo.py teacher folder (DiT + VAE + the tiny_text_encoder marker, no UMT5) samples with
    text_encoders.TinyTextEncoder's embeddings: the same latents as the sampler run by hand on them."""
    import train_dmd
    torch.manual_seed(0)
    dit = mw.WanDiT(mw.PRESETS["tiny"]).eval()
    mw.save_dit(dit, tmp_path / "teacher" / "transformer")
    vae_wan.save_vae(vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)), str(tmp_path / "teacher" / "vae"))
    (tmp_path / "teacher" / "model_index.json").write_text("{}")
    (tmp_path / "teacher" / text_encoders.TINY_TEXT_MARKER).write_text("")
    paths, (lat,) = run_sample(tmp_path / "teacher", tmp_path, denoising_steps="1000,500", num_frames=9)
    x, gen = flow.initial_noise(1, 9, 32, 48, 7, "cpu")
    ctx = text_encoders.TinyTextEncoder(32).encode(["a red circle moving left"])
    with torch.no_grad():
        ref = sample.sample_student(dit, ctx, x, [1000.0, 500.0], None, gen)
    torch.testing.assert_close(lat, ref, rtol=0, atol=1e-5)
    assert media.read_mp4(paths[0])[0].shape == (9, 32, 48, 3)
    import data   # data.py loads the same folder for teacher data: frozen weights, the tiny text encoder
    base, _, te = data.load_teacher(dict(train_dmd.DEFAULTS, pretrained_model_name_or_path=str(tmp_path / "teacher"),
                                         device="cpu"), torch.device("cpu"), torch.float32)
    assert not any(p.requires_grad for p in base.parameters()) and isinstance(te, text_encoders.TinyTextEncoder)


def test_latents_only_mode(pipe_dir, tmp_path, capsys):
    """decode=False (with save_latents=True): the same latents as a decoding run, no VAE decode, no mp4, and a
    one-line summary (counts and folder) instead of every path."""
    paths, (ref,) = run_sample(pipe_dir, tmp_path / "a", prompts_file="", num_inference_steps=3)
    assert capsys.readouterr().out.splitlines()[-1].endswith(f"1 mp4 + 1 latents in {tmp_path / 'a' / 'out'}")
    from safetensors.torch import load_file
    cfg = dict(model=str(pipe_dir), ckpt="", prompt="a red circle moving left", prompts_file="", negative_prompt=None,
               height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=4.0, flow_shift=None,
               sampler="unipc", denoising_steps="", seed=7, batch_size=1, out=str(tmp_path / "b"),
               save_latents=True, decode=False, fps=16, device="cpu", dtype="float32")
    lats = sample.generate(cfg)
    assert [p.endswith(".latents.safetensors") for p in lats] == [True]
    assert sorted(os.listdir(tmp_path / "b")) == [os.path.basename(lats[0])]   # no mp4
    torch.testing.assert_close(load_file(lats[0])["latents"], ref, rtol=0, atol=0)
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.endswith(f"| 1 latents in {tmp_path / 'b'}") and "VAE decode 0.0s" in line
    with pytest.raises(ValueError, match="decode=False writes latents only"):
        sample.generate(dict(cfg, save_latents=False))

# -----------------------------------------------------------------------------
# sample.py's command line: what a newcomer gives --ckpt, counts, a causal student's frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


run_main = run_script


def no_models(monkeypatch):
    """Any model load or hub lookup fails the test: a refusal must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded (or the hub asked) before the refusal")
    for mod, name in ((mw, "load_dit"), (mw, "resolve_hub"), (flow, "resolve_model_dir"), (vae_wan, "load_vae"),
                      (text_encoders, "text_encoder")):
        monkeypatch.setattr(mod, name, boom)


def fake_run(folder, student=True, **cfg):
    """A train_dmd.py output folder as sample.py reads it (config.json, env.json, a checkpoint), no weights that load."""
    import json
    os.makedirs(folder / "checkpoint-0000020")
    (folder / "checkpoint-0000020" / "state.pt").write_bytes(b"PK\x03\x04 a torch pickle")
    json.dump({"pretrained_model_name_or_path": "tiny", "height": 32, "width": 32, "num_training_frames": 3},
              open(folder / "checkpoint-0000020" / "config.json", "w"))   # the trainer writes it beside state.pt
    json.dump({"pretrained_model_name_or_path": str(folder / "teacher"), "height": 32, "width": 32,
               "num_training_frames": 3, "output_dir": "out/somewhere_else", **cfg}, open(folder / "config.json", "w"))
    json.dump({"argv": ["train_dmd.py", "config/tiny.py", "--output_dir=out/somewhere_else", "--seed=3"]},
              open(folder / "env.json", "w"))
    if student:
        save_file({"x": torch.zeros(1)}, folder / "student_ema.safetensors")
    return folder


def test_ckpt_that_is_not_a_student_is_one_line(tmp_path, monkeypatch, capsys):
    """--ckpt given a checkpoint folder, its state.pt, a text file, a run with no exported student yet: one line
    naming what was given and what to give instead (the exact export command), before any model or hub lookup."""
    no_models(monkeypatch)
    run = fake_run(tmp_path / "run")
    export = f"`python train_dmd.py config/tiny.py --seed=3 --output_dir={run} --export_from=checkpoint-0000020`"
    (tmp_path / "notes.txt").write_text("# not weights\n")
    bare = fake_run(tmp_path / "bare", student=False)
    cases = [([f"--ckpt={run / 'checkpoint-0000020'}"], f"a train_dmd.py checkpoint (training state, not a student): "
              f"export its student with {export}, then sample --ckpt={run}"),
             ([f"--ckpt={run / 'checkpoint-0000020' / 'state.pt'}", f"--model={tmp_path}"], export),
             ([f"--ckpt={tmp_path / 'notes.txt'}"], "notes.txt: not a safetensors file (no safetensors header at its "
              "start): give a student .safetensors (a run's student_ema.safetensors) or a train_dmd.py output folder"),
             ([f"--ckpt={bare}"], f"no exported student in it yet (student_ema.safetensors): export its newest "
              f"checkpoint's with `python train_dmd.py config/tiny.py --seed=3 --output_dir={bare} --export_from=latest`")]
    for argv, says in cases:
        code, out, err = run_main("sample.py", argv + [f"--out={tmp_path / 'never'}"], monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("sample.py: error: --ckpt=") and says in err, err
        assert not (tmp_path / "never").exists()


def test_checkpoint_export_command_and_transformer_folder(tmp_path, monkeypatch, capsys):
    """A real tiny run: the command sample.py names for its checkpoint folder exports that checkpoint as printed; the
    run's merged transformer/ samples as the run folder does (the settings from the run's config.json)."""
    import shlex
    import train_dmd
    monkeypatch.chdir(ROOT)
    run = tmp_path / "run"
    train_dmd.train(train_dmd.config([os.path.join(ROOT, "config", "tiny.py"), f"--output_dir={run}",
                                      "--max_train_steps=2", "--checkpoint_step_interval=1", "--validation_step_interval=1000",
                                      "--validation_diversity_seeds=0", "--height=32", "--width=32", "--num_training_frames=2"]))
    capsys.readouterr()
    with pytest.raises(SystemExit):
        sample.config([f"--ckpt={run / 'checkpoint-0000001'}"])
    problem = capsys.readouterr().err
    assert problem.startswith(f"sample.py: error: --ckpt={run / 'checkpoint-0000001'}: a train_dmd.py checkpoint")
    cmd = problem.split("`")[1]
    assert cmd.startswith("python train_dmd.py ") and cmd.endswith("--export_from=checkpoint-0000001"), problem
    capsys.readouterr()
    code, out, err = run_main("train_dmd.py", shlex.split(cmd)[2:], monkeypatch, capsys)
    assert code == 0 and "(step 1)" in out, out + err
    lat = {}
    for ckpt in (run, run / "transformer", run / "transformer" / "diffusion_pytorch_model.safetensors"):
        assert sample.ckpt_problem(str(ckpt)) is None
        c = sample.config([f"--ckpt={ckpt}", f"--out={tmp_path / 'out'}", "--save_latents=True", "--decode=False"])
        assert (c["height"], c["num_frames"], c["model"]) == (32, 5, str(run / "tiny_teacher"))
        (path,) = sample.generate(c)
        from safetensors.torch import load_file
        lat[str(ckpt)] = load_file(path)["latents"]
    first, *rest = lat.values()
    for other in rest:
        torch.testing.assert_close(other, first, rtol=0, atol=1e-5)


def test_non_positive_counts_are_one_line(tmp_path, monkeypatch, capsys):
    """--batch_size=0 (before: range() arg 3 must not be zero, and an empty --out folder) and the other counts:
    one line before any model loads, --out never made."""
    no_models(monkeypatch)
    run = fake_run(tmp_path / "run")
    for key in ("batch_size", "num_inference_steps", "num_frames", "fps"):
        code, out, err = run_main("sample.py", [f"--ckpt={run}", f"--{key}=0", f"--out={tmp_path / 'never'}"],
                                  monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and f"error: --{key}=0: " in err and f"positive --{key}" in err, err
        assert not (tmp_path / "never").exists()


def test_causal_frames_name_the_nearest_that_fit(tmp_path, monkeypatch, capsys):
    """A num_frames whose latent frames do not split into the causal student's blocks is refused naming the nearest
    num_frames below and above that do; the causal command README.md and sample.py print fits
    config/wan_causal_dmd.py's blocks (it printed 161: 41 latent frames, not a multiple of 3)."""
    import re
    no_models(monkeypatch)
    run = fake_run(tmp_path / "run", causal=True, num_frame_per_block=3, independent_first_frame=False,
                   context_noise=0.0, num_training_frames=21)
    code, out, err = run_main("sample.py", [f"--ckpt={run}", "--num_frames=161", f"--out={tmp_path / 'never'}"],
                              monkeypatch, capsys)
    assert code == 2 and err.count("\n") == 1 and "--num_frames=161 is 41 latent frames" in err, err
    assert "blocks of 3" in err and err.rstrip().endswith("give --num_frames=153 or 165"), err
    with pytest.raises(ValueError, match=r"the first a block of its own and 5 after it.*give --num_frames=13 or 25"):
        sample.check_blocks(21, 3, True)
    sample.check_blocks(165, 3, False)
    cfg = configure(dict(__import__("train_dmd").DEFAULTS), "train_dmd.py", [os.path.join(ROOT, "config", "wan_causal_dmd.py")])
    for path in ("README.md", "sample.py"):
        printed = re.findall(r"sample\.py --ckpt=out/wan_causal_dmd .*?--num_frames=(\d+)", open(os.path.join(ROOT, path)).read())
        assert printed, path
        for n in printed:
            sample.check_blocks(int(n), cfg["num_frame_per_block"], cfg["independent_first_frame"])
