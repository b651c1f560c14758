"""
Sample videos to mp4 from a Wan 2.1 teacher (flow UniPC or Euler, classifier-free guidance) or from a
few-step DMD student (flow.rollout, the training rollout exiting at its last step: predict x0, re-noise, no CFG).
The student's settings come from the config.json train_dmd.py writes beside it (steps, warp, causal blocks).

  python sample.py --prompt="a red fox running through snow"                          # teacher, 50 steps
  python sample.py --ckpt=out/wan_dmd_3step --prompt="a red fox running through snow"  # 3-step student
  python sample.py --model=/path/to/Wan2.1-T2V-1.3B --prompts_file=prompts.txt --num_frames=33
  python sample.py --ckpt=out/wan_causal_dmd --stream=True --num_frames=165  # causal student, streamed, rolled
  python sample.py --help

A causal student (its folder's config.json has "causal": true, written by train_dmd.py) is generated block by
block with the KV cache (flow.causal_rollout); --stream=True decodes and appends each block's frames to the mp4 as soon
as the block is done; num_frames beyond the training length rolls the cache window (num_training_frames latents).

Seeds follow diffusers' WanPipeline with a CPU generator: the same seed and settings give the same
initial noise, so teacher samples match diffusers' (tests/test_sample.py checks the latents).
"""
import json
import os
import re
import shlex
import sys
import time

import torch

import flow
import lora
from configurator import hub_file, pick_threads
import media
import model_wan as mw
import progress
import quant
import readers
import sparse_attn
import text_encoders
import vae_wan

# -----------------------------------------------------------------------------
# defaults; override with config files (python sample.py CONFIG.py) and --key=value
model = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"  # diffusers pipeline root or hub id, or an original-layout folder
ckpt = ""                    # student: adapter or full DiT .safetensors, a train_dmd.py output folder or its transformer/
prompt = "A cat walks on the grass, realistic style."  # the prompt when prompts_file is empty
prompts_file = ""            # one prompt per line (or hf://datasets/OWNER/NAME/file.txt); replaces `prompt`
negative_prompt = None       # None: Wan's default (Chinese) negative prompt; "": the empty prompt
height = 480                 # rounded down to a multiple of 16
width = 832                  # rounded down to a multiple of 16
num_frames = 81              # rounded to 4k+1
num_inference_steps = 50     # teacher steps
guidance_scale = 5.0         # teacher CFG scale, standard form: uncond + g*(cond - uncond); <= 1 disables CFG
flow_shift = None            # None: the layout's reference (diffusers: scheduler_config.json; original: 5.0)
sampler = "unipc"            # teacher sampler: "unipc" (the reference) or "euler"
denoising_steps = ""         # student timesteps, e.g. "1000,757,522"; given (or ckpt given) -> student mode
seed = 0                     # batch i uses seed + i
batch_size = 1               # prompts per DiT batch
out = "out/samples"          # folder for the mp4s (and latents)
save_latents = False         # also write the final normalised latents as safetensors
decode = True                # False: latents only (needs save_latents=True): no VAE decode, no mp4 (benchmark sweeps)
stream = False               # causal student: decode and write each block's frames as soon as it is generated
attention_sparsity = None    # student's VSA sparsity (fraction of key cubes skipped); None: as its config.json says
sparse_cube = None           # student's VSA cube in patch tokens (frames, h, w); None: as its config.json says
sparse_remainder = None      # student's VSA remainder (unselected cubes' means in the softmax); None: its config.json
base_model_precision = "no"  # DiT blocks stored in 8 bits: "int8" / "fp8" weight-only, "fp8-matmul" (as train_dmd's key)
text_encoder_1_precision = "no"  # UMT5 stored in 8 bits the same way
quantize_via = "accelerator" # where the weights are quantised as they load: "accelerator" (the device) or "cpu"
fps = 16                     # frame rate of the written mp4s (Wan 2.1: 16)
device = "auto"              # auto: cuda if available, else cpu
dtype = "auto"               # DiT and text-encoder dtype; auto: bfloat16 on cuda, float32 on cpu (the VAE stays fp32)
threads = 0                  # torch CPU threads; 0: OMP_NUM_THREADS, else the free cores (cores - load)
# With ckpt = a train_dmd output folder, its config.json sets model, height, width and num_frames (the teacher and
# the size it was trained at; a "tiny" teacher: the folder's tiny_teacher/) unless given on the command line; its
# steps, warp and causal blocks always apply.
# -----------------------------------------------------------------------------

