"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper around a UNet `model_fn(x_t, t, **cond)`.

    out = out_uncond + scale · (out_cond - out_uncond)

The conditional and unconditional branches run as ONE batched call, [uncond; cond] like diffusers.
The "unconditional" branch is whatever the model was trained to treat as no condition: the empty
caption's context (or a negative prompt's), or the null class label. Guidance acts on the raw model
output (ε, v or x0 alike — it is linear), before the sampler's Denoiser converts it.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, phi: float) -> torch.Tensor:
    """Pull the guided output's per-sample std back to the conditional one's, by a fraction φ
    (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4, eq. 15-16)."""
    dims = list(range(1, guided.ndim))
    rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def _batch(value: torch.Tensor, n: int) -> torch.Tensor:
    return value.expand(n, *value.shape[1:]) if value.shape[0] == 1 and n != 1 else value


def classifier_free_guidance(model_fn: Callable, cond: Dict[str, Optional[torch.Tensor]],
                             uncond: Dict[str, Optional[torch.Tensor]], scale: float,
                             rescale: float = 0.0) -> Callable:
    """-> model_fn(x, t) guided by `scale`. Scale ≤ 1 means no guidance (the conditional branch alone,
    one call of batch B), as in diffusers; otherwise one call of batch 2B.

    cond / uncond: keyword arguments of model_fn (context, class_labels, ...); None values are dropped;
    an uncond entry of batch 1 is broadcast to the batch (one empty caption serves every sample).
    """
    cond = {k: v for k, v in cond.items() if v is not None}
    if scale <= 1.0:
        return lambda x, t: model_fn(x, t, **cond)
    uncond = {k: v for k, v in uncond.items() if v is not None}
    if set(cond) != set(uncond):
        raise ValueError(f"cond has {sorted(cond)}, uncond has {sorted(uncond)}: give both the same keys")

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        both = {k: torch.cat([_batch(uncond[k], B), _batch(cond[k], B)]) for k in cond}  # (2B, ...)
        t = t.expand(B) if t.ndim == 0 else t
        out_u, out_c = model_fn(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)  # (B, C, h, w) each
        out = out_u + scale * (out_c - out_u)
        return rescale_guidance(out, out_c, rescale) if rescale > 0 else out

    return guided
