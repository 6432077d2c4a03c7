"""The networks: the SD-style UNet and the KL autoencoder (VAE)."""

from .unet import UNet
from .vae import AutoencoderKL

__all__ = ["UNet", "AutoencoderKL"]
