"""Shared fixtures: tiny diffusers reference modules built offline (docs/wan21.md#testing-against-diffusers); the suite's own environment; run_script."""
import atexit
import os
import runpy
import shutil
import subprocess
import sys
import tempfile

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def own_environment():
    """The suite passes in a user's environment as it is: their hub and tracker settings are dropped (HF_HUB_OFFLINE=1,
    common on offline clusters, fails the hub tests; their HF_TOKEN, cached login or HF_ENDPOINT would be sent to the
    tests' fake hub; WANDB_* would change a run), and HF_HOME is a fresh folder. At conftest import, before any test
    imports huggingface_hub, which reads them once; the tests that need one set it themselves (monkeypatch)."""
    for k in list(os.environ):
        if k.startswith(("HF_", "HUGGING_FACE_", "WANDB_")) or k == "TRANSFORMERS_OFFLINE":
            del os.environ[k]
    os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="wan-dmd-tests-hf-")
    atexit.register(shutil.rmtree, os.environ["HF_HOME"], ignore_errors=True)
    if "huggingface_hub.constants" in sys.modules:   # imported already (a plugin): its import-time copy too
        sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = False


own_environment()

# head_dim 128 as in the real models, so the RoPE split is the real 44/42/42
TINY_D = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=32, freq_dim=256, ffn_dim=96, num_layers=2, cross_attn_norm=True,
              qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)


def randomize_(module, std=0.1, seed=0):
    """Random values for every parameter, including the zero/one-initialised ones, so that no path is hidden."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


@pytest.fixture
def ref_dit():
    """diffusers WanTransformer3DModel (tiny, fp32, random weights) in eval mode."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(0)
    return randomize_(WanTransformer3DModel(**TINY_D)).eval()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = "a red blue green circle square moving left right up down cat dog video of the".split()
    tok.train_from_iterator([" ".join(words)] * 4, trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture
def tiny_pipeline(ref_dit):
    """A whole diffusers WanPipeline with tiny random components (no downloads)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    te = UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                     relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")).eval()
    vae = AutoencoderKLWan(base_dim=16, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True]).eval()
    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=tiny_tokenizer(), text_encoder=te, transformer=ref_dit, vae=vae, scheduler=sched)


def run_offline_hub(code, cache, tmp_path):
    """Run `code` in a fresh interpreter with HF_HUB_OFFLINE=1 and the hub cache at `cache` -> its stdout."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "HF_HOME": str(tmp_path / "home")}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def run_script(script, argv, monkeypatch, capsys):
    """`python SCRIPT ARGV...` (a root script) in this process -> (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    code = 0
    try:
        runpy.run_path(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script),
                       run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    out, err = capsys.readouterr()
    return code, out, err
