"""SimpleTuner's config.json (tests/fixtures/simpletuner/config/: the JSON of SimpleTuner's DMD quickstart
for Wan 2.1, documentation/distillation/FASTWAN_DMD.md at bghira/SimpleTuner bc8e6ab, with the
fake_score_lr_scheduler / min_lr_ratio its October 2025 version had and a shorter validation prompt; its
multidatabackend in the format of SimpleTuner's Wan quickstart, a prompt library and a webhook file) read by
simpletuner.py: every key mapped or named in the one ignored-keys line, SimpleTuner's meanings converted, and a 2-step
tiny run of the file unchanged."""
import json
import os
import shutil

import pytest

import simpletuner
import checks
import train_dmd

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, "tests", "fixtures", "simpletuner", "config", "config.json")


def write(tmp_path, d, name="st.json"):
    (tmp_path / name).write_text(json.dumps(d))
    return str(tmp_path / name)


def test_seed_config_every_key_mapped_or_named(capsys):
    c = train_dmd.config([QUICKSTART])
    out = capsys.readouterr().out
    ignored = [line for line in out.splitlines() if line.startswith("SimpleTuner keys ignored:")]
    assert len(ignored) == 1
    qs = json.load(open(QUICKSTART))
    keys = set(qs) - {"distillation_config"} | set(qs["distillation_config"])
    read = {k for k in keys if simpletuner.RENAMES.get(k, k) in train_dmd.DEFAULTS} | set(simpletuner.DATASET_GLOBALS)
    read |= {"data_backend_config", "model_type"}
    assert all(k in ignored[0] for k in keys - read), sorted(k for k in keys - read if k not in ignored[0])
    assert not any(f" {k} (" in ignored[0] or f" {k}," in ignored[0] for k in read - set(simpletuner.IGNORED))
    # SimpleTuner's meanings: standard CFG 3 = DMD2 w 2; its blocks -> the bidirectional student, said loudly
    assert c["real_score_guidance_scale"] == 2.0 and c["fake_score_guidance_scale"] == 0.0
    assert (c["causal"], c["num_frame_per_block"], c["same_step_across_blocks"]) == (False, 0, True)
    assert "NOTICE: num_frame_per_block=3" in out and "--causal=True --num_frame_per_block=3" in out
    assert (c["base_model_precision"], c["text_encoder_1_precision"], c["quantize_via"]) == ("int8-quanto", "int8-quanto", "cpu")
    checks.check_config(c)   # the quickstart's 8-bit settings are ours: int8 base and UMT5, quantised on the CPU
    assert (c["lora_rank"], c["fake_score_lora_rank"], c["lr_scheduler"], c["fake_score_lr_scheduler"],
            c["lr_min_ratio"]) == (128, 128, "cosine_with_min_lr", "cosine_with_min_lr", 0.5)
    assert (c["height"], c["width"], c["grad_clip_method"], c["seed"]) == (480, 832, "value", 1000)
    assert c["negative_prompt"] == qs["validation_negative_prompt"] and c["optimizer"] == "adamw"
    # the multidatabackend JSON: the video backend with the globals as defaults; SimpleTuner's flow-matching term
    (ds,) = c["datasets"]
    # its folders are the working folder's (as SimpleTuner reads them): made absolute and announced
    assert ds["instance_data_dir"] == os.path.abspath("datasets/wan-dmd") and ds["num_frames"] == 121
    assert ds["cache_dir"] == os.path.abspath("cache/vae/wan/wan-dmd") and ds["caption_dropout_probability"] == 0.1
    assert ds["resolution"] == 480 and "relative to the working folder, as SimpleTuner reads them" in out
    # the other conversions are announced as these are: the negative prompt, the optimizer
    assert "validation_negative_prompt -> negative_prompt" in out and "adamw_bf16 -> adamw" in out
    assert c["real_data_loss_weight"] == 1.0
    # the recipe's keys SimpleTuner lacks, in one notice (with video data: the guidance interval alone)
    (recipe,) = [line for line in out.splitlines() if "our recipe adds" in line]
    assert "--real_score_guidance_max_timestep=650" in recipe and "ode_regression_weight" not in recipe
    assert c["real_score_guidance_max_timestep"] == 1000.0 and c["ode_regression_weight"] == 0.0   # SimpleTuner's meaning
    for k in ("validation_prompt_library", "webhook_config"):   # SimpleTuner's relative paths, found beside the JSON
        assert os.path.isfile(c[k])
    assert checks.check_config(c) == [1000.0, 757.0, 522.0]


