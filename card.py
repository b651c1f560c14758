"""
The model card (README.md) of a published student: pure functions of the run's config, its log records, env.json and
the files of the upload; publish.write_card gathers those and writes it. The card names the teacher (the hub id when
it has one, a local folder as given), its license, the method and its numbers, and shows how to load the student in
diffusers and with sample.py, from the hub repo or, not pushed, from the run folder.
"""
import json
import os
import shlex

import quant
from configurator import hub_file, redact

DIFFUSERS_BASES = {"Wan-AI/Wan2.1-T2V-1.3B": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                   "Wan-AI/Wan2.1-T2V-14B": "Wan-AI/Wan2.1-T2V-14B-Diffusers"}


def base_model_id(src):
    """The hub id of the teacher, or None (tiny / random / a local folder outside the hub cache)."""
    if src == "tiny" or src.startswith("random:"):
        return None
    if os.path.isdir(src):
        parts = [p for p in os.path.abspath(src).split(os.sep) if p.startswith("models--")]
        return parts[-1][len("models--"):].replace("--", "/", 1) if parts else None
    return src if src.count("/") == 1 else None


def base_license(src, repo_id):
    """The base model's license from its README front matter (local folder or the hub cache), else Wan 2.1's
    Apache-2.0 for Wan-AI repos and our own Apache-2.0 for tiny/random teachers; "other" when unknown."""
    readme = os.path.join(src, "README.md") if os.path.isdir(src) else None
    if readme is None and repo_id:
        try:
            from huggingface_hub import try_to_load_from_cache
            hit = try_to_load_from_cache(repo_id, "README.md")
            readme = hit if isinstance(hit, str) else None
        except Exception:   # noqa: BLE001
            readme = None
    if readme and os.path.exists(readme):
        with open(readme, encoding="utf-8", errors="replace") as f:
            head = f.read(4000).split("---")
        for line in (head[1].splitlines() if len(head) > 2 else []):
            if line.startswith("license:"):
                return line.split(":", 1)[1].strip().strip("'\"")
    if repo_id is None or repo_id.startswith("Wan-AI/"):
        return "apache-2.0"
    return "other"


def duration(secs):
    return f"{secs / 3600:.2f} h" if secs >= 3600 else f"{secs / 60:.1f} min" if secs >= 60 else f"{secs:.0f} s"


def fmt_steps(steps):
    return ",".join(f"{s:g}" if float(s).is_integer() else f"{s:.3f}" for s in steps)


def data_summary(c):
    if c["datasets"]:
        parts = [f"`{d.get('id', '?')}` ({d.get('dataset_type', 'video')})" for d in c["datasets"]]
        return (f"{len(parts)} dataset(s): {', '.join(parts)}; captions and VAE latents cached, rollout_mode "
                f"`{c['rollout_mode']}`, real_data_loss_weight {c['real_data_loss_weight']}")
    src = c["prompts_file"]
    if not src:
        return "data-free DMD: the validation prompt(s) as training prompts, no videos"
    name = src if src.startswith("hf://") else os.path.basename(src)
    try:
        with open(hub_file(src)) as f:
            n = sum(1 for line in f if line.strip())
    except (OSError, ValueError):   # e.g. a hub file not in this machine's cache: named, not counted
        return f"data-free DMD: the training prompts of `{name}`, no videos"
    return f"data-free DMD: {n} training prompts (`{name}`), no videos"


def base_storage(c):
    """The training base's precision in words (base_model_precision): the exported weights are full precision."""
    kind = quant.parse_precision(c.get("base_model_precision", "no"))
    if kind == "no":
        mp = c.get("mixed_precision", "bf16")
        return f"{'fp32' if mp == 'no' else mp} (`mixed_precision={mp}`)"
    return (f"{kind} weight-only (`base_model_precision={c['base_model_precision']}`); the merged transformer/ holds "
            "the student on the full-precision teacher weights")


