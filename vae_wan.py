"""
The Wan 2.1 causal 3-D VAE (docs/wan21.md#the-vae) in plain PyTorch, and its loaders (diffusers vae/ folder, original
Wan2.1_VAE.pth, hub id). Run by the data cache (encode), sampling and validation (decode).
"""
import json
import os
import re
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_wan import resolve_hub
from readers import load_safetensors, read_json, write_safetensors

# VAE: the Wan 2.1 causal 3-D VAE (docs/wan21.md#the-vae)
#
# Parameter layout: diffusers' AutoencoderKLWan (encoder.conv_in, encoder.down_blocks.N, quant_conv,
# post_quant_conv, decoder.up_blocks.N.resnets.M, ...), so a diffusers vae/ folder loads as it is;
# the original Wan2.1_VAE.pth keys are renamed on load (vae_key_from_original, docs/wan21.md#weight-key-maps).
#
# The causal cache (docs/wan21.md#the-vae). A clip is encoded in chunks of 1, 4, 4, ... frames and decoded one latent
# frame at a time. Every conv with a time kernel sees, in place of its front zero padding, the last
# CACHE_T frames of its own INPUT from the previous chunk, so the chunks add up to one causal pass.
# The time down/upsampling exists only in this chunked path. The cache is a plain dict made fresh by
# each encode/decode (and dropped when it returns), passed down through every forward, that maps a
# module to its state; nothing is stored on the modules:
#   CausalConv3d with time padding: its last <= CACHE_T input frames, cloned so that the chunk's
#                                   activations are freed after the chunk
#   Resample "downsample3d":        the last frame after its spatial conv
#   Resample "upsample3d":          True once the first chunk has gone through (it is not upsampled in time)

WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
CACHE_T = 2

@dataclass
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple = (False, True, True)   # sic, as the reference (and config.json) spell it
    latents_mean: tuple = WAN21_LATENTS_MEAN           # plain floats: no buffers to lose on a meta build
    latents_std: tuple = WAN21_LATENTS_STD

class CausalConv3d(nn.Conv3d):
    """Conv3d with causal time padding: 2*pt frames in front (the cached frames of the previous chunk,
    zeros for the rest), none behind; symmetric zero padding (ph, pw) in space."""

    def __init__(self, cin, cout, kernel, stride=1, padding=0):
        super().__init__(cin, cout, kernel, stride=stride)   # padded by hand in forward
        pt, ph, pw = (padding,) * 3 if isinstance(padding, int) else padding
        self.front, self.ph, self.pw = 2 * pt, ph, pw

    def forward(self, x, cache=None):
        """x (B,Cin,T,H,W) -> (B,Cout,T',H',W'). With `cache` (convs with time padding only) the previous
        chunk's last input frames stand in for the front zeros, and this chunk's are stored."""
        prev = None
        if cache is not None and self.front > 0:
            prev = cache.get(self)                   # (B,Cin,<=2,H,W), None on the first chunk
            new = x[:, :, -CACHE_T:].clone()
            if prev is not None and new.shape[2] < CACHE_T:   # a 1-frame chunk: keep the previous last frame
                new = torch.cat([prev[:, :, -1:], new], 2)
            cache[self] = new
        if not (self.front or self.ph or self.pw):
            return super().forward(x)
        # the reference's cat([prev, x]) then F.pad, written into one zeroed buffer: the same conv input
        # with one full-size copy fewer (that copy sat at the decoder's memory peak)
        B, C, T, H, W = x.shape
        n = 0 if prev is None else prev.shape[2]
        ph, pw, t0 = self.ph, self.pw, self.front - n                # zero frames in front of prev
        xp = x.new_zeros(B, C, t0 + n + T, H + 2 * ph, W + 2 * pw)   # (B,Cin,front+T,H+2ph,W+2pw)
        if n:
            xp[:, :, t0:t0 + n, ph:ph + H, pw:pw + W] = prev
        xp[:, :, t0 + n:, ph:ph + H, pw:pw + W] = x
        return super().forward(xp)

