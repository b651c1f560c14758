"""
SimpleTuner's config.json (its DMD quickstart for Wan 2.1) read as train_dmd.py keys, so that

    python train_dmd.py config/config.json

trains what a SimpleTuner user means by that file. Every key is mapped, or named in one summary line as ignored
with the reason; where SimpleTuner's meaning differs from ours the value is converted and a notice says so:

- `distillation_config` (the nested DMD block) is flattened; `distillation_method` must be "dmd", `model_family` "wan".
- Guidance: SimpleTuner applies real/fake_score_guidance_scale s as standard CFG, uncond + s(cond - uncond) (0 = off);
  ours is the DMD2 form x_c + w(x_c - x_u). The same score: w = s - 1 (s = 0 -> w = 0).
- Blocks: SimpleTuner's DMD rollout cuts the clip into num_frame_per_block chunks that a bidirectional Wan denoises
  independently (no KV cache, no context between them), then validates and exports that bidirectional model over
  whole clips. The student it delivers is bidirectional, so the block keys take their bidirectional values here (a
  notice gives the one-line change to the causal Self-Forcing student).
- model_type "lora": generator LoRA at lora_rank, the critic a second LoRA of that rank on the same frozen base
  (SimpleTuner clones the whole model for it); "full": full fine-tunes of both (fp32 copies).
- data_backend_config (SimpleTuner's multidatabackend JSON list) -> `datasets`: the image/video backends, with the
  global dataset keys (resolution, caption_dropout_probability, ...) as their defaults. SimpleTuner's DMD adds the
  model's ordinary flow-matching loss on every data batch (weight 1): real_data_loss_weight = 1.0 when data is given.
- base_model_precision / text_encoder_1_precision / quantize_via are ours by name: "int8-quanto", "fp8-torchao", ...
  map to our weight-only int8 / fp8 (quant.py).
Paths in the file (data_backend_config, validation_prompt_library, webhook_config) are SimpleTuner's, relative to
the folder it runs in: looked up there, then beside the JSON and one folder up (config/config.json -> config/...);
every one missing is named in one line. A backend's instance_data_dir and cache_dir are relative to the working
folder, as in SimpleTuner: made absolute, with a notice. validation_negative_prompt becomes the training negative
prompt and optimizer adamw_bf16 our fp32-master AdamW, each announced as the conversions above are.
"""
import json
import os

# SimpleTuner key -> ours where the names differ (every other key of ours is read by its own name)
RENAMES = {"validation_steps": "validation_step_interval", "checkpointing_steps": "checkpoint_step_interval",
           "model_path": "pretrained_model_name_or_path", "validation_negative_prompt": "negative_prompt",
           "min_lr_ratio": "lr_min_ratio"}
SCHEDULERS = {"constant_with_warmup": "constant"}   # ours always warm up over lr_warmup_steps
# SimpleTuner globals that are per-dataset keys here: defaults of every mapped data backend
DATASET_GLOBALS = ("resolution", "resolution_type", "caption_dropout_probability", "aspect_bucket_rounding",
                   "minimum_image_size", "compress_disk_cache", "delete_problematic_images", "vae_batch_size")
# data backend keys read as ours (by name) or renamed; the rest are SimpleTuner's loader details
BACKEND_KEYS = {"id": "id", "instance_data_dir": "instance_data_dir", "cache_dir_vae": "cache_dir", "cache_dir": "cache_dir",
                "repeats": "repeats",
                "num_frames": "num_frames", "frame_interval": "frame_interval", "crop": "crop",
                **{k: k for k in DATASET_GLOBALS}}
IGNORED = {   # key -> why it has no effect here
    "attention_mechanism": "attention is PyTorch SDPA", "disable_benchmark": "no start-up benchmark here",
    "num_train_epochs": "max_train_steps alone sets the length", "strict_epoch_limit": "no epochs here",
    "ignore_final_epochs": "no epochs here",
    "pretrained_t5_model_name_or_path": "UMT5 is read from the teacher folder",
    "simulate_generator_forward": "the rollout always simulates the few-step sampler (backward simulation)",
    "lora_type": "'standard' is the only LoRA here", "model_family": "checked: Wan 2.1 only",
    "distillation_method": "checked: DMD only", "fake_score_use_ema": "not implemented",
    "adversarial_weight": "not implemented",
    "disable_bucket_pruning": "buckets are never pruned here",
}
WAN_SIZES = {480: (480, 832), 720: (720, 1280)}   # Wan 2.1's pixel-area sizes (H, W)
BLOCK_KEYS = {"num_frame_per_block": 0, "independent_first_frame": False, "same_step_across_blocks": True,
              "context_noise": 0}   # their bidirectional values