def test_simpletuner_variants(tmp_path, capsys):
    full = write(tmp_path, {"model_type": "full", "real_score_guidance_scale": 1.0, "fake_score_guidance_scale": 2.5,
                            "resolution": 720})
    c = train_dmd.config([full])
    assert (c["lora_rank"], c["fake_score_lora_rank"]) == (0, 0)
    assert (c["real_score_guidance_scale"], c["fake_score_guidance_scale"]) == (0.0, 1.5)
    assert (c["height"], c["width"]) == (720, 1280)
    assert "resolution" not in capsys.readouterr().out.split("ignored:")[-1]   # mapped to the size, not ignored
    causal = write(tmp_path, {"causal": True, "num_frame_per_block": 3, "same_step_across_blocks": False,
                              "validation_num_video_frames": 81})
    c = train_dmd.config([causal])
    assert (c["causal"], c["num_frame_per_block"], c["same_step_across_blocks"]) == (True, 3, False)
    checks.check_config(c)
    capsys.readouterr()

    def error(d):   # a mistake in the file: one line on stderr, exit status 2
        with pytest.raises(SystemExit) as e:
            train_dmd.config([write(tmp_path, d) if not isinstance(d, str) else d])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("train_dmd.py: error: "), err
        return err
    # every missing companion file named in one line
    err = error({"data_backend_config": "config/multi.json", "validation_prompt_library": "lib.json",
                 "webhook_config": "hook.json"})
    assert all(f"{k}='{v}'" in err for k, v in (("data_backend_config", "config/multi.json"),
                                                 ("validation_prompt_library", "lib.json"), ("webhook_config", "hook.json")))
    assert "3 file(s)" in err and os.getcwd() in err
    assert "DMD only" in error({"distillation_method": "lcm"})
    backends = write(tmp_path, [{"dataset_type": "video", "caption_strategy": "filename"}], "b.json")
    assert "caption_strategy" in error({"data_backend_config": backends})
    # SimpleTuner's quickstart dataset block as printed: one object, a duplicated "repeats", a missing comma
    quick = '{\n  "id": "wan-dmd",\n  "type": "local",\n  "repeats": 0,\n  "repeats": 2\n  "dataset_type": "video"\n}\n'
    (tmp_path / "quick.json").write_text(quick)
    err = error({"data_backend_config": str(tmp_path / "quick.json")})
    assert "quick.json, line 6, column 3: not valid JSON: Expecting ',' delimiter" in err and '"dataset_type"' in err
    (tmp_path / "quick.json").write_text(quick.replace("2\n", "2,\n"))   # comma fixed: one object, read as one backend
    (tmp_path / "clips").mkdir()
    c = train_dmd.config([write(tmp_path, {"data_backend_config": str(tmp_path / "quick.json")})])
    assert [d["repeats"] for d in c["datasets"]] == [2] and "'repeats' given twice" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text('{"learning_rate": 1e-5,}')
    assert "bad.json, line 1, column 24: not valid JSON" in error(str(tmp_path / "bad.json"))


def test_print_config_exits_before_output_dir(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train_dmd.config([QUICKSTART, f"--output_dir={tmp_path / 'never'}", "--print_config"])
    assert e.value.code == 0 and not (tmp_path / "never").exists()
    out, err = capsys.readouterr()
    resolved = json.loads(out)   # stdout is the JSON alone (--print_config > run.json parses); notices on stderr
    assert "SimpleTuner keys ignored:" in err
    assert resolved["output_dir"] == str(tmp_path / "never") and resolved["real_score_guidance_scale"] == 2.0


def test_seed_config_tiny_run(tmp_path, monkeypatch):
    """The quickstart's file unchanged, then config/tiny.py's model sizes and the outputs' switches on the command line;
    the data backend points at tiny clips (its sizes are the data's)."""
    from test_data import moving_square, write_video
    shutil.copytree(os.path.dirname(QUICKSTART), tmp_path / "config")
    backends = json.load(open(tmp_path / "config" / "wan" / "multidatabackend.json"))
    backends[0].update(resolution=32, video=dict(backends[0]["video"], num_frames=9, min_frames=9))
    (tmp_path / "config" / "wan" / "multidatabackend.json").write_text(json.dumps(backends))
    os.makedirs(tmp_path / "datasets" / "wan-dmd")
    for i in range(2):
        write_video(tmp_path / "datasets" / "wan-dmd" / f"c{i}.mp4", moving_square(9, 48, 48), caption=f"a clip {i}")
    monkeypatch.chdir(tmp_path)
    c = train_dmd.config(["config/config.json", os.path.join(ROOT, "config", "tiny.py"), "--output_dir=out",
                          "--max_train_steps=2", "--push_to_hub=False", "--push_checkpoints_to_hub=False",
                          "--report_to=none", "--webhook_config=None", "--validation_diversity_seeds=2",
                          "--validation_teacher_steps=4"])
    train_dmd.train(c)
    recs = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [r["step"] for r in recs] == [1, 2] and all("real_data_loss" in r for r in recs)
    assert os.path.exists(tmp_path / "out" / "student_ema.safetensors")
    saved = json.load(open(tmp_path / "out" / "config.json"))
    assert saved["real_score_guidance_scale"] == 2.0 and saved["fake_score_lr_scheduler"] == "cosine_with_min_lr"
