"""Building blocks shared by the UNet and the VAE.

Module and parameter names follow diffusers (`to_q`, `to_out.0`, `ff.net.0.proj`, `norm1`, …) so a
diffusers state_dict loads into ours key for key, with no renaming.

References:
- ResnetBlock, sinusoidal timestep embedding: Ho et al. 2020, "Denoising Diffusion Probabilistic
  Models" (appendix B), after Vaswani et al. 2017 §3.5.
- Attention(Q, K, V) = softmax(Q Kᵀ / √d) V: Vaswani et al. 2017, eq. 1.
- Spatial transformer with cross-attention to a text context: Rombach et al. 2022, "High-Resolution
  Image Synthesis with Latent Diffusion Models", §3.3.
- GEGLU feed-forward: Shazeer 2020, "GLU Variants Improve Transformer", eq. 6.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..adapters.layers import add_adapters, plain_layer
from .attend import attend


# --------------------------------------------------------------------------- time embedding


def timestep_embedding(
    t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0.0, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32.

    freq_i = max_period^(-i / (dim/2 - freq_shift)), emb = [sin(t·freq), cos(t·freq)] (Vaswani et al. 2017
    §3.5); `flip_sin_to_cos` puts cos first, as SD does.
    """
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=t.device) * (-math.log(max_period) / (half - freq_shift))
    args = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos else [torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb  # (B, dim)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: Linear -> SiLU -> Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))  # (B, dim)


# --------------------------------------------------------------------------- convolutional blocks


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-Conv twice, plus a projected time embedding after the first conv (Ho et al. 2020).

    `temb_channels=None` gives the VAE's unconditioned block (no `time_emb_proj`).
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels) if temb_channels is not None else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # + (B, C_out, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))  # (B, C_out, H, W)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample(nn.Module):
    """Stride-2 3×3 conv. `padding=0` is the VAE's variant: pad right/bottom by one, then conv."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # (B, C, H+1, W+1)
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, to match an odd-sized skip), then a 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: Optional[tuple] = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        else:
            x = F.interpolate(x, size=size, mode="nearest")  # (B, C, *size)
        return self.conv(x)


# --------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention (Vaswani et al. 2017, eq. 1); the kernel per device/shape/dtype is models/attend.py's.

    Self-attention when `context` is None, else cross-attention to `context` (Rombach et al. 2022 §3.3).
    """

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: Optional[int] = None,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        context_dim = query_dim if context_dim is None else context_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])  # diffusers key: to_out.0

    def _project_qkv(self, x: torch.Tensor, context: Optional[torch.Tensor]):
        if context is None:  # self-attention: one fused GEMM for q, k, v (same weights, same result)
            mods = (self.to_q, self.to_k, self.to_v)
            plain = [plain_layer(m) for m in mods]  # adapters (LoRA, …) add their own term after the GEMM
            w = torch.cat([m.weight for m in plain])  # (3·inner, C)
            b = None if plain[0].bias is None else torch.cat([m.bias for m in plain])
            qkv = F.linear(x, w, b).chunk(3, dim=-1)  # 3 × (B, N, inner)
            return tuple(add_adapters(m, x, y) for m, y in zip(mods, qkv))
        return self.to_q(x), self.to_k(context), self.to_v(context)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, _ = x.shape  # (B, N, C)
        q, k, v = self._project_qkv(x, context)  # (B, N, inner), (B, L, inner) ×2
        q, k, v = (u.unflatten(-1, (self.heads, -1)).transpose(1, 2) for u in (q, k, v))  # (B, h, ·, d)
        keep = None if mask is None or context is None else mask  # (B, L) key padding of the context
        out = attend(q, k, v, keep, upcast=self.upcast)  # (B, h, N, d); kernel chosen in models/attend.py
        out = out.transpose(1, 2).reshape(B, N, -1)  # (B, N, inner)
        return self.to_out[0](out)  # (B, N, C)


class SpatialSelfAttention(Attention):
    """GroupNorm + single self-attention over the H·W positions of a feature map, with a residual.

    The VAE mid-block attention and diffusers' AttnDownBlock2D/AttnUpBlock2D attention (biases on q/k/v).
    """

    def __init__(self, channels: int, head_dim: int, groups: int, eps: float):
        super().__init__(channels, heads=channels // head_dim, head_dim=head_dim, bias=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x: torch.Tensor, context=None, mask=None) -> torch.Tensor:  # context/mask: unused
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)  # (B, HW, C)
        return x + h.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)


