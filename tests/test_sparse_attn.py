"""Video sparse attention (sparse_attn.py, model_wan.enable_sparse_attention): every cube selected equals dense
attention (outputs and gradients, fp64, to 1e-12), the selection and the whole sparse output equal a naive
token-by-token reference, the flex kernel equals the gather kernel, the gate starts at zero (the model starts
dense), only the generator's forwards are sparse, and the settings travel with a student folder. The remainder
(sparse_remainder) equals a naive reference with dense logits (token mask + log-count-biased cube means), outputs and
gradients, and is dense attention when every cube is selected."""
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F

import checks
import lora
import model_wan as mw
import publish
import sample
import sparse_attn as sa

GRIDS = [((4, 8, 8), (4, 4, 4)), ((5, 6, 7), (4, 4, 4)), ((3, 6, 8), (2, 2, 2)), ((2, 3, 5), (1, 2, 3))]


def qkv(grid, B=2, N=3, d=16, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    L = math.prod(grid)
    return [torch.randn(B, L, N, d, generator=g, dtype=dtype) for _ in range(4)]


def dense(q, k, v, mask=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=mask).transpose(1, 2)


def naive_cubes(grid, cube):
    """Cube index of every token, from its (f, h, w) coordinates -> (L,) long, cubes numbered in raster order."""
    nf, nh, nw = sa.cube_counts(grid, cube)
    ids = [(f // cube[0] * nh + h // cube[1]) * nw + w // cube[2]
           for f, h, w in itertools.product(*(range(n) for n in grid))]
    return torch.tensor(ids), nf * nh * nw


def naive_sparse(q, k, v, gate, grid, cube, sparsity):
    """The method written token by token: cube means by membership, top-k per query cube, a dense token mask."""
    cid, C = naive_cubes(grid, cube)
    member = F.one_hot(cid, C).to(q.dtype)                             # (L,C)
    mean = lambda t: torch.einsum("blnd,lc->bncd", t, member) / member.sum(0)[:, None]   # (B,N,C,d)
    scores = mean(q) @ mean(k).transpose(-1, -2) / math.sqrt(q.shape[-1])
    o_c = scores.softmax(-1) @ mean(v)                                 # (B,N,C,d)
    kk = max(1, min(math.ceil((1 - sparsity) * C), C))
    top = scores.argsort(-1, descending=True)[..., :kk]                # (B,N,C,k)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)
    mask = chosen[:, :, cid][:, :, :, cid]                             # (B,N,L,L) query token x key token
    return dense(q, k, v, mask) + gate * o_c[:, :, cid].transpose(1, 2), top


def naive_remainder(q, k, v, gate, grid, cube, sparsity):
    """The remainder written from dense logits: each query token's softmax runs over the tokens of its cube's selected
    key cubes and one pseudo-key per unselected cube (mean key and value, logit + log of its token count)."""
    cid, C = naive_cubes(grid, cube)
    member = F.one_hot(cid, C).to(q.dtype)                             # (L,C)
    count = member.sum(0)                                              # (C,)
    mean = lambda t: torch.einsum("blnd,lc->bncd", t, member) / count[:, None]   # (B,N,C,d)
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))                # (B,N,L,d)
    scale = 1 / math.sqrt(q.shape[-1])
    scores = mean(q) @ mean(k).transpose(-1, -2) * scale
    o_c = scores.softmax(-1) @ mean(v)
    top = scores.argsort(-1, descending=True)[..., :max(1, min(math.ceil((1 - sparsity) * C), C))]
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True)[:, :, cid]   # (B,N,L,C)
    tok_logits = (qt @ kt.transpose(-1, -2) * scale).masked_fill(~chosen[..., cid], float("-inf"))   # (B,N,L,L)
    cube_logits = (qt @ mean(k).transpose(-1, -2) * scale + count.log()).masked_fill(chosen, float("-inf"))
    p = torch.cat([tok_logits, cube_logits], -1).softmax(-1)
    o_f = p[..., :len(cid)] @ vt + p[..., len(cid):] @ mean(v)
    return (o_f + gate.transpose(1, 2) * o_c[:, :, cid]).transpose(1, 2)


@pytest.mark.parametrize("grid,cube", GRIDS)
def test_cubes_round_trip_and_padding(grid, cube):
    q = qkv(grid)[0]
    qc = sa.to_cubes(q, grid, cube)
    assert torch.equal(sa.from_cubes(qc, grid, cube), q)
    cid, C = naive_cubes(grid, cube)
    valid = sa.real_tokens(grid, cube)
    assert valid.shape == (C, math.prod(cube)) and int(valid.sum()) == math.prod(grid)
    assert torch.equal(valid.sum(1), torch.bincount(cid, minlength=C))
    assert torch.equal(qc[:, :, ~valid], torch.zeros_like(qc[:, :, ~valid]))   # padding slots are zero