def teacher_rows(c, base):
    """The method table's model rows: the base is the teacher, or (teacher_model_name_or_path) the student's base
    beside the separate teacher that gave the real score."""
    if not c.get("teacher_model_name_or_path"):
        return [f"| base model (teacher) | `{base}` |"]
    kind = quant.parse_precision(c.get("teacher_model_precision") or c.get("base_model_precision", "no"))
    return [f"| base model (student) | `{base}`: the generator's and the critic's base, the exported weights' |",
            f"| teacher (real score) | `{c['teacher_model_name_or_path']}`, frozen, no adapter, stored "
            f"{kind + ' weight-only' if kind != 'no' else 'unquantised (mixed_precision=' + c.get('mixed_precision', 'bf16') + ')'} |"]


def model_card(c, steps, records, env, files, prompts, at=None):
    """The README.md of the published student. steps: the rollout timesteps (after any warp); records: log.jsonl;
    env: environment(); files: the names in the upload (decides which loading snippets apply); prompts: validation;
    at: the trainer step the student was exported at (None: unknown)."""
    src = c["pretrained_model_name_or_path"]
    base = base_model_id(src)
    pipe_id = pipeline_source(src, base)
    repo = c["hub_model_id"] or c["output_dir"]   # not pushed: the snippets load the local run folder
    is_lora = c["lora_rank"] > 0
    last = records[-max(1, len(records) // 10):] if records else []

    def mean(k):
        v = [r[k] for r in last if isinstance(r.get(k), (int, float)) and r[k] == r[k]]
        return f"{sum(v) / len(v):.4g}" if v else "n/a"
    secs = sum(r.get("s_per_step", 0.0) for r in records) * c["log_interval"]   # summed over resumed runs too
    took = duration(secs)
    world = env.get("world_size", 1)
    gpus = ", ".join(sorted(set(env.get("gpus") or []))) or "CPU"
    tags = ["text-to-video", "diffusers", "wan2.1", "dmd", "distillation", "few-step", "wan-dmd"] + (["lora"] if is_lora else [])
    meta = ["---"] + ([f"base_model: {base}", f"base_model_relation: {'adapter' if is_lora else 'finetune'}"] if base else [])
    meta += [f"license: {base_license(src, base)}", "library_name: diffusers", "pipeline_tag: text-to-video", "tags:"]
    meta += [f"- {t}" for t in tags] + ["---", ""]
    prompt = prompts[0] if prompts else c["validation_prompt"]
    gen = f"LoRA rank {c['lora_rank']}, alpha {c['lora_alpha']:g}" if is_lora else "full fine-tune"
    critic = f"LoRA rank {c['fake_score_lora_rank']}" if c["fake_score_lora_rank"] > 0 else "full fine-tune"
    L = meta + [f"# {c['hub_model_id'].split('/')[-1] or run_name(c)}: a {len(steps)}-step DMD student of {base or src}", ""]
    L += [f"A {len(steps)}-step text-to-video student distilled from `{base or src}` with DMD (Distribution Matching "
          "Distillation, DMD2 form) by wan-dmd's `train_dmd.py`.", ""]
    if os.path.exists(os.path.join(c["output_dir"], "preview.gif")) or "preview.gif" in files:
        L += ["![validation samples](preview.gif)", "", "Validation prompts: " + "; ".join(f"*{p}*" for p in prompts), ""]
    if c.get("model_card_note"):
        L += [redact(c["model_card_note"], "model_card_note"), ""]   # a token or webhook in it never reaches the hub
    L += ["## Method", "", "| | |", "|---|---|",
          *teacher_rows(c, base or src),
          f"| method | DMD (DMD2 form), backward-simulation rollout (`rollout_mode={c['rollout_mode']}`) |",
          f"| student steps | {len(steps)}: timesteps {fmt_steps(steps)} (σ = t/1000), no CFG at inference |",
          f"| teacher guidance | `real_score_guidance_scale` w = {c['real_score_guidance_scale']:g} in x_c + w(x_c − x_u) "
          f"(= standard CFG {c['real_score_guidance_scale'] + 1:g}); critic w = {c['fake_score_guidance_scale']:g} |",
          f"| shift | score timestep shift {c['timestep_shift']:g}, warp_denoising_step {c['warp_denoising_step']}, "
          f"flow_schedule_shift {c['flow_schedule_shift']:g} |",
          f"| generator | {gen}; lr {c['learning_rate']:g}, update every {c['generator_update_interval']} step(s); "
          f"EMA {c['ema_decay'] if c['use_ema'] else 'off'} |",
          f"| critic (fake score) | {critic}; lr {c['fake_score_lr']:g} |",
          f"| frozen base stored in training as | {base_storage(c)} |",
          f"| data | {data_summary(c)} |",
          f"| training | {c['max_train_steps']} steps at {c['num_training_frames']} latent frames {c['height']}x{c['width']}, "
          f"batch {c['train_batch_size']} x accum {c['gradient_accumulation_steps']} x {world} process(es); {took} on {gpus} |",
          f"| exported at | {exported_at(c, records, at)} |",
          f"| final losses (mean of the last {len(last)} logged steps) | dmd_loss {mean('dmd_loss')}, "
          f"fake_score_loss {mean('fake_score_loss')}, abs(g) {mean('g_abs')} |",
          f"| code | wan-dmd commit `{env.get('git_commit', 'unknown')}`, torch {env.get('torch', '?')} |", ""]
    return "\n".join(L + card_usage(c, steps, files, repo, pipe_id, prompt) + card_files(files)) + "\n"


def pipeline_source(src, base):
    """Where the card's diffusers snippet loads the base pipeline from: the teacher's diffusers hub id; a local
    diffusers folder as given (not on the hub); for an original-layout folder or a built teacher (tiny, random:)
    the hub's diffusers Wan 2.1 of that size (14B when the name or the folder's config.json says so)."""
    if base:
        return DIFFUSERS_BASES.get(base, base)
    if os.path.isfile(os.path.join(src, "model_index.json")):
        return src
    cfg = os.path.join(src, "config.json")
    dim = json.load(open(cfg)).get("dim") if os.path.isfile(cfg) else None
    return DIFFUSERS_BASES["Wan-AI/Wan2.1-T2V-14B" if dim == 5120 or "14B" in src else "Wan-AI/Wan2.1-T2V-1.3B"]


def exported_at(c, records, at):
    """The model card's line on the exported step: which step of the run, the weights, that step's collapse signal."""
    if at is None:
        return "unknown step (the student file predates step metadata)"
    val = [r for r in records if r["step"] == at and "diversity_ratio" in r]
    return (f"step {at} of {c['max_train_steps']} ({'EMA' if c['use_ema'] else 'raw'} weights; `train_dmd.py CONFIG "
            f"--export_from=checkpoint-N` exports another checkpoint)" + (f"; validation diversity "
            f"{val[-1]['diversity_ratio']:.2f}x the teacher's (worst prompt {val[-1]['diversity_ratio_min']:.2f}x)" if val else ""))


def card_usage(c, steps, files, repo, pipe_id, prompt):
    """The model card's loading snippets (diffusers, then wan-dmd's sample.py) -> lines."""
    adapter = "student_ema.safetensors" if "student_ema.safetensors" in files else "student.safetensors"
    merged = "transformer/config.json" in files
    sigmas = ", ".join(f"{s / 1000:g}" for s in steps)
    W, H = (int(v) for v in c["validation_resolution"].lower().split("x"))
    Fn = c["validation_num_video_frames"]
    L = []
    L += ["## Use it with diffusers", "",
          f"The student samples in {len(steps)} steps: x0 = x − σ·v(x, t), then x0 is re-noised to the next σ with fresh "
          "noise (`FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)` on the sigmas below), guidance_scale 1.", "",
          "```python", "import torch", "from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline",
          "from diffusers.utils import export_to_video", "",
          f'pipe = WanPipeline.from_pretrained({json.dumps(pipe_id)}, torch_dtype=torch.bfloat16)']
    if c["lora_rank"] > 0 and adapter in files:
        L += [f'pipe.load_lora_weights({json.dumps(repo)}, weight_name="{adapter}")   # the LoRA student (EMA weights)']
        if merged:
            L += ["# or the merged student:", "# from diffusers import WanTransformer3DModel",
                  f'# pipe.transformer = WanTransformer3DModel.from_pretrained({json.dumps(repo)}, subfolder="transformer", '
                  "torch_dtype=torch.bfloat16)"]
    else:
        L = L[:-1] + ["from diffusers import WanTransformer3DModel",
                      f'transformer = WanTransformer3DModel.from_pretrained({json.dumps(repo)}, subfolder="transformer", '
                      "torch_dtype=torch.bfloat16)",
                      f'pipe = WanPipeline.from_pretrained({json.dumps(pipe_id)}, transformer=transformer, torch_dtype=torch.bfloat16)']
    L += ['pipe.to("cuda")',
          "pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, stochastic_sampling=True)",
          "set_timesteps = pipe.scheduler.set_timesteps   # the pipeline asks for N steps: give it the student's sigmas",
          f"pipe.scheduler.set_timesteps = lambda *a, device=None, **k: set_timesteps(sigmas=[{sigmas}], device=device)",
          f'video = pipe({json.dumps(prompt)}, num_inference_steps={len(steps)}, guidance_scale=1.0,',
          f"             height={H}, width={W}, num_frames={Fn}).frames[0]",
          'export_to_video(video, "student.mp4", fps=16)', "```", ""]
    built = c["pretrained_model_name_or_path"] == "tiny" or c["pretrained_model_name_or_path"].startswith("random:")
    if built:   # no diffusers pipeline (UMT5, VAE) behind a teacher built from a seed: the snippet would load another
        L = ["## Use it with diffusers", "", f"Not this student: its teacher `{c['pretrained_model_name_or_path']}` is "
             "built by wan-dmd from the run's seed (no diffusers pipeline behind it); sample it with wan-dmd below.", ""]
    # every path the snippets insert is quoted (a folder named with ; or $(...) runs nothing when pasted)
    get = [f"hf download {shlex.quote(repo)} --local-dir student"] if c["hub_model_id"] else []   # else: the run folder
    model = "" if built else f"--model={shlex.quote(pipe_id)} "   # a tiny teacher: the folder's tiny_teacher/, found by sample.py
    L += ["## Use it with wan-dmd", "", "```bash", *get,
          f'python sample.py {model}--ckpt={shlex.quote("student" if get else repo)} --denoising_steps={fmt_steps(steps)} \\',
          f'    --height={H} --width={W} --num_frames={Fn} --prompt={shlex.quote(prompt)}', "```", ""]
    return L


def card_files(files):
    """The model card's table of the uploaded files -> lines."""
    L = ["## Files", "", "| file | what |", "|---|---|"]
    what = {"student_ema.safetensors": "the student, EMA weights: LoRA adapter (diffusers/PEFT keys) or full weights",
            "student.safetensors": "the student: LoRA adapter (diffusers/PEFT keys) or full weights",
            "transformer/": "merged student in diffusers `WanTransformer3DModel` layout",
            "config.json": "the resolved training config (train_dmd.py keys)",
            "env.json": "versions of python, torch, CUDA, the GPUs and the wan-dmd commit",
            "log.jsonl": "training metrics, one record per logged step", "loss_curve.png": "dmd_loss, fake_score_loss, mean abs(g), grad norms of G and F, validation diversity",
            "preview.gif": "validation samples (downscaled)",
            "samples/": "validation videos of the last step (in the upload only: the run folder keeps them in "
                        "validation/step_N/)",
            "tiny_teacher/": "the tiny teacher the student was trained on (built from the run's seed; sample.py loads it)"}
    shown = {f.split("/")[0] + "/" if "/" in f else f for f in files}
    L += [f"| `{k}` | {v} |" for k, v in what.items() if k in shown]
    return L


def run_name(c):
    return c.get("tracker_run_name") or os.path.basename(os.path.normpath(c["output_dir"])) or c["tracker_project_name"]