def find_path(path, json_path):
    """A SimpleTuner relative path -> an existing path: as given (from the working folder), beside the JSON, or one
    folder above it; None when it is in none of them."""
    if not isinstance(path, str) or path.lstrip().startswith("{") or os.path.isabs(path) or os.path.exists(path):
        return path
    here = os.path.dirname(os.path.abspath(json_path))
    for base in (here, os.path.dirname(here)):
        if os.path.exists(os.path.join(base, path)):
            return os.path.join(base, path)
    return None


def find_companions(d, json_path):
    """The files the config names (data_backend_config, validation_prompt_library, webhook_config) -> {key: found
    path}; the missing ones all named in one FileNotFoundError."""
    named = {k: d[k] for k in ("data_backend_config", "validation_prompt_library", "webhook_config")
             if isinstance(d.get(k), str) and d[k]}
    found = {k: find_path(v, json_path) for k, v in named.items()}
    missing = [f"{k}={named[k]!r}" for k, v in found.items() if v is None]
    if missing:
        here = os.path.dirname(os.path.abspath(json_path))
        places = list(dict.fromkeys([os.getcwd(), here, os.path.dirname(here)]))   # SimpleTuner's folder, the JSON's
        raise FileNotFoundError(f"{json_path}: {len(missing)} file(s) it names not found: {', '.join(missing)} (looked "
                                f"in {', '.join(places)}): copy them there, or give their paths")
    return found


def load_json(path, say=print):
    """A JSON file -> its value; bad JSON is one ValueError with the line, the column and that line's text; a key
    given twice in one object (json keeps the last, as SimpleTuner does) is announced."""
    with open(path, encoding="utf-8") as f:
        text = f.read()

    def pairs(items):
        seen = [k for i, (k, _) in enumerate(items) if k in [k2 for k2, _ in items[:i]]]
        if seen:
            say(f"notice: {path}: {', '.join(repr(k) for k in seen)} given twice in one object: the last value is used")
        return dict(items)
    try:
        return json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        line = text.splitlines()[e.lineno - 1].strip() if e.lineno <= len(text.splitlines()) else ""
        raise ValueError(f"{path}, line {e.lineno}, column {e.colno}: not valid JSON: {e.msg} (the line: {line[:80]!r})"
                         ) from None


def read_config(json_path, defaults, say=print):
    """SimpleTuner config.json -> {our key: value}. Notices and the one ignored-keys line go through `say`."""
    d = load_json(json_path, say)
    if not isinstance(d, dict):
        raise ValueError(f"{json_path}: a SimpleTuner config is a JSON object of keys, not a {type(d).__name__}")
    if "objective" in d and "distillation_config" not in d and set(d) <= set(defaults):
        return own_json(d, defaults)   # train_dmd.py's own JSON (a run's config.json, --print_config): no conversion
    d = {k.lstrip("-"): v for k, v in d.items()}   # SimpleTuner also accepts CLI-style "--key" names in its JSON
    d.update({k.lstrip("-"): v for k, v in (d.pop("distillation_config", None) or {}).items()})
    for key, want in (("distillation_method", "dmd"), ("model_family", "wan")):
        if str(d.get(key, want)).lower() != want:
            raise ValueError(f"{json_path}: {key}={d[key]!r}: this library distils Wan 2.1 by DMD only")
    if d.get("lora_type", "standard") != "standard":
        raise ValueError(f"{json_path}: lora_type={d['lora_type']!r}: only 'standard' LoRA is implemented")
    out, ignored = {}, {}
    found = find_companions(d, json_path)
    for k, v in d.items():
        ours = RENAMES.get(k, k)
        if k == "data_backend_config":
            out["datasets"] = read_backends(found[k], d, ignored, say)
        elif k in DATASET_GLOBALS:   # read into every dataset by read_backends; resolution also sets height x width
            if "data_backend_config" not in d and k != "resolution":
                ignored.setdefault("a dataset key, and no data_backend_config", []).append(k)
        elif k in IGNORED:
            ignored.setdefault(IGNORED[k], []).append(k)
        elif k == "model_type":
            continue   # read by meaning: the LoRA ranks
        elif ours in defaults:
            out[ours] = convert(ours, v, defaults[ours])
        else:
            ignored.setdefault("unknown to train_dmd.py", []).append(k)
    for k in ("validation_prompt_library", "webhook_config"):
        if isinstance(out.get(k), bool):   # SimpleTuner's flag for its built-in prompt library
            ignored.setdefault("no built-in prompt library here", []).append(k)
            out[k] = defaults[k]
        elif out.get(k):
            out[k] = found.get(k, out[k])
    meaning(d, out, defaults, say)
    recipe_notice(d, out, say)
    if ignored:
        say("SimpleTuner keys ignored: " + "; ".join(f"{', '.join(sorted(set(ks)))} ({why})" for why, ks in ignored.items()))
    return out


def own_json(d, defaults):
    """train_dmd.py's own JSON (every key ours, `objective` among them) -> its values as written, JSON lists back
    to the tuples of their defaults."""
    return {k: tuple(v) if isinstance(v, list) and isinstance(defaults[k], tuple) else v for k, v in d.items()}


def convert(key, v, default):
    """A SimpleTuner value (strings from its CLI-style JSON) -> the type of our default."""
    if key in ("lr_scheduler", "fake_score_lr_scheduler"):
        return SCHEDULERS.get(v, v)
    if key == "optimizer" and v == "adamw_bf16":
        return "adamw"   # fp32 master weights: the same updates, more exact
    if isinstance(v, str) and isinstance(default, bool):
        return v.lower() == "true"
    if isinstance(v, str) and isinstance(default, (int, float)) and not isinstance(default, bool):
        return type(default)(float(v))
    if isinstance(v, str) and isinstance(default, tuple):
        return tuple(float(x) for x in v.strip("[]()").split(","))
    return v


def meaning(d, out, defaults, say):
    """Where SimpleTuner means something else by a value: guidance form, blocks, model_type, 8-bit, data loss."""
    for k in ("real_score_guidance_scale", "fake_score_guidance_scale"):
        if float(d.get(k, 0)) != 0:   # 0 is "off" in both forms
            s = float(d[k])
            out[k] = s - 1
            say(f"notice: SimpleTuner {k}={s:g} is standard CFG (uncond + {s:g}(cond - uncond)) -> {k}={out[k]:g} "
                f"here (DMD2 form x_c + {out[k]:g}(x_c - x_u)): the same score")
    if not d.get("causal"):
        given = {k: d[k] for k in BLOCK_KEYS if k in d and d[k] != BLOCK_KEYS[k]}
        out.update({k: v for k, v in BLOCK_KEYS.items() if k in d})
        if given:
            keys = " ".join(f"--{k}={v}" for k, v in given.items())
            say(f"NOTICE: {', '.join(f'{k}={v}' for k, v in given.items())}: SimpleTuner denoises these blocks "
                "independently with a bidirectional Wan and delivers a bidirectional student: trained here as the "
                "bidirectional student (one block). For the causal Self-Forcing student instead (better after the "
                f"ODE init of README 'Causal student'): add --causal=True {keys} --validation_num_video_frames=81")
    if d.get("validation_negative_prompt") is not None:
        say("notice: SimpleTuner validation_negative_prompt -> negative_prompt: the unconditional prompt of the "
            "teacher's guidance in every training step here (the student samples without CFG: no validation use)")
    if d.get("optimizer") == "adamw_bf16":
        say("notice: SimpleTuner optimizer=adamw_bf16 -> adamw: AdamW with fp32 master weights (the same updates, "
            "more exact)")
    r = int(d.get("resolution", 0) or 0)
    if r:   # the data-free rollout's size: Wan's own for 480/720, else 480p's shape at that area
        out["height"], out["width"] = WAN_SIZES.get(r, (r // 16 * 16, round(r * 832 / 480 / 16) * 16))
    mt = d.get("model_type", "lora")
    if mt == "full":
        out.update(lora_rank=0, fake_score_lora_rank=0)
        say("notice: model_type=full -> full fine-tune of the generator and of the critic (fp32 copies; LoRA ranks 0)")
    elif mt == "lora":
        out["fake_score_lora_rank"] = out.get("lora_rank", defaults["lora_rank"])
        out["fake_score_lora_alpha"] = out.get("lora_alpha", defaults["lora_alpha"])
        say(f"notice: model_type=lora -> generator LoRA r{out.get('lora_rank', defaults['lora_rank'])} and critic LoRA "
            f"r{out['fake_score_lora_rank']} on one frozen base (SimpleTuner clones the whole model for the critic)")
    else:
        raise ValueError(f"model_type={mt!r}: 'lora' or 'full'")
    if any(x.get("dataset_type") == "video" for x in out.get("datasets", [])) and "real_data_loss_weight" not in d:
        out["real_data_loss_weight"] = 1.0
        say("notice: SimpleTuner's DMD adds the ordinary flow-matching loss on each data batch -> "
            "real_data_loss_weight=1.0 (--real_data_loss_weight=0 for data-free DMD on the captions)")


# what config/wan_dmd_3step.py adds to the quickstart (docs/recipe.md); SimpleTuner has none of these keys
RECIPE = {"real_score_guidance_max_timestep": 650.0, "ode_regression_weight": 0.25, "teacher_data_samples": 8}


def recipe_notice(d, out, say):
    """One notice naming the recipe's keys the file lacks: it trains with SimpleTuner's meaning, without them (with
    video data only the guidance interval applies: the regression's pairs come from a data-free run)."""
    lacks = {k: v for k, v in RECIPE.items() if k not in d and k not in out
             and (k == "real_score_guidance_max_timestep" or not out.get("datasets"))}
    if lacks:
        say(f"notice: not in SimpleTuner's config: {', '.join(lacks)} (trained as SimpleTuner would); our recipe "
            f"adds {' '.join(f'--{k}={v:g}' for k, v in lacks.items())} (docs/recipe.md)")


def read_backends(path, d, ignored, say=print):
    """SimpleTuner's multidatabackend JSON (a list of backends, or one backend object) -> our `datasets`: one video
    dataset per enabled image/video backend (its text/image embed caches are ours per dataset, so skipped). Its
    relative folders are the working folder's, as SimpleTuner reads them: made absolute, and announced."""
    backends = load_json(path, say)
    if isinstance(backends, dict):
        backends = [backends]
    if not isinstance(backends, list) or not all(isinstance(b, dict) for b in backends):
        raise ValueError(f"{path}: a SimpleTuner data backend config is a JSON list of backend objects (or one object)")
    out = []
    for b in backends:
        if b.get("disabled") or b.get("dataset_type", "image") not in ("image", "video"):
            continue
        if b.get("type", "local") != "local":
            raise ValueError(f"{path}: backend {b.get('id')!r} has type {b['type']!r}: only 'local' folders here")
        if b.get("caption_strategy", "textfile") != "textfile":
            raise ValueError(f"{path}: backend {b.get('id')!r}: caption_strategy {b['caption_strategy']!r}: captions "
                             "here come from a .txt beside each file (textfile) or metadata.jsonl/.csv")
        ds = {"dataset_type": "video", **{k: d[k] for k in DATASET_GLOBALS if k in d}}   # a folder of videos/images
        for k, v in {**b, **(b.get("video") or {})}.items():
            if k in BACKEND_KEYS:
                ds[BACKEND_KEYS[k]] = v
            elif k not in ("video", "dataset_type", "type", "caption_strategy", "disabled", "crop_style"):
                ignored.setdefault("a SimpleTuner data-loader detail", []).append(k)
        if ds.get("crop") is True:
            ds["crop"] = "random" if b.get("crop_style") == "random" else "center"
        rel = {k: ds[k] for k in ("instance_data_dir", "cache_dir") if isinstance(ds.get(k), str) and ds[k]
               and not os.path.isabs(ds[k])}
        if rel:
            ds.update({k: os.path.abspath(v) for k, v in rel.items()})
            say(f"notice: {path}: backend {ds.get('id', '?')!r}: " + ", ".join(f"{k} {v!r} -> {ds[k]}" for k, v in
                rel.items()) + " (relative to the working folder, as SimpleTuner reads them)")
        out.append(ds)
    if not out:
        raise ValueError(f"{path}: no enabled image or video backend")
    return out
