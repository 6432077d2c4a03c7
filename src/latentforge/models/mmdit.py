"""The SD3/SD3.5 network: a multimodal diffusion transformer (MM-DiT) predicting the flow velocity ε − x0.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis", §4 and Fig. 2:

    latent (B, C, H, W) --patchify (p×p conv) + cropped 2-D sin-cos positions--> image tokens (B, N, D)
    text tokens (B, L, context_dim) --Linear--> text tokens (B, L, D)
    c = MLP(sinusoid(t)) + MLP(pooled text)                                   (B, D)
    joint blocks × num_layers: each stream has its own weights (adaLN modulation, q/k/v, output, MLP), and one
        attention runs over the concatenation [image tokens; text tokens]      (Fig. 2b)
    final adaLN, Linear to p²·C, unpatchify --> (B, C, H, W)

- adaLN-Zero (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", §3.2): LayerNorm without
  affine, then x·(1 + scale) + shift, and residual branches multiplied by a gate, all regressed from c.
- The last block is "context pre-only": its text stream only feeds keys/values; its text output is dropped.
- SD3.5: qk-normalisation (Esser et al. 2024, §5.3.2: RMSNorm of each head's q and k) and, in MMDiT-X
  (SD3.5 medium, `dual_attention_layers`), a second attention in those blocks over the image tokens alone.

Module and parameter names are diffusers' `SD3Transformer2DModel` (JointTransformerBlock, PatchEmbed, …), so its
state_dict loads into ours key for key. The attention kernel is models/attend.py's.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MMDiTConfig
from .attend import attend
from .layers import TimestepEmbedding, run, timestep_embedding
from .pretrained import PretrainedModule

NORM_EPS = 1e-6  # every LayerNorm and RMSNorm of the network (SD3's reference code and diffusers)
TIME_CHANNELS = 256  # width of the sinusoidal timestep embedding


def sincos_2d(dim: int, grid: int, base: int) -> torch.Tensor:
    """(grid², dim) 2-D sin-cos position table (Vaswani et al. 2017 §3.5, per axis; MAE's 2-D form).

    Row-major over a grid × grid patch grid: the first dim/2 channels encode the column, the last dim/2 the row,
    each as [sin(pos·ω), cos(pos·ω)] with ω_i = 10000^(−i/(dim/4)). Positions are spaced base/grid apart, so a
    `base`-patch image spans [0, base) whatever the table size (SD3: base = sample_size / patch_size).
    """
    if dim % 4:
        raise ValueError(f"MMDiTConfig: the width ({dim}) must be a multiple of 4 for the 2-D position embedding")
    pos = torch.arange(grid, dtype=torch.float32) / (grid / base)  # (grid,)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))  # (dim/4,)
    angles = torch.outer(pos.double(), omega)  # (grid, dim/4)
    axis = torch.cat([angles.sin(), angles.cos()], dim=1)  # (grid, dim/2)
    rows = axis[:, None, :].expand(grid, grid, -1)  # (grid, grid, dim/2): the row's code at each cell
    cols = axis[None, :, :].expand(grid, grid, -1)  # the column's code
    return torch.cat([cols, rows], dim=-1).reshape(grid * grid, dim).float()  # (grid², dim)


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN's h·(1 + scale) + shift, per sample: h (B, N, D), shift/scale (B, D)."""
    return h * (1 + scale[:, None]) + shift[:, None]


class PatchEmbed(nn.Module):
    """p×p patches → tokens by a stride-p conv, plus the centre crop of a fixed sin-cos position table.

    The table (1, max², D) is a stored buffer (`pos_embed.pos_embed` in diffusers' files); an h×w-patch input takes
    its central h×w window, so every resolution up to pos_embed_max_size·p sees positions around the same centre.
    """

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        p, m = config.patch_size, config.pos_embed_max_size
        self.patch_size, self.max_size = p, m
        self.proj = nn.Conv2d(config.in_channels, config.width, p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(config.width, m, config.sample_size // p)[None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"MMDiT: {h}×{w} patches exceed pos_embed_max_size {self.max_size}")
        top, left = (self.max_size - h) // 2, (self.max_size - w) // 2
        table = self.pos_embed.reshape(self.max_size, self.max_size, -1)  # (max, max, D)
        pos = table[top:top + h, left:left + w].reshape(1, h * w, -1)  # (1, hw, D)
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, hw, D)
        return (tokens + pos).to(tokens.dtype)


class TimeTextEmbedding(nn.Module):
    """The conditioning vector c = MLP(sinusoid(t)) + MLP(pooled text) (Esser et al. 2024, Fig. 2a)."""

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(TIME_CHANNELS, config.width)
        self.text_embedder = TimestepEmbedding(config.pooled_dim, config.width)  # the same Linear-SiLU-Linear

    def forward(self, t: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, TIME_CHANNELS, flip_sin_to_cos=True)  # (B, 256)
        return self.timestep_embedder(emb.to(pooled.dtype)) + self.text_embedder(pooled)  # (B, D)


class AdaLayerNorm(nn.Module):
    """LayerNorm without affine parameters, and `chunks` (B, D) modulation vectors from one Linear on SiLU(c)."""

    def __init__(self, dim: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(dim, chunks * dim)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> Tuple[torch.Tensor, tuple]:
        params = self.linear(F.silu(c)).chunk(self.chunks, dim=1)  # chunks × (B, D)
        return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS), params  # (B, N, D)


class GeluFeedForward(nn.Module):
    """Linear to 4·dim, tanh-approximated GELU, Linear back. Keys `net.0.proj`, `net.2` (net.1 is dropout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        first = nn.Module()
        first.proj = nn.Linear(dim, dim * mult)
        self.net = nn.ModuleList([first, nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.gelu(self.net[0].proj(x), approximate="tanh"))  # (B, N, dim)


def _qk_norms(module: nn.Module, names: Tuple[str, str], head_dim: int, on: bool) -> None:
    for name in names:
        setattr(module, name, nn.RMSNorm(head_dim, eps=NORM_EPS) if on else None)


class JointAttention(nn.Module):
    """Attention over [image tokens; text tokens] with separate q/k/v and output weights per stream (Fig. 2b).

    Without a text stream (`joint=False`) it is plain self-attention over the image tokens (MMDiT-X's second
    attention). `context_out=False`: the text stream's output is not projected (the pre-only last block).
    """

    def __init__(self, dim: int, heads: int, head_dim: int, qk_norm: bool, joint: bool = True,
                 context_out: bool = True):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q, self.to_k, self.to_v = (nn.Linear(dim, inner) for _ in range(3))
        _qk_norms(self, ("norm_q", "norm_k"), head_dim, qk_norm)
        if joint:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(dim, inner) for _ in range(3))
            _qk_norms(self, ("norm_added_q", "norm_added_k"), head_dim, qk_norm)
        self.joint = joint
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])  # diffusers key: to_out.0
        self.to_add_out = nn.Linear(inner, dim) if joint and context_out else None

    def _qkv(self, x: torch.Tensor, projections, norms):
        q, k, v = (p(x).unflatten(-1, (self.heads, -1)).transpose(1, 2) for p in projections)  # (B, h, N, d)
        if norms[0] is not None:
            q, k = norms[0](q), norms[1](k)
        return q, k, v

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None):
        N = x.shape[1]  # x (B, N, D), context (B, L, D)
        q, k, v = self._qkv(x, (self.to_q, self.to_k, self.to_v), (self.norm_q, self.norm_k))  # (B, h, N, d)
        if self.joint:
            cq, ck, cv = self._qkv(context, (self.add_q_proj, self.add_k_proj, self.add_v_proj),
                                   (self.norm_added_q, self.norm_added_k))  # (B, h, L, d)
            q, k, v = torch.cat([q, cq], dim=2), torch.cat([k, ck], dim=2), torch.cat([v, cv], dim=2)
        out = attend(q, k, v).transpose(1, 2).flatten(2)  # (B, N [+ L], inner)
        x_out = self.to_out[0](out[:, :N])  # (B, N, D)
        if not self.joint:
            return x_out
        return x_out, None if self.to_add_out is None else self.to_add_out(out[:, N:])  # (B, L, D)


class JointTransformerBlock(nn.Module):
    """One MM-DiT block (Esser et al. 2024, Fig. 2b): adaLN-Zero per stream, joint attention, per-stream MLPs.

    Image-stream modulation: (shift, scale, gate) for attention and for the MLP, plus a third triple for the
    second attention in dual-attention (MMDiT-X) blocks. The pre-only block's text stream gets (scale, shift) only.
    """

    def __init__(self, config: MMDiTConfig, pre_only: bool, dual: bool):
        super().__init__()
        D, heads, d, qk = config.width, config.num_heads, config.head_dim, config.qk_norm
        self.context_pre_only = pre_only
        self.norm1 = AdaLayerNorm(D, 9 if dual else 6)
        self.norm1_context = AdaLayerNorm(D, 2 if pre_only else 6)
        self.attn = JointAttention(D, heads, d, qk, joint=True, context_out=not pre_only)
        self.attn2 = JointAttention(D, heads, d, qk, joint=False) if dual else None
        self.ff = GeluFeedForward(D)
        self.ff_context = None if pre_only else GeluFeedForward(D)

    def forward(self, x: torch.Tensor, c: torch.Tensor, temb: torch.Tensor):
        h, m = self.norm1(x, temb)  # (B, N, D); 6 or 9 × (B, D)
        hc, mc = self.norm1_context(c, temb)  # (B, L, D); 2 or 6 × (B, D)
        hc = modulate(hc, mc[1], mc[0]) if self.context_pre_only else modulate(hc, mc[0], mc[1])
        a, ac = self.attn(modulate(h, m[0], m[1]), hc)  # (B, N, D), (B, L, D) or None
        x = x + m[2][:, None] * a
        if self.attn2 is not None:
            x = x + m[8][:, None] * self.attn2(modulate(h, m[6], m[7]))
        x = x + m[5][:, None] * self.ff(modulate(F.layer_norm(x, x.shape[-1:], eps=NORM_EPS), m[3], m[4]))
        if self.context_pre_only:
            return x, None
        c = c + mc[2][:, None] * ac  # (B, L, D)
        c = c + mc[5][:, None] * self.ff_context(modulate(F.layer_norm(c, c.shape[-1:], eps=NORM_EPS), mc[3], mc[4]))
        return x, c


class MMDiT(PretrainedModule):
    """`forward(x, t, context, pooled) -> (B, out_channels, H, W)`: the velocity at latent x (B, C, H, W), flow time
    t (B,) as diffusers' pipelines pass it (σ·1000), text tokens (B, L, context_dim), pooled text (B, pooled_dim)."""

    component = "transformer"  # its diffusers sub-folder (PretrainedModule.from_pretrained)

    def __init__(self, config: MMDiTConfig):
        super().__init__()
        bad = sorted(set(config.dual_attention_layers) - set(range(config.num_layers)))
        if bad:
            raise ValueError(f"MMDiTConfig.dual_attention_layers: {bad} outside the {config.num_layers} blocks")
        self.config = config
        D, n = config.width, config.num_layers
        self.pos_embed = PatchEmbed(config)
        self.time_text_embed = TimeTextEmbedding(config)
        self.context_embedder = nn.Linear(config.context_dim, D)
        dual = set(config.dual_attention_layers)
        self.transformer_blocks = nn.ModuleList([
            JointTransformerBlock(config, pre_only=i == n - 1, dual=i in dual) for i in range(n)])
        self.norm_out = AdaLayerNorm(D, 2)
        self.proj_out = nn.Linear(D, config.patch_size ** 2 * config.out_channels)
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"MMDiT: latent size {H}×{W} is not a multiple of the patch size {p}")
        tokens = self.pos_embed(x)  # (B, hw, D)
        temb = self.time_text_embed(t, pooled)  # (B, D)
        c = self.context_embedder(context)  # (B, L, D)
        for block in self.transformer_blocks:
            tokens, c = run(block, self.gradient_checkpointing, tokens, c, temb)  # (B, hw, D), (B, L, D)
        h, (scale, shift) = self.norm_out(tokens, temb)
        out = self.proj_out(modulate(h, shift, scale))  # (B, hw, p·p·C)
        out = out.reshape(B, H // p, W // p, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p, w, p)
        return out.reshape(B, -1, H, W)  # (B, C, H, W)
