"""The networks: the SD-style UNet, the SD3-style MMDiT and the KL autoencoder (VAE)."""

from .mmdit import MMDiT
from .unet import UNet
from .vae import AutoencoderKL

__all__ = ["UNet", "MMDiT", "AutoencoderKL"]
