"""The attention kernel: softmax(q kᵀ · scale + bias) v (Vaswani et al. 2017, eq. 1), by the fastest route.

On GPUs it is always torch's `scaled_dot_product_attention` (flash / memory-efficient kernels). On CPU the
best route depends on the dtype, whether gradients are needed and the shape (`bench/bench_attention.py` on the
`small` UNet's shapes — forward + backward at batch 16, forward alone at batch 4 — one thread of an AVX-512/AMX
Xeon, torch 2.13; its tables are in docs/BENCHMARKS.md §1):

- *explicit* — two batched GEMMs and a softmax (`baddbmm`, `softmax`, `bmm`): faster than the flash kernel in
  bf16 when gradients are needed (bf16 GEMMs run on AMX; torch's bf16 flash backward is several times slower
  than fp32's). It keeps the (N × L) weights for backward, so it is used only while they stay small
  (`EXPLICIT_MAX_SCORES` elements per call) and where the queries are not too few to pay its fixed costs.
- *flash* — torch's kernel; it never builds the weights. All fp32 attention uses it (training and
  sampling: the explicit route gains a few percent at most there, and one route keeps fp32 results
  independent of the grad mode); bf16 with gradients outside the explicit route's limits runs it in fp32
  (faster than its bf16 backward); bf16 sampling runs it in bf16 directly.

Every route computes the same function; they differ in rounding only (fp32: ~1e-6).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

CPU_MIN_HEAD_DIM = 16  # the CPU flash kernel is ~1.5x slower (fwd+bwd) at head_dim 8 than at 16
EXPLICIT_MIN_QUERIES = 64  # below it (the 16-token middle block) the explicit route's fixed costs lose
EXPLICIT_MAX_SCORES = 1 << 23  # B·h·N·L elements: 32 MiB of fp32 weights kept for backward per call


def cpu_route(q: torch.Tensor, k: torch.Tensor, upcast: bool) -> str:
    """`explicit` or `flash` for q (B, h, N, d), k (B, h, L, d) on CPU (see the module docstring)."""
    B, h, N, _ = q.shape
    L = k.shape[2]
    if q.dtype == torch.float32 or upcast or not torch.is_grad_enabled():
        return "flash"
    return "flash" if B * h * N * L > EXPLICIT_MAX_SCORES or N < EXPLICIT_MIN_QUERIES else "explicit"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: Optional[torch.Tensor] = None,
           upcast: bool = False) -> torch.Tensor:
    """q (B, h, N, d), k/v (B, h, L, d), keep (B, L) bool (True = attend to that key) or None
    -> (B, h, N, d) in q's dtype. `upcast`: compute in fp32 whatever the inputs' dtype (SD 2.x's
    `upcast_attention`)."""
    dtype = q.dtype
    route = "gpu" if q.device.type != "cpu" else cpu_route(q, k, upcast)
    if dtype != torch.float32 and (upcast or (route == "flash" and torch.is_grad_enabled())):
        q, k, v = q.float(), k.float(), v.float()
    bias = None if keep is None else key_padding_bias(keep, q.dtype)  # (B, 1, 1, L)
    if route == "gpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias).to(dtype)
    if route == "explicit":
        return _explicit(q, k, v, bias).to(dtype)
    return _cpu_flash(q, k, v, bias).to(dtype)


def key_padding_bias(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L) bool, True = attend -> (B, 1, 1, L) additive bias (0 or the dtype's most negative number).

    A finite negative instead of -inf keeps a fully padded row finite (uniform weights, like diffusers).
    """
    bias = torch.zeros(keep.shape, dtype=dtype, device=keep.device)
    bias = bias.masked_fill(~keep.bool(), torch.finfo(dtype).min)
    return bias[:, None, None, :]


def _explicit(q, k, v, bias):
    """softmax(q kᵀ/√d + bias) v as baddbmm → softmax → bmm, heads folded into the batch."""
    B, h, N, d = q.shape
    L = k.shape[2]
    q3, k3, v3 = q.reshape(B * h, N, d), k.reshape(B * h, L, d), v.reshape(B * h, L, d)  # (Bh, ·, d)
    if bias is None:
        scores = torch.baddbmm(q3.new_empty(1), q3, k3.transpose(1, 2), beta=0, alpha=d ** -0.5)  # (Bh, N, L)
    else:
        full = bias.expand(B, h, 1, L).reshape(B * h, 1, L)  # (Bh, 1, L)
        scores = torch.baddbmm(full, q3, k3.transpose(1, 2), alpha=d ** -0.5)  # (Bh, N, L)
    return torch.bmm(scores.softmax(-1), v3).reshape(B, h, N, d)  # (B, h, N, d)


def _cpu_flash(q, k, v, bias):
    d = q.shape[-1]
    if d < CPU_MIN_HEAD_DIM:
        # Zero-padding q, k, v to 16 leaves q·kᵀ and the first d output columns unchanged (scale stays 1/√d).
        q, k, v = (F.pad(u, (0, CPU_MIN_HEAD_DIM - d)) for u in (q, k, v))  # (B, h, ·, 16)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=d ** -0.5)[..., :d]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, h, N, d)
