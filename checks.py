"""
train_dmd.py's config checks: every key error, and every block-geometry error of the causal student, before any
model is built (a bad run stops in a second with one line, not after the teacher has loaded); check_inputs: the
files and the teacher a config names, and the packages it needs, found before any model loads.
"""
import importlib.util
import os
import re

import torch

import cache
import flow
import lora
import model_wan as mw
import quant
import readers
import run_dir
import sparse_attn
from configurator import fail, hub_file


def check_config(c):
    """Errors for values we cannot honour, never a silent ignore -> the parsed dmd_denoising_steps."""
    steps = flow.parse_steps(c["dmd_denoising_steps"], "dmd_denoising_steps")
    if c["objective"] not in ("dmd", "ode_init"):
        raise ValueError(f"objective must be 'dmd' or 'ode_init', got {c['objective']!r}")
    check_causal(c)
    if c["objective"] == "ode_init":
        if not any(d.get("dataset_type") == "latents" for d in c["datasets"]):
            raise ValueError("objective='ode_init' reads teacher ODE trajectories: datasets=[dict(dataset_type="
                             "'latents', cache_dir=...)] with the folder of `python data.py CONFIG "
                             "--make_ode_pairs=prompts.txt`")
        for k in ("real_data_loss_weight", "ode_regression_weight"):
            if c[k] > 0:
                raise ValueError(f"{k} is a DMD term: set it to 0 with objective='ode_init'")
    elif c["ode_regression_weight"] > 0 and c["teacher_data_samples"] <= 0 and not any(
            d.get("dataset_type") == "latents" for d in c["datasets"]):
        raise ValueError("ode_regression_weight > 0 regresses on teacher ODE trajectories: teacher_data_samples > 0 "
                         "(made once from the training prompts), or datasets=[dict(dataset_type='latents', cache_dir=...)] "
                         "with the folder of `python data.py CONFIG --make_ode_pairs=prompts.txt`")
    if c["real_data_loss_weight"] < 0 or c["ode_regression_weight"] < 0:
        raise ValueError("real_data_loss_weight and ode_regression_weight are weights of added losses: >= 0")
    if c["rollout_mode"] not in ("backward", "data"):
        raise ValueError(f"rollout_mode must be 'backward' or 'data', got {c['rollout_mode']!r}")
    if c["teacher_data_samples"] > 0 and (c["datasets"] or max(c["real_data_loss_weight"], c["ode_regression_weight"]) <= 0):
        raise ValueError("teacher_data_samples > 0 makes the real-data and regression terms' data from the training "
                         "prompts: it needs real_data_loss_weight > 0 or ode_regression_weight > 0, and no `datasets`")
    videos = [d for d in c["datasets"] if d.get("dataset_type", "video") in ("video", "latents")]
    needs = c["real_data_loss_weight"] > 0 or c["rollout_mode"] == "data"
    if needs and not videos and c["teacher_data_samples"] <= 0:
        raise ValueError("real_data_loss_weight > 0 and rollout_mode='data' need latents: add a video or latents dataset "
                         "to `datasets`, or teacher_data_samples > 0 (the teacher's own samples of the prompts)")
    if videos and len(videos) != len(c["datasets"]) and needs:
        raise ValueError("real_data_loss_weight > 0 / rollout_mode='data' need latents in every batch: drop the "
                         "prompt-only datasets from `datasets`")
    if c["validation_guidance"] not in (None, 1.0):
        raise ValueError("validation_guidance must be 1.0: the student sampler takes no CFG")
    if c["validation_num_inference_steps"] not in (None, len(steps)):
        raise ValueError(f"validation_num_inference_steps={c['validation_num_inference_steps']} must equal the "
                         f"number of dmd_denoising_steps ({len(steps)}): validation runs the training rollout's sampler")
    schedulers = ("constant", "cosine", "cosine_with_min_lr")
    for k, allowed in (("lr_scheduler", schedulers), ("fake_score_lr_scheduler", schedulers), ("grad_clip_method", ("norm", "value")),
                       ("ema_validation", ("none", "ema_only", "comparison")), ("mixed_precision", ("bf16", "no")),
                       ("residual_dtype", ("fp32", "bf16")),
                       ("optimizer", ("adamw", "adamw_bf16")), ("report_to", ("none", "wandb"))):
        if c[k] not in allowed:
            raise ValueError(f"{k} must be one of {allowed}, got {c[k]!r}")
    if c["activation_offload"] and not c["gradient_checkpointing"]:
        raise ValueError("activation_offload keeps the checkpointed block inputs in host memory: it needs "
                         "gradient_checkpointing=True")
    for k in ("base_model_precision", "text_encoder_1_precision", "teacher_model_precision"):
        quant.parse_precision(c.get(k) or "no", k)
    if c["quantize_via"] not in ("accelerator", "cpu"):
        raise ValueError(f"quantize_via must be 'accelerator' or 'cpu', got {c['quantize_via']!r}")
    for k in ("checkpoint_step_interval", "validation_step_interval", "log_interval", "generator_update_interval",
              "ema_update_interval", "gradient_accumulation_steps", "train_batch_size", "checkpoints_total_limit"):
        if not isinstance(c[k], int) or c[k] < 1:   # 0 would be a modulo by zero deep in the loop
            raise ValueError(f"{k} must be a positive integer, got {c[k]!r}" + (" (a run validates at its end too: a "
                             "large interval validates only there)" if k == "validation_step_interval" else ""))
    for k, lo in (("sp_size", 1), ("max_train_steps", 0)):   # max_train_steps=0: export the initial student
        if not isinstance(c[k], int) or c[k] < lo:
            raise ValueError(f"{k} must be an integer >= {lo}, got {c[k]!r}")
    if (c["push_to_hub"] or c["push_checkpoints_to_hub"]) and not c["hub_model_id"]:
        raise ValueError("push_to_hub / push_checkpoints_to_hub need hub_model_id ('user/name' on the hub)")
    if not isinstance(c["validation_diversity_seeds"], int) or c["validation_diversity_seeds"] < 0 \
            or c["validation_teacher_steps"] < 1 or c["diversity_warn_ratio"] < 0:
        raise ValueError("validation_diversity_seeds >= 0 (0 or 1: no collapse signal), validation_teacher_steps >= 1 "
                         "and diversity_warn_ratio >= 0")
    if not 0 < c["real_score_guidance_max_timestep"] <= 1000:
        raise ValueError(f"real_score_guidance_max_timestep must be in (0, 1000], got {c['real_score_guidance_max_timestep']}")
    check_shapes(c)
    sparse_attn.check_sparse(c["attention_sparsity"], c["sparse_cube"])
    if not isinstance(c["sparsity_warmup_steps"], int) or c["sparsity_warmup_steps"] < 0:
        raise ValueError(f"sparsity_warmup_steps must be an integer >= 0, got {c['sparsity_warmup_steps']!r}")
    if not isinstance(c["sparse_remainder"], bool):
        raise ValueError(f"sparse_remainder must be True or False, got {c['sparse_remainder']!r}")
    if c["attention_sparsity"] and c["causal"]:
        raise ValueError("attention_sparsity > 0: sparse attention does not support the causal student (causal=True)")
    return steps


