"""Many processes on CPU with gloo (parallel.py): DDP gradients, Ulysses sequence parallelism, FSDP2, and
2-process config/tiny.py runs with checkpoints and exact resume. Each test launches torchrun."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import checks
import train_dmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # two processes on a small machine


def torchrun(*args, nproc=2, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone", *args]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-6000:]
    return p.stdout


def train(out, *args, nproc=2):
    common = [os.path.join(ROOT, "config", "tiny.py"), f"--output_dir={out}", "--checkpoint_step_interval=2",
              "--validation_step_interval=4", *args]
    if nproc == 1:
        p = subprocess.run([sys.executable, "train_dmd.py", *common], cwd=ROOT, capture_output=True, text=True,
                           timeout=300, env=ENV)
        assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
        return p.stdout
    return torchrun("train_dmd.py", *common, nproc=nproc)


def student(out):
    return load_file(os.path.join(out, "student_ema.safetensors"))


def log(out):
    return [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]


def assert_same(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.slow
@pytest.mark.parametrize("check", ["ddp_grads", "sp_attention"])
def test_dist_checks(check):
    assert f"{check} ok" in torchrun(os.path.join("tests", "dist_checks.py"), check)


@pytest.mark.slow
def test_ddp_run_checkpoint_resume_and_fsdp(tmp_path):
    """2 processes: a 4-step DDP run; the same run stopped at step 2 and resumed (bit-exact); FSDP2 (sharded
    checkpoints, resumed at step 2, export gathered on rank 0) equal to DDP."""
    full = tmp_path / "ddp"
    stdout = train(full, "--max_train_steps=4")
    assert "2 process(es): 2 data-parallel x sp 1 | global batch 2" in stdout
    assert [r["step"] for r in log(full)] == [1, 2, 3, 4]
    ck = full / "checkpoint-0000004"
    assert sorted(os.listdir(ck)) == ["checksums.json", "config.json", "rank1.pt", "state.pt"]   # the sums go in last
    st = torch.load(ck / "state.pt", weights_only=True)
    r1 = torch.load(ck / "rank1.pt", weights_only=True)
    assert st["world"] == 2 and not torch.equal(st["rng"]["torch"], r1["rng"]["torch"])   # per-rank streams
    assert sorted(n.rsplit(".")[-1] for n in os.listdir(full / "validation" / "step_4")) == ["mp4", "png"]   # rank 0 alone
    assert os.path.exists(full / "env.json") and os.path.exists(full / "README.md")   # publish.py's artefacts, once

    half = tmp_path / "ddp_resumed"
    train(half, "--max_train_steps=2")
    train(half, "--max_train_steps=4")
    assert_same(student(half), student(full))
    assert [r["dmd_loss"] for r in log(half)] == [r["dmd_loss"] for r in log(full)]

    fs = tmp_path / "fsdp"
    train(fs, "--max_train_steps=2", "--fsdp=True")
    assert "sharded" in os.listdir(fs / "checkpoint-0000002")
    train(fs, "--max_train_steps=4", "--fsdp=True")
    assert_same(student(fs), student(full), atol=1e-7)
    merged_a = load_file(os.path.join(fs, "transformer", "diffusion_pytorch_model.safetensors"))
    merged_b = load_file(os.path.join(full, "transformer", "diffusion_pytorch_model.safetensors"))
    assert_same(merged_a, merged_b, atol=1e-6)
    with pytest.raises(AssertionError, match="fsdp=True"):   # a sharded checkpoint needs fsdp to resume
        train(fs, "--max_train_steps=6")


@pytest.mark.slow
def test_fsdp_with_sparse_attention_equals_ddp(tmp_path):
    """The VSA student (gates as LoRA targets of the generator) under FSDP2 equals DDP, its export included."""
    args = ["--max_train_steps=2", "--attention_sparsity=0.5", "--sparse_cube=(1,2,2)"]
    train(tmp_path / "ddp", *args)
    train(tmp_path / "fsdp", *args, "--fsdp=True")
    assert sum("to_gate_compress.lora_" in k for k in student(tmp_path / "fsdp")) == 4
    assert_same(student(tmp_path / "fsdp"), student(tmp_path / "ddp"), atol=1e-6)


@pytest.mark.slow
def test_fsdp_full_finetune_with_accumulation(tmp_path):
    """FSDP2 with full fine-tuning (separate generator and critic copies sharded too) and gradient accumulation
    equals DDP on the same run."""
    args = ["--max_train_steps=2", "--lora_rank=0", "--fake_score_lora_rank=0", "--gradient_accumulation_steps=2",
            "--learning_rate=1e-5", "--fake_score_lr=1e-5"]
    train(tmp_path / "ddp", *args)
    stdout = train(tmp_path / "fsdp", *args, "--fsdp=True")
    assert "global batch 4 = 1 per group x accum 2 x 2 group(s)" in stdout
    assert_same(student(tmp_path / "fsdp"), student(tmp_path / "ddp"), atol=1e-6)


@pytest.mark.slow
def test_sequence_parallel_run_equals_one_process(tmp_path):
    """sp_size=2 on 2 processes (one data-parallel group) trains exactly what one process trains."""
    stdout = train(tmp_path / "sp", "--max_train_steps=3", "--sp_size=2")
    assert "1 data-parallel x sp 2" in stdout
    train(tmp_path / "one", "--max_train_steps=3", nproc=1)
    assert_same(student(tmp_path / "sp"), student(tmp_path / "one"), atol=1e-6)
    for a, b in zip(log(tmp_path / "sp"), log(tmp_path / "one")):
        assert a["dmd_loss"] == pytest.approx(b["dmd_loss"], rel=1e-4)


@pytest.mark.slow
def test_sequence_parallel_composes_with_fsdp_and_ddp(tmp_path):
    """sp_size=2 with FSDP2 (parameters sharded over the two ranks of the group) equals one process; 4 processes as
    2 data-parallel groups x sp 2 equal 2 processes of plain DDP (the groups see the same samples as its ranks)."""
    train(tmp_path / "one", "--max_train_steps=2", nproc=1)
    train(tmp_path / "sp_fsdp", "--max_train_steps=2", "--sp_size=2", "--fsdp=True")
    assert_same(student(tmp_path / "sp_fsdp"), student(tmp_path / "one"), atol=1e-6)
    train(tmp_path / "ddp", "--max_train_steps=2")
    stdout = train(tmp_path / "ddp_sp", "--max_train_steps=2", "--sp_size=2", nproc=4)
    assert "4 process(es): 2 data-parallel x sp 2 | global batch 2" in stdout
    assert_same(student(tmp_path / "ddp_sp"), student(tmp_path / "ddp"), atol=1e-6)


@pytest.mark.slow
def test_ddp_with_dataset_real_data_loss_and_resume(tmp_path):
    """2 processes on a video folder: the cache is built by both ranks (half each), each rank reads its own shard,
    rollout_mode='data' + real_data_loss_weight (two generator forwards before one backward under DDP), and a
    resume at step 2 restores every rank's loader position and random streams exactly."""
    from test_data_cache import clips
    root = clips(tmp_path / "v", n=4, frames=9, hw=(48, 48))
    cfg = tmp_path / "data_cfg.py"
    cfg.write_text(f"datasets = [dict(instance_data_dir={str(root)!r}, resolution=32, num_frames=9)]\n"
                   "real_data_loss_weight = 0.5\nrollout_mode = 'data'\n")
    common = [str(cfg), "--max_train_steps=4", "--gradient_accumulation_steps=2"]
    train(tmp_path / "straight", *common)
    train(tmp_path / "split", *common[:-2], "--max_train_steps=2", "--gradient_accumulation_steps=2")
    assert "resumed from" in train(tmp_path / "split", *common)
    assert_same(student(tmp_path / "split"), student(tmp_path / "straight"))
    ck = tmp_path / "straight" / "checkpoint-0000004"
    st, r1 = (torch.load(ck / f, weights_only=True) for f in ("state.pt", "rank1.pt"))
    assert st["data"] == r1["data"]   # the same number of batches consumed on each rank, of different shards
    assert all("real_data_loss" in r for r in log(tmp_path / "straight"))


