"""Learning-rate schedule: linear warmup, then cosine decay to `min_lr` or constant.

A pure function of the step, so resuming needs nothing but the step number.
"""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, schedule: str = "cosine", warmup_steps: int = 0,
          max_steps: int = 1, min_lr: float = 0.0) -> float:
    """LR for optimizer step `step` (0-based).

    warmup: lr · (step+1)/warmup for step < warmup (Goyal et al. 2017);
    cosine: min_lr + ½(lr - min_lr)(1 + cos(π·p)), p = progress after warmup in [0, 1]
            (SGDR, Loshchilov & Hutter 2017, without restarts).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    p = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * p))


def lr_for(cfg, step: int) -> float:
    """`lr_at` with the settings of a TrainConfig / VAETrainConfig."""
    return lr_at(step, cfg.lr, cfg.lr_schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr)