STUDENT_STEPS = "1000,757,522"   # the 3-step schedule of FastWan and SimpleTuner's DMD quickstart, when the ckpt has no train_dmd config.json
TINY_TEACHER = "tiny_teacher"    # the folder beside a student of the "tiny" teacher where train_dmd.py writes that teacher
MERGED_FILE = "diffusion_pytorch_model.safetensors"   # the merged student's weights in a run's transformer/

# -----------------------------------------------------------------------------
# the student: its weights, its settings (train_dmd.py's config.json beside them) and its sampler

def student_file(path):
    """A student file, or a folder -> the file to load: a train_dmd output folder's student_ema.safetensors (EMA
    weights preferred), else its student.safetensors; a diffusers transformer/ folder (a run's merged student)'s
    diffusion_pytorch_model.safetensors."""
    if os.path.isdir(path):
        names = [n for n in ("student_ema.safetensors", "student.safetensors", MERGED_FILE)
                 if os.path.exists(os.path.join(path, n))]
        if not names:
            raise FileNotFoundError(f"{path}: no student_ema.safetensors or student.safetensors")
        path = os.path.join(path, names[0])
    if not os.path.isfile(path):
        raise FileNotFoundError(f"student checkpoint not found: {path!r}")
    return path


def run_folder(ckpt):
    """The folder whose config.json describes the student `ckpt`: its own folder (a run folder, or the folder of a
    .safetensors file), or, for a run's transformer/ (a diffusers model config.json beside the weights), the run."""
    folder = ckpt if os.path.isdir(ckpt) else os.path.dirname(os.path.abspath(ckpt))
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            model = "_class_name" in json.load(f)
    except (OSError, ValueError, TypeError):
        model = False
    return os.path.dirname(os.path.abspath(folder)) if model else folder


def train_command(run, *extra):
    """The train_dmd.py command of run folder `run` plus `extra` words -> one string: env.json's argv when
    train_dmd.py started the run, else its config.json; --output_dir always `run` (the run may have moved)."""
    try:
        argv = [str(w) for w in readers.read_json(os.path.join(run, "env.json"), "env.json").get("argv") or []]
    except (OSError, ValueError, AttributeError):
        argv = []
    words = []
    if argv and os.path.basename(argv[0]) == "train_dmd.py":
        for i, w in enumerate(argv[1:], 1):   # its own --output_dir and --export_from, either spelling, left out
            if not w.startswith(("--output_dir", "--export_from")) and argv[i - 1] not in ("--output_dir", "--export_from"):
                words.append(w)
    else:
        words = [os.path.join(run, "config.json")]
    return "python " + shlex.join(["train_dmd.py", *words, f"--output_dir={run}", *extra])


def ckpt_problem(ckpt, folder_ok=False):
    """What a --ckpt that exists cannot be, in one line naming what to give instead -> str, or None for a student:
    a train_dmd.py checkpoint (its folder or state.pt), a file that is not safetensors, a folder with no student
    (folder_ok: not checked)."""
    path = os.path.normpath(ckpt)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if os.path.exists(os.path.join(folder, "state.pt")) and (folder == path or path.endswith(".pt")):
        run, name = os.path.dirname(folder) or ".", os.path.basename(folder)
        spec = name if re.fullmatch(r"checkpoint-\d+", name) else folder
        return (f"--ckpt={ckpt}: a train_dmd.py checkpoint (training state, not a student): export its student with "
                f"`{train_command(run, '--export_from=' + spec)}`, then sample --ckpt={run}")
    try:
        readers.safetensors_keys(student_file(path))
    except FileNotFoundError:
        if folder_ok:
            return None
        if any(re.fullmatch(r"checkpoint-\d+", n) for n in os.listdir(path)):
            return (f"--ckpt={ckpt}: no exported student in it yet (student_ema.safetensors): export its newest "
                    f"checkpoint's with `{train_command(path, '--export_from=latest')}`")
        return (f"--ckpt={ckpt}: no student_ema.safetensors or student.safetensors in it: give a folder train_dmd.py "
                "exported a student into (e.g. out/tiny_dmd), or a student .safetensors")
    except ValueError as e:
        return (f"--ckpt={ckpt}: {str(e).split(': cannot read the weights: ')[-1]}: give a student .safetensors "
                "(a run's student_ema.safetensors) or a train_dmd.py output folder")
    return None


