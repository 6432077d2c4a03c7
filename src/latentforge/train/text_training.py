"""`train_text_encoder = true`: fine-tune the text model together with the UNet.

The cached text contexts were made by the text model as it was; once it trains they are stale, so every
step re-encodes the batch's captions (a dropped caption — caption dropout — becomes "", the null caption)
with autograd on. The text model stays in eval mode: its dropout is off, so a step is still a function of
(seed, stream position) and resume stays bitwise, 2 processes equal to 1. It has no EMA: the exported
`model/text_encoder/` holds its trained weights (next to the EMA UNet), as diffusers' train_text_to_image
does. Its gradients are averaged over ranks here (DDP wraps only the UNet).

`lora.text_encoder = true` (an adapter run) takes the same path with the text model frozen and adapters on
it (train/adapter.py `attach_text`): the captions are re-encoded through the adapted model every step.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..errors import UserError
from .adapter import adapts_text
from .step import Batch


def enabled(cfg) -> bool:
    """The text model trains (all of it, or its adapters): captions are re-encoded every step."""
    return cfg.train_text_encoder or adapts_text(cfg)


def check(cfg, dataset, text_encoder) -> None:
    """train_text_encoder / lora.text_encoder need a captioned cache and a single transformers text encoder."""
    if not enabled(cfg):
        return
    key = "train_text_encoder" if cfg.train_text_encoder else "lora.text_encoder"
    if cfg.conditioning != "text":
        raise UserError(f"{key}=true: the data has no captions — use captioned data, or set {key}=false")
    if text_encoder is None or not hasattr(text_encoder, "contexts"):
        raise UserError(f"{key}=true: needs the cache's text encoder (one transformers model; "
                        f"SDXL's two encoders are not trained) — set {key}=false")
    item = dataset[0]
    if item.get("caption") is None:
        raise UserError(f"{key}=true: the cache holds no captions — rebuild it with this version of "
                        f"latentforge (latentforge cache), or set {key}=false")


def unfreeze(text_encoder) -> torch.nn.Module:
    """The text model, trainable (requires_grad) but in eval mode (no dropout)."""
    return text_encoder.model.eval().requires_grad_(True)


def encode_batch(text_encoder, batch: Batch, drop: torch.Tensor) -> Batch:
    """The batch with its context re-encoded from its captions, with autograd; dropped captions -> ""."""
    captions = ["" if d else c for c, d in zip(batch.captions, drop.tolist())]
    context, mask = text_encoder.contexts(captions)  # (B, L, D), (B, L)
    return replace(batch, context=context, mask=mask)


def average_gradients(params, d) -> None:
    """All-reduce (mean over ranks) the gradients of parameters that DDP does not manage."""
    if not d.enabled:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(d.world_size)