class ChannelRMSNorm(nn.Module):
    """Reference RMS_norm: F.normalize over channels (eps 1e-12 on the L2 norm) * sqrt(C) * gamma, no
    bias; half-precision inputs are normalised in fp32. gamma (C,1,1,1) for 5-D, (C,1,1) for 4-D inputs."""

    def __init__(self, dim, ndim=5):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (ndim - 2)))

    def forward(self, x):
        """x (B,C,...) -> same shape and dtype."""
        half = x.dtype in (torch.float16, torch.bfloat16)
        return F.normalize(x.float() if half else x, dim=1).to(x.dtype) * self.scale * self.gamma

class ResBlock(nn.Module):
    """x + f(x): RMS, SiLU, conv3, RMS, SiLU, conv3 (dropout is 0 in Wan); 1x1x1 conv shortcut if Cin != Cout."""

    def __init__(self, cin, cout):
        super().__init__()
        self.norm1 = ChannelRMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, 3, padding=1)
        self.norm2 = ChannelRMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, 3, padding=1)
        self.conv_shortcut = CausalConv3d(cin, cout, 1) if cin != cout else None   # never cached (no time pad)

    def forward(self, x, cache):
        """x (B,Cin,T,H,W) -> (B,Cout,T,H,W)."""
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        # one op per line: rebinding x frees each activation once the next exists (nesting the calls
        # would keep conv1's output alive through conv2: +1 full-size tensor at the decode's peak)
        x = self.norm1(x)
        x = F.silu(x)
        x = self.conv1(x, cache)
        x = self.norm2(x)
        x = F.silu(x)
        x = self.conv2(x, cache)
        return x + h

