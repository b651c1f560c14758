"""Under bad input: bad files and bad text are one-line errors that name the file (readers.py); a start that
fails leaves an existing run's files alone; the suite passes in a user's environment as it is; the critic trains on
the generator step's batch."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import data
import dmd
import lora
import model_wan as mw
import publish
import readers
import sample
import text_encoders
import train_dmd
import vae_wan
from test_data import solid, write_image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "tiny.py")
LATIN1 = "a café on a hill\n".encode("latin-1")   # é as one byte: not UTF-8


def tiny_cfg(out, *overrides):
    return train_dmd.config([TINY, f"--output_dir={out}", "--validation_step_interval=1000",
                             "--validation_diversity_seeds=0", "--checkpoint_step_interval=1000", *overrides])


def test_text_readers_name_the_file(tmp_path):
    bad, empty, bom = tmp_path / "bad.txt", tmp_path / "empty.txt", tmp_path / "bom.txt"
    bad.write_bytes(b"a cat\n" + LATIN1)
    empty.write_text("\n   \n")
    bom.write_bytes("\ufeffa cat\n\nA dog \n".encode("utf-8"))
    with pytest.raises(ValueError, match=f"prompts file '{bad}': not UTF-8 text \\(byte 0xe9 on line 2\\)"):
        readers.read_lines(bad)
    with pytest.raises(ValueError, match=f"'{empty}' has no prompt"):
        readers.read_lines(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt'"):
        readers.read_lines(tmp_path / "missing.txt")
    assert readers.read_lines(bom) == ["a cat", "A dog"]   # a Windows editor's byte-order mark is not a prompt
    (tmp_path / "lib.json").write_text('{"a": "x",}')
    with pytest.raises(ValueError, match="lib.json'.*not valid JSON"):
        readers.read_json(tmp_path / "lib.json")


def test_bad_prompts_files_in_every_reader(tmp_path):
    """train_dmd, sample.py, data.py's teacher data and validation library, the dataset metadata, the webhook
    config. Before: a bare UnicodeDecodeError; an empty prompts file was "no training prompts" (no file named) in
    train_dmd and no prompt at all in sample.py (it wrote nothing)."""
    bad, empty = tmp_path / "bad.txt", tmp_path / "empty.txt"
    bad.write_bytes(LATIN1)
    empty.write_text("\n")
    for path, match in ((bad, "not UTF-8"), (empty, "has no prompt")):
        with pytest.raises(ValueError, match=f"{path}'.*{match}"):
            train_dmd.train(tiny_cfg(tmp_path / "run", f"--prompts_file={path}"))
        with pytest.raises(ValueError, match=f"{path}'.*{match}"):
            sample.settings(dict(device="cpu", dtype="float32", height=32, width=32, num_frames=5, sampler="unipc",
                                 prompts_file=str(path), prompt="x", ckpt=""))
        with pytest.raises(ValueError, match=f"{path}'.*{match}"):
            data.make_teacher_data(dict(train_dmd.DEFAULTS), str(path), str(tmp_path / "teacher"))
    with pytest.raises(ValueError, match=f"validation_prompt_library '{bad}': not UTF-8"):
        data.read_prompts(dict(train_dmd.DEFAULTS, validation_prompt_library=str(bad)))
    with pytest.raises(ValueError, match=f"webhook_config '{bad}': not UTF-8"):
        publish.load_webhook_config(str(bad))
    (tmp_path / "media").mkdir()
    write_image(tmp_path / "media" / "a.png", solid(32, 32, (1, 2, 3))[0], caption=None)
    (tmp_path / "media" / "metadata.jsonl").write_bytes(b'{"file": "a.png", "caption": "caf\xe9"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl'.*not UTF-8"):
        data.MediaDataset(dict(instance_data_dir=str(tmp_path / "media"), resolution=32, num_frames=1))


def damaged(path, how):
    """Damage a safetensors file as downloads do: cut in half, or an HTML error page / a pickle under its name."""
    raw = open(path, "rb").read()
    content = {"truncated": raw[:len(raw) // 2], "html": b"<!DOCTYPE html><html>502 Bad Gateway</html>",
               "pickle": b"PK\x03\x04" + raw[:100]}[how]
    open(path, "wb").write(content)


@pytest.mark.parametrize("how,match", [("truncated", "truncated: .* bytes, fewer than its header lists"),
                                       ("html", "an HTML or XML page"), ("pickle", "a torch pickle")])
def test_damaged_weights_name_the_file(tmp_path, how, match):
    """Each loader of weights: the DiT (teacher / sample.py), the VAE, the text encoder, a student file. Before:
    "Error while deserializing header: incomplete metadata", no file named."""
    torch.manual_seed(0)
    dit = mw.WanDiT(mw.PRESETS["tiny"]).eval()
    mw.save_dit(dit, str(tmp_path / "dit"))
    vae_wan.save_vae(vae_wan.WanVAE(vae_wan.WanVAEConfig(base_dim=16, dim_mult=(1, 1, 1, 1), num_res_blocks=1)),
                     str(tmp_path / "vae"))
    lora.add_adapter(dit, "student", 4, 4, lora.DEFAULT_LORA_TARGETS)
    save_file(mw.adapter_state_dict(dit, "student"), str(tmp_path / "student.safetensors"))
    from transformers import UMT5Config, UMT5EncoderModel
    UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
                     ).save_pretrained(str(tmp_path / "te" / "text_encoder"))
    (tmp_path / "te" / "tokenizer").mkdir()
    files = {"dit": tmp_path / "dit" / "diffusion_pytorch_model.safetensors",
             "vae": tmp_path / "vae" / "diffusion_pytorch_model.safetensors",
             "student": tmp_path / "student.safetensors", "te": tmp_path / "te" / "text_encoder" / "model.safetensors"}
    for f in files.values():
        damaged(f, how)
    loads = {"dit": lambda: mw.load_dit(tmp_path / "dit"), "vae": lambda: vae_wan.load_vae(str(tmp_path / "vae")),
             "student": lambda: sample.load_student(dit, str(files["student"])),
             "te": lambda: text_encoders.load_text_encoder(tmp_path / "te")}
    for name, load in loads.items():
        with pytest.raises(ValueError, match=f"^{files[name]}: cannot read the weights: {match}"):
            load()


def test_foreign_weights_name_the_source(tmp_path):
    save_file({"lora_A.weight": torch.zeros(4, 8)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="other.safetensors': not a Wan DiT checkpoint"):
        mw.load_dit(tmp_path / "other.safetensors")


def test_small_images_skipped_unless_minimum_image_size_is_lowered(tmp_path, capsys):
    """SimpleTuner's minimum_image_size under pixel_area: fewer than its square of pixels is skipped, with the
    reason; default resolution // 2. Before: default 0 (off), so a thumbnail was upscaled into the bucket."""
    for name, (h, w) in {"thumb.png": (8, 8), "ok.png": (32, 48), "thin.png": (10, 30)}.items():
        write_image(tmp_path / name, solid(h, w, (9, 9, 9))[0])
    ds = data.MediaDataset(dict(instance_data_dir=str(tmp_path), resolution=32, num_frames=1))
    assert sorted(os.path.basename(s["file"]) for s in ds.samples) == ["ok.png", "thin.png"]   # 300 px >= 16²
    out = capsys.readouterr().out
    assert "thumb.png" in out and "too small (8x8 = 64 px < minimum_image_size² = 16² px" in out
    ds = data.MediaDataset(dict(instance_data_dir=str(tmp_path), resolution=32, num_frames=1, minimum_image_size=0))
    assert len(ds.samples) == 3


