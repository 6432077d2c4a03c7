"""The SD 1.x/2.x-family UNet: ε/v/x0 prediction from (noisy latent, timestep, text context).

conv_in -> down levels (ResnetBlocks [+ attention], downsample) -> mid (Resnet, attention, Resnet)
-> up levels (concatenate the matching skip, ResnetBlocks [+ attention], upsample) -> norm/SiLU/conv_out.
Ronneberger et al. 2015 (skips), Ho et al. 2020 (timestep-conditioned ResnetBlocks),
Rombach et al. 2022 (cross-attention to the text context).

The module tree is exactly diffusers' `UNet2DConditionModel` (CrossAttnDownBlock2D/DownBlock2D,
UNetMidBlock2DCrossAttn, CrossAttnUpBlock2D/UpBlock2D; AttnDownBlock2D/AttnUpBlock2D when there is no
cross-attention), so its state_dict keys are diffusers' keys and weights load 1:1.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import UNetConfig
from .pretrained import PretrainedModule
from .layers import (
    Downsample, MidBlock, ResnetBlock, SpatialSelfAttention, SpatialTransformer, TimestepEmbedding, Upsample,
    run, timestep_embedding,
)


def _attention(config: UNetConfig, channels: int, heads: int, depth: int) -> nn.Module:
    """A cross-attention SpatialTransformer of `depth` blocks, or plain spatial self-attention without a context."""
    if config.cross_attention_dim is None:
        return SpatialSelfAttention(channels, channels // heads, config.norm_groups, config.norm_eps)
    return SpatialTransformer(channels, heads, channels // heads, depth, config.cross_attention_dim,
                              config.norm_groups, config.use_linear_projection, config.upcast_attention)


def micro_conditioning(text_embeds: torch.Tensor, time_ids: torch.Tensor, config: UNetConfig) -> torch.Tensor:
    """SDXL micro-conditioning input (Podell et al. 2023, §2.2): a sinusoidal embedding of each size/crop
    number (B, K), concatenated after the pooled text embedding (B, P) -> (B, P + K·dim).

    diffusers' `addition_embed_type="text_time"` (`add_time_proj`; the `add_embedding` MLP follows).
    """
    B, dim = text_embeds.shape[0], config.addition_time_embed_dim
    emb = timestep_embedding(time_ids.flatten(), dim, config.flip_sin_to_cos, config.freq_shift)  # (B·K, dim)
    return torch.cat([text_embeds, emb.reshape(B, -1).to(text_embeds.dtype)], dim=-1)  # (B, P + K·dim)


def time_ids(original_size, crop_top_left, target_size) -> torch.Tensor:
    """SDXL's six micro-conditioning numbers (Podell et al. 2023, §2.2): original (height, width) of the
    training image, the (top, left) of its crop, and the target (height, width) -> (6,) float32, in the
    order of diffusers' `add_time_ids` (`original_size + crops_coords_top_left + target_size`)."""
    values = [*original_size, *crop_top_left, *target_size]
    if len(values) != 6:
        raise ValueError(f"time_ids: expected (H, W), (top, left), (H, W), got {values}")
    return torch.tensor([float(v) for v in values])  # (6,)


class DownLevel(nn.Module):
    """`layers` ResnetBlocks (each followed by attention if enabled), then a stride-2 downsample."""

    def __init__(self, config: UNetConfig, in_ch: int, out_ch: int, temb_ch: int, heads: int, depth: int,
                 attention: bool, downsample: bool):
        super().__init__()
        g, eps = config.norm_groups, config.norm_eps
        n = config.layers_per_level
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, g, eps) for i in range(n)])
        self.attentions = nn.ModuleList([_attention(config, out_ch, heads, depth) for _ in range(n)] if attention else [])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None
        self.gradient_checkpointing = False

    def forward(self, x, temb, context=None, mask=None) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        ckpt, skips = self.gradient_checkpointing, []
        for i, resnet in enumerate(self.resnets):
            x = run(resnet, ckpt, x, temb)  # (B, C_out, H, W)
            if self.attentions:
                x = run(self.attentions[i], ckpt, x, context, mask)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)  # (B, C_out, H/2, W/2)
            skips.append(x)
        return x, skips


