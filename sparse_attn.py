"""
Trainable video sparse attention (VSA: Zhang et al. 2025, "VSA: Faster Video Diffusion with Trainable Sparse
Attention", arXiv 2505.13389; the method of FastVideo's `video_sparse_attn`), in plain PyTorch, no custom kernels.

The tokens of a (F, H, W) patch grid (model_wan's raster order f*H*W + h*W + w) are grouped into cubes of
cf x ch x cw tokens (VSA: 4 x 4 x 4 = 64), cubes in raster order, tokens in raster order inside a cube.
1. coarse: q, k and v are mean-pooled per cube; the query cubes attend over all key cubes (softmax, scale 1/sqrt(d))
   -> o_c, one vector per cube, given to each of its tokens;
2. selection: per (sample, head, query cube) the top-k key cubes by those coarse scores, k = ceil((1 - sparsity) C)
   clamped to [1, C] (C cubes; FastVideo's compute_topk). It is a hard choice: no gradient flows through it;
3. fine: each query cube's tokens attend only to the tokens of its k selected cubes -> o_f;
   With remainder=True (ours, not VSA's) the fine softmax also covers the unselected key cubes at coarse resolution:
   one pseudo-key per unselected cube c, its mean key and value with logit q.k_c/sqrt(d) + log n_c (n_c its real
   tokens): the mean-field estimate of the mass the dropped keys had (exact when a cube's keys are equal). C extra
   keys per query; with every cube selected there are none (dense attention as before);
4. o = o_f + gate * o_c, gate (B,L,N,d) a Linear of the attention input (FastVideo's to_gate_compress, no
   nonlinearity), zero-initialised: a fresh gate gives o = o_f, i.e. exactly dense attention when every cube is
   selected, and the coarse branch is learned from there.
Grids that the cube does not divide are zero-padded per axis up to a multiple of it (FastVideo pads the same way,
its variable_block_sizes): padded tokens are masked out as keys, left out of the cube means (divided by the cube's
real token count) and their query rows dropped.

Two interchangeable fine-stage kernels: "gather" (the selected cubes' k/v gathered per query cube, SDPA on the
gathered blocks; any device, the CPU path) and "flex" (FlexAttention with a BlockMask built from the selection,
torch.compile'd; CUDA, cubes of a multiple of 64 tokens). "auto" takes flex where it applies.
"""
import functools
import inspect
import math

import torch
import torch.nn.functional as F

DEFAULT_CUBE = (4, 4, 4)   # VSA's tile: latent frames x height x width tokens, after the 1x2x2 patchify
_compiled_flex = []        # torch.compile(flex_attention), built once on first use
# flex's forward tiles must divide the cube blocks: its defaults for head dim 128 take 128 query rows, so cubes of 64
# tokens get these; "fwd_" keeps them out of the backward, which picks its own tiles (torch 2.11 on sm90 has none for
# 64-token blocks at head dim 128: train with 128-token cubes there, e.g. sparse_cube=(4,4,8))
FLEX_KERNEL_OPTIONS = {"fwd_BLOCK_M": 64, "fwd_BLOCK_N": 64, "fwd_num_warps": 4, "fwd_num_stages": 3}
FLEX_COMPILE_MODE = None   # e.g. "max-autotune-no-cudagraphs": flex's tiles autotuned (slower first call)


def num_selected(sparsity, num_cubes):
    """Key cubes kept per query cube: ceil((1 - sparsity) * C) clamped to [1, C] (FastVideo's compute_topk)."""
    return max(1, min(math.ceil((1 - sparsity) * num_cubes), num_cubes))


