"""
The causal (block-wise autoregressive) student's pieces (docs/method.md#the-causal-student): blocks of latent frames, their
block-causal attention mask and the KV cache of earlier frames' self-attention k/v. model_wan.WanDiT.forward
(causal=, kv_cache=) uses them; model_wan re-exports them (mw.block_starts, mw.KVCache).
"""
import torch


def block_starts(num_frames, num_frame_per_block, independent_first_frame):
    """Latent-frame index where each block starts: (21, 3, False) -> [0, 3, ..., 18]; (21, 4, True) ->
    [0, 1, 5, 9, 13, 17] (the first frame is a block of its own). num_frame_per_block 0 = one block of all
    (remaining) frames."""
    off = 1 if independent_first_frame and num_frames > 0 else 0
    n = num_frames - off
    nb = num_frame_per_block or max(n, 1)
    if num_frame_per_block < 0 or n % nb:
        raise ValueError(f"{num_frames} latent frames" + (" (after the lone first frame: "
                         f"{n})" if off else "") + f" do not split into blocks of num_frame_per_block="
                         f"{num_frame_per_block}")
    return [0] * off + list(range(off, num_frames, nb)) if n else [0]

def block_causal_mask(num_frames, tokens_per_frame, num_frame_per_block, independent_first_frame, device=None):
    """(L, L) bool, L = num_frames*tokens_per_frame: True where the query token may attend the key token,
    i.e. the key's block is the query's block or an earlier one."""
    starts = torch.tensor(block_starts(num_frames, num_frame_per_block, independent_first_frame), device=device)
    blk = torch.searchsorted(starts, torch.arange(num_frames, device=device), right=True) - 1   # block of each frame
    blk = blk.repeat_interleave(tokens_per_frame)
    return blk[None, :] <= blk[:, None]

class KVCache:
    """Self-attention k/v (after RoPE, detached) of already processed latent frames, for every layer:
    k[i], v[i] of shape (B, max_frames*tokens_per_frame, N, d). Absolute frames [start, end) are held, frame
    `start` in slot 0. Writing a block of f frames at frame s (WanDiT.forward with kv_cache) keeps frames
    [start, s), drops any from s on, and, when s+f would overflow the window, rolls it: the oldest frames are
    dropped and the rest shifted to the front (no attention sink). RoPE positions stay absolute: the
    rolled entries carry their own rotation."""

    def __init__(self, num_layers, batch, max_frames, tokens_per_frame, num_heads, head_dim, device=None,
                 dtype=torch.float32):
        shape = (batch, max_frames * tokens_per_frame, num_heads, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
        self.batch, self.max_frames, self.tokens_per_frame, self.dtype = batch, max_frames, tokens_per_frame, dtype
        self.version = 0   # bumped when held entries move or may change under an earlier forward (roll, reset, rewind)
        self.reset()

    def reset(self):
        self.start = self.end = 0
        self.version += 1

    def write_slots(self, s, f):
        """Make room for frames [s, s+f) (rolling the window if needed) -> their token slots (a, b)."""
        if f > self.max_frames:
            raise ValueError(f"a block of {f} frames does not fit a KV cache of {self.max_frames} frames")
        if not self.start <= s <= self.end:
            raise ValueError(f"start_frame={s} does not continue the KV cache, which holds frames [{self.start}, "
                             f"{self.end}): write blocks in order (reset() for a new clip)")
        new_start = max(self.start, s + f - self.max_frames)
        if new_start > self.start:   # roll: keep frames [new_start, s) and move them to the front
            n, a = (s - new_start) * self.tokens_per_frame, (new_start - self.start) * self.tokens_per_frame
            for buf in self.k + self.v:
                buf[:, :n] = buf[:, a:a + n].clone()
        if new_start > self.start or s + f < self.end:   # moved, or rewound before the last block
            self.version += 1
        self.start, self.end = new_start, s + f
        a = (s - self.start) * self.tokens_per_frame
        return {"a": a, "b": a + f * self.tokens_per_frame, "version": self.version, "written": set()}

    def update(self, i, slots, k, v):
        """Self-attention of layer i in a forward whose block has token `slots` (write_slots): store k/v (detached)
        there the first time; a gradient-checkpoint recompute in backward finds them written and stores nothing.
        -> k, v to attend: the cached earlier frames, then this block's own (the gradient reaches only these)."""
        a, b = slots["a"], slots["b"]
        kb, vb = self.k[i], self.v[i]
        if i not in slots["written"]:
            kb[:, a:b], vb[:, a:b] = k.detach(), v.detach()
            slots["written"].add(i)
        elif self.version != slots["version"]:
            raise RuntimeError("the KV cache rolled, was reset or rewound between a checkpointed forward with grad and "
                               "its backward: give the cache room for the whole rollout, or backward first")
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return torch.cat([kb[:, :a], k], 1), torch.cat([vb[:, :a], v], 1)
        return kb[:, :b], vb[:, :b]                                             # views: no copy