@pytest.mark.parametrize("grid,cube", GRIDS)
def test_every_cube_selected_equals_dense_attention(grid, cube):
    """Sparsity 0 on the sparse path with a zero gate: outputs and q/k/v gradients equal SDPA to 1e-12 (fp64)."""
    q, k, v, _ = (t.requires_grad_(True) for t in qkv(grid))
    gate = torch.zeros_like(q)
    w = torch.randn_like(q)
    out = sa.sparse_attention(q, k, v, gate, grid, 0.0, cube, kernel="gather")
    ref = dense(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():   # FlexAttention (eager on CPU, forward only there)
        torch.testing.assert_close(sa.sparse_attention(q, k, v, gate, grid, 0.0, cube, kernel="flex"), ref,
                                   rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,cube", GRIDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_selection_and_output_equal_naive_reference(grid, cube, sparsity):
    q, k, v, gate = qkv(grid, seed=1)
    ref, top = naive_sparse(q, k, v, gate, grid, cube, sparsity)
    valid = sa.real_tokens(grid, cube)
    scores, _ = sa.coarse_attention(*(sa.to_cubes(t, grid, cube) for t in (q, k, v)), valid)
    idx = sa.select_cubes(scores, sparsity)
    assert torch.equal(idx.sort(-1).values, top.sort(-1).values)       # the same cubes (random data: no ties)
    bm = sa.selection_block_mask(idx, valid, valid.shape[1])              # the blocks compiled flex visits
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    assert torch.equal(bm.to_dense().bool(), chosen)
    assert torch.equal(bm.full_kv_num_blocks, (chosen & valid.all(1)).sum(-1, dtype=torch.int32))
    for kernel in ("gather", "flex"):
        out = sa.sparse_attention(q, k, v, gate, grid, sparsity, cube, kernel=kernel)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12, msg=lambda m, kernel=kernel: f"{kernel}: {m}")


def test_gather_chunks_and_gradients_equal_naive():
    """The gather kernel in small chunks (max_elements) with padding: gradients equal the naive masked reference."""
    grid, cube = (5, 6, 7), (2, 3, 3)
    q, k, v, gate = (t.requires_grad_(True) for t in qkv(grid, seed=2))
    ref, _ = naive_sparse(q, k, v, gate, grid, cube, 0.7)
    valid = sa.real_tokens(grid, cube)
    qc, kc, vc = (sa.to_cubes(t, grid, cube) for t in (q, k, v))
    scores, o_c = sa.coarse_attention(qc, kc, vc, valid)
    o_f = sa.fine_gather(qc, kc, vc, sa.select_cubes(scores, 0.7), valid, max_elements=5000)
    out = sa.from_cubes(o_f, grid, cube) + gate * sa.from_cubes(o_c[:, :, :, None].expand_as(qc), grid, cube)
    w = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v, gate)),
                    torch.autograd.grad((ref * w).sum(), (q, k, v, gate))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("grid,cube", GRIDS)
@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_remainder_equals_naive_reference(grid, cube, sparsity):
    """sparse_remainder: both kernels equal the dense-logits reference (fp64, 1e-12), the gather kernel in small
    chunks too and with q/k/v/gate gradients; flex forward only (eager on CPU)."""
    q, k, v, gate = (t.requires_grad_(True) for t in qkv(grid, seed=4))
    ref = naive_remainder(q, k, v, gate, grid, cube, sparsity)
    assert (ref - naive_sparse(q, k, v, gate, grid, cube, sparsity)[0]).abs().max() > 1e-3   # it changes o_f
    w = torch.randn_like(ref)
    want = torch.autograd.grad((ref * w).sum(), (q, k, v, gate))
    for chunk in (2 ** 27, 3000):
        valid = sa.real_tokens(grid, cube)
        qc, kc, vc = (sa.to_cubes(t, grid, cube) for t in (q, k, v))
        scores, o_c = sa.coarse_attention(qc, kc, vc, valid)
        idx = sa.select_cubes(scores, sparsity)
        o_f = sa.fine_gather(qc, kc, vc, idx, valid, sa.remainder_keys(kc, vc, idx, valid), max_elements=chunk)
        out = sa.from_cubes(torch.addcmul(o_f, sa.to_cubes(gate, grid, cube), o_c[:, :, :, None]), grid, cube)
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
        for a, b in zip(torch.autograd.grad((out * w).sum(), (q, k, v, gate)), want):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():
        for kernel in ("gather", "flex"):
            out = sa.sparse_attention(q, k, v, gate, grid, sparsity, cube, remainder=True, kernel=kernel)
            torch.testing.assert_close(out, ref, rtol=0, atol=1e-12, msg=lambda m, kernel=kernel: f"{kernel}: {m}")