def cube_counts(grid, cube):
    """(F,H,W) token grid, (cf,ch,cw) cube -> cubes per axis (nf, nh, nw)."""
    return tuple(-(-g // c) for g, c in zip(grid, cube))


def to_cubes(x, grid, cube):
    """(B,L,N,d) tokens in raster order -> (B,N,C,V,d): C cubes of V = cf*ch*cw tokens, zero-padded."""
    B, L, N, d = x.shape
    (Fg, Hg, Wg), (cf, ch, cw) = grid, cube
    nf, nh, nw = cube_counts(grid, cube)
    x = F.pad(x.reshape(B, Fg, Hg, Wg, N * d), (0, 0, 0, nw * cw - Wg, 0, nh * ch - Hg, 0, nf * cf - Fg))
    x = x.view(B, nf, cf, nh, ch, nw, cw, N, d).permute(0, 7, 1, 3, 5, 2, 4, 6, 8)   # (B,N,nf,nh,nw,cf,ch,cw,d)
    return x.reshape(B, N, nf * nh * nw, cf * ch * cw, d)


def from_cubes(y, grid, cube):
    """The inverse of to_cubes: (B,N,C,V,d) -> (B,L,N,d) in raster order, padded tokens dropped."""
    B, N, C, V, d = y.shape
    (Fg, Hg, Wg), (cf, ch, cw) = grid, cube
    nf, nh, nw = cube_counts(grid, cube)
    y = y.view(B, N, nf, nh, nw, cf, ch, cw, d).permute(0, 2, 5, 3, 6, 4, 7, 1, 8)    # (B,nf,cf,nh,ch,nw,cw,N,d)
    return y.reshape(B, nf * cf, nh * ch, nw * cw, N, d)[:, :Fg, :Hg, :Wg].reshape(B, Fg * Hg * Wg, N, d)


@functools.lru_cache(maxsize=16)
def real_tokens(grid, cube, device=None):
    """(C,V) bool: True where a cube slot holds a real token, False where it is padding (cached per geometry)."""
    ones = torch.ones(1, math.prod(grid), 1, 1, device=device)
    return to_cubes(ones, grid, cube)[0, 0, :, :, 0] > 0


def cube_means(valid, *xs):
    """Means over each cube's real tokens: xs (B,N,C,V,d), valid (C,V) -> one (B,N,C,d) each, summed in fp32+."""
    acc = torch.promote_types(xs[0].dtype, torch.float32)
    n = valid.sum(1).to(acc)[:, None]                                # (C,1) real tokens per cube
    return [(t.sum(3, dtype=acc) / n).to(t.dtype) for t in xs]


def coarse_attention(qc, kc, vc, valid):
    """Cube means (over real tokens) and attention between them. qc/kc/vc (B,N,C,V,d), valid (C,V) ->
    scores (B,N,C,C) (the selection's criterion) and o_c (B,N,C,d)."""
    acc = torch.promote_types(qc.dtype, torch.float32)               # softmax in at least fp32
    qm, km, vm = cube_means(valid, qc, kc, vc)                       # (B,N,C,d)
    scores = qm @ km.transpose(-1, -2) / math.sqrt(qc.shape[-1])     # (B,N,C,C)
    return scores, (scores.to(acc).softmax(-1).to(vm.dtype) @ vm)


def select_cubes(scores, sparsity):
    """(B,N,C,C) coarse scores -> (B,N,C,k) indices of the k highest-scoring key cubes per query cube."""
    return scores.detach().topk(num_selected(sparsity, scores.shape[-1]), dim=-1).indices


def remainder_keys(kc, vc, idx, valid):
    """The remainder's pseudo-keys: every cube's mean key and value (B,N,C,d) each, and per query cube its bias
    (B,N,C,C) in fp32+: log n_c for the unselected key cubes (the log-count weight of the cube's mean), -inf for the
    selected ones (their tokens are attended one by one). kc/vc (B,N,C,V,d), idx (B,N,C,k), valid (C,V)."""
    km, vm = cube_means(valid, kc, vc)
    acc = torch.promote_types(kc.dtype, torch.float32)
    log_n = valid.sum(1).to(acc).log().expand(*idx.shape[:3], -1)     # (B,N,C,C)
    return km, vm, log_n.scatter(-1, idx, float("-inf"))


def fine_gather(qc, kc, vc, idx, valid=None, rem=None, max_elements=2 ** 27):
    """Fine stage by gathering: each query cube's selected key/value cubes are copied into one block and SDPA runs
    on (query cube, its gathered keys) pairs, in chunks of query cubes so one chunk's copies stay under
    max_elements. qc/kc/vc (B,N,C,V,d), idx (B,N,C,k), valid (C,V) or None when no cube holds padding, rem
    remainder_keys(...) or None: its C pseudo-keys end each block, their bias in a float mask -> o_f (B,N,C,V,d)."""
    B, N, C, V, d = qc.shape
    k = idx.shape[-1]
    if rem is None:   # rows of whole cubes (V tokens) of the (B*N*C, V, d) views
        kf, vf = kc.reshape(B * N * C, V, d), vc.reshape(B * N * C, V, d)
        rows = idx + torch.arange(B * N, device=idx.device).view(B, N, 1, 1) * C
    else:             # rows of single tokens, then the cube means: one copy (a cat after the gather is a second)
        kf, vf = (torch.cat([t.reshape(B * N, C * V, d), mean.reshape(B * N, C, d)], 1).reshape(-1, d)
                  for t, mean in ((kc, rem[0]), (vc, rem[1])))
        rows = _remainder_rows(idx, V) + torch.arange(B * N, device=idx.device).view(B, N, 1, 1) * (C * V + C)
    m = k * V + (C if rem is not None else 0)                          # keys per query cube
    step = max(1, max_elements // (B * N * m * d))
    out = []
    for a in range(0, C, step):
        sel = rows[:, :, a:a + step]                                   # (B,N,c,k) cubes or (B,N,c,m) tokens
        c = sel.shape[2]
        kg, vg = kf[sel].view(B, N * c, m, d), vf[sel].view(B, N * c, m, d)
        mask = None   # else (B,N*c,1,k*V): the gathered slots that hold real tokens
        if valid is not None:
            mask = valid[idx[:, :, a:a + step]].view(B, N * c, 1, k * V)
        if rem is not None:
            mask = _remainder_mask(mask, rem[2][:, :, a:a + step].to(kg.dtype), k * V)
        o = F.scaled_dot_product_attention(qc[:, :, a:a + step].reshape(B, N * c, V, d), kg, vg, attn_mask=mask)
        out.append(o.view(B, N, c, V, d))
    return torch.cat(out, 2)


def _remainder_rows(idx, V):
    """Per query cube, the rows of one (sample, head)'s table [C*V tokens, C cube means] that its keys are: the V
    tokens of each selected cube, then all C means -> (B,N,C,k*V+C)."""
    B, N, C, k = idx.shape
    tokens = (idx[..., None] * V + torch.arange(V, device=idx.device)).flatten(-2)   # (B,N,C,k*V)
    return torch.cat([tokens, (C * V + torch.arange(C, device=idx.device)).expand(B, N, C, C)], -1)


def _remainder_mask(mask, bias, n_tok):
    """fine_gather's float mask for blocks of n_tok gathered tokens and then the C pseudo-keys: 0 / -inf on the
    tokens (real / padding; mask (B,N*c,1,n_tok), None: all real), then the remainder's bias (B,N,c,C) ->
    (B,N*c,1,n_tok+C)."""
    B, N, c, C = bias.shape
    tok = bias.new_zeros(B, N * c, 1, n_tok)
    if mask is not None:
        tok = tok.masked_fill(~mask, float("-inf"))
    return torch.cat([tok, bias.reshape(B, N * c, 1, C)], 3)


def selection_block_mask(idx, valid, V, exact=True, remainder=False):
    """FlexAttention BlockMask of cube-sized blocks (V tokens) from the selection idx (B,N,C,k): each query cube's
    selected key cubes, the complete ones as full blocks, those with padding (valid (C,V); None: none) as partial
    blocks whose mask_mod drops the padded keys. The compiled kernel visits only the listed blocks and evaluates
    mask_mod only inside partial ones, so there it needs the padding alone (exact=False: one 1-D load per key);
    eager flex applies mask_mod to every pair, so exact=True makes it the whole token mask. remainder: the keys go
    on after the C*V tokens with R = ceil(C/V) blocks of pseudo-keys (one per cube, then padding), a partial block
    of every query cube whose mask keeps the cubes that query cube did not select."""
    from torch.nn.attention.flex_attention import BlockMask
    B, N, C, k = idx.shape
    R = -(-C // V) if remainder else 0
    chosen = torch.zeros(B, N, C, C, dtype=torch.bool, device=idx.device).scatter_(-1, idx, True)
    tok = torch.ones(C * V, dtype=torch.bool, device=idx.device) if valid is None else valid.flatten()
    tok = F.pad(tok, (0, R * V))                                        # pseudo-key slots: no token

    def pseudo(b, h, q_idx, kv_idx):   # the pseudo-key of a cube that q's cube did not select
        j = kv_idx - C * V
        return (j >= 0) & (j < C) & ~chosen[b, h, q_idx // V, j.clamp(0, C - 1)]

    def exact_mask(b, h, q_idx, kv_idx):
        m = chosen[b, h, q_idx // V, (kv_idx // V).clamp(max=C - 1)] & tok[kv_idx]
        return m | pseudo(b, h, q_idx, kv_idx) if R else m

    def padding_mask(b, h, q_idx, kv_idx):
        return tok[kv_idx] | pseudo(b, h, q_idx, kv_idx) if R else tok[kv_idx]
    # each row of kv_indices lists all C cubes: the k chosen first (full or partial ones in front), then the rest
    order = torch.argsort(chosen.to(torch.int8), dim=-1, descending=True, stable=True)        # (B,N,C,C)
    first_k = torch.arange(C, device=idx.device) < k
    full = first_k.expand(B, N, C, C) if valid is None else valid.all(1)[order] & first_k   # chosen, complete
    part = ~full & first_k
    by = lambda front: order.gather(-1, torch.argsort((~front).to(torch.int8), dim=-1, stable=True)).to(torch.int32)
    rem = torch.arange(C, C + R, dtype=torch.int32, device=idx.device).expand(B, N, C, R)   # pseudo-key blocks
    # the query-side lists serve only the backward (compute_q_blocks: torch >= 2.6)
    skip_q = {"compute_q_blocks": False} if not torch.is_grad_enabled() and _HAS_COMPUTE_Q else {}
    return BlockMask.from_kv_blocks(part.sum(-1, dtype=torch.int32) + R, torch.cat([rem, by(part)], -1),
                                    full.sum(-1, dtype=torch.int32), torch.cat([by(full), rem], -1), BLOCK_SIZE=V,
                                    mask_mod=exact_mask if exact else padding_mask, **skip_q)


def _has_compute_q():
    try:
        from torch.nn.attention.flex_attention import BlockMask
        return "compute_q_blocks" in inspect.signature(BlockMask.from_kv_blocks).parameters
    except ImportError:
        return False


_HAS_COMPUTE_Q = _has_compute_q()


def fine_flex(qc, kc, vc, idx, valid=None, rem=None):
    """Fine stage with FlexAttention on selection_block_mask: compiled on CUDA, eager elsewhere (the exact mask,
    forward only on CPU). Same contract as fine_gather; the remainder's pseudo-keys are appended to k and v (padded
    to whole blocks) and a score_mod adds their log n_c (the selected cubes' ones are masked out)."""
    from torch.nn.attention.flex_attention import flex_attention
    B, N, C, V, d = qc.shape
    q, k, v = (t.reshape(B, N, C * V, d) for t in (qc, kc, vc))
    score_mod = None
    if rem is not None:
        R = -(-C // V)
        k, v = (torch.cat([t, F.pad(m, (0, 0, 0, R * V - C))], 2) for t, m in ((k, rem[0]), (v, rem[1])))
        n = torch.full((C,), V, device=q.device) if valid is None else valid.sum(1)
        log_n = F.pad(n.to(torch.promote_types(q.dtype, torch.float32)).log(), (C * V, R * V - C))   # 0: tokens, pad
        score_mod = lambda score, b, h, q_idx, kv_idx: score + log_n[kv_idx]
    if q.device.type != "cuda":
        bm = selection_block_mask(idx, valid, V, remainder=rem is not None)
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=bm).view(B, N, C, V, d)
    bm = selection_block_mask(idx, valid, V, exact=False, remainder=rem is not None)
    return _flex_cuda(q, k, v, bm, score_mod).view(B, N, C, V, d)


@torch.compiler.disable   # inside torch.compile'd blocks too, flex runs as its own compiled kernel
def _flex_cuda(q, k, v, bm, score_mod=None):
    from torch.nn.attention.flex_attention import flex_attention
    # torch's default backward tiles for head dim > 64 on sm90/sm100 (inductor's template heuristics) span 128
    # tokens: a 64-token block has no valid choice there, and the failure would surface deep in the backward
    sm = torch.cuda.get_device_capability(q.device)[0]
    if q.requires_grad and bm.BLOCK_SIZE[0] % 128 and q.shape[-1] > 64 and sm in (9, 10):
        raise ValueError(f"sparse attention: training with {bm.BLOCK_SIZE[0]}-token cubes on this GPU has no "
                         "FlexAttention backward kernel: use a sparse_cube of 128 tokens, e.g. (4, 4, 8) (sampling "
                         "takes either)")
    if not _compiled_flex:
        _compiled_flex.append(torch.compile(flex_attention, dynamic=False, mode=FLEX_COMPILE_MODE))
    options = FLEX_KERNEL_OPTIONS if bm.BLOCK_SIZE[0] % 128 else {}   # 128-token cubes fit flex's own tiles
    return _compiled_flex[0](q, k, v, score_mod=score_mod, block_mask=bm, kernel_options=options)


def pick_kernel(kernel, device, cube):
    """"auto" -> "flex" on CUDA for cubes of a multiple of 64 tokens (FlexAttention's block granularity), else
    "gather"; "flex"/"gather" as asked."""
    if kernel not in ("auto", "flex", "gather"):
        raise ValueError(f"sparse attention kernel must be 'auto', 'flex' or 'gather', got {kernel!r}")
    if kernel != "auto":
        return kernel
    return "flex" if torch.device(device).type == "cuda" and math.prod(cube) % 64 == 0 else "gather"


def check_sparse(sparsity, cube):
    """The settings' one-line errors (train_dmd and sample check them before any model is built)."""
    if not 0 <= sparsity < 1:
        raise ValueError(f"attention_sparsity must be in [0, 1) (the fraction of key cubes skipped), got {sparsity}")
    if len(cube) != 3 or any(int(c) != c or c < 1 for c in cube):
        raise ValueError(f"sparse_cube must be 3 positive integers (latent frames, height, width tokens), got {cube}")


def sparse_attention(q, k, v, gate, grid, sparsity, cube=DEFAULT_CUBE, remainder=False, kernel="auto"):
    """VSA. q/k/v/gate (B,L,N,d) with L = F*H*W tokens of `grid` in raster order -> (B,L,N,d) =
    o_f + gate * o_c (see the module docstring). sparsity 0 selects every cube (o_f is then dense attention).
    remainder: the unselected cubes' pseudo-keys join the fine softmax (the module docstring, step 3)."""
    if q.shape[1] != math.prod(grid):
        raise ValueError(f"sparse attention: {q.shape[1]} tokens, but the grid {tuple(grid)} has {math.prod(grid)}")
    valid = real_tokens(tuple(grid), tuple(cube), q.device)                # (C,V)
    padded = any(g % c for g, c in zip(grid, cube))                       # some cubes hold padding
    qc, kc, vc = (to_cubes(t, grid, cube) for t in (q, k, v))             # (B,N,C,V,d)
    scores, o_c = coarse_attention(qc, kc, vc, valid)                      # (B,N,C,C), (B,N,C,d)
    idx = select_cubes(scores, sparsity)                                   # (B,N,C,k)
    fine = fine_flex if pick_kernel(kernel, q.device, cube) == "flex" else fine_gather
    rem = remainder_keys(kc, vc, idx, valid) if remainder else None       # (B,N,C,d) x2, (B,N,C,C)
    o_f = fine(qc, kc, vc, idx, valid if padded else None, rem)            # (B,N,C,V,d)
    out = torch.addcmul(o_f, to_cubes(gate.to(o_f.dtype), grid, cube), o_c[:, :, :, None])   # o_f + gate * o_c
    return from_cubes(out, grid, cube)                                     # (B,L,N,d)
