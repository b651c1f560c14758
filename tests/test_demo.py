"""demo.py and quality.py: the synthetic world's detector against ground truth (the clips as written to mp4 and read
back), the PNG writer against PyAV's decoder, the metrics on known cases, and a reduced demo end to end (every
artefact, then a resume that redoes nothing)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

av = pytest.importorskip("av")
import demo  # noqa: E402
import media  # noqa: E402
import quality  # noqa: E402
import vae_wan  # noqa: E402
from conftest import run_script  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))   # bench_quality's --more_students


def test_detector_on_the_dataset(tmp_path):
    """Every ground-truth clip (mp4 round trip, jittered start) is a valid mode of its caption, in its own band:
    precision 1 and full coverage; and the detector refuses the wrong caption, a still object and an empty frame."""
    demo.write_dataset(str(tmp_path), 32, 9, 2, seed=0)
    videos, caps, bands = demo.read_dataset(str(tmp_path))
    assert videos.shape == (24 * 3 * 2, 3, 9, 32, 32) and len(set(caps)) == 24
    found = {}
    for v, cap, band in zip(videos, caps, bands):
        r = quality.detect(media.to_uint8(v), cap)
        assert r["valid"] and r["shape_ok"] and r["mode"] == band, (cap, band, r)
        assert (r["colour"], r["shape"], r["direction"]) == quality.parse_caption(cap)
        found.setdefault(cap, set()).add(r["mode"])
    assert all(len(m) == quality.NUM_BANDS for m in found.values())                 # coverage 1
    # quality's precision/coverage on the same clips, arranged prompt-major as its samplers return them
    order = sorted(range(len(caps)), key=lambda i: (quality.captions().index(caps[i]), i))
    prompts = quality.captions()
    prec, cov, modes, shape = quality.precision_coverage(videos[order], prompts, range(6))
    assert prec == shape == cov == 1.0 and all(m == [2, 2, 2] for m in modes.values())
    # wrong caption, no motion, nothing drawn
    clip = quality.render("a red circle moving left", 1, 32, 9)
    assert quality.detect(clip, "a red circle moving left")["valid"]
    for wrong in ("a blue circle moving left", "a red circle moving right"):
        assert not quality.detect(clip, wrong)["valid"]
    assert not quality.detect(clip, "a red square moving left")["shape_ok"]
    still = np.repeat(clip[:1], 9, 0)
    assert quality.detect(still, "a red circle moving left")["direction"] is None
    assert not quality.detect(np.full_like(clip, 30), "a red circle moving left")["valid"]
    assert quality.precision_coverage(videos[:1], ["a cat walks on the grass"], [0]) == (None,) * 4


def test_png_and_mmd(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    path = media.write_png(str(tmp_path / "x.png"), img)
    with av.open(path) as c:
        back = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert np.array_equal(back, img)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 20, generator=g), torch.randn(64, 20, generator=g)
    assert abs(quality.mmd2(a, b)) < 0.05 and quality.mmd2(a, b + 2) > 0.3                 # same law ~ 0, shifted law > 0
    ref = {"p": [4, 4, 0], "q": [0, 0, 8]}
    assert quality.mode_tv({"p": [2, 2, 0], "q": [0, 0, 4]}, ref) == 0                  # the same weights at half the count
    assert quality.mode_tv({"p": [0, 0, 8], "q": [8, 0, 0]}, ref) == 1                  # disjoint
    assert abs(quality.mode_tv({"p": [8, 0, 0], "q": [0, 0, 8]}, ref) - 0.25) < 1e-12    # p's weight on one mode only
    assert quality.min_mode_share({"p": [2, 2, 0], "q": [0, 0, 4]}, ref) == 1.0          # every kept mode as the teacher
    assert quality.min_mode_share({"p": [3, 1, 0], "q": [0, 0, 4]}, ref) == 0.5          # p's 2nd mode at half its share
    assert quality.min_mode_share({"p": [4, 0, 0], "q": [0, 0, 4]}, ref) == 0.0          # a mode lost


def test_more_students_steps():
    """A student's DMD steps: dmd_steps x its more_students_steps factor; other students and the headline at
    dmd_steps; a malformed entry is one line."""
    c = {"dmd_steps": 600, "more_students_steps": "w3=2,causal=0.5"}
    assert [demo.dmd_steps_of(c, n) for n in ("dmd", "dmd_w3", "dmd_causal", "dmd_other")] == [600, 1200, 300, 600]
    assert demo.dmd_steps_of(dict(c, dmd_steps=2), "dmd_w3") == 4                      # a quick run stays quick
    for bad in ("w3", "w3=x", "w3=0", "w3=-1"):
        with pytest.raises(SystemExit, match="more_students_steps"):
            demo.dmd_steps_of(dict(c, more_students_steps=bad), "dmd")


def test_mode_shares_and_more_students(tmp_path):
    """modes_under_half counts the caption x mode cells below half their reference share (a lost mode too, a mode
    the reference never made not at all); bench_quality's --more_students parses NAME=PATH and refuses the rest."""
    ref = {"p": [4, 4, 0], "q": [2, 2, 4]}
    assert sorted(quality.mode_share_ratios({"p": [3, 1, 0], "q": [2, 2, 4]}, ref)) == [0.5, 1, 1, 1, 1.5]
    assert quality.modes_under_half({"p": [2, 2, 0], "q": [1, 1, 2]}, ref) == 0          # as the teacher, fewer samples
    assert quality.modes_under_half({"p": [3, 1, 0], "q": [2, 2, 4]}, ref) == 0          # exactly half is not under
    assert quality.modes_under_half({"p": [7, 1, 0], "q": [0, 1, 7]}, ref) == 2          # p's 2nd mode, q's 1st (lost)
    # the floor: a teacher-like student's count under redraws. Large samples of even modes: never under half
    assert quality.under_half_floor({"p": [400, 400]}, {"p": [400, 400]}) == (0.0, 1.0)
    # a rare mode of 2 in 20 beside 20 student samples: under half whenever the student draws none of it (~0.12) or
    # the reference draws many; exact binomial arithmetic bounds the redraws' answer
    mean, none = quality.under_half_floor({"p": [18, 2]}, {"p": [18, 2]}, draws=4000)
    assert 0.12 < mean < 0.5 and abs(none - (1 - mean)) < 1e-9                       # one cell: count is 0 or 1
    assert quality.under_half_floor({"p": [0, 0]}, {"p": [18, 2]}) == (0.0, 1.0)        # no valid samples: no cell
    import bench_quality as bq
    assert bq.more_students(f"a={tmp_path},b2={tmp_path}") == [("a", str(tmp_path)), ("b2", str(tmp_path))]
    assert bq.more_students("") == []
    for bad in (str(tmp_path), f"={tmp_path}", "a=/no/such/folder"):
        with pytest.raises(SystemExit, match="--more_students"):
            bq.more_students(bad)