def load_student(dit, path, adapter="student", kind=None, sparse=None):
    """The one student loader (sample.py, train_dmd's generator_init, the quality bench). A LoRA adapter file
    (diffusers/PEFT keys or ours) becomes adapter `adapter` of `dit` (replacing one of that name) and is selected;
    a full-weights file (either layout) replaces the base weights of `dit`. kind: "adapter" or "full" to refuse the
    other before anything is touched. sparse: (attention_sparsity, sparse_cube, sparse_remainder), default
    student_sparsity(path): a sparse student (or one whose file holds VSA gates) gets sparse attention for its
    forwards -> "adapter" or "full"."""
    path = student_file(path)
    sd = readers.load_safetensors(path)
    found = "adapter" if any(".lora_A" in k for k in sd) else "full"
    if kind is not None and found != kind:
        raise ValueError(f"{path} holds {'a LoRA adapter' if found == 'adapter' else 'full weights'}, "
                         f"expected {'a LoRA adapter' if kind == 'adapter' else 'full weights'}")
    sparsity, cube, remainder = sparse or student_sparsity(path)
    if sparsity or any("gate_compress" in k for k in sd):   # the gates must exist before the weights are read
        mw.enable_sparse_attention(dit, sparsity, cube, adapter if found == "adapter" else None, remainder)
    if found == "adapter":
        if adapter in lora.adapter_names(dit):
            lora.delete_adapter(dit, adapter)
        try:
            mw.load_adapter(dit, adapter, sd)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        lora.set_adapter(dit, adapter)
        return found
    sd = {mw.diffusers_to_original_key(k.removeprefix("model.diffusion_model.")): v for k, v in sd.items()}
    own = dit.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"{path} does not fit the DiT: missing {missing[:10]}, unexpected {unexpected[:10]}, "
                         f"wrong shapes {bad[:10]}")
    with torch.no_grad():
        for k, v in sd.items():
            own[k].copy_(v)
    return found


def student_config(ckpt):
    """The train_dmd config.json beside a student (its output folder, or the folder of a .safetensors file) -> dict,
    or {} when there is none; a file that is not a JSON object is one ValueError naming it."""
    path = student_config_path(ckpt)
    if not os.path.exists(path):
        return {}
    try:
        cfg = readers.read_json(path, "the student's config.json")
    except ValueError as e:
        raise ValueError(f"{e}: train_dmd.py writes it beside the student; move the broken file aside to sample "
                         "without it (then give --model, --height, --width, --num_frames)") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"the student's config.json {path!r} holds a JSON {type(cfg).__name__}, not the object of "
                         "train_dmd.py keys it writes beside the student: move it aside to sample without it")
    return cfg


def student_config_path(ckpt):
    return os.path.join(run_folder(ckpt), "config.json")


def student_sparsity(ckpt, sparsity=None, cube=None, remainder=None):
    """The student's VSA settings: the given ones, else attention_sparsity / sparse_cube / sparse_remainder of its
    config.json, else dense (a config from before sparse_remainder: without it) -> (sparsity, cube, remainder)."""
    cfg = student_config(ckpt)
    sparsity = float(cfg.get("attention_sparsity", 0.0) if sparsity is None else sparsity)
    remainder = bool(cfg.get("sparse_remainder", False) if remainder is None else remainder)
    return sparsity, tuple(cfg.get("sparse_cube", sparse_attn.DEFAULT_CUBE) if cube is None else cube), remainder