class UpLevel(nn.Module):
    """`layers + 1` ResnetBlocks on [x, skip] (each followed by attention if enabled), then upsample ×2."""

    def __init__(self, config: UNetConfig, prev_ch: int, out_ch: int, skip_chs: List[int], temb_ch: int, heads: int,
                 depth: int, attention: bool, upsample: bool):
        super().__init__()
        g, eps = config.norm_groups, config.norm_eps
        ins = [prev_ch] + [out_ch] * (len(skip_chs) - 1)
        self.resnets = nn.ModuleList([ResnetBlock(i + s, out_ch, temb_ch, g, eps) for i, s in zip(ins, skip_chs)])
        self.attentions = nn.ModuleList([_attention(config, out_ch, heads, depth) for _ in skip_chs] if attention else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None
        self.gradient_checkpointing = False

    def forward(self, x, skips: List[torch.Tensor], temb, context=None, mask=None) -> torch.Tensor:
        ckpt = self.gradient_checkpointing
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = run(resnet, ckpt, x, temb)  # (B, C_out, H, W)
            if self.attentions:
                x = run(self.attentions[i], ckpt, x, context, mask)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, skips[-1].shape[-2:])  # (B, C_out, H_skip, W_skip) ≈ 2H, 2W
        return x


class UNet(PretrainedModule):
    """Noise-prediction UNet. `forward(x, t, context, class_labels, context_mask) -> (B, out_channels, H, W)`."""

    component = "unet"  # its diffusers sub-folder (PretrainedModule.from_pretrained)

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        ch, n = config.channels, len(config.channels)
        if len(config.attention) != n:
            raise ValueError(f"UNetConfig.attention: {len(config.attention)} entries for {n} levels")
        heads, depths = config.level_heads(), config.level_depths()
        temb_ch = ch[0] * 4

        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch)
        self.class_embedding = nn.Embedding(config.num_class_embeds, temb_ch) if config.num_class_embeds else None
        if (config.addition_time_embed_dim is None) != (config.addition_input_dim is None):
            raise ValueError("UNetConfig: set both addition_time_embed_dim and addition_input_dim (text_time), or neither")
        self.add_embedding = TimestepEmbedding(config.addition_input_dim, temb_ch) if config.addition_input_dim else None

        self.down_blocks = nn.ModuleList()
        skip_chs = [ch[0]]  # channels of every skip tensor, in push order
        for i in range(n):
            last = i == n - 1
            self.down_blocks.append(
                DownLevel(config, ch[max(i - 1, 0)], ch[i], temb_ch, heads[i], depths[i], config.attention[i], not last))
            skip_chs += [ch[i]] * (config.layers_per_level + (0 if last else 1))

        mid_attn = None
        if config.mid_attention:
            if config.cross_attention_dim is None:
                raise ValueError("UNetConfig.mid_attention needs cross_attention_dim (diffusers' UNet2DConditionModel "
                                 "has no self-attention-only mid block); set mid_attention=False")
            mid_attn = _attention(config, ch[-1], heads[-1], depths[-1])
        self.mid_block = MidBlock(ch[-1], temb_ch, mid_attn, config.norm_groups, config.norm_eps, num_resnets=1)

        self.up_blocks = nn.ModuleList()
        prev = ch[-1]
        for j, i in enumerate(reversed(range(n))):
            k = config.layers_per_level + 1
            level_skips = [skip_chs.pop() for _ in range(k)]
            self.up_blocks.append(
                UpLevel(config, prev, ch[i], level_skips, temb_ch, heads[i], depths[i], config.attention[i],
                        upsample=i > 0))
            prev = ch[i]

        self.conv_norm_out = nn.GroupNorm(config.norm_groups, ch[0], eps=config.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], config.out_channels, 3, padding=1)

    # ------------------------------------------------------------------ forward

    def forward(self, x: torch.Tensor, t, context: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, context_mask: Optional[torch.Tensor] = None,
                text_embeds: Optional[torch.Tensor] = None, time_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """text_embeds (B, P) pooled text and time_ids (B, K) size/crop numbers: SDXL models only."""
        cfg = self.config
        t = torch.as_tensor(t, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t  # (B,)
        temb = timestep_embedding(t, cfg.channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).to(x.dtype)  # (B, C0)
        temb = self.time_embedding(temb)  # (B, 4·C0)
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("this UNet is class-conditional: pass class_labels (B,) long")
            temb = temb + self.class_embedding(class_labels).to(temb.dtype)  # (B, 4·C0)
        if self.add_embedding is not None:
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet is micro-conditioned (SDXL): pass text_embeds (B, P) and time_ids (B, K)")
            temb = temb + self.add_embedding(micro_conditioning(text_embeds, time_ids, cfg)).to(temb.dtype)  # (B, 4·C0)

        h = self.conv_in(x)  # (B, C0, H, W)
        skips = [h]
        for level in self.down_blocks:
            h, level_skips = level(h, temb, context, context_mask)  # (B, C_i, H/2^i, W/2^i)
            skips += level_skips
        h = self.mid_block(h, temb, context, context_mask)  # (B, C_last, h, w)
        for level in self.up_blocks:
            h = level(h, skips, temb, context, context_mask)  # consumes its skips; (B, C_i, ·, ·)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, out_channels, H, W)

    # ------------------------------------------------------------------ utilities

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype
