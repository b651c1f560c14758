"""publish.py: PNG/GIF writers and the loss plot, the model card (and its diffusers snippet against the student
sampler), webhooks and the hub upload against real HTTP servers on 127.0.0.1, and a config/tiny.py run's artefacts."""
import base64
import email.parser
import email.policy
import http.server
import json
import re
import runpy
import os
import shutil
import socket
import sys
import threading
import time
from types import SimpleNamespace

import numpy as np

import media
import pytest
import torch

import configurator
from card import model_card
import publish
import simpletuner
import flow
import train_dmd
from conftest import run_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "config", "tiny.py")


class Server:
    """An HTTP server on 127.0.0.1 (port 0) in a thread, recording every request; `reply(handler, body)` answers."""

    def __init__(self, reply=None, delay=0.0):
        self.requests, self.delay, self.reply = [], delay, reply
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def handle_any(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                time.sleep(outer.delay)
                code, obj = outer.reply(self, body) if outer.reply else (200, {})
                data = json.dumps(obj).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):   # the client gave up (its timeout)
                    pass
            do_GET = do_POST = do_PUT = handle_any

        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.srv.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.srv.server_port}"
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


class FakeHub(Server):
    """The hub endpoints huggingface_hub's create_repo + upload_folder use (every file uploaded "regular", i.e.
    base64 inside the commit); `files` holds the repo's content, `fail` makes every call answer 500."""

    def __init__(self):
        self.files, self.repos, self.cards, self.fail = {}, {}, [], False
        super().__init__(reply=self.answer)

    def answer(self, h, body):
        if self.fail:
            return 500, {"error": "hub down"}
        if h.path == "/api/repos/create":
            d = json.loads(body)
            self.repos[f"{d['organization']}/{d['name']}"] = d.get("visibility", "public")
            return 200, {"url": f"{self.url}/{d['organization']}/{d['name']}"}
        if h.path == "/api/validate-yaml":   # the model card's metadata, checked before the commit
            self.cards.append(json.loads(body)["content"])
            return 200, {"errors": [], "warnings": []}
        if "/preupload/" in h.path:
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                   for f in json.loads(body)["files"]]}
        if "/commit/" in h.path:
            for line in body.decode().splitlines():
                op = json.loads(line)
                if op["key"] == "file":
                    self.files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            repo = h.path.split("/api/models/")[1].split("/commit/")[0]
            return 200, {"commitUrl": f"{self.url}/{repo}/commit/{'1' * 40}", "commitOid": "1" * 40}
        return 404, {"error": h.path}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            with open(os.path.join(root, n), "rb") as f:
                out[os.path.relpath(os.path.join(root, n), folder)] = f.read()
    return out


def tiny_cfg(out, *overrides):
    return train_dmd.config([TINY, f"--output_dir={out}", *overrides])

# -----------------------------------------------------------------------------