def test_a_failing_start_leaves_an_existing_run_alone(tmp_path):
    """A bad teacher path, a bad prompts file, a bad key value: config.json and env.json of the run already in
    output_dir keep their bytes (before: config.json was rewritten before the teacher failed to load, env.json by
    the publisher's start)."""
    out = tmp_path / "run"
    out.mkdir()
    before = {"config.json": b'{"learning_rate": 1e-05}\n', "env.json": b'{"torch": "2.5"}\n'}
    for name, raw in before.items():
        (out / name).write_bytes(raw)
    (tmp_path / "bad.txt").write_bytes(LATIN1)
    for bad, error in (("--pretrained_model_name_or_path=/no/such/teacher", FileNotFoundError),
                       (f"--prompts_file={tmp_path / 'bad.txt'}", ValueError), ("--grad_clip_method=foo", ValueError),
                       ("--validation_prompt_library=/no/such/library.json", FileNotFoundError)):
        with pytest.raises(error):
            train_dmd.train(tiny_cfg(out, bad))
        assert {name: (out / name).read_bytes() for name in before} == before, bad


def test_a_failing_resume_leaves_the_run_alone(tmp_path):
    out = tmp_path / "run"
    train_dmd.train(tiny_cfg(out, "--max_train_steps=1", "--checkpoint_step_interval=1"))
    before = {name: (out / name).read_bytes() for name in ("config.json", "env.json")}
    with pytest.raises(ValueError, match="lora_rank"):
        train_dmd.train(tiny_cfg(out, "--max_train_steps=2", "--lora_rank=4"))
    assert {name: (out / name).read_bytes() for name in before} == before