def student_steps(ckpt):
    """The student's timesteps as trained: dmd_denoising_steps of its config.json, warped when warp_denoising_step
    was set (flow.rollout_steps); STUDENT_STEPS when the folder has no such config -> "t1,t2,..."."""
    cfg = student_config(ckpt)
    steps = cfg.get("dmd_denoising_steps", STUDENT_STEPS)
    steps = [float(t) for t in (steps if isinstance(steps, list) else str(steps).split(","))]
    return ",".join(map(str, flow.rollout_steps(steps, cfg.get("warp_denoising_step"), float(cfg.get("timestep_shift", 1.0)))))


def read_causal_config(ckpt):
    """The causal keys of a student folder's config.json (train_dmd.py writes them) -> dict, or None for a
    bidirectional student (no config.json, or "causal" false). window: latent frames of the KV cache
    (num_training_frames; more frames than that roll it); dmd_denoising_steps as trained (student_steps)."""
    cfg = student_config(ckpt)
    if not cfg.get("causal"):
        return None
    keys = ("num_frame_per_block", "independent_first_frame", "context_noise", "num_training_frames")
    missing = [k for k in keys if k not in cfg]
    if missing:
        raise ValueError(f"the config.json beside {ckpt} has \"causal\": true but lacks {missing}")
    return {"num_frame_per_block": int(cfg["num_frame_per_block"]),
            "independent_first_frame": bool(cfg["independent_first_frame"]),
            "context_noise": float(cfg["context_noise"]), "window": int(cfg["num_training_frames"]),
            "dmd_denoising_steps": student_steps(ckpt)}


