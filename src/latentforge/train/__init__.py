"""Training: the UNet loop (`loop.train`, one step in `step.train_step`), the VAE's (`vae.train_vae`),
and the pieces they share — EMA, LR schedule, atomic checkpoints, DDP, the NaN guard."""

from .loop import TrainResult, train
from .step import train_step

__all__ = ["train", "train_step", "TrainResult"]
