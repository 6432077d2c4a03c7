"""Adapter dropout (PEFT's `lora_dropout`) whose masks are a function of (sample, layer), not of the process.

torch's dropout draws from the process's RNG, so under DDP every rank draws its own masks and 2 processes
do not train like 1. Here the training step names its samples instead:

    with sample_keys([unet, text_model], keys):    # keys[b]: one int per sample of the batch,
        loss = ...; loss.backward()                # train/loop.py: mix(seed, "lora-dropout", stream position)

and each adapter layer draws sample b's mask from a generator seeded with (keys[b], the layer's path):
the same sample at the same stream position gets the same mask on any rank, after any `--resume`, and
again when gradient checkpointing recomputes the layer (the keys are module attributes, so autograd's
worker threads see them too). Outside `sample_keys` (sampling, validation, a plain forward) nothing is
dropped. Kept units are scaled by 1/(1 − p) as in torch (Srivastava et al. 2014, inverted dropout).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from typing import Iterable, List, Optional

import torch
from torch import nn


def _seed(key: int, name: str) -> int:
    digest = hashlib.blake2b(f"{key}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class KeyedDropout(nn.Module):
    """Dropout with probability `p`; the mask of sample b is drawn from (keys[b], `name`)."""

    def __init__(self, p: float, name: str = ""):
        super().__init__()
        self.p, self.name = float(p), name
        self.keys: Optional[List[int]] = None  # set by sample_keys for the duration of a training step

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.keys is None:
            return x
        if len(self.keys) != x.shape[0]:
            raise RuntimeError(f"adapter dropout {self.name}: {len(self.keys)} sample keys for a batch of {x.shape[0]}")
        keep = []
        for key in self.keys:
            g = torch.Generator(device=x.device).manual_seed(_seed(key, self.name))
            keep.append(torch.rand(x.shape[1:], generator=g, device=x.device) >= self.p)  # (...) of one sample
        return x * (torch.stack(keep).to(x.dtype) / (1.0 - self.p))  # (B, ...)

    def extra_repr(self) -> str:
        return f"p={self.p:g}"


@contextmanager
def sample_keys(modules: Iterable[nn.Module], keys: List[int]):
    """Name the batch's samples to every KeyedDropout inside `modules` for the duration (forward and backward)."""
    layers = [m for module in modules for m in module.modules() if isinstance(m, KeyedDropout)]
    for m in layers:
        m.keys = list(keys)
    try:
        yield layers
    finally:
        for m in layers:
            m.keys = None