def sample_student(dit, ctx, noise, steps, causal=None, generator=None, on_block=None, progress=None, velocity=None):
    """The student's samples: flow.rollout with every exit at the last step, velocity(x, t, ctx, **kw) the student
    (default: `dit` itself). causal: read_causal_config's dict -> block by block (flow.causal_rollout) with a fresh
    KV cache of `window` latent frames (None: all), on_block(start_frame, x0) as each block finishes.
    noise (B,C,F,h,w) fp32 -> x0 (B,C,F,h,w)."""
    velocity = dit if velocity is None else velocity
    if causal is None:
        return flow.rollout(lambda x, t: velocity(x, t, ctx), noise, steps, generator=generator, progress=progress)[0]
    B, _, Fn, h, w = noise.shape
    blocks = (causal["num_frame_per_block"], causal["independent_first_frame"])
    starts = mw.block_starts(Fn, *blocks)
    ph, pw = dit.cfg.patch_size[1:]
    cache = dit.new_kv_cache(B, causal.get("window") or Fn, (h // ph) * (w // pw), device=noise.device)

    def block(x, t, start):
        return velocity(x, t, ctx, causal=blocks, kv_cache=cache, start_frame=start)
    return flow.causal_rollout(block, noise, steps, [len(steps) - 1] * len(starts), starts, causal["context_noise"],
                               generator=generator, on_block=on_block, progress=progress)[0]

def student_defaults(ckpt, given=()):
    """The sample.py keys a student's config.json fixes: its teacher (a "tiny" one: the folder's tiny_teacher/, which
    train_dmd.py writes beside it), its training height x width and frames (num_training_frames latent -> 4(T-1)+1
    video frames) -> dict. given: the keys the command line sets; a config.json lacking one of the others, or a
    teacher that cannot be found from it, is one ValueError."""
    cfg, out = student_config(ckpt), {}
    path = student_config_path(ckpt)
    need = {"pretrained_model_name_or_path": "model", "height": "height", "width": "width",
            "num_training_frames": "num_frames"}
    lacking = [k for k, ours in need.items() if k not in cfg and ours not in given]
    if os.path.exists(path) and lacking:
        raise ValueError(f"the student's config.json {path!r} lacks {', '.join(lacking)} (train_dmd.py writes them): "
                         f"give {', '.join('--' + need[k] for k in lacking)} on the command line, or restore the "
                         "run's own config.json")
    teacher = str(cfg.get("pretrained_model_name_or_path", ""))
    tiny = os.path.join(run_folder(ckpt), TINY_TEACHER)
    if teacher == "tiny" and os.path.isdir(tiny):
        out["model"] = tiny
    elif (teacher == "tiny" or teacher.startswith("random:")) and "model" not in given:
        raise ValueError(f"{ckpt}: trained on the {teacher!r} teacher train_dmd.py builds from its seed, and the "
                         f"folder has no {TINY_TEACHER}/ beside it" + (
                             ": write it by exporting the run again with its config, e.g. python train_dmd.py "
                             f"config/tiny.py --output_dir={ckpt} --export_from=latest"
                             if teacher == "tiny" else " (random weights at real size: a memory and speed check, "
                             "nothing to sample): give --model=TEACHER to try the student on another base"))
    elif teacher and teacher != "tiny" and not teacher.startswith("random:"):
        out["model"] = teacher
    if "height" in cfg and "width" in cfg:
        out.update(height=int(cfg["height"]), width=int(cfg["width"]))
    if "num_training_frames" in cfg:
        out["num_frames"] = 4 * (int(cfg["num_training_frames"]) - 1) + 1
    return out

# -----------------------------------------------------------------------------
# python sample.py

def config(argv=None):
    """Defaults, config files and --key=value (sys.argv[1:] when None); with ckpt a student whose folder has a
    config.json, student_defaults replace the defaults first, so the command line still wins -> the config dict."""
    from configurator import configure, fail
    argv = sys.argv[1:] if argv is None else argv
    first = configure(dict(globals()), __file__, [a for a in argv if a != "--print_config"])
    ckpt = first["ckpt"]
    if ckpt and not os.path.exists(ckpt):
        fail("sample.py", f"--ckpt={ckpt!r}: no such file or folder (a train_dmd.py output folder such as "
                          "out/tiny_dmd, or a student .safetensors)")
    problem = ckpt_problem(ckpt, folder_ok=True) if ckpt else None   # a folder without a student: settings says so
    if problem:
        fail("sample.py", problem)
    try:
        fixed = student_defaults(ckpt, {k for k in first if first[k] != globals()[k]}) if ckpt else {}
    except ValueError as e:
        fail("sample.py", str(e))
    c = configure({**globals(), **fixed}, __file__, argv)
    used = {k: v for k, v in fixed.items() if c[k] == v}
    if used:
        print(f"{ckpt}: its config.json sets " + ", ".join(f"{k}={v}" for k, v in used.items()) + " (--key=value overrides)")
    return c


def settings(c):
    """Checks and resolves a sample.py config -> dict of what generate needs (sizes, prompts, steps or None for
    the teacher, the causal settings, device, dtype, the teacher folder, its layout and shift, the negative prompt)."""
    for key, what in (("batch_size", "prompts per DiT batch"), ("num_frames", "video frames"),
                      ("num_inference_steps", "teacher steps"), ("fps", "frames per second")):
        if c.get(key, 1) < 1:   # a caller may pass only the keys it sets (the bench, a test)
            raise ValueError(f"--{key}={c[key]}: {what}, at least 1: give a positive --{key} (default {globals()[key]})")
    dev = mw.pick_device(c["device"])
    s = dict(dev=dev, dtype=mw.pick_dtype(c["dtype"], dev), H=c["height"] // 16 * 16, W=c["width"] // 16 * 16,
             Fn=(max(c["num_frames"], 1) - 1) // 4 * 4 + 1, stream=bool(c.get("stream", False)))
    if (s["H"], s["W"], s["Fn"]) != (c["height"], c["width"], c["num_frames"]):
        print(f"notice: size {c['num_frames']}x{c['height']}x{c['width']} -> {s['Fn']}x{s['H']}x{s['W']} "
              "(frames 4k+1, sides multiples of 16)")
    if s["H"] < 16 or s["W"] < 16:
        raise ValueError(f"height and width must be at least 16, got {c['height']}x{c['width']}")
    if c["sampler"] not in ("unipc", "euler"):
        raise ValueError(f"sampler must be 'unipc' or 'euler', got {c['sampler']!r}")
    s["prompts"] = readers.read_lines(hub_file(c["prompts_file"])) if c["prompts_file"] else [c["prompt"]]
    causal = s["causal"] = read_causal_config(c["ckpt"]) if c["ckpt"] else None
    if causal is None and s["stream"]:
        raise ValueError("stream=True needs a causal student (ckpt folder whose config.json has \"causal\": true)")
    s["decode"] = bool(c.get("decode", True))
    if not s["decode"] and (not c["save_latents"] or s["stream"]):
        raise ValueError("decode=False writes latents only: it needs save_latents=True and stream=False")
    check_memory(s, min(c["batch_size"], len(s["prompts"])), dev)
    if causal is not None:
        T = 1 + (s["Fn"] - 1) // 4
        check_blocks(s["Fn"], causal["num_frame_per_block"], causal["independent_first_frame"])
        if T > causal["window"]:
            print(f"notice: {T} latent frames > the {causal['window']} trained: the KV cache window rolls")
    if not c["ckpt"] and (c.get("attention_sparsity") or c.get("sparse_cube") or c.get("sparse_remainder")):
        raise ValueError("attention_sparsity / sparse_cube / sparse_remainder are a student's settings: give its --ckpt")
    check_out(c["out"])
    problem = ckpt_problem(c["ckpt"]) if c["ckpt"] else None
    if problem:
        raise ValueError(problem)
    s["steps"] = None
    if c["ckpt"] or c["denoising_steps"]:   # the student, on the steps it was trained on unless given
        default_steps = student_steps(c["ckpt"]) if c["ckpt"] else STUDENT_STEPS
        s["steps"] = flow.parse_steps(c["denoising_steps"] or default_steps, "denoising_steps")
    try:
        s["src"], s["layout"] = flow.resolve_model_dir(c["model"])
    except FileNotFoundError:   # one line, not a traceback: what is missing and how to point at a local copy
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
        if c["model"] == "tiny" or c["model"].startswith("random:"):
            raise SystemExit(f"sample.py: --model={c['model']}: train_dmd.py builds that teacher from its seed; a tiny "
                             f"run writes it beside its student: --ckpt=OUTPUT_DIR (e.g. out/tiny_dmd) samples the "
                             f"student on it, --model=OUTPUT_DIR/{TINY_TEACHER} the teacher") from None
        raise SystemExit(f"sample.py: teacher {c['model']!r} is not a local folder and not in the hub cache" +
                         (" (HF_HUB_OFFLINE is set)" if offline else ", and the hub could not be reached") +
                         ": point --model at a local copy (a Wan 2.1 diffusers or original-layout folder), "
                         "e.g. --model=/data/Wan2.1-T2V-1.3B-Diffusers") from None
    s["shift"] = c["flow_shift"] if c["flow_shift"] is not None or s["steps"] is not None else \
        flow.reference_shift(s["src"], s["layout"])   # the teacher's; a student runs its own steps
    s["neg"] = text_encoders.negative_prompt(c["negative_prompt"])
    s["quant"] = quant.resolve(c.get("base_model_precision", "no"), dev)
    s["te_quant"] = quant.resolve(c.get("text_encoder_1_precision", "no"), dev, "text_encoder_1_precision")
    s["via"] = c.get("quantize_via", "accelerator")
    if s["via"] not in ("accelerator", "cpu"):
        raise ValueError(f"quantize_via must be 'accelerator' or 'cpu', got {s['via']!r}")
    try:   # last: made only once every other setting is good
        os.makedirs(c["out"], exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out={c['out']!r}: cannot be made ({e.strerror}): give a writable folder") from None
    return s


def check_out(out):
    """Refuse an --out that cannot be made, making nothing: its nearest existing folder must be a writable folder."""
    p = os.path.abspath(out)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    why = "not a folder" if not os.path.isdir(p) else "not writable" if not os.access(p, os.W_OK | os.X_OK) else ""
    if why:
        raise ValueError(f"--out={out!r}: cannot be made ({p} is {why}): give a writable folder")


def check_blocks(Fn, per_block, first_alone):
    """Refuse num_frames `Fn` whose latent frames do not split into the causal student's blocks, naming the nearest
    num_frames below and above that do."""
    T = 1 + (Fn - 1) // 4
    try:
        mw.block_starts(T, per_block, first_alone)
    except ValueError as e:
        if per_block < 1:
            raise ValueError(f"the causal student's config.json: {e}") from None
        off = 1 if first_alone else 0
        low = off + (T - off) // per_block * per_block
        fits = [4 * (t - 1) + 1 for t in (low, low + per_block) if t >= 1]
        raise ValueError(f"--num_frames={Fn} is {T} latent frames" + (", the first a block of its own and "
                         f"{T - 1} after it," if off else ",") + f" which do not split into the causal student's blocks "
                         f"of {per_block} (num_frame_per_block of its config.json): give --num_frames="
                         + " or ".join(map(str, fits))) from None


def check_memory(s, batch, dev):
    """Refuse a size that cannot fit before anything is allocated: at least the latents and (decode=True) the
    decoded fp32 video must fit in the device's memory (RAM on the CPU); the DiT and the VAE need more on top."""
    T, h, w = 1 + (s["Fn"] - 1) // 4, s["H"] // 8, s["W"] // 8
    need = batch * 4 * (16 * T * h * w + (3 * s["Fn"] * s["H"] * s["W"] if s["decode"] else 0))
    if dev.type == "cuda":
        have, where = torch.cuda.get_device_properties(dev).total_memory, f"{dev} memory"
    else:
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "this machine's RAM"
    if need > have:
        raise ValueError(f"size {s['Fn']}x{s['H']}x{s['W']} (frames x height x width): its " + (
            "decoded video alone" if s["decode"] else "latents alone") + f" takes {need / 2**30:,.0f} GiB, more than "
            f"{where} ({have / 2**30:,.0f} GiB): sample a smaller --height, --width or --num_frames")


def sampling_dit(c, s):
    """The DiT to sample with: the teacher, with the student's adapter, or holding the student's full weights;
    base_model_precision int8/fp8: its blocks stored in 8 bits as they are read (a full student: once its weights
    are in, layer by layer)."""
    full = bool(c["ckpt"]) and not any(".lora_A" in k for k in readers.safetensors_keys(student_file(c["ckpt"])))
    dit = mw.load_dit(s["src"], dtype=s["dtype"], device=s["dev"], quant="no" if full else s["quant"],
                      quantize_via=s["via"])
    if c["ckpt"]:
        sparse = student_sparsity(c["ckpt"], c.get("attention_sparsity"), c.get("sparse_cube"), c.get("sparse_remainder"))
        print(f"student: {load_student(dit, c['ckpt'], sparse=sparse)} weights from {c['ckpt']}"
              + (f", sparse attention {sparse[0]:g} in cubes of {sparse[1]}" if sparse[0] else "")
              + (" with the remainder" if sparse[0] and sparse[2] else ""))
    if full and s["quant"] != "no":
        lora.quantize_base(dit, s["quant"])
    return dit


def denoise(c, s, dit, ctx, neg_ctx, x, gen, bar, on_block=None):
    """One batch's latents: the student (sample_student) or the teacher (UniPC/Euler with CFG)."""
    if s["steps"] is not None:
        return sample_student(dit, ctx, x, s["steps"], s["causal"], gen, on_block, bar)
    velocity = flow.guided(dit, ctx, None if neg_ctx is None else neg_ctx.expand(x.shape[0], -1, -1), c["guidance_scale"])
    sigmas, timesteps = flow.flow_schedule(c["num_inference_steps"], s["shift"], s["layout"])
    sigmas = sigmas.to(s["dev"])
    return (flow.unipc_sample(velocity, x, sigmas, timesteps.to(s["dev"]), bar) if c["sampler"] == "unipc"
            else flow.euler_sample(velocity, x, sigmas, bar))


def generate(cfg, s=None):
    """Run sampling for a resolved config dict (s: its settings, when already checked) -> list of written mp4 paths
    (decode=False: the latents files)."""
    c = dict(cfg)
    s = settings(c) if s is None else s
    n, why = pick_threads(c.get("threads", 0))
    torch.set_num_threads(n)
    dev, dt, student, stream = s["dev"], s["dtype"], s["steps"] is not None, s["stream"]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()   # text encoding first, then free the encoder before the DiT comes in
    te = text_encoders.text_encoder(s["src"], dt, dev, quant=s["te_quant"], quantize_via=s["via"])
    prompts, bs = s["prompts"], c["batch_size"]
    ctxs = [te.encode(prompts[i:i + bs]).to(dev, dt) for i in range(0, len(prompts), bs)]
    neg_ctx = te.encode([s["neg"]]).to(dev, dt) if not student and c["guidance_scale"] > 1 else None
    del te
    sync()
    t_text = time.perf_counter() - t0
    dit = sampling_dit(c, s)
    vae = vae_wan.load_vae(s["src"], dtype=torch.float32, device=dev) if s["decode"] else None
    mode = (f"student {len(s['steps'])} steps {','.join(f'{t:g}' for t in s['steps'])}" if student else
            f"teacher {c['sampler']} {c['num_inference_steps']} steps, guidance {c['guidance_scale']}, shift {s['shift']}")
    print(f"{len(prompts)} prompt(s), {s['Fn']}x{s['H']}x{s['W']}, {mode}, {dev} {dt}")
    paths, latents, t_dit, t_vae, t_first = [], [], 0.0, 0.0, None
    os.makedirs(c["out"], exist_ok=True)
    for bi, ctx in enumerate(ctxs):   # per batch: the denoising bar, closed before the VAE decode's own bar
        bar = progress.bar(total=len(s["steps"]) if student else c["num_inference_steps"],
                   desc=f"denoising {bi + 1}/{len(ctxs)}" if len(ctxs) > 1 else "denoising")
        B = ctx.shape[0]
        x, gen = flow.initial_noise(B, s["Fn"], s["H"], s["W"], c["seed"] + bi, dev)
        t0 = time.perf_counter()
        stems = [os.path.join(c["out"], f"{bi * bs + j:03d}_{media.slug(prompts[bi * bs + j])}_seed{c['seed'] + bi}")
                 for j in range(B)]
        writers = [media.Mp4Writer(st + ".mp4", c["fps"]) for st in stems] if stream else None
        vae_cache = {}

        def on_block(start, x0):   # streaming: decode this block (continuing the VAE's causal cache), append
            nonlocal t_first
            video = vae.decode_stream(x0, vae_cache)
            for j, wr in enumerate(writers):
                wr.write(video[j])
            if t_first is None:
                sync()
                t_first = time.perf_counter() - t0
        with torch.no_grad():
            lat = denoise(c, s, dit, ctx, neg_ctx, x, gen, bar, on_block if stream else None)
            sync()
            bar.close()
            t_dit += time.perf_counter() - t0   # streaming: DiT and VAE together
            t0 = time.perf_counter()
            video = None
            if s["decode"] and not stream:
                with progress.bar(total=lat.shape[2], desc="VAE decode", unit="latent frame") as vbar:
                    video = vae.decode(lat.float(), progress=vbar)   # (B,3,F,H,W) in [-1,1]
            sync()
            t_vae += time.perf_counter() - t0
        for j, stem in enumerate(stems):
            if s["decode"]:
                paths.append(writers[j].close() if stream else media.write_mp4(stem + ".mp4", video[j], c["fps"]))
            if c["save_latents"]:
                readers.write_safetensors({"latents": lat[j:j + 1].float().cpu()}, stem + ".latents.safetensors")
                latents.append(stem + ".latents.safetensors")
    report(dev, stream, t_text, t_dit, t_vae, t_first, paths, latents, c["out"])
    return paths if s["decode"] else latents


def report(dev, stream, t_text, t_dit, t_vae, t_first, paths, latents, out):
    """The closing line: stage times, peak memory, how many files were written where (a sweep writes thousands)."""
    if dev.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    else:
        import resource
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"
    first = f" | first frames after {t_first:.2f}s" if t_first is not None else ""
    dit_vae = "DiT+VAE (streamed)" if stream else "DiT"
    files = [f"{len(paths)} mp4"] * bool(paths) + [f"{len(latents)} latents"] * bool(latents)
    print(f"done: text {t_text:.1f}s | {dit_vae} {t_dit:.1f}s | VAE decode {t_vae:.1f}s{first} | peak {peak} | "
          f"{' + '.join(files) or 'no files'} in {out}")


if __name__ == "__main__":
    cfg = config()
    try:   # every mistake of the command line and its files: one line before any model loads
        checked = settings(cfg)
    except (ValueError, FileNotFoundError) as e:
        from configurator import fail
        fail("sample.py", str(e))
    generate(cfg, checked)
