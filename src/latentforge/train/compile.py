"""compile=true: torch.compile of the denoiser, for training (the loop) and sampling (`Pipeline.compile`).

Shapes are static (`dynamic=False`): every distinct input shape gets a graph specialised to it. A plain cache
has one latent shape, so a run compiles once; a bucketed cache has a few (one per bucket, data/buckets.py), so a
run compiles once per bucket shape it trains on — without `dynamic=False`, torch would turn to a dynamic-shape
graph at the second shape, slower for every step after. The recompile limit is raised to the number of shapes.
Validation and sample grids use the uncompiled module (their batch sizes differ; they run rarely).

The first step of each shape is the compilation: minutes for an SD-size UNet (156 s for SD 1.5 on an H200,
2026-12-04), warned once per process. The compiled step computes the same function with other kernels (fused,
reordered reductions), so it agrees with the eager step to rounding, not bitwise; a compiled run resumed compiled
stays bitwise (same graphs, same kernels).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import torch

FIRST_STEP_WARNING = ("compile=true: the first step (and the first of every new latent shape) compiles the UNet, "
                      "which takes minutes for an SD-size model; the steps after it run faster")
_warned = False


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles, then hands each to `backend`."""

    def __init__(self, backend: str = "inductor"):
        self.backend, self.graphs = backend, 0

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        return lookup_backend(self.backend)(gm, example_inputs)


def compile_denoiser(model: torch.nn.Module, shapes: int = 1, backend="inductor",
                     warn: Optional[Callable[[str], None]] = None) -> torch.nn.Module:
    """`model` under torch.compile with static shapes, allowed `shapes` distinct input shapes (+ 2 spare) before
    torch falls back to eager. `backend`: a name or a callable (CountingBackend)."""
    global _warned
    if not _warned:
        (warn or (lambda m: print(m, file=sys.stderr)))(FIRST_STEP_WARNING)
        _warned = True
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.6's name
    setattr(config, name, max(getattr(config, name), shapes + 2))
    return torch.compile(model, dynamic=False, backend=backend)


def count_shapes(dataset) -> int:
    """Distinct latent shapes of a dataset: its buckets, or 1."""
    return len(set(getattr(dataset, "buckets", None) or ["one"]))