class GEGLU(nn.Module):
    """GEGLU(x) = (x W + b) ⊙ GELU(x V + c) (Shazeer 2020, eq. 6), both halves from one Linear."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.dim_out = dim_out
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One GEMM per half of the weight, not one GEMM then .chunk(2): the halves come out contiguous
        # (no strided elementwise ops) and backward needs no concatenation of their gradients.
        # Same FLOPs; fwd+bwd of the 64-channel feed-forward is ~25 % faster on CPU (docs/BENCHMARKS.md).
        plain = plain_layer(self.proj)  # an adapter on proj adds its term to both halves
        w, b, n = plain.weight, plain.bias, self.dim_out
        h = F.linear(x, w[:n], b[:n])  # (B, N, dim_out)
        gate = F.linear(x, w[n:], b[n:])  # (B, N, dim_out)
        if plain is not self.proj:
            y = add_adapters(self.proj, x, torch.cat([h, gate], dim=-1))  # (B, N, 2·dim_out)
            h, gate = y[..., :n].contiguous(), y[..., n:].contiguous()  # contiguous: the same GELU kernel
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU to 4·dim, then back to dim. Keys `net.0.proj`, `net.2` as in diffusers (net.1 is dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))  # (B, N, dim)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm transformer block: self-attention, cross-attention to the context, GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: Optional[int], upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.attn2 = Attention(dim, heads, head_dim, context_dim, upcast=upcast) if context_dim is not None else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))  # (B, N, C)
        if self.attn2 is not None:
            x = x + self.attn2(self.norm2(x), context, mask)  # context None -> attends to itself
        return x + self.ff(self.norm3(x))  # (B, N, C)


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, with a residual (Rombach et al. 2022).

    diffusers' Transformer2DModel for continuous inputs: GroupNorm, proj_in (1×1 conv or Linear),
    `depth` BasicTransformerBlocks, proj_out.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: Optional[int],
                 groups: int, linear_projection: bool, upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if linear_projection else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(inner, channels) if linear_projection else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x).permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C)
        # A 1×1 conv is a Linear on tokens: one GEMM either way (conv weights are (out, in, 1, 1)).
        h = _tokens_linear(self.proj_in, h)  # (B, HW, inner)
        for block in self.transformer_blocks:
            h = block(h, context, mask)  # (B, HW, inner)
        h = _tokens_linear(self.proj_out, h)  # (B, HW, C)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        return x + h


def _tokens_linear(proj: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A Linear, or a 1×1 conv applied to (B, N, C) tokens as the Linear it is; plus any adapter's term."""
    plain = plain_layer(proj)
    return add_adapters(proj, h, F.linear(h, plain.weight.flatten(1), plain.bias))  # (B, N, out)


# --------------------------------------------------------------------------- mid block


class MidBlock(nn.Module):
    """ResnetBlock, attention, ResnetBlock at the lowest resolution (UNet and VAE).

    Without attention: `num_resnets` blocks and nothing between them (diffusers' UNet uses 1, the VAE 2).
    `attention` is a SpatialTransformer (cross) or SpatialSelfAttention (self); both take (x, context, mask).
    """

    def __init__(self, channels: int, temb_channels: Optional[int], attention: Optional[nn.Module],
                 groups: int, eps: float, num_resnets: int = 2):
        super().__init__()
        n = 2 if attention is not None else num_resnets
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, temb_channels, groups, eps) for _ in range(n)])
        self.attentions = nn.ModuleList([attention] if attention is not None else [])
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        x = run(self.resnets[0], ckpt, x, temb)  # (B, C, H, W)
        for attn in self.attentions:
            x = run(attn, ckpt, x, context, mask)
        for resnet in self.resnets[1:]:
            x = run(resnet, ckpt, x, temb)
        return x


def run(module: nn.Module, checkpointed: bool, *args):
    """module(*args), under activation checkpointing when asked and gradients are on."""
    if checkpointed and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)
    return module(*args)
