"""
Ulysses sequence parallelism's collectives (model_wan.enable_sequence_parallel turns them on): P ranks of a group
hold the same sample; each runs 1/P of the tokens through the blocks and, inside self-attention only, 1/P of the
heads over all tokens. AllToAll moves between the two layouts (two per block), sp_split takes this rank's tokens,
Gather joins every rank's tokens of the output; each is differentiable.
"""
import torch


def _all_to_all(x, group):
    """x (P, ...) -> (P, ...): slice j goes to rank j; slice j of the result came from rank j."""
    x = x.contiguous()
    out = torch.empty_like(x)
    torch.distributed.all_to_all_single(out, x, group=group)
    return out

def _seq_to_heads(x, group):   # (S,B,L/P,N,d) -> (S,B,L,N/P,d)
    P = torch.distributed.get_world_size(group)
    S, B, Lp, N, d = x.shape
    y = _all_to_all(x.view(S, B, Lp, P, N // P, d).permute(3, 0, 1, 2, 4, 5), group)   # (P,S,B,L/P,N/P,d)
    return y.permute(1, 2, 0, 3, 4, 5).reshape(S, B, P * Lp, N // P, d)

def _heads_to_seq(x, group):   # (S,B,L,N/P,d) -> (S,B,L/P,N,d)
    P = torch.distributed.get_world_size(group)
    S, B, L, Np, d = x.shape
    y = _all_to_all(x.view(S, B, P, L // P, Np, d).permute(2, 0, 1, 3, 4, 5), group)   # (P,S,B,L/P,N/P,d)
    return y.permute(1, 2, 3, 0, 4, 5).reshape(S, B, L // P, P * Np, d)

class AllToAll(torch.autograd.Function):
    """_seq_to_heads (or _heads_to_seq when `back`) forward; the other one is its backward."""
    @staticmethod
    def forward(ctx, x, group, back):
        ctx.group, ctx.back = group, back
        return (_heads_to_seq if back else _seq_to_heads)(x, group)

    @staticmethod
    def backward(ctx, g):
        return (_seq_to_heads if ctx.back else _heads_to_seq)(g, ctx.group), None, None

def sp_split(x, group):
    """(B,L,...) -> this rank's contiguous L/P tokens (its gradient flows back into that slice only)."""
    P, r = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    return x.chunk(P, dim=1)[r]

class Gather(torch.autograd.Function):
    """(B,L/P,C) per rank -> (B,L,C) on every rank. Every rank of the group then computes the same loss, so
    the gradient of this rank's slice is its slice of the (identical) full gradient: no communication."""
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        P = torch.distributed.get_world_size(group)
        out = torch.empty((P * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        gather = getattr(torch.distributed, "all_gather_single", None) or torch.distributed.all_gather_into_tensor  # torch<2.13
        gather(out, x.contiguous(), group=group)
        return out.unflatten(0, (P, -1)).transpose(0, 1).flatten(1, 2)

    @staticmethod
    def backward(ctx, g):
        return sp_split(g, ctx.group), None
