"""Configuration as plain data: frozen dataclasses, named presets, TOML loading, key=value overrides.

Each concept owns one dataclass. Presets are plain values: `tiny` (tests, < 1 M parameters),
`small` (trainable on a 2-core CPU), `sd15` (Stable Diffusion 1.5 shapes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

IntOrTuple = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class UNetConfig:
    """SD 1.x/2.x-family UNet. One entry per resolution level in `channels` / `attention`."""

    in_channels: int = 4
    out_channels: int = 4
    channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_level: int = 2
    attention: Tuple[bool, ...] = (True, True, True, False)  # per level: transformer blocks or not
    num_heads: Optional[IntOrTuple] = 8  # heads per level (int or per level); SD 1.x style
    head_dim: Optional[IntOrTuple] = None  # alternatively channels per head (SD 2.x style); wins if set
    transformer_layers: int = 1
    cross_attention_dim: Optional[int] = 768  # None -> no cross-attention (unconditional / class-only)
    use_linear_projection: bool = False
    num_class_embeds: Optional[int] = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    mid_attention: bool = True
    sample_size: int = 64  # latent side, recorded for the diffusers config


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder. Downsamples by 2**(len(channels)-1) per side."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_level: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    sample_size: int = 512
    mid_attention: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward noising process q(x_t | x_0). Mirrors diffusers' DDPMScheduler config keys."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2 (alias: cosine)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample


@dataclass(frozen=True)
class ModelPreset:
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


PRESETS = {
    # Tests: < 1 M parameters, 4x VAE downsampling, runs in milliseconds.
    "tiny": ModelPreset(
        unet=UNetConfig(
            channels=(32, 64), layers_per_level=1, attention=(False, True), num_heads=2,
            cross_attention_dim=32, norm_groups=8, sample_size=8,
        ),
        vae=VAEConfig(channels=(16, 32), layers_per_level=1, norm_groups=8, sample_size=32),
    ),
    # Sized for training on a 2-core CPU (shapes demo, benchmarks).
    "small": ModelPreset(
        unet=UNetConfig(
            channels=(64, 128, 256), layers_per_level=2, attention=(True, True, False), num_heads=4,
            cross_attention_dim=384, norm_groups=32, sample_size=16,
        ),
        vae=VAEConfig(channels=(32, 64, 128), layers_per_level=1, norm_groups=32, sample_size=64),
    ),
    # Stable Diffusion 1.5 shapes: UNet 859,520,964 parameters, VAE 83,653,863.
    "sd15": ModelPreset(unet=UNetConfig(), vae=VAEConfig()),
}


def preset(name: str) -> ModelPreset:
    from .errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def replace(cfg, **changes):
    """dataclasses.replace, re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)