class AttnBlock(nn.Module):
    """Per-frame single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, dim):
        super().__init__()
        self.norm = ChannelRMSNorm(dim, ndim=4)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        """x (B,C,T,H,W) -> (B,C,T,H,W); no time mixing, so nothing to cache."""
        B, C, T, H, W = x.shape
        h = self.norm(x.transpose(1, 2).reshape(B * T, C, H, W))                  # (BT,C,H,W)
        qkv = self.to_qkv(h).flatten(2).transpose(1, 2).unsqueeze(1).contiguous()  # (BT,1,HW,3C)
        h = F.scaled_dot_product_attention(*qkv.chunk(3, dim=-1))                  # (BT,1,HW,C), scale 1/sqrt(C)
        h = self.proj(h.squeeze(1).transpose(1, 2).reshape(B * T, C, H, W))
        return x + h.view(B, T, C, H, W).transpose(1, 2)

class Upsample2x(nn.Module):
    def forward(self, x):
        """x (N,C,H,W) -> (N,C,2H,2W), nearest-exact computed in fp32 as the reference does."""
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)

class Resample(nn.Module):
    """Spatial x2 down/up per frame (keys resample.1.*), plus time x2 through the cache for the 3-D modes.
    downsample: ZeroPad2d((0,1,0,1)) + Conv2d(C,C,3,stride 2); the 3-D time conv (3,1,1)/stride 2 sees the
    previous chunk's last frame and skips the first chunk (1 frame stays 1; then 4 -> 2, 2 -> 1).
    upsample: the 3-D time conv C -> 2C first (skipped on the first chunk), its two halves interleaved
    as frames 2j, 2j+1; then nearest-exact x2 + Conv2d(C, C/2, 3)."""

    def __init__(self, dim, mode):
        super().__init__()
        self.mode = mode
        if mode.startswith("up"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0))
        elif mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))

    def forward(self, x, cache):
        """x (B,C,T,H,W) -> downsample (B,C,T',H/2,W/2), T' = T, or (T+1)/2 for 3-D after the first chunk;
        upsample (B,C/2,T',2H,2W), T' = T, or 2T for 3-D after the first chunk."""
        if self.mode == "upsample3d":
            if self in cache:
                # The reference marks the first chunk "Rep", then runs the second uncached and stores
                # [zeros, x]; prepending those zeros is what the front padding does anyway, so from the
                # second chunk on this is the plain cached conv (bit-identical).
                x = self.time_conv(x, cache)                                     # (B,2C,T,H,W)
                B, C2, T, H, W = x.shape
                x = x.view(B, 2, C2 // 2, T, H, W).permute(0, 2, 3, 1, 4, 5)    # (B,C,T,2,H,W)
                x = x.reshape(B, C2 // 2, 2 * T, H, W)                           # frame 2j: [:C], 2j+1: [C:]
            cache[self] = True
        B, C, T, H, W = x.shape
        x = x.transpose(1, 2).reshape(B * T, C, H, W)                            # (BT,C,H,W): per frame
        x = self.resample(x).unflatten(0, (B, T)).transpose(1, 2)                # (B,C',T,H',W')
        if self.mode == "downsample3d":
            prev = cache.get(self)
            cache[self] = x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))                      # (B,C,(T+1)//2,H',W')
        return x

class MidBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(dim, dim), ResBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttnBlock(dim)])

    def forward(self, x, cache):
        """x (B,C,T,H,W) -> same: Res, Attn, Res."""
        return self.resnets[1](self.attentions[0](self.resnets[0](x, cache)), cache)

class VAEEncoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (1, *c.dim_mult)]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for j in range(c.num_res_blocks):
                blocks.append(ResBlock(cin if j == 0 else cout, cout))
            if i < len(c.dim_mult) - 1:
                blocks.append(Resample(cout, "downsample3d" if c.temperal_downsample[i] else "downsample2d"))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * c.z_dim, 3, padding=1)

    def forward(self, x, cache):
        """x (B,3,T,H,W), one chunk (T = 1, then 4) -> (B,2*z_dim,1,H/8,W/8): mu and logvar."""
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        x = F.silu(self.norm_out(x))
        return self.conv_out(x, cache)

class UpBlock(nn.Module):
    def __init__(self, cin, cout, num_res, mode):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout) for j in range(num_res))
        self.upsamplers = nn.ModuleList([Resample(cout, mode)]) if mode else None

    def forward(self, x, cache):
        """x (B,Cin,T,H,W) -> (B,Cout/2,T',2H,2W) with an upsampler (T' = T or 2T), else (B,Cout,T,H,W)."""
        for block in self.resnets:
            x = block(x, cache)
        return x if self.upsamplers is None else self.upsamplers[0](x, cache)

class VAEDecoder(nn.Module):
    def __init__(self, c: WanVAEConfig):
        super().__init__()
        dims = [c.base_dim * m for m in (c.dim_mult[-1], *c.dim_mult[::-1])]
        up_t, n = c.temperal_downsample[::-1], len(c.dim_mult)
        self.conv_in = CausalConv3d(c.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(   # after the first stage the input is C/2: the upsample conv halves it
            UpBlock(cin // 2 if i else cin, cout, c.num_res_blocks + 1,
                    None if i == n - 1 else "upsample3d" if up_t[i] else "upsample2d")
            for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])))
        self.norm_out = ChannelRMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1)

    def forward(self, x, cache):
        """x (B,z_dim,1,h,w), one latent frame -> (B,3,T,8h,8w): T = 1 for the first chunk, then 4."""
        x = self.mid_block(self.conv_in(x, cache), cache)
        for block in self.up_blocks:
            x = block(x, cache)
        x = F.silu(self.norm_out(x))
        return self.conv_out(x, cache)

class WanVAE(nn.Module):
    """Wan 2.1 VAE: video (B,3,1+4k,H,W) in [-1,1] <-> normalised latents (B,16,1+k,H/8,W/8).
    Runs in its parameter dtype (the reference runs fp32); encode/decode return fp32."""

    def __init__(self, cfg: WanVAEConfig = None):
        super().__init__()
        self.cfg = cfg = cfg or WanVAEConfig()
        if len(cfg.temperal_downsample) != len(cfg.dim_mult) - 1:
            raise ValueError(f"temperal_downsample {cfg.temperal_downsample} needs len(dim_mult) - 1 entries")
        self.encoder = VAEEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = VAEDecoder(cfg)

    @property
    def dtype(self):
        return self.post_quant_conv.weight.dtype

    def latent_stats(self, device):
        """(mean, std), each (1,z_dim,1,1,1) fp32: latents = (mu - mean) / std (docs/wan21.md#the-vae)."""
        z = self.cfg.z_dim
        return (torch.tensor(self.cfg.latents_mean, device=device).view(1, z, 1, 1, 1),
                torch.tensor(self.cfg.latents_std, device=device).view(1, z, 1, 1, 1))

    def encode(self, video):
        """video (B,3,F,H,W) in [-1,1], F = 1+4k, H and W multiples of 8 -> normalised latents
        (B,z_dim,1+k,H/8,W/8) fp32: (mu - mean)/std, mu the posterior mean (deterministic)."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be (B,3,F,H,W), got shape {tuple(video.shape)}")
        _, _, Fr, H, W = video.shape
        if (Fr - 1) % 4 or H % 8 or W % 8:
            raise ValueError(f"video shape {tuple(video.shape)}: need F = 1+4k frames and H, W multiples of 8")
        x, cache = video.to(self.dtype), {}
        chunks = [x[:, :, :1]] + [x[:, :, i:i + 4] for i in range(1, Fr, 4)]    # frames 0 | 1-4 | 5-8 | ...
        h = torch.cat([self.encoder(c, cache) for c in chunks], 2)              # (B,2z,1+k,H/8,W/8)
        mu = self.quant_conv(h)[:, :self.cfg.z_dim]                               # logvar unused
        mean, std = self.latent_stats(mu.device)
        return (mu.float() - mean) / std

    def decode(self, latents, tile=None, cache=None, progress=None):
        """latents (B,z_dim,T,h,w) normalised -> video (B,3,1+4(T-1),8h,8w) fp32 in [-1,1].
        tile=(size, stride) in pixels (multiples of 8) decodes overlapping size x size tiles one at a
        time and blends them linearly: less memory at large H, W, close to but not equal to untiled.
        cache: a dict ({} for a new clip, the same dict for every later call) continues the decoder's causal cache
        across calls (streaming, decode_stream): a later call's T latent frames give 4T video frames, and the
        outputs concatenated equal one decode of the whole clip. progress: a tqdm bar, updated per latent frame."""
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be (B,{self.cfg.z_dim},T,h,w) with T >= 1, got shape {tuple(latents.shape)}")
        if tile is not None and cache is not None:
            raise ValueError("decode: tile and a streaming cache do not combine")
        mean, std = self.latent_stats(latents.device)
        x = self.post_quant_conv((latents.float() * std + mean).to(self.dtype))  # 1x1x1: per frame
        if tile is None:
            out = self._decode_frames(x, cache, progress)
        else:
            out = self._decode_tiled(x, *tile)
        return out.clamp_(-1.0, 1.0)

    def decode_stream(self, latents, cache):
        """The next latent frames of a clip, continuing the decoder's causal `cache` (decode with cache=)."""
        return self.decode(latents, cache=cache)

    def _decode_frames(self, x, cache=None, progress=None):
        """x (B,z,T,h,w) after post_quant_conv -> (B,3,1+4(T-1),8h,8w) fp32 (4T frames when `cache` continues a
        clip), one latent frame per chunk; only the cache (<= 2 frames per conv) and the output outlive a chunk."""
        B, _, T, h, w = x.shape
        cache = {} if cache is None else cache
        out, f, n = None, 0, 4 * T - (0 if cache else 3)   # a clip's first latent frame gives one video frame
        for i in range(T):
            y = self.decoder(x[:, :, i:i + 1], cache)          # (B,3,1,H,W) for a clip's first frame, then (B,3,4,H,W)
            if out is None:
                out = torch.empty(B, 3, n, *y.shape[3:], device=y.device, dtype=torch.float32)
            out[:, :, f:f + y.shape[2]] = y
            f += y.shape[2]
            if progress is not None:
                progress.update(1)
        return out

    def _decode_tiled(self, x, size, stride):
        """x (B,z,T,h,w) -> (B,3,F,8h,8w) fp32 from size x size pixel tiles `stride` apart (the last one
        flush with the edge), each decoded with its own cache; weights ramp linearly over the overlap at
        interior edges (as diffusers' blend_h/blend_v) and the sum is normalised."""
        if size % 8 or stride % 8 or not 0 < stride <= size:
            raise ValueError(f"tile=(size, stride) must be multiples of 8 with 0 < stride <= size, got {(size, stride)}")
        B, _, T, h, w = x.shape
        t, s, ramp = size // 8, stride // 8, size - stride
        out = torch.zeros(B, 3, 1 + 4 * (T - 1), 8 * h, 8 * w, device=x.device)
        wsum = torch.zeros(8 * h, 8 * w, device=x.device)
        for y0 in _tile_starts(h, t, s):
            for x0 in _tile_starts(w, t, s):
                tile = self._decode_frames(x[:, :, :, y0:y0 + t, x0:x0 + t])      # (B,3,F,8t',8t'')
                Ht, Wt = tile.shape[3:]
                wy = _blend_weights(Ht, y0 > 0, y0 + t < h, ramp, x.device)
                wx = _blend_weights(Wt, x0 > 0, x0 + t < w, ramp, x.device)
                wgt = wy[:, None] * wx[None, :]                                  # (8t',8t'')
                out[..., 8 * y0:8 * y0 + Ht, 8 * x0:8 * x0 + Wt] += tile * wgt
                wsum[8 * y0:8 * y0 + Ht, 8 * x0:8 * x0 + Wt] += wgt
        return out.div_(wsum)

def _tile_starts(n, t, s):
    """Starts of t-wide tiles s apart covering 0..n, the last one flush with the end."""
    return [0] if n <= t else list(range(0, n - t, s)) + [n - t]

def _blend_weights(n, lead, trail, ramp, device):
    """(n,) tile weights: 1 inside, rising over `ramp` pixels at an interior leading edge, falling at an
    interior trailing one; never 0, so every pixel is covered."""
    w = torch.ones(n, device=device)
    if ramp > 0:
        r = torch.arange(1, ramp + 1, device=device) / (ramp + 1)
        if lead:
            w[:ramp] = torch.minimum(w[:ramp], r[:n])
        if trail:
            w[-ramp:] = torch.minimum(w[-ramp:], r.flip(0)[-n:])
    return w

# original Wan2.1_VAE.pth -> diffusers keys (docs/wan21.md#weight-key-maps); the decoder's flat upsamples are regrouped
_VAE_O2D = [
    (r"^conv1\.", "quant_conv."), (r"^conv2\.", "post_quant_conv."),
    (r"^(encoder|decoder)\.conv1\.", r"\1.conv_in."),
    (r"^(encoder|decoder)\.head\.0\.", r"\1.norm_out."), (r"^(encoder|decoder)\.head\.2\.", r"\1.conv_out."),
    (r"\.middle\.0\.", ".mid_block.resnets.0."), (r"\.middle\.1\.", ".mid_block.attentions.0."),
    (r"\.middle\.2\.", ".mid_block.resnets.1."), (r"^encoder\.downsamples\.", "encoder.down_blocks."),
    (r"\.residual\.0\.", ".norm1."), (r"\.residual\.2\.", ".conv1."), (r"\.residual\.3\.", ".norm2."),
    (r"\.residual\.6\.", ".conv2."), (r"\.shortcut\.", ".conv_shortcut."),
]

def vae_key_from_original(key, num_res_blocks):
    """`decoder.upsamples.4.residual.2.weight` -> `decoder.up_blocks.1.resnets.0.conv1.weight` (at 2 res
    blocks: each decoder stage is num_res_blocks+1 residual blocks, then one resample)."""
    for pat, rep in _VAE_O2D:
        key = re.sub(pat, rep, key)
    def up(m):
        stage, j = divmod(int(m.group(1)), num_res_blocks + 2)
        return f"decoder.up_blocks.{stage}." + (f"resnets.{j}." if j <= num_res_blocks else "upsamplers.0.")
    return re.sub(r"^decoder\.upsamples\.(\d+)\.", up, key)

def vae_original_to_diffusers(sd):
    """Rename a state dict in the original layout; the residual-block count is where the first
    encoder resample sits."""
    first = [int(k.split(".")[2]) for k in sd if re.match(r"^encoder\.downsamples\.\d+\.resample\.", k)]
    if not first:
        raise ValueError(f"not a Wan 2.1 VAE in the original layout: no encoder.downsamples.N.resample.* among "
                         f"{len(sd)} tensors (first keys: {sorted(sd)[:5]})")
    return {vae_key_from_original(k, min(first)): v for k, v in sd.items()}

def vae_config_from_state_dict(sd, config=None):
    """WanVAEConfig from tensor shapes (diffusers keys), latent constants from config.json (else Wan 2.1's);
    whatever config.json declares must agree with the weights."""
    config = config or {}
    for k, ok in (("is_residual", False), ("patch_size", None), ("attn_scales", []), ("in_channels", 3),
                  ("out_channels", 3), ("dropout", 0.0)):
        if config.get(k, ok) != ok:
            raise ValueError(f"vae config.json has {k}={config[k]!r}: only the Wan 2.1 VAE ({k}={ok!r}) is supported")
    if config.get("decoder_base_dim") not in (None, config.get("base_dim")):
        raise ValueError(f"vae config.json has decoder_base_dim={config['decoder_base_dim']}: not supported")
    if "encoder.conv_in.weight" not in sd:
        raise ValueError(f"not a Wan VAE checkpoint: no encoder.conv_in.weight among {len(sd)} tensors "
                         f"(first keys: {sorted(sd)[:5]})")
    base = sd["encoder.conv_in.weight"].shape[0]
    mult, temporal, res, n = [], [], 0, 0
    while (p := f"encoder.down_blocks.{n}.") + "conv1.weight" in sd or p + "resample.1.weight" in sd:
        if p + "resample.1.weight" in sd:        # closes a stage
            temporal.append(p + "time_conv.weight" in sd)
        else:
            if len(mult) == len(temporal):       # first residual block of a stage
                mult.append(sd[p + "conv1.weight"].shape[0] // base)
            res += 1
        n += 1
    cfg = WanVAEConfig(base_dim=base, z_dim=sd["post_quant_conv.weight"].shape[0], dim_mult=tuple(mult),
                       num_res_blocks=res // max(len(mult), 1), temperal_downsample=tuple(temporal),
                       latents_mean=tuple(config.get("latents_mean", WAN21_LATENTS_MEAN)),
                       latents_std=tuple(config.get("latents_std", WAN21_LATENTS_STD)))
    for k in ("base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"):
        v = config.get(k)
        if v is not None and (tuple(v) if isinstance(v, list) else v) != getattr(cfg, k):
            raise ValueError(f"vae config.json says {k}={v} but the weights have {k}={getattr(cfg, k)}")
    if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
        raise ValueError(f"latents_mean/latents_std need {cfg.z_dim} entries, got "
                         f"{len(cfg.latents_mean)}/{len(cfg.latents_std)}")
    return cfg

VAE_PTH = "Wan2.1_VAE.pth"
VAE_HUB_PATTERNS = ["model_index.json", "vae/config.json", "vae/diffusion_pytorch_model*.safetensors*", VAE_PTH]

def read_vae(source):
    """source -> (state dict in diffusers keys, config.json dict or {}). See load_vae for what is accepted."""
    src = str(source)
    if not os.path.exists(src):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", src) and not src.startswith((".", "/")):
            src = resolve_hub(src, VAE_HUB_PATTERNS)
        else:
            raise FileNotFoundError(f"no such file or folder: {src!r} (expected a diffusers vae/ folder, a pipeline "
                                    f"root, a folder with {VAE_PTH}, a .pth/.safetensors file or a hub id)")
    if os.path.isdir(src) and os.path.exists(os.path.join(src, "model_index.json")):
        src = os.path.join(src, "vae")                                  # pipeline root
    if os.path.isdir(src) and os.path.exists(os.path.join(src, VAE_PTH)):
        src = os.path.join(src, VAE_PTH)                                # original-layout folder
    config, files = {}, [src]
    if os.path.isdir(src):
        names = sorted(os.listdir(src))
        index = [n for n in names if n.endswith(".safetensors.index.json")]
        if index:
            files = sorted(set(read_json(os.path.join(src, index[0]))["weight_map"].values()))
        else:
            files = [n for n in names if n.endswith(".safetensors")]
        files = [os.path.join(src, n) for n in files]
        if not files:
            raise FileNotFoundError(f"no Wan VAE weights in {src!r}: looked for diffusion_pytorch_model*.safetensors "
                                    f"(diffusers vae/ folder), model_index.json (pipeline root) and {VAE_PTH}")
    cfg_path = os.path.join(os.path.dirname(files[0]), "config.json")
    if files[0].endswith(".pth"):
        sd = torch.load(files[0], map_location="cpu", weights_only=True)
    elif all(f.endswith(".safetensors") for f in files):
        sd = {k: v for f in files for k, v in load_safetensors(f).items()}   # bad files: an error naming them
        config = read_json(cfg_path) if os.path.exists(cfg_path) else {}
    else:
        raise ValueError(f"{src!r}: expected a .pth or .safetensors file")
    if any(k.startswith(("encoder.downsamples.", "decoder.upsamples.")) for k in sd):   # original layout
        sd = vae_original_to_diffusers(sd)
    return sd, config

def load_vae(source, dtype=None, device="cpu"):
    """Load the Wan 2.1 VAE from:
    - a diffusers `vae/` folder (config.json + diffusion_pytorch_model.safetensors), or a pipeline root,
    - an original-layout folder holding Wan2.1_VAE.pth, or that .pth file (or a .safetensors in either layout),
    - a hub repo id (only the VAE files are downloaded; HF_HUB_OFFLINE and the cache are honoured).
    Built on the meta device and assigned; the checkpoint's dtype is kept unless `dtype` is given."""
    sd, config = read_vae(source)
    cfg = vae_config_from_state_dict(sd, config)
    with torch.device("meta"):
        model = WanVAE(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(f"checkpoint {str(source)!r} does not match WanVAE({cfg}):\n"
                         f"  missing keys ({len(missing)}): {missing[:20]}\n"
                         f"  unexpected keys ({len(unexpected)}): {unexpected[:20]}")
    for k, v in expected.items():
        if sd[k].shape != v.shape:
            raise ValueError(f"{k}: checkpoint shape {tuple(sd[k].shape)} != model shape {tuple(v.shape)}")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in sd.items()}, assign=True)
    return model.eval()

def save_vae(vae, path):
    """diffusers vae/ layout: config.json (with the latent statistics) + one safetensors file; load_vae reads it back."""
    os.makedirs(path, exist_ok=True)
    cfg = vae.cfg
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
                       temperal_downsample=list(cfg.temperal_downsample), latents_mean=list(cfg.latents_mean),
                       latents_std=list(cfg.latents_std)), f, indent=1)
    write_safetensors(vae.state_dict(), os.path.join(path, "diffusion_pytorch_model.safetensors"))
