"""Validation grids during training and the final model folder (EMA weights, diffusers layout)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def ema_unet(unet, ema):
    """A copy of `unet` holding the EMA weights, in eval mode."""
    model = copy.deepcopy(unet)
    ema.copy_to(model)
    return model.eval().requires_grad_(False)


def export_model(run: Path, cfg, unet, ema, vae=None, text_encoder=None) -> Path:
    raise NotImplementedError  # replaced once formats.diffusers lands


def maybe_sample(run: Path, step: int, cfg, unet, ema, vae=None, text_encoder=None, null=None):
    if vae is None:
        return None
    raise NotImplementedError