def test_saved_reference(tmp_path, monkeypatch):
    """bench_quality --reference: made and saved once, read back (not resampled) under the same settings, refused
    in one line naming the setting that differs."""
    import bench_quality as bq
    made = dict(latents=torch.randn(6, 16, 1, 2, 2), modes={"p": [1, 2, 0]})
    monkeypatch.setattr(quality, "reference_set", lambda *a: made)
    path = str(tmp_path / "ref.pt")
    a = bq.parse_args(["--teacher=t", "--student=s", "--prompts_file=f", "--seeds=2", f"--reference={path}"])
    args = (["p"], [100000, 100001], None, (9, 32, 32), [1000.0])
    assert bq.load_reference(a, *args) is made and os.path.exists(path)
    monkeypatch.setattr(quality, "reference_set", lambda *a: pytest.fail("resampled a saved reference"))
    back = bq.load_reference(a, *args)
    assert torch.equal(back["latents"], made["latents"]) and back["modes"] == made["modes"]
    a.guidance = 5.0
    with pytest.raises(SystemExit, match="another guidance"):
        bq.load_reference(a, *args)


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    """A reduced demo (a few steps per stage): every artefact exists and has the right form; a second run
    skips the trained stages (their files untouched)."""
    out = str(tmp_path / "demo")
    args = [sys.executable, os.path.join(ROOT, "demo.py"), f"--out_dir={out}", "--clips_per_mode=1", "--vae_steps=2",
            "--teacher_steps=3", "--dmd_steps=2", "--dmd_pairs=1", "--bench_seeds=1", "--sample_prompts=2",
            "--ode_seeds=1", "--ode_teacher_steps=8", "--ode_steps=2", "--more_students=config/demo_causal.py"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len([n for n in os.listdir(os.path.join(out, "data")) if n.endswith(".mp4")]) == 72
    for p in ("teacher/transformer/config.json", "teacher/vae/config.json", "teacher/tiny_text_encoder",
              "dmd/transformer/config.json", "dmd/student_ema.safetensors", "vae_reconstruction.png", "prompts.txt"):
        assert os.path.exists(os.path.join(out, p)), p
    samples = sorted(os.listdir(os.path.join(out, "samples")))
    assert len(samples) == 2
    frames, _ = media.read_mp4(os.path.join(out, "samples", samples[0]))
    assert frames.shape == (9, 32, 3 * 32, 3)                                     # three samplers side by side
    with av.open(os.path.join(out, "contact_sheet.png")) as c:
        sheet = next(c.decode(video=0)).to_ndarray(format="rgb24")
    assert sheet.shape == (2 * 3 * (66 + 14) + 2, 9 * 66 + 2, 3)   # 6 rows x 9 frames of 64 px + gaps, each row labelled
    assert (sheet[4:14] == 0).all(-1).sum() > 100                      # the first row's label: "teacher-50: a ..."
    table = json.load(open(os.path.join(out, "quality.json")))
    assert list(table) == [*quality.SAMPLERS, "teacher-50 CFG 2", "teacher-3 CFG 2", "student-3 causal"]
    for r in table.values():
        assert 0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1 and np.isfinite(r["mmd"])
        assert 0 <= r["mode_tv"] <= 1
    assert "| student-3 |" in run.stdout and "| student-3 causal |" in run.stdout
    cfg = json.load(open(os.path.join(out, "dmd", "config.json")))   # the headline student is the recipe's, at w = 3
    assert (cfg["real_score_guidance_scale"], cfg["real_score_guidance_max_timestep"], cfg["ode_regression_weight"],
            cfg["teacher_data_samples"]) == (3.0, 650.0, 0.25, 1)
    assert "ODE pairs: 24 written" in run.stdout
    assert json.load(open(os.path.join(out, "dmd_causal", "config.json")))["causal"]
    stamp = os.path.getmtime(os.path.join(out, "dmd", "transformer", "config.json"))
    again = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "vae step" not in again.stdout and "teacher step" not in again.stdout
    assert os.path.getmtime(os.path.join(out, "dmd", "transformer", "config.json")) == stamp


def test_train_vae_sets_latent_statistics(tmp_path):
    """A few autoencoder steps; afterwards the VAE's latent normalisation makes the clips' latents zero-mean,
    unit-std per channel (what the DiT is trained on), and save/load keeps it."""
    demo.write_dataset(str(tmp_path / "d"), 32, 9, 1, seed=0)
    videos = demo.read_dataset(str(tmp_path / "d"))[0][:8]
    c = dict(seed=0, vae_base_dim=8, vae_lr=1e-3, vae_steps=2, vae_batch_size=2)
    vae = demo.train_vae(videos, c)
    vae_wan.save_vae(vae, str(tmp_path / "vae"))
    vae = vae_wan.load_vae(str(tmp_path / "vae"))
    with torch.no_grad():
        z = vae.encode(videos)                                                     # (8,16,3,4,4)
    torch.testing.assert_close(z.mean((0, 2, 3, 4)), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(z.std((0, 2, 3, 4)), torch.ones(16), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_demo_causal_student(tmp_path):
    """The demo with a causal student (config/demo_causal.py): teacher ODE trajectories -> ode_init regression ->
    causal DMD from it -> the quality table sampled block by block; the student's config.json says causal."""
    out = str(tmp_path / "demo")
    args = [sys.executable, os.path.join(ROOT, "demo.py"), f"--out_dir={out}", "--clips_per_mode=1", "--vae_steps=2",
            "--teacher_steps=3", "--dmd_steps=2", "--bench_seeds=1", "--sample_prompts=1", "--ode_seeds=1",
            "--ode_teacher_steps=8", "--ode_steps=2", "--dmd_config=config/demo_dmd.py,config/demo_causal.py",
            "--more_students="]
    run = subprocess.run(args, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert len([n for n in os.listdir(os.path.join(out, "ode_pairs")) if n.startswith("ode_")]) == 24   # + the text cache
    init = json.load(open(os.path.join(out, "ode_init", "config.json")))
    assert init["objective"] == "ode_init" and init["max_train_steps"] == 2
    assert os.path.exists(os.path.join(out, "ode_init", "student.safetensors"))
    cfg = json.load(open(os.path.join(out, "dmd", "config.json")))
    assert cfg["causal"] and cfg["num_frame_per_block"] == 1 and cfg["generator_init"] == os.path.join(out, "ode_init")
    assert "| student-3 |" in run.stdout and json.load(open(os.path.join(out, "quality.json")))["student-3"]["mode_tv"] <= 1


def test_bench_quality_scores_several_students_on_one_teacher_set(tmp_path):
    """bench_quality.py with several students (--more_students): one row per student under its name, the teacher rows
    left out on request; two students with the same weights get the same row (same noise, same reference set)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import bench_quality
    from test_cli import demo_teacher
    import model_wan as mw
    from safetensors.torch import save_file
    teacher = demo_teacher(str(tmp_path / "teacher"))
    weights = str(tmp_path / "student.safetensors")   # a full-weights student file: the teacher itself
    save_file({k: v.contiguous() for k, v in mw.load_dit(teacher).state_dict().items()}, weights)
    prompts = str(tmp_path / "prompts.txt")
    with open(prompts, "w") as f:
        f.write(quality.captions()[0] + "\n")
    args = [f"--teacher={teacher}", f"--student={weights}", f"--prompts_file={prompts}", "--seeds=2",
            "--steps=1000,500", "--guidance=1", "--num_frames=5", "--height=16", "--width=16"]
    table = bench_quality.main(args + [f"--more_students=b={weights}", "--teacher_rows="])
    assert list(table) == ["student-3", "student-3 b"]
    assert {k: v for k, v in table["student-3"].items() if k != "seconds"} == \
        {k: v for k, v in table["student-3 b"].items() if k != "seconds"}


def test_demo_student_configs_pass_the_checks():
    """Every config/demo_*.py on top of config/demo_dmd.py (demo_w3_reg.py on demo_w3.py, as its command line has
    it) passes train_dmd's config checks: a config file's mistake shows here, not minutes into a demo run."""
    import glob
    import checks
    import train_dmd
    files = sorted(glob.glob(os.path.join(ROOT, "config", "demo_*.py")))
    assert any(f.endswith("demo_w3_reg.py") for f in files)
    for f in files:
        if f.endswith("demo_dmd.py"):
            continue
        under = ["demo_dmd.py"] + (["demo_w3.py"] if f.endswith("demo_w3_reg.py") else [])
        checks.check_config(train_dmd.config([os.path.join(ROOT, "config", n) for n in under] + [f]))


def test_committed_teacher_only_for_its_own_keys(tmp_path, capsys):
    """assets/demo_teacher stands in for the teacher the demo's defaults would train (its made_with.json holds those
    keys), copied weight for weight; any teacher key changed trains one here, said in a notice; a folder of the
    user's without made_with.json is used as given."""
    c = {k: getattr(demo, k) for k in (*demo.TEACHER_KEYS, "teacher_path")}
    times = {}
    demo.make_teacher(c, str(tmp_path), None, None, times)   # no latents: a copy trains nothing
    got, want = demo.mw.load_dit(str(tmp_path / "teacher")), demo.mw.load_dit(os.path.join(ROOT, c["teacher_path"]))
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values()))
    assert "(a copy of assets/demo_teacher)" in capsys.readouterr().out
    assert demo.committed_teacher(dict(c, teacher_steps=500)) is None
    assert "teacher_steps=500 (it has 2000)" in capsys.readouterr().out
    assert demo.committed_teacher(dict(c, teacher_path="")) is None
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text((tmp_path / "teacher" / "transformer" / "config.json").read_text())
    assert demo.committed_teacher(dict(c, teacher_path=str(mine), teacher_steps=500)) == str(mine)


def run_demo(argv, monkeypatch, capsys):
    return run_script("demo.py", argv, monkeypatch, capsys)


def test_demo_mistakes_are_one_line_before_stage_1(tmp_path, monkeypatch, capsys):
    """A size the VAE and DiT cannot take, frames not 4k+1 (before: a traceback after stage 1 wrote its clips), a
    config file that is not there (before: found after stages 1-3), a zero count: one line, exit status 2, out_dir
    never made. --help says where extra students go."""
    monkeypatch.chdir(ROOT)
    never = tmp_path / "never"
    cases = [(["--size=30"], "--size=30: frame height = width must be a multiple of 16 (the VAE's 8x times the DiT's "
              "2x2 patches), at least 16: give e.g. --size=16"),
             (["--num_frames=10"], "--num_frames=10: the VAE takes 4k+1 frames, k >= 1: give e.g. --num_frames=9"),
             (["--dmd_config=config/nope.py"], "--dmd_config: config/nope.py: no such file"),
             (["--more_students=config/demo_causal.py,config/nope2.py"], "--more_students: config/nope2.py: no such file"),
             (["--bench_seeds=0"], "--bench_seeds=0: a count, at least 1"),
             (["--more_students=config/demo_causal.py", "--more_students_steps=causal=x"], "more_students_steps")]
    for argv, says in cases:
        code, out, err = run_demo(argv + [f"--out_dir={never}"], monkeypatch, capsys)
        assert code != 0 and not never.exists(), (argv, out, err)
        if says != "more_students_steps":
            assert code == 2 and err.count("\n") == 1 and err.startswith("demo.py: error: ") and says in err, (argv, err)
    code, out, err = run_demo(["--help"], monkeypatch, capsys)
    assert code == 0 and "<out_dir>/dmd_<name>" in out and "out/dmd_<name>" not in out.replace("<out_dir>/dmd_", "")


def test_stages_reuse_only_output_made_with_the_same_keys(tmp_path, monkeypatch, capsys):
    """A rerun reuses a stage's output only when its made_with.json holds the same keys (before: `--dmd_steps=60`
    after a 50-step run into the same out_dir skipped stage 4 and scored the old student): else it is made again,
    one notice line saying why; an old student is moved aside, never deleted; one stopped half way resumes."""
    c = {k: getattr(demo, k) for k in dir(demo) if not k.startswith("_") and isinstance(getattr(demo, k), (int, float, str))}
    c = dict(c, out_dir=str(tmp_path), clips_per_mode=1, dmd_steps=50, threads=1)
    out, times, calls = str(tmp_path), {}, []

    def fake_train(dc):   # what train_dmd.train leaves: the exported student
        calls.append(dc["max_train_steps"])
        assert dc["overwrite_output_dir"]   # no checkpoint here: a stopped start's files are moved aside, not refused
        os.makedirs(os.path.join(dc["output_dir"], "transformer"), exist_ok=True)
        with open(os.path.join(dc["output_dir"], "config.json"), "w") as f:
            json.dump({"max_train_steps": dc["max_train_steps"]}, f)
    monkeypatch.setattr(demo.train_dmd, "train", fake_train)
    latents = torch.zeros(1, 16, 3, 4, 4)
    demo.make_student(c, out, latents, times)
    demo.make_student(c, out, latents, times)
    assert calls == [50] and "notice" not in capsys.readouterr().out               # the same keys: reused
    demo.make_student(dict(c, dmd_steps=60), out, latents, times)
    notice = [line for line in capsys.readouterr().out.splitlines() if line.startswith("notice")]
    assert calls == [50, 60] and len(notice) == 1, notice
    assert notice[0].startswith(f"notice: remaking the student dmd in {tmp_path / 'dmd'}: it was made with "
                                "dmd_steps=50 (now 60); the old one moved to ")
    (old,) = [d for d in os.listdir(tmp_path) if d.startswith("dmd.old-")]
    assert json.load(open(tmp_path / old / "config.json"))["max_train_steps"] == 50
    assert json.load(open(tmp_path / "dmd" / "config.json"))["max_train_steps"] == 60
    os.rmdir(tmp_path / "dmd" / "transformer")                                     # stopped half way: resumes
    demo.make_student(dict(c, dmd_steps=60), out, latents, times)
    assert calls == [50, 60, 60] and "notice" not in capsys.readouterr().out
    demo.make_student(dict(c, dmd_steps=60, teacher_steps=500), out, latents, times)   # another teacher: retrained
    assert calls[-1] == 60 and len(calls) == 4 and "teacher_steps=2000 (now 500)" in capsys.readouterr().out
    # the dataset: reused as made, made again at another size (the old clips gone, not mixed in)
    demo.make_dataset(c, out, times)
    stamp = os.path.getmtime(tmp_path / "data" / "00_b0_0.mp4")
    demo.make_dataset(c, out, times)
    assert os.path.getmtime(tmp_path / "data" / "00_b0_0.mp4") == stamp and "notice" not in capsys.readouterr().out
    videos, _, _ = demo.make_dataset(dict(c, size=48), out, times)
    assert videos.shape[-1] == 48 and "remaking the dataset" in capsys.readouterr().out


def test_first_run_stages_say_nothing(tmp_path, capsys):
    """A first run into an empty out_dir makes every stage without a notice (stage 3's folder already holds stage 2's
    VAE: not an older teacher); a rerun reuses both; an older demo's teacher (no made_with.json) is made again."""
    c = {k: getattr(demo, k) for k in (*demo.TEACHER_KEYS, "teacher_path")}
    os.makedirs(tmp_path / "teacher" / "vae")
    (tmp_path / "teacher" / "vae" / "config.json").write_text("{}")
    demo.make_teacher(c, str(tmp_path), None, None, {})
    out = capsys.readouterr().out
    assert "notice" not in out and "(a copy of assets/demo_teacher)" in out
    demo.make_teacher(c, str(tmp_path), None, None, {})
    assert "a copy of" not in capsys.readouterr().out                                  # reused
    os.remove(tmp_path / "teacher" / demo.MADE_WITH)
    demo.make_teacher(c, str(tmp_path), None, None, {})
    assert "notice: remaking the teacher in" in capsys.readouterr().out and (tmp_path / "teacher" / "vae").is_dir()