@pytest.mark.parametrize("grid,cube", GRIDS[1:3])
def test_remainder_with_every_cube_selected_is_dense(grid, cube):
    """No unselected cube, no pseudo-key: sparsity 0 with the remainder and a zero gate is dense attention, outputs
    and gradients (gather), forward (flex)."""
    q, k, v, _ = (t.requires_grad_(True) for t in qkv(grid, seed=5))
    gate = torch.zeros_like(q)
    out, ref = sa.sparse_attention(q, k, v, gate, grid, 0.0, cube, remainder=True, kernel="gather"), dense(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(ref.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with torch.no_grad():
        out = sa.sparse_attention(q, k, v, gate, grid, 0.0, cube, remainder=True, kernel="flex")
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_remainder_block_mask_lists_the_pseudo_key_blocks():
    """flex's mask with the remainder: every query cube lists its selected cubes and all ceil(C/V) pseudo-key
    blocks, and the token-level mask keeps exactly the unselected cubes' pseudo-keys."""
    grid, cube = (3, 6, 8), (1, 2, 2)                                  # 36 cubes of 4 tokens: 9 pseudo-key blocks
    q, k, v, _ = qkv(grid, B=1, N=2, seed=6)
    valid = sa.real_tokens(grid, cube)
    scores, _ = sa.coarse_attention(*(sa.to_cubes(t, grid, cube) for t in (q, k, v)), valid)
    idx = sa.select_cubes(scores, 0.8)
    C, V = valid.shape
    bm = sa.selection_block_mask(idx, None, V, remainder=True)
    chosen = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, True)
    assert bm.seq_lengths == (C * V, (C + 9) * V)
    assert torch.equal(bm.to_dense().bool(), torch.cat([chosen, torch.ones(1, 2, C, 9, dtype=torch.bool)], -1))
    b, h, qi, kv = torch.meshgrid(*(torch.arange(n) for n in (1, 2, C * V, (C + 9) * V)), indexing="ij")
    pseudo = bm.mask_mod(b, h, qi, kv)[..., C * V:]                      # (1,2,C*V,9*V)
    assert torch.equal(pseudo[..., :C], ~chosen.repeat_interleave(V, 2)) and not pseudo[..., C:].any()


def test_num_selected_and_bad_settings():
    assert [sa.num_selected(s, 624) for s in (0, 0.5, 0.8, 0.9, 0.999)] == [624, 312, 125, 63, 1]
    for s, cube in ((1.0, (4, 4, 4)), (-0.1, (4, 4, 4)), (0.5, (4, 4)), (0.5, (0, 4, 4))):
        with pytest.raises(ValueError, match="attention_sparsity|sparse_cube"):
            sa.check_sparse(s, cube)


def tiny_model():
    torch.manual_seed(0)
    m = mw.WanDiT(mw.PRESETS["tiny"]).double()
    x = torch.randn(2, 16, 4, 8, 12, dtype=torch.float64)
    return m, (x, torch.tensor([500.0, 120.0], dtype=torch.float64), torch.randn(2, 7, 32, dtype=torch.float64))


def test_gate_starts_at_zero_and_only_the_generator_is_sparse():
    """LoRA: the gates are zero, frozen, LoRA targets of the generator only (in its trainable set and adapter file);
    the teacher (no adapter) and the critic stay dense; the generator at sparsity 0 equals the dense model, and with
    gradient checkpointing its gradients equal those without."""
    m, inp = tiny_model()
    ref = m(*inp)
    m.requires_grad_(False)
    lora.add_adapter(m, "critic", rank=4, dtype=torch.float64)
    mw.enable_sparse_attention(m, 0.8, (2, 2, 2), adapter="generator")
    lora.add_adapter(m, "generator", rank=4, targets=(*lora.DEFAULT_LORA_TARGETS, "self_attn.gate_compress"),
                     dtype=torch.float64)
    gates = [b.self_attn.gate_compress for b in m.blocks]
    assert all(not g.weight.any() and not g.bias.any() and not g.weight.requires_grad for g in gates)
    named = lora.named_trainable(m, "generator")
    assert sum("gate_compress.lora_" in n for n in named) == 2 * len(m.blocks)
    assert not any("gate_compress" in n for n in lora.named_trainable(m, "critic"))
    assert sum("to_gate_compress.lora_" in k for k in mw.adapter_state_dict(m, "generator")) == 2 * len(m.blocks)
    for name in (None, "critic"):
        with lora.use_adapter(m, name):
            torch.testing.assert_close(m(*inp), ref, rtol=0, atol=1e-12)
    with lora.use_adapter(m, "generator"):
        assert (m(*inp) - ref).abs().max() > 1e-3                      # sparse at 0.8
        mw.enable_sparse_attention(m, 0.0, (2, 2, 2), adapter="generator")
        torch.testing.assert_close(m(*inp), ref, rtol=0, atol=1e-12)  # every cube, zero gate: dense
        mw.enable_sparse_attention(m, 0.0, (2, 2, 2), adapter="generator", remainder=True)
        torch.testing.assert_close(m(*inp), ref, rtol=0, atol=1e-12)  # with the remainder too (no pseudo-key)
        mw.enable_sparse_attention(m, 0.8, (2, 2, 2), adapter="generator", remainder=True)
        assert all(not g.weight.any() for g in gates) and (m(*inp) - ref).abs().max() > 1e-3   # gates kept at zero
        mw.enable_sparse_attention(m, 0.5, (2, 2, 2), adapter="generator")
        with torch.no_grad():   # a non-zero gate LoRA so that the coarse branch takes part
            for g in gates:
                g.lora_B["generator"].normal_(0, 0.1)
        grads = []
        for ckpt in (False, True):
            m.gradient_checkpointing = ckpt
            for p in named.values():
                p.requires_grad_(True).grad = None
            m(*inp).square().mean().backward()
            grads.append([p.grad.clone() for p in named.values()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_full_copy_gates_train_and_dense_again():
    m, inp = tiny_model()
    ref = m(*inp)
    mw.enable_sparse_attention(m, 0.5, (1, 2, 2))
    assert all(b.self_attn.gate_compress.weight.requires_grad for b in m.blocks)
    m(*inp).sum().backward()
    assert all(b.self_attn.gate_compress.weight.grad.abs().sum() > 0 for b in m.blocks)
    assert "blocks.0.attn1.to_gate_compress.weight" in mw.to_diffusers_state_dict(m)
    mw.enable_sparse_attention(m, None)
    assert not any("gate" in k for k in m.state_dict())
    torch.testing.assert_close(m(*inp), ref, rtol=0, atol=0)
    with pytest.raises(ValueError, match="causal"):
        mw.enable_sparse_attention(m, 0.5, (1, 2, 2))(*inp[:2], inp[2], causal=(2, False))


@pytest.mark.parametrize("lora_mode", [True, False])
def test_sparse_student_round_trip_through_its_folder(tmp_path, lora_mode):
    """train_dmd's config.json (attention_sparsity, sparse_cube, sparse_remainder) and publish.export's file -> sample's
    load_student on a fresh teacher: the same sparse student, outputs equal."""
    m, inp = tiny_model()
    base = mw.WanDiT(mw.PRESETS["tiny"]).double()
    base.load_state_dict(m.state_dict())
    c = {"output_dir": str(tmp_path), "attention_sparsity": 0.5, "sparse_cube": [1, 2, 2]}
    if lora_mode:   # with the remainder; the full copy's config has no sparse_remainder (a run from before it)
        c["sparse_remainder"] = True
        mw.enable_sparse_attention(m, 0.5, (1, 2, 2), adapter="generator", remainder=True)
        lora.add_adapter(m, "generator", rank=4, targets=(*lora.DEFAULT_LORA_TARGETS, "self_attn.gate_compress"),
                         dtype=torch.float64)
    else:
        mw.enable_sparse_attention(m, 0.5, (1, 2, 2))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n or "gate_compress" in n and not lora_mode:   # LoRA: the base gate stays frozen at 0
                p.normal_(0, 0.05)
    adapter = "generator" if lora_mode else None
    with lora.use_adapter(m, adapter):
        want = m(*inp)
    publish.export(c, m, adapter, None, 0)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(c, f)
    assert sample.student_sparsity(str(tmp_path)) == (0.5, (1, 2, 2), lora_mode)
    assert sample.load_student(base, str(tmp_path)) == ("adapter" if lora_mode else "full")
    assert base.blocks[0].self_attn.sparse == ("student" if lora_mode else None, 0.5, (1, 2, 2), lora_mode)
    torch.testing.assert_close(base(*inp), want, rtol=0, atol=1e-6)   # the file holds fp32 for LoRA B*scale


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grid", [(4, 8, 8), (5, 6, 7)])
@pytest.mark.parametrize("remainder", [False, True])
def test_cuda_compiled_flex_equals_gather_with_gradients(grid, remainder):
    """The compiled FlexAttention kernel (block-sparse for real) equals the gather kernel in fp32 at sparsity 0.7,
    outputs and q/k/v/gate gradients; with padding too, and with the remainder's pseudo-key blocks."""
    q, k, v, gate = (t.cuda().float().requires_grad_(True) for t in qkv(grid, B=1, N=4, d=64, seed=3))
    outs = []
    for kernel in ("gather", "flex"):
        o = sa.sparse_attention(q, k, v, gate, grid, 0.7, (4, 4, 4), remainder=remainder, kernel=kernel)
        outs.append((o, *torch.autograd.grad(o.square().sum(), (q, k, v, gate))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_train_config_errors():
    import train_dmd
    with pytest.raises(ValueError, match="attention_sparsity"):
        checks.check_config(dict(train_dmd.DEFAULTS, attention_sparsity=1.0))
    with pytest.raises(ValueError, match="causal"):
        checks.check_config(dict(train_dmd.DEFAULTS, attention_sparsity=0.5, causal=True))
    with pytest.raises(ValueError, match="sparsity_warmup_steps"):
        checks.check_config(dict(train_dmd.DEFAULTS, sparsity_warmup_steps=-1))
    with pytest.raises(ValueError, match="sparse_remainder"):
        checks.check_config(dict(train_dmd.DEFAULTS, sparse_remainder="yes"))


def test_sparsity_warmup_stages(tmp_path):
    """sparsity_warmup_steps: 10 equal stages from 0 to attention_sparsity (dmd.sparsity), the last one from the
    warm-up's end on; a tiny run ends at the target with the stage set on the generator's attention only."""
    import os
    import dmd
    import train_dmd
    c = dict(attention_sparsity=0.8, sparsity_warmup_steps=20)
    stages = [dmd.sparsity(c, s) for s in range(25)]
    assert stages[:2] == [0.0, 0.0] and stages[2] == pytest.approx(0.08) and stages[19] == pytest.approx(0.72)
    assert stages[20:] == [0.8] * 5 and sorted(stages) == stages
    assert dmd.sparsity(dict(c, sparsity_warmup_steps=0), 0) == 0.8
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = train_dmd.config([os.path.join(root, "config", "tiny.py"), f"--output_dir={tmp_path}", "--max_train_steps=3",
                          "--attention_sparsity=0.5", "--sparse_cube=(1,2,2)", "--sparsity_warmup_steps=2",
                          "--validation_step_interval=100"])
    base = train_dmd.train(c)["base"]
    assert {b.self_attn.sparse for b in base.blocks} == {("generator", 0.5, (1, 2, 2), True)}   # remainder: default


@pytest.mark.slow
def test_train_dmd_sparse_student_round_trip(tmp_path):
    """config/tiny.py with VSA for 2 steps: the gates' LoRA is in the generator's trainable set (and the critic has
    none); the exported folder, loaded by sample.load_student on the bare teacher, gives the trained generator."""
    import copy
    import os
    import train_dmd
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = train_dmd.config([os.path.join(root, "config", "tiny.py"), f"--output_dir={tmp_path}", "--max_train_steps=2",
                          "--attention_sparsity=0.5", "--sparse_cube=(1,2,2)", "--validation_step_interval=2",
                          "--checkpoint_step_interval=2"])
    res = train_dmd.train(c)
    base = res["base"]
    assert sum("gate_compress.lora_" in n for n in lora.named_trainable(base, "generator")) == 2 * len(base.blocks)
    assert not any("gate_compress" in n for n in lora.named_trainable(base, "critic"))
    torch.manual_seed(1)
    inp = (torch.randn(1, 16, 3, 8, 8), torch.tensor([700.0]), torch.randn(1, 7, base.cfg.text_dim))
    with torch.no_grad(), lora.use_adapter(base, "generator"):
        want = base(*inp)
    fresh = mw.enable_sparse_attention(copy.deepcopy(base), None)
    lora.delete_adapter(fresh, "generator")
    assert sample.load_student(fresh, str(tmp_path)) == "adapter"
    with torch.no_grad():
        torch.testing.assert_close(fresh(*inp), want, rtol=0, atol=1e-5)
