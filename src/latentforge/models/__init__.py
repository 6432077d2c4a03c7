"""The networks: the SD-style UNet and the KL autoencoder (VAE)."""

from .unet import UNet

__all__ = ["UNet"]
