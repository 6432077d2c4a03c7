"""The KL autoencoder (VAE) that maps images to latents and back (Rombach et al. 2022, §3.1).

Encoder: conv_in -> levels of ResnetBlocks + stride-2 downsample -> mid (Resnet, self-attention, Resnet)
-> norm/SiLU/conv_out to 2·latent channels (mean, log-variance) -> quant_conv.
Decoder: post_quant_conv -> conv_in -> mid -> levels of ResnetBlocks + ×2 upsample -> norm/SiLU/conv_out.
The posterior is a diagonal Gaussian (Kingma & Welling 2014); its KL to N(0, I) regularises training.

Module names are diffusers' `AutoencoderKL` names, so weights load 1:1.

This file is the only place that knows the latent scaling: `encode` returns (z - shift_factor) · scaling_factor,
`decode` undoes it. Everything downstream (cache, UNet, samplers) works in scaled latents.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig
from .pretrained import PretrainedModule
from .layers import Downsample, MidBlock, ResnetBlock, SpatialSelfAttention, Upsample, run

_EPS = 1e-6  # GroupNorm eps throughout the VAE


class DiagonalGaussian:
    """N(mean, diag(exp(logvar))) from the encoder's (B, 2·C, h, w) moments; log-variance clamped to [-30, 20]."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, C, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """z = mean + std · ε, ε ~ N(0, I) (the reparameterisation trick, Kingma & Welling 2014 §2.4)."""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q ‖ N(0, I)) per sample, summed over (C, h, w): ½ Σ (μ² + σ² − 1 − log σ²). Shape (B,)."""
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


def _mid(config: VAEConfig) -> MidBlock:
    c = config.channels[-1]
    attn = SpatialSelfAttention(c, head_dim=c, groups=config.norm_groups, eps=_EPS) if config.mid_attention else None
    return MidBlock(c, None, attn, config.norm_groups, _EPS, num_resnets=2)


class EncoderLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, _EPS)
                                      for i in range(layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)]) if downsample else None
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = run(resnet, self.gradient_checkpointing, x)  # (B, C_out, H, W)
        return x if self.downsamplers is None else self.downsamplers[0](x)  # (B, C_out, H/2, W/2)


class DecoderLevel(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, _EPS)
                                      for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = run(resnet, self.gradient_checkpointing, x)  # (B, C_out, H, W)
        return x if self.upsamplers is None else self.upsamplers[0](x)  # (B, C_out, 2H, 2W)


class Encoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, n, g = config.channels, len(config.channels), config.norm_groups
        self.conv_in = nn.Conv2d(config.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([EncoderLevel(ch[max(i - 1, 0)], ch[i], config.layers_per_level, g, i < n - 1)
                                          for i in range(n)])
        self.mid_block = _mid(config)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * config.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, C0, H, W)
        for level in self.down_blocks:
            h = level(h)  # (B, C_i, H/2^i, W/2^i)
        h = self.mid_block(h)  # (B, C_last, h, w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 2·latent, h, w)


class Decoder(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        ch, n, g = config.channels[::-1], len(config.channels), config.norm_groups
        self.conv_in = nn.Conv2d(config.latent_channels, ch[0], 3, padding=1)
        self.mid_block = _mid(config)
        self.up_blocks = nn.ModuleList([DecoderLevel(ch[max(i - 1, 0)], ch[i], config.layers_per_level + 1, g, i < n - 1)
                                        for i in range(n)])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=_EPS)
        self.conv_out = nn.Conv2d(ch[-1], config.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid_block(self.conv_in(z))  # (B, C_last, h, w)
        for level in self.up_blocks:
            h = level(h)  # (B, C_i, ·, ·), doubling the side at each level but the last
        return self.conv_out(F.silu(self.conv_norm_out(h)))  # (B, 3, H, W)


class AutoencoderKL(PretrainedModule):
    """Images in [-1, 1] (B, 3, H, W) <-> scaled latents (B, latent_channels, H/f, W/f), f = downsample_factor."""

    component = "vae"  # its diffusers sub-folder (PretrainedModule.from_pretrained)

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        c = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if config.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.encoder.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    # ------------------------------------------------------------------ the latent convention (only here)

    def _scale(self, z: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift_factor or 0.0
        return (z - shift) * self.config.scaling_factor

    def _unscale(self, latents: torch.Tensor) -> torch.Tensor:
        shift = self.config.shift_factor or 0.0
        return latents / self.config.scaling_factor + shift

    @torch.no_grad()
    def calibrate_latent_scale(self, images: torch.Tensor, batch: int = 16) -> float:
        """Set the scale to 1/std of the posterior modes of `images` (no shift), so a UNet trains on
        unit-variance latents — how SD's 0.18215 was chosen (Rombach et al. 2022, Sec. 4.3.2). -> the scale."""
        z = torch.cat([self.encode_posterior(images[i:i + batch].to(self.device, self.dtype)).mode()
                       for i in range(0, len(images), batch)])  # (N, C, h, w)
        scale = 1.0 / max(z.float().std().item(), 1e-6)
        self.config = dataclasses.replace(self.config, scaling_factor=scale, shift_factor=None)
        return scale

    # ------------------------------------------------------------------ encode / decode

    def encode_posterior(self, images: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) in the raw (unscaled) latent space."""
        moments = self.encoder(images)  # (B, 2·C, h, w)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def encode(self, images: torch.Tensor, sample: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, C, H/f, W/f): posterior sample or mode."""
        posterior = self.encode_posterior(images)
        z = posterior.sample(generator) if sample else posterior.mode()
        return self._scale(z)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent z -> image (B, 3, H, W); for VAE training, which never sees scaled latents."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents (B, C, h, w) -> images (B, 3, h·f, w·f), roughly in [-1, 1] (not clamped)."""
        return self.decode_raw(self._unscale(latents))

    def forward(self, images: torch.Tensor, sample: bool = True,
                generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, DiagonalGaussian]:
        """For VAE training: (reconstruction (B, 3, H, W), posterior)."""
        posterior = self.encode_posterior(images)
        z = posterior.sample(generator) if sample else posterior.mode()  # (B, C, h, w)
        return self.decode_raw(z), posterior