def check_shapes(c):
    """Sizes, the device and the LoRA targets: what would otherwise fail deep in a model, after it has loaded."""
    h, w = c["height"], c["width"]
    if not (isinstance(h, int) and isinstance(w, int)) or h < 16 or w < 16 or h % 16 or w % 16:
        raise ValueError(f"height and width must be multiples of 16, got {h}x{w}")
    if not isinstance(c["num_training_frames"], int) or c["num_training_frames"] < 1:
        raise ValueError(f"num_training_frames must be an integer >= 1 (latent frames; 21 = 81 video frames), got "
                         f"{c['num_training_frames']!r}")
    vw, _, vh = str(c["validation_resolution"]).lower().partition("x")
    if not (vw.isdigit() and vh.isdigit()) or int(vw) < 16 or int(vh) < 16 or int(vw) % 16 or int(vh) % 16:
        raise ValueError(f"validation_resolution must be WIDTHxHEIGHT, multiples of 16 (e.g. '832x480'), got "
                         f"{c['validation_resolution']!r}")
    vf = c["validation_num_video_frames"]
    if not isinstance(vf, int) or vf < 1 or (vf - 1) % 4:
        raise ValueError(f"validation_num_video_frames must be 4k+1 video frames (81, 49, 9, ...), got {vf!r}")
    dev = str(c["device"])
    if dev.startswith("cuda") and not torch.cuda.is_available() or dev.startswith("mps") and not (
            getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device={dev!r}: this torch ({torch.__version__}) sees no such device; device='auto' picks "
                         "what there is")
    targets = c["lora_targets"] if isinstance(c["lora_targets"], (list, tuple)) else (c["lora_targets"],)
    names = mw.linear_names()
    bad = [t for t in targets if not any(lora.matches(n, (re.sub(r"^blocks\.\d+\.", "", t),)) for n in names)]
    if c["lora_rank"] > 0 and bad:
        raise ValueError(f"lora_targets: {', '.join(map(repr, bad))} name no Linear of the Wan DiT: give names such "
                         "as self_attn.q, cross_attn.k, ffn.0 (original-layout names, a full name or its end)")


def preflight(c, prog):
    """check_config and check_inputs for an entry script: a mistake is one line (exit status 2), no traceback, before
    any model loads -> c."""
    try:
        check_config(c)
        check_inputs(c)
    except (ValueError, FileNotFoundError) as e:
        fail(prog, str(e))
    return c


def check_launch(sp_size, fsdp, environ=os.environ):
    """sp_size and fsdp against how the command was launched (torchrun sets RANK and WORLD_SIZE): a ValueError."""
    world = int(environ.get("WORLD_SIZE", "1"))
    if world == 1 and sp_size > 1:
        raise ValueError(f"sp_size={sp_size} needs several processes: torchrun --nproc_per_node=N train_dmd.py ... "
                         "(N a multiple of sp_size), or sp_size=1")
    if sp_size < 1 or world % sp_size:
        raise ValueError(f"sp_size={sp_size} must divide the number of processes ({world})")
    if fsdp and "RANK" not in environ:
        raise ValueError("fsdp=True needs torchrun (torchrun --nproc_per_node=N train_dmd.py ...), also for N = 1")


def check_inputs(c):
    """What the config names outside itself, before any model loads: the prompts file, the validation prompt
    library and the webhook file (present, UTF-8, not empty, JSON), the launch (sp_size, fsdp), a checkpoint named by
    resume_from_checkpoint or export_from, the teacher (a local folder, or a hub id this machine can read) and wandb
    when report_to asks for it. Each fault: one ValueError / FileNotFoundError naming the key and the fix."""
    check_launch(c["sp_size"], c["fsdp"])
    for key in ("resume_from_checkpoint", "export_from"):   # a named checkpoint is there (`latest`: found later)
        if c[key] not in ("", "latest"):
            run_dir.named_checkpoint(c["output_dir"], c[key], key)
    if c["report_to"] == "wandb" and importlib.util.find_spec("wandb") is None:
        raise ValueError("report_to='wandb' but wandb is not installed: pip install wandb (and wandb login), or "
                         "--report_to=none")
    if c["prompts_file"] and not c["datasets"]:
        try:
            readers.read_lines(hub_file(c["prompts_file"]))
        except FileNotFoundError as e:
            raise FileNotFoundError(f"prompts_file: {e}; give a file of one prompt per line (a path from the working "
                                    f"folder {os.getcwd()}, or hf://datasets/OWNER/NAME/file.txt)") from None
        except ValueError as e:
            raise ValueError(f"prompts_file: {e}") from None
    if c["validation_prompt_library"]:
        readers.read_json(c["validation_prompt_library"], "validation_prompt_library")
    if isinstance(c["webhook_config"], str) and c["webhook_config"] and not c["webhook_config"].lstrip().startswith("{"):
        readers.read_json(c["webhook_config"], "webhook_config")   # a file (inline JSON is read by publish.py)
    for key in ("pretrained_model_name_or_path", "teacher_model_name_or_path"):   # the student's base, a separate teacher
        if c.get(key):
            mw.check_source(c[key], key)
    if c["generator_init"] and not os.path.exists(c["generator_init"]):
        raise FileNotFoundError(f"generator_init={c['generator_init']!r}: no such file or folder (a train_dmd.py "
                                "output folder, or a student .safetensors)")
    cache.check_folders(c["datasets"])


def check_causal(c):
    """The causal keys: their bidirectional values unless causal=True; every block geometry error before any model
    is built (the quickstart's 121 frames -> 31 latent, docs/keys.md)."""
    Fr, L = c["num_training_frames"], c["dmd_loss_frames"] or c["num_training_frames"]
    if not c["causal"]:
        bidir = {"num_frame_per_block": c["num_frame_per_block"] in (0, None, Fr),
                 "independent_first_frame": not c["independent_first_frame"],
                 "same_step_across_blocks": bool(c["same_step_across_blocks"]), "context_noise": c["context_noise"] == 0,
                 "dmd_loss_frames": L == Fr}
        bad = [k for k, ok in bidir.items() if not ok]
        if bad:
            raise ValueError(f"{', '.join(f'{k}={c[k]!r}' for k in bad)}: these are keys of the causal (block-wise) "
                             "student: set causal=True, or keep num_frame_per_block=0 (one block), "
                             "independent_first_frame=False, same_step_across_blocks=True, context_noise=0, "
                             "dmd_loss_frames=0")
        return
    nb, first = c["num_frame_per_block"] or 0, int(bool(c["independent_first_frame"]))
    Fv = 1 + (c["validation_num_video_frames"] - 1) // 4
    for what, n in (("num_training_frames", Fr), ("validation_num_video_frames (latent frames)", Fv)):
        try:
            ok = n - first >= 1 and mw.block_starts(n, nb, first)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"{what}={n}: {n - first} latent frames" + (" after the lone first frame" if first else "")
                             + f" do not split into blocks of num_frame_per_block={nb}; e.g. 21 latent frames "
                             "(81 video frames) with 3, or 21 with independent_first_frame and 4 (121 video "
                             "frames are 31 latent: not a multiple of 3)")
    blocks = mw.block_starts(Fr, nb, first)
    if not 0 < L <= Fr or Fr - L not in blocks:
        raise ValueError(f"dmd_loss_frames={c['dmd_loss_frames']}: the loss keeps the last frames from a block start "
                         f"(block starts {blocks}); use 0 (all {Fr}) or one of {sorted(Fr - b for b in blocks)}")
    if not 0 <= c["context_noise"] < 1000:
        raise ValueError(f"context_noise={c['context_noise']}: a timestep in [0, 1000) (0 = clean context)")
    if c["sp_size"] > 1:
        raise ValueError("sp_size > 1: sequence parallelism does not support the causal student")
    if c["rollout_mode"] != "backward" and c["objective"] == "dmd":
        raise ValueError("rollout_mode='data' noises a whole dataset clip at once: the causal student needs "
                         "rollout_mode='backward'")