def test_environment_is_the_suites():
    """conftest.own_environment: nothing of the user's hub or tracker settings reaches a test."""
    import huggingface_hub
    from huggingface_hub import constants
    leaked = [k for k in os.environ if k.startswith(("HF_", "HUGGING_FACE_", "WANDB_")) and k != "HF_HOME"]
    assert leaked == [] and not constants.is_offline_mode() and huggingface_hub.get_token() is None


@pytest.mark.slow
def test_suite_passes_in_a_users_environment():
    """HF_HUB_OFFLINE=1 (offline clusters), a token, a hub cache and wandb settings of the user's: the hub tests and
    the check above pass as they do in a clean environment (before: 2 publish tests failed offline)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_TOKEN="hf_userstokenabc123", HF_HOME="/nonexistent/hf",
               WANDB_MODE="offline", OMP_NUM_THREADS="1")
    tests = ["tests/test_reliability.py::test_environment_is_the_suites",
             "tests/test_publish.py::test_hub_upload_resume_and_offline",
             "tests/test_publish.py::test_secrets_never_written_nor_printed"]
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:]


def test_critic_trains_on_the_generator_steps_batch(tmp_path, monkeypatch):
    """On a generator step the critic gets the generator's micro-batches (the same contexts, in order); a critic-only
    step draws its own: one draw per micro-batch and trainer step (before: two on generator steps)."""
    draws, seen = [], []
    next_batch, dmd_loss, critic_loss = train_dmd.next_batch, dmd.dmd_loss, dmd.critic_loss
    monkeypatch.setattr(train_dmd, "next_batch", lambda r: draws.append(next_batch(r)) or draws[-1])
    monkeypatch.setattr(dmd, "dmd_loss",
                        lambda x, t, R, F, ctx, *a: seen.append(("G", ctx)) or dmd_loss(x, t, R, F, ctx, *a))
    monkeypatch.setattr(dmd, "critic_loss", lambda F, x, t, ctx: seen.append(("F", ctx)) or critic_loss(F, x, t, ctx))
    train_dmd.train(tiny_cfg(tmp_path, "--max_train_steps=4", "--generator_update_interval=2",
                             "--gradient_accumulation_steps=2"))
    assert len(draws) == 4 * 2
    assert [w for w, _ in seen] == ["G", "G", "F", "F", "F", "F"] * 2
    ctx = [c for _, c in seen]
    for i in (0, 6):   # generator steps 1 and 3: the critic's contexts are the generator's
        assert ctx[i + 2] is ctx[i] and ctx[i + 3] is ctx[i + 1]
        assert ctx[i + 4] is not ctx[i] and ctx[i + 4] is not ctx[i + 1]