def test_sp_config_errors():
    c = dict(train_dmd.DEFAULTS, sp_size=0)
    with pytest.raises(ValueError, match="sp_size"):
        checks.check_config(c)
    import parallel
    with pytest.raises(ValueError, match="several processes"):
        parallel.setup(2, torch.device("cpu"))


@pytest.mark.slow
def test_fsdp_with_an_8bit_base_equals_ddp(tmp_path):
    """base_model_precision=int8 under FSDP2 (the 8-bit codes and their scales shard as parameters) equals DDP, its
    export (merged into the full-precision base) included."""
    args = ["--max_train_steps=2", "--base_model_precision=int8"]
    train(tmp_path / "ddp", *args)
    train(tmp_path / "fsdp", *args, "--fsdp=True")
    assert_same(student(tmp_path / "fsdp"), student(tmp_path / "ddp"), atol=1e-6)
    merged = [load_file(os.path.join(tmp_path, d, "transformer", "diffusion_pytorch_model.safetensors")) for d in ("ddp", "fsdp")]
    assert_same(merged[1], merged[0], atol=1e-6)


@pytest.mark.slow
def test_fsdp_with_a_separate_8bit_teacher_equals_ddp(tmp_path):
    """teacher_model_name_or_path under FSDP2: the separate, larger teacher in int8 is sharded per block like the
    base, and the student equals DDP's (where every rank holds the whole teacher)."""
    import model_wan as mw
    torch.manual_seed(7)
    mw.save_dit(mw.WanDiT(mw.WanConfig(dim=128, ffn_dim=192, num_heads=2, num_layers=3, text_dim=32)).eval(),
                tmp_path / "big" / "transformer")
    (tmp_path / "big" / "model_index.json").write_text("{}")
    args = ["--max_train_steps=2", f"--teacher_model_name_or_path={tmp_path / 'big'}", "--teacher_model_precision=int8",
            "--validation_diversity_seeds=0"]
    train(tmp_path / "ddp", *args)
    out = train(tmp_path / "fsdp", *args, "--fsdp=True")
    assert f"teacher {tmp_path / 'big'} | generator LoRA" in out
    assert_same(student(tmp_path / "fsdp"), student(tmp_path / "ddp"), atol=1e-6)