def test_png_gif_and_loss_curve(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (7, 11, 3), dtype=np.uint8)
    assert np.array_equal(np.array(Image.open(media.write_png(tmp_path / "a.png", img))), img)
    # random pixels fill the 4096-code LZW table several times: every frame must decode exactly
    frames = rng.integers(0, 256, (3, 40, 90, 3), dtype=np.uint8)
    frames[1, :20] = 7
    gif = Image.open(media.write_gif(tmp_path / "a.gif", frames, fps=8))
    pal = np.array([(round(r * 51), round(g * 42.5), round(b * 51)) for r in range(6) for g in range(7) for b in range(6)], np.uint8)
    assert gif.n_frames == 3 and gif.info["loop"] == 0 and gif.info["duration"] == 120
    for i, q in enumerate(media.gif_quantize(frames)):
        gif.seek(i)
        assert np.array_equal(np.array(gif.convert("RGB")), pal[q])
        assert np.abs(pal[q].astype(int) - frames[i]).max() <= 26   # the cube's half step
    recs = [{"step": s, "dmd_loss": 1 / s, "fake_score_loss": 0.5 + 0.1 * np.sin(s), "g_abs": float("nan") if s == 3 else s,
             "g_grad_norm": 2.0, "f_grad_norm": 1.0 + s} for s in range(1, 30)]
    for s in (10, 20, 29):   # validations: the collapse signal
        recs[s - 1].update(diversity=0.1 * s, teacher_diversity=4.0, diversity_ratio=s / 40, diversity_ratio_min=s / 80)
    curve = publish.loss_curve(recs)
    assert curve.shape == (400, 1080, 3)
    panels = [curve[i:i + 200, j:j + 360] for i in (0, 200) for j in (0, 360, 720)]
    for panel in panels:
        assert (np.all(panel == media.COLORS[0], axis=-1)).sum() > 50   # a drawn line in every panel
    assert (np.all(panels[3] == media.COLORS[1], axis=-1)).sum() > 50   # F's grad norm
    blue = np.all(panels[4] == media.COLORS[0], axis=-1)
    assert blue[:, 70:80].sum() >= 15   # the first validation's 5x5 marker at the panel's left edge
    ode = publish.loss_curve([{"step": s, "ode_loss": 1 / s, "g_grad_norm": 2.0} for s in range(1, 30)])   # ode_init run
    assert (np.all(ode[:200, :360] == media.COLORS[1], axis=-1)).sum() > 50   # the ODE loss, beside an empty dmd series
    # generator statistics repeated on log lines between generator steps are drawn once, at their gen_step
    gen = [{"step": s, "gen_step": 1 + (s - 1) // 5 * 5, "dmd_loss": float(1 + (s - 1) // 5)} for s in range(1, 21)]
    assert np.array_equal(publish.loss_curve(gen)[:200, :360], publish.loss_curve(
        [{"step": s, "dmd_loss": float(1 + (s - 1) // 5)} for s in (1, 6, 11, 16)])[:200, :360])
    sheet = media.contact_sheet([frames[:, :8, :8]] * 2, scale=2)
    assert sheet.shape == (2 * 18 + 2, 3 * 18 + 2, 3)
    # labelled rows (sampler, prompt): a strip of text above each row; legends beside each panel's title
    labelled = media.contact_sheet([frames[:, :8, :8]] * 2, scale=2, labels=["student-3: a red fox", "teacher"])
    assert labelled.shape == (2 * (18 + 14) + 2, 3 * 18 + 2, 3)
    assert (labelled[4:14] == 0).all(-1).sum() > 20 and not (labelled[2 + 14:2 + 14 + 16] == 0).all(-1).any()
    assert publish.sheet_labels(["v/step_2/00_ema_a_red_fox.mp4"]) == ["ema: a red fox"]
    legend = publish.loss_curve(recs)[200:400, :360][4:14]   # the grad-norm panel's title row: G and F swatches
    assert np.all(legend == media.COLORS[0], axis=-1).sum() >= 64 and np.all(legend == media.COLORS[1], axis=-1).sum() >= 64
    assert media.fit("abcdefgh", 5) == "abc.." and media.fit("abc", 5) == "abc"


def test_constant_series_is_drawn_flat():
    """A constant loss (or one whose last digits jitter) is a flat line across the middle, between distinct axis
    labels, not a diagonal from label to equal label."""
    for ys in ([0.697] * 20, [0.697 + 1e-9 * (i % 2) for i in range(20)], [-2.0] * 20, [0.0] * 20):
        img = media.line_plot("dmd loss", [("dmd", list(range(1, 21)), ys)])
        rows = np.nonzero(np.all(img[20:-22, 73:-9] == media.COLORS[0], axis=-1))[0]
        assert len(rows) > 200 and rows.max() - rows.min() <= 1, ys   # one horizontal line
        assert abs((rows.min() + 20) - (20 + 178) / 2) <= 2   # at mid height


def card_cfg(**kw):
    return {**train_dmd.DEFAULTS, "hub_model_id": "me/wan-dmd-3step", "output_dir": "/nonexistent", **kw}


def test_model_card_renders_all_fields(tmp_path):
    env = {"git_commit": "abc123", "torch": "2.13.0", "gpus": ["NVIDIA H100 80GB HBM3"] * 8, "world_size": 8}
    recs = [{"step": s, "dmd_loss": 0.01 * s, "fake_score_loss": 0.2, "g_abs": 0.5, "s_per_step": 9.0} for s in range(1, 101)]
    files = ["student_ema.safetensors", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
             "config.json", "env.json", "preview.gif", "README.md"]
    card = model_card(card_cfg(), [1000.0, 757.0, 522.0], recs, env, files, ["A cat walks on the grass."])
    head = card.split("---")[1]
    for line in ("base_model: Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "base_model_relation: adapter", "license: apache-2.0",
                 "library_name: diffusers", "pipeline_tag: text-to-video", "- text-to-video", "- dmd", "- lora"):
        assert line in head.splitlines(), line
    for s in ("timesteps 1000,757,522", "w = 3 in x_c + w(x_c − x_u) (= standard CFG 4)", "LoRA rank 128, alpha 128",
              "score timestep shift 1", "flow_schedule_shift 5", "data-free DMD", "4000 steps", "15.0 min on NVIDIA H100 80GB HBM3",
              "dmd_loss 0.955", "fake_score_loss 0.2", "abs(g) 0.5", "x 8 process(es)", "commit `abc123`",
              "![validation samples](preview.gif)", "*A cat walks on the grass.*",
              'pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", torch_dtype=torch.bfloat16)',
              'pipe.load_lora_weights("me/wan-dmd-3step", weight_name="student_ema.safetensors")',
              'subfolder="transformer"', "sigmas=[1, 0.757, 0.522]", "num_inference_steps=3, guidance_scale=1.0",
              "height=480, width=832, num_frames=81", "hf download me/wan-dmd-3step --local-dir student",
              "python sample.py --model=Wan-AI/Wan2.1-T2V-1.3B-Diffusers --ckpt=student --denoising_steps=1000,757,522",
              "| `transformer/` |", "| `student_ema.safetensors` |"):
        assert s in card, s
    # full fine-tune from the original layout, warped steps: the merged transformer and the -Diffusers pipeline
    card = model_card(card_cfg(lora_rank=0, pretrained_model_name_or_path="Wan-AI/Wan2.1-T2V-14B",
                                       model_card_note="Trained for the docs."),
                              [1000.0, 937.5, 845.1], [], {}, ["transformer/config.json", "student_ema.safetensors"], [])
    assert "base_model: Wan-AI/Wan2.1-T2V-14B\n" in card and "base_model_relation: finetune" in card
    assert "load_lora_weights" not in card and "- lora" not in card and "Trained for the docs." in card
    assert 'WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-14B-Diffusers", transformer=transformer' in card
    assert "--denoising_steps=1000,937.500,845.100" in card and "sigmas=[1, 0.9375, 0.8451]" in card
    # the tiny random teacher has no hub id: no base_model line, our own license
    card = model_card(card_cfg(pretrained_model_name_or_path="tiny"), [1000.0], [], {}, [], [])
    assert "base_model" not in card.split("---")[1] and "license: apache-2.0" in card
    assert "| exported at | unknown step" in card
    # not pushed, a local diffusers teacher: the title is the run's name, the snippets load the local folders
    teacher = tmp_path / "my_wan"
    teacher.mkdir()
    (teacher / "model_index.json").write_text("{}")
    card = model_card(card_cfg(hub_model_id="", output_dir="out/run7", pretrained_model_name_or_path=str(teacher)),
                      [1000.0], [], {}, ["student_ema.safetensors"], [])
    assert card.split("---", 2)[2].lstrip().startswith("# run7: a 1-step DMD student of ") and "OUTPUT_DIR" not in card
    assert f'WanPipeline.from_pretrained("{teacher}"' in card and 'load_lora_weights("out/run7"' in card
    assert "hf download" not in card and f"--model={teacher} --ckpt=out/run7" in card
    original = tmp_path / "Wan2.1-T2V-14B"   # an original-layout folder: diffusers' copy of that size
    original.mkdir()
    (original / "config.json").write_text('{"dim": 5120}')
    card = model_card(card_cfg(pretrained_model_name_or_path=str(original)), [1000.0], [], {}, [], [])
    assert 'WanPipeline.from_pretrained("Wan-AI/Wan2.1-T2V-14B-Diffusers"' in card
    # the exported step, and that step's validation (the collapse signal) when there was one
    recs[49].update(diversity_ratio=0.81, diversity_ratio_min=0.62)
    card = model_card(card_cfg(), [1000.0], recs, env, files, [], at=50)
    assert "| exported at | step 50 of 4000 (EMA weights;" in card and "diversity 0.81x the teacher's (worst prompt 0.62x)" in card


def test_card_sampler_is_the_student_sampler(tiny_pipeline):
    """The card's scheduler lines, exec'd on a stand-in pipe, step exactly like flow.rollout (the student sampler), and
    drive WanPipeline with the student's timesteps."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    card = model_card(card_cfg(), [1000.0, 757.0, 522.0], [], {}, ["student_ema.safetensors"], ["a red circle"])
    lines = [ln for ln in card.splitlines() if ln.startswith(("pipe.scheduler", "set_timesteps"))]
    assert len(lines) == 3
    pipe = SimpleNamespace()
    exec("\n".join(lines), {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler, "pipe": pipe})
    sched = pipe.scheduler
    A = torch.randn(16, 16) * 0.1
    velocity = lambda x, t: torch.einsum("ij,bj...->bi...", A, x) * (1 + t.view(-1, 1, 1, 1, 1) / 1000)
    x = torch.randn(1, 16, 2, 4, 4)
    want = flow.rollout(velocity, x, [1000.0, 757.0, 522.0], generator=torch.Generator().manual_seed(3))[0]
    sched.set_timesteps(3, device="cpu")   # as WanPipeline calls it
    assert sched.timesteps.tolist() == pytest.approx([1000.0, 757.0, 522.0])
    g, lat = torch.Generator().manual_seed(3), x
    for t in sched.timesteps:
        lat = sched.step(velocity(lat, t.expand(1)), t, lat, generator=g).prev_sample
    torch.testing.assert_close(lat, want, rtol=1e-5, atol=1e-5)
    # and the real pipeline runs on it with exactly these timesteps and no CFG
    tiny_pipeline.scheduler, seen = FlowMatchEulerDiscreteScheduler(), []
    exec("\n".join(lines), {"FlowMatchEulerDiscreteScheduler": FlowMatchEulerDiscreteScheduler, "pipe": tiny_pipeline})
    fwd = tiny_pipeline.transformer.forward
    tiny_pipeline.transformer.forward = lambda *a, **k: (seen.append(k["timestep"].tolist()), fwd(*a, **k))[1]
    tiny_pipeline("a red circle", num_inference_steps=3, guidance_scale=1.0, height=32, width=32, num_frames=5,
                  output_type="latent")
    assert seen == [[1000.0], [757.0], [522.0]]


def test_webhooks_payloads_order_and_isolation(tmp_path, capsys):
    srv = Server()
    png = media.png_bytes(np.zeros((4, 4, 3), np.uint8))
    cfg = tmp_path / "hook.json"
    cfg.write_text(json.dumps({"webhook_type": "discord", "webhook_url": srv.url + "/api/webhooks/1/SECRET",
                               "message_prefix": "run7", "log_level": "info"}))
    w = publish.Webhook(publish.load_webhook_config(str(cfg)), "proj")
    w.send("start", "started")
    w.send("validation", "val at 2", image=("contact_sheet.png", png))
    w.send("debugging", "not sent", level="debug")
    w.send("finish", "done")
    assert w.close(deadline=10) == 0 and w.sent == 3
    r = srv.requests
    assert [q["path"] for q in r] == ["/api/webhooks/1/SECRET"] * 3
    assert json.loads(r[0]["body"]) == {"content": "`(run7)` started"}
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + r[1]["headers"]["content-type"].encode() + b"\r\n\r\n" + r[1]["body"])
    parts = {p.get_param("name", header="content-disposition"): p for p in msg.iter_parts()}
    assert json.loads(parts["payload_json"].get_content()) == {"content": "`(run7)` val at 2"}
    assert parts["files[0]"].get_filename() == "contact_sheet.png" and parts["files[0]"].get_content() == png
    assert json.loads(r[2]["body"])["content"] == "`(run7)` done"
    # raw: JSON with the event, fields and the image in base64
    w = publish.Webhook(publish.load_webhook_config({"webhook_type": "raw", "callback_url": srv.url + "/cb"}), "proj")
    w.send("validation", "val", image=("s.png", png), step=4, dmd_loss=0.5)
    w.close()
    d = json.loads(srv.requests[-1]["body"])
    assert {k: d[k] for k in ("message_type", "message", "level", "job_id", "step", "dmd_loss")} == \
        {"message_type": "validation", "message": "val", "level": "info", "job_id": "proj", "step": 4, "dmd_loss": 0.5}
    assert base64.b64decode(d["images"][0]) == png
    with pytest.raises(ValueError, match="callback_url"):
        publish.load_webhook_config({"webhook_type": "raw"})
    with pytest.raises(ValueError, match="webhook_type"):
        publish.load_webhook_config('{"webhook_type": "slack", "webhook_url": "x"}')
    # server down: sends return at once, close() at once, one warning, nothing raised
    down = publish.Webhook({"webhook_type": "raw", "callback_url": f"http://127.0.0.1:{free_port()}/x"}, "p")
    t0 = time.time()
    for i in range(5):
        down.send("checkpoint", f"c{i}")
    down.close(deadline=10)
    assert time.time() - t0 < 5 and down.failed == 5 and down.sent == 0
    # slow server: a bounded queue drops the oldest, close() keeps its deadline, the URL's secret is never printed
    slow = Server(delay=2.0)
    w = publish.Webhook({"webhook_type": "discord", "webhook_url": slow.url + "/SECRET", "timeout": 0.5}, "p", maxsize=2)
    t0 = time.time()
    for i in range(10):
        w.send("checkpoint", f"c{i}")
    assert time.time() - t0 < 0.5 and w.dropped >= 7
    left = w.close(deadline=1.0)
    assert time.time() - t0 < 3.0 and left >= 1
    out = capsys.readouterr().out
    assert "is behind: dropping the oldest" in out and "TimeoutError" in out and "SECRET" not in out
    srv.close()
    slow.close()


def test_hub_upload_resume_and_offline(tmp_path, capsys, monkeypatch):
    hub = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_TESTSECRET")
    ck = tmp_path / "out" / "checkpoint-0000002"
    (ck / "sharded").mkdir(parents=True)
    blob = os.urandom(3000)
    (ck / "state.pt").write_bytes(blob)
    (ck / "sharded" / "0.distcp").write_bytes(b"x" * 10)
    staging = str(tmp_path / "out" / ".hub_staging")
    hub.fail = True   # the hub is down: nothing lost, the checkpoint stays staged, one warning
    up = publish.HubUploader("me/run", True, staging)
    up.stage("checkpoint-0000002", {"": str(ck)})
    shutil.rmtree(ck)   # rotated away locally: the staged hard links still hold it
    up.kick()
    up.close()
    assert up.pending() == ["checkpoint-0000002"] and hub.files == {}
    # a new process (after a crash) resumes the staged upload
    hub.fail = False
    up = publish.HubUploader("me/run", True, staging)
    up.kick()
    up.close()
    assert up.pending() == [] and hub.repos == {"me/run": "private"}
    assert set(hub.files) == {"checkpoints/checkpoint-0000002/state.pt", "checkpoints/checkpoint-0000002/sharded/0.distcp"}
    assert hub.files["checkpoints/checkpoint-0000002/state.pt"] == blob
    # a slow hub: staging the next checkpoint does not wait for the upload in progress
    hub.delay = 1.0
    up = publish.HubUploader("me/run", True, staging)
    up.stage("checkpoint-0000004", {"x": __file__})
    up.kick()
    deadline = time.time() + 5
    while up.current != "checkpoint-0000004" and time.time() < deadline:
        time.sleep(0.01)
    t0 = time.time()
    up.stage("checkpoint-0000006", {"x": __file__})
    assert time.time() - t0 < 0.5 and up.current == "checkpoint-0000004"   # staged while the upload goes on
    up.kick()
    up.close()
    hub.delay = 0.0
    assert up.pending() == [] and {"checkpoints/checkpoint-0000004/x", "checkpoints/checkpoint-0000006/x"} <= set(hub.files)
    calls = [r for r in hub.requests if r["path"].startswith(("/api/repos/", "/api/models/"))]
    assert len(calls) >= 3 and all(r["headers"].get("authorization") == "Bearer hf_TESTSECRET" for r in calls)
    # no network at all
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    up = publish.HubUploader("me/run", False, staging)
    (tmp_path / "README.md").write_text("card")
    up.stage("final", {"README.md": str(tmp_path / "README.md")})
    up.kick()
    up.close()
    assert up.pending() == ["final"]
    out = capsys.readouterr().out
    assert out.count("warning: hub upload") == 2 and "TESTSECRET" not in out
    hub.close()


@pytest.mark.slow
def test_tiny_run_publishes(tmp_path, capsys, monkeypatch):
    """config/tiny.py with push_to_hub, push_checkpoints_to_hub and a raw webhook against local servers: the
    artefacts, the webhook transcript, the hub's files == the dry-run staged folder, file by file."""
    hub, hook = FakeHub(), Server()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_TESTSECRET")
    out = tmp_path / "run"
    c = tiny_cfg(out, "--max_train_steps=4", "--checkpoint_step_interval=2", "--validation_step_interval=2",
                 "--push_to_hub=True", "--push_checkpoints_to_hub=True", "--hub_model_id=me/tiny-dmd",
                 "--model_card_private=True", "--tracker_run_name=tiny7",
                 f"--webhook_config={json.dumps({'webhook_type': 'raw', 'callback_url': hook.url + '/hook'})}")
    train_dmd.train(c)
    stdout = capsys.readouterr().out
    assert "TESTSECRET" not in stdout and "warning" not in stdout
    # run artefacts
    env = json.load(open(out / "env.json"))
    assert {"python", "platform", "torch", "cuda", "gpus", "git_commit", "packages"} <= set(env)
    git = os.path.exists(os.path.join(os.path.dirname(os.path.abspath(publish.__file__)), ".git"))   # a worktree: a file
    assert (re.fullmatch(r"[0-9a-f]{40}(\+dirty)?", env["git_commit"]) if git else env["git_commit"] == "unknown")
    assert "numpy" in env["packages"]
    assert json.load(open(out / "config.json"))["hub_model_id"] == "me/tiny-dmd"
    assert len(publish.read_log(out)) == 4
    for p in (out / "loss_curve.png", out / "validation/step_2/contact_sheet.png", out / "validation/step_4/contact_sheet.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "preview.gif").read_bytes()[:6] == b"GIF89a"
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-to-video" in card and "LoRA rank 8" in card and "me/tiny-dmd" in card
    assert "WanPipeline" not in card and "Not this student: its teacher `tiny`" in card   # no diffusers pipeline
    # the webhook transcript
    events = [json.loads(r["body"]) for r in hook.requests]
    assert [e["message_type"] for e in events] == ["start", "checkpoint", "validation", "checkpoint", "validation", "finish"]
    assert all(e["job_id"] == "tiny7" for e in events)
    assert [e.get("step") for e in events[1:]] == [2, 2, 4, 4, 4]
    assert base64.b64decode(events[2]["images"][0])[:4] == b"\x89PNG"
    assert base64.b64decode(events[5]["images"][0])[:6] == b"GIF89a"
    assert events[5]["url"] == f"{hub.url}/me/tiny-dmd"
    # the hub received the checkpoints and exactly the dry-run folder
    assert hub.repos == {"me/tiny-dmd": "private"}
    assert not os.listdir(out / ".hub_staging")   # everything uploaded
    for step in ("0000002", "0000004"):
        assert hub.files[f"checkpoints/checkpoint-{step}/state.pt"] == (out / f"checkpoint-{step}" / "state.pt").read_bytes()
    staged = tree(publish.stage_final(dict(c, output_dir=str(out))))
    mp4 = sorted(os.listdir(out / "validation" / "step_4"))[0]
    assert sorted(staged) == sorted(["README.md", "config.json", "env.json", "log.jsonl", "loss_curve.png", "preview.gif",
                                     "student_ema.safetensors", "transformer/config.json",
                                     "transformer/diffusion_pytorch_model.safetensors", f"samples/{mp4}"]
                                    + [f"tiny_teacher/{f}" for f in ("model_index.json", "tiny_text_encoder",
                                       "scheduler/scheduler_config.json", "transformer/config.json",
                                       "transformer/diffusion_pytorch_model.safetensors", "vae/config.json",
                                       "vae/diffusion_pytorch_model.safetensors")])
    final = {k: v for k, v in hub.files.items() if not k.startswith("checkpoints/")}
    assert final.keys() == staged.keys()
    for k in staged:
        assert final[k] == staged[k], k
    # the tiny teacher written beside the student is the one it was trained on (rebuilt from the seed), VAE included
    import data
    import model_wan as mw
    import vae_wan
    base, vae, _ = data.load_teacher(c, torch.device("cpu"), torch.float32, text=False)
    for got, want in ((mw.load_dit(str(out / "tiny_teacher")), base), (vae_wan.load_vae(str(out / "tiny_teacher")), vae)):
        sd = got.state_dict()
        assert all(torch.equal(sd[k], v) for k, v in want.state_dict().items() if ".lora_" not in k)
    # publish.py takes the publishing keys on its command line: another repo, public, a note; config.json unchanged
    saved = (out / "config.json").read_text()
    monkeypatch.setattr(sys, "argv", ["publish.py", str(out), "--hub_model_id=me/again", "--model_card_private=False",
                                      "--model_card_note=second push"])
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(publish.__file__)), "publish.py"), run_name="__main__")
    assert "hub: me/again holds the student" in capsys.readouterr().out
    assert hub.repos["me/again"] == "public" and hub.files["README.md"] == (out / "README.md").read_bytes()
    assert "second push" in (out / "README.md").read_text() and "me/again" in (out / "README.md").read_text()
    assert (out / "config.json").read_text() == saved
    hub.close()
    hook.close()


def test_failure_and_config_errors(tmp_path):
    hook = Server()
    c = tiny_cfg(tmp_path / "a", "--pretrained_model_name_or_path=random:nope",
                 f"--webhook_config={json.dumps({'webhook_type': 'discord', 'webhook_url': hook.url})}")
    with pytest.raises(ValueError, match="unknown preset"):
        train_dmd.train(c)
    msgs = [json.loads(r["body"])["content"] for r in hook.requests]
    assert len(msgs) == 2 and "training started" in msgs[0]
    assert msgs[1].startswith("`(a)` training failed: ValueError: 'random:nope': unknown preset")
    with pytest.raises(ValueError, match="hub_model_id"):
        train_dmd.train(tiny_cfg(tmp_path / "b", "--push_to_hub=True"))
    assert not (tmp_path / "b").exists()   # before anything was written
    # the quickstart's SimpleTuner keys map by name (strings from JSON converted)
    hook_cfg = {"webhook_type": "raw", "callback_url": "http://127.0.0.1:1/x"}
    st = {"push_to_hub": "true", "push_checkpoints_to_hub": False, "hub_model_id": "me/x", "model_card_private": "false",
          "webhook_config": hook_cfg, "report_to": "none", "tracker_project_name": "p", "tracker_run_name": "r"}
    (tmp_path / "st.json").write_text(json.dumps(st))
    got = simpletuner.read_config(str(tmp_path / "st.json"), train_dmd.DEFAULTS)
    assert {k: got[k] for k in st} == {
        "push_to_hub": True, "push_checkpoints_to_hub": False, "hub_model_id": "me/x", "model_card_private": False,
        "webhook_config": hook_cfg, "report_to": "none", "tracker_project_name": "p", "tracker_run_name": "r"}
    hook.close()


def test_secrets_never_written_nor_printed(tmp_path, capsys, monkeypatch):
    """A webhook URL given inline (its path is the secret) and a URL's user:password@: used by the run, absent from
    every file written to output_dir (config.json, env.json's argv, each checkpoint's state.pt), from what is staged
    and uploaded to the hub, and from what publish.py prints."""
    hub, hook = FakeHub(), Server()
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_TESTSECRET")
    out = tmp_path / "run"
    inline = json.dumps({"webhook_type": "raw", "callback_url": hook.url + "/hook/SECRETPATH"})
    argv = [os.path.join(ROOT, "train_dmd.py"), TINY, f"--output_dir={out}", "--max_train_steps=2",
            "--checkpoint_step_interval=1", "--validation_step_interval=1000", "--validation_diversity_seeds=0",
            "--push_to_hub=True", "--push_checkpoints_to_hub=True", "--hub_model_id=me/tiny",
            f"--webhook_config={inline}"]
    monkeypatch.setattr(sys, "argv", argv)   # env.json records the command line
    c = train_dmd.config(argv[1:])
    train_dmd.train(c)
    assert hook.requests and all(r["path"] == "/hook/SECRETPATH" for r in hook.requests)   # the run used it
    staged = tree(publish.stage_final(dict(c, output_dir=str(out))))                   # python publish.py --dry_run
    files = {**tree(out), **{f"hub:{k}": v for k, v in hub.files.items()}, **{f"staged:{k}": v for k, v in staged.items()}}
    assert {"config.json", "env.json", "checkpoint-0000001/state.pt", "hub:checkpoints/checkpoint-0000002/state.pt",
            "hub:config.json", "hub:env.json"} <= set(files)
    for name, blob in files.items():
        assert b"SECRETPATH" not in blob and b"TESTSECRET" not in blob, name
    assert "/<redacted>" in json.dumps(json.load(open(out / "config.json"))["webhook_config"])
    assert any("/<redacted>" in a for a in json.load(open(out / "env.json"))["argv"])
    # a webhook whose URL holds user:password@ fails here: its warning names the host only
    w = publish.Webhook({"webhook_type": "raw", "callback_url": f"http://me:pa55word@127.0.0.1:{free_port()}/x"}, "p")
    w.send("start", "s")
    w.close()
    printed = capsys.readouterr().out
    assert w.failed == 1 and "warning: webhook 127.0.0.1" in printed
    assert "SECRETPATH" not in printed and "pa55word" not in printed and "TESTSECRET" not in printed
    hub.close()
    hook.close()


def test_redact():
    hook = {"webhook_type": "discord", "webhook_url": "https://discord.com/api/webhooks/1/TOKEN"}
    assert configurator.redact({"webhook_config": hook, "lora_targets": ("a", "b"), "seed": 3}) == {
        "webhook_config": {"webhook_type": "discord", "webhook_url": "https://discord.com/<redacted>"},
        "lora_targets": ("a", "b"), "seed": 3}
    assert configurator.redact(["x.py", "--webhook_config=" + json.dumps(hook), "--hub_token=hf_abcdefghijk"]) == [
        "x.py", "--webhook_config=" + json.dumps(dict(hook, webhook_url="https://discord.com/<redacted>")),
        "--hub_token=<redacted>"]
    assert configurator.redact("failed: http://me:pw@host:8/p?q=1") == "failed: http://<redacted>@host:8/p?q=1"
    assert configurator.redact("http://127.0.0.1:8080/me/x") == "http://127.0.0.1:8080/me/x"

# -----------------------------------------------------------------------------
# python publish.py: a newcomer's mistakes, one line each before anything is staged


def run_publish(argv, monkeypatch, capsys):
    return run_script("publish.py", argv, monkeypatch, capsys)


def run_folder(folder, student=True, checkpoint=False):
    """A run folder as publish.py reads it: config.json, env.json (its argv), log.jsonl; the student and a
    checkpoint when asked."""
    import run_dir
    folder.mkdir()
    json.dump({**train_dmd.DEFAULTS, "pretrained_model_name_or_path": "tiny", "output_dir": str(folder)},
              open(folder / "config.json", "w"), default=str)
    json.dump({"argv": ["train_dmd.py", "config/tiny.py", f"--output_dir={folder}"]}, open(folder / "env.json", "w"))
    (folder / "log.jsonl").write_text("")
    if student:
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(folder / "student_ema.safetensors"), metadata={"step": "1"})
    if checkpoint:
        (folder / "checkpoint-0000001").mkdir()
        torch.save({"step": 1}, folder / "checkpoint-0000001" / "state.pt")
        run_dir.write_checksums(str(folder / "checkpoint-0000001"), "r1", 1)
    return folder


def test_publish_mistakes_are_one_line(tmp_path, monkeypatch, capsys):
    """A run that stopped before step 1 (no student; before: a dry run staged a card "exported at unknown step"), a
    folder that is not there, a hub id that is not USER/NAME: one line, exit status 2, nothing staged."""
    crashed = run_folder(tmp_path / "crashed", student=False)
    unexported = run_folder(tmp_path / "unexported", student=False, checkpoint=True)
    done = run_folder(tmp_path / "done")
    cases = [([str(crashed), "--dry_run"], f"{crashed}: no exported student (student_ema.safetensors) and no checkpoint: "
              f"the run stopped before its first; train it again with `python train_dmd.py config/tiny.py "
              f"--output_dir={crashed} --overwrite_output_dir=True`"),
             ([str(unexported), "--dry_run"], f"export its newest checkpoint's first with `python train_dmd.py "
              f"config/tiny.py --output_dir={unexported} --export_from=latest`"),
             ([str(tmp_path / "does_not_exist")], f"{tmp_path / 'does_not_exist'}: no such folder"),
             ([str(tmp_path)], f"{tmp_path}: no config.json: not a train_dmd.py output folder"),
             ([str(done), "--hub_model_id=noslash"], "--hub_model_id='noslash': not the hub's USER/NAME form: give e.g. "
              "--hub_model_id=me/noslash"),
             ([str(done), "--hub_model_id=noslash", "--dry_run"], "--hub_model_id='noslash': not the hub's USER/NAME"),
             ([str(done)], f"{done / 'config.json'} has no hub_model_id: give --hub_model_id=USER/NAME")]
    for argv, says in cases:
        code, out, err = run_publish(argv, monkeypatch, capsys)
        assert code == 2 and err.count("\n") == 1 and err.startswith("publish.py: error: ") and says in err, (argv, err)
        assert not any((tmp_path / n / ".hub_staging").exists() for n in ("crashed", "unexported", "done"))


def test_publish_failed_upload_says_what_is_true(tmp_path, monkeypatch, capsys):
    """publish.py whose upload fails: one line saying so, the staged folder and the command to retry; none of the
    trainer's words (before: "training goes on ... retried at the next checkpoint and the next start")."""
    hub = FakeHub()
    hub.fail = True
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", "hf_TESTSECRET")
    done = run_folder(tmp_path / "done")
    code, out, err = run_publish([str(done), "--hub_model_id=me/x"], monkeypatch, capsys)
    hub.close()
    assert code == 1 and err.count("\n") == 1, out + err
    assert err.startswith("publish.py: error: the upload to me/x did not finish (") and "training" not in out + err
    assert err.rstrip().endswith(f"it stays staged in {done / '.hub_staging'}; retry with: python publish.py {done} "
                                 "--hub_model_id=me/x"), err
    assert "TESTSECRET" not in out + err and os.listdir(done / ".hub_staging") == ["final"]


def test_card_words_say_what_is_there():
    """The card's base row says how the frozen base is stored (before: "frozen base during training | no
    (mixed_precision)", read as "not frozen"); its Files table says samples/ is in the upload only."""
    card = model_card(card_cfg(mixed_precision="no"), [1000.0], [], {}, ["samples/0.mp4", "student_ema.safetensors"], [])
    assert "| frozen base stored in training as | fp32 (`mixed_precision=no`) |" in card
    assert "frozen base during training" not in card and "| no (mixed_precision)" not in card
    assert "bf16 (`mixed_precision=bf16`)" in model_card(card_cfg(mixed_precision="bf16"), [1000.0], [], {}, [], [])
    assert "| `samples/` | validation videos of the last step (in the upload only: the run folder keeps them in " \
           "validation/step_N/) |" in card
