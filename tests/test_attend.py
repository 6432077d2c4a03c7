"""models/attend.py: every route of the attention kernel computes softmax(q kᵀ/√d + bias) v.

Reference: the formula itself in float64 (Vaswani et al. 2017, eq. 1), forward and gradients.
"""

from __future__ import annotations

import pytest
import torch

from latentforge.models import attend as A


def reference(q, k, v, keep=None):
    """softmax(q kᵀ/√d + bias) v in float64; a fully masked row attends uniformly (as diffusers' finite bias)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5  # (B, h, N, L)
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], torch.finfo(torch.float64).min)
    return s.softmax(-1) @ v


def qkv(B, h, N, L, d, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, h, n, d, generator=g).to(dtype) for n in (N, L, L)]


# (B, h, N, L, d), dtype -> the CPU route the rules pick with gradients (see models/attend.py)
SHAPES = {
    ((2, 2, 64, 8, 16), torch.float32): "flash",      # fp32: always the flash kernel
    ((2, 2, 64, 160, 8), torch.float32): "flash",     # head_dim 8: the zero-padded flash kernel
    ((2, 2, 64, 8, 16), torch.bfloat16): "explicit",  # bf16 training
    ((2, 2, 16, 8, 16), torch.bfloat16): "flash",     # fewer queries than EXPLICIT_MIN_QUERIES: flash in fp32
}


@pytest.mark.parametrize("shape,dtype", list(SHAPES))
def test_each_route_is_the_formula_forward_and_backward(shape, dtype):
    q, k, v = (u.requires_grad_() for u in qkv(*shape, dtype=dtype))
    assert A.cpu_route(q, k, upcast=False) == SHAPES[shape, dtype]
    out = A.attend(q, k, v)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    ref_inputs = [u.detach().double().requires_grad_() for u in (q, k, v)]
    ref = reference(*ref_inputs)
    assert out.dtype == dtype and out.shape == ref.shape
    assert (out.double() - ref).abs().max() < tol
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    theirs = torch.autograd.grad(ref, ref_inputs, g.double())
    for a, b in zip(ours, theirs):
        assert a.dtype == dtype and (a.double() - b).abs().max() < (1e-4 if dtype == torch.float32 else
                                                                      5e-2 * b.abs().max())


@pytest.mark.parametrize("dtype,shape", [(torch.float32, (2, 2, 64, 8, 16)), (torch.float32, (2, 2, 64, 160, 8)),
                                         (torch.bfloat16, (2, 2, 64, 8, 16))])
def test_key_padding_with_a_fully_masked_row_stays_finite(dtype, shape):
    # fp32: the flash kernel (the second shape padded to 16 channels); bf16 with gradients: the explicit route
    q, k, v = (u.requires_grad_() for u in qkv(*shape, dtype=dtype))
    keep = torch.ones(shape[0], shape[3], dtype=torch.bool)
    keep[0, 3:] = False  # first sample: 3 keys kept
    keep[1, :] = False  # second sample: nothing kept -> uniform weights
    out = A.attend(q, k, v, keep)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.isfinite(out).all()
    assert (out.double() - reference(q, k, v, keep)).abs().max() < tol
    assert (out[1].double() - v[1].double().mean(-2, keepdim=True)).abs().max() < tol


@pytest.mark.parametrize("grad", [True, False])
def test_bf16_routes_match_the_formula_to_bf16_precision(grad):
    # bf16 with gradients (training): the explicit route in bf16; without (sampling): torch's bf16 flash kernel
    shape = (2, 2, 64, 8, 16)
    q, k, v = qkv(*shape, dtype=torch.bfloat16)
    keep = torch.ones(2, 8, dtype=torch.bool)
    keep[1, :] = False
    with torch.set_grad_enabled(grad):
        assert A.cpu_route(q, k, upcast=False) == ("explicit" if grad else "flash")
        out = A.attend(q, k, v, keep)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.double() - reference(q, k, v, keep)).abs().max() < 3e-2


def test_upcast_computes_in_fp32_and_returns_the_inputs_dtype():
    q, k, v = qkv(2, 2, 64, 160, 16, dtype=torch.bfloat16)
    out = A.attend(q, k, v, upcast=True)
    assert out.dtype == torch.bfloat16
    # fp32 compute: the only error is the final rounding to bf16 (relative 2^-8)
    ref = reference(q, k, v)
    assert ((out.double() - ref).abs() <= ref.abs() * 2 ** -8 + 1e-6).all()


def test_large_score_matrices_never_take_the_explicit_route():
    q = torch.empty(1, 1, 1 << 12, 16, device="meta")
    k = torch.empty(1, 1, (A.EXPLICIT_MAX_SCORES >> 12) + 1, 16, device="meta")
    for dtype in (torch.float32, torch.bfloat16):
        assert A.cpu_route(q.to(dtype), k.to(dtype), upcast=False) == "flash"
