"""Tolerances derived from the computation, not tuned on one processor's kernels.

Two float computations of one mathematical value differ when they sum the same terms in another order: another
kernel (MKL's AVX2 vs AVX-512 GEMM, oneDNN's convolution blocking), a batch split across processes or
micro-batches, recomputation under gradient checkpointing. How far apart they can be follows from three things:
the scale of the terms, the dtype's unit roundoff u = eps/2, and how many terms each reduction sums (its width)
and how many reductions follow each other (its depth). This module is the one owner of that formula; a test that
compares such computations takes its bound from here. Where the computation is the same, tests stay bitwise.

The per-reduction bound is the probabilistic one of Higham & Mary 2019 ("A New Approach to Probabilistic Rounding
Error Analysis", SIAM J. Sci. Comput. 41(5), Theorem 3.1): the computed sum of n terms is within λ·√n·u·Σ|x_i| of
the exact one with probability at least 1 − 2·exp(−λ²(1−u)²/2). The worst-case bound γ_n·Σ|x_i| (Higham 2002,
"Accuracy and Stability of Numerical Algorithms", eq. (4.4)) is attained only by adversarial rounding and would
make every comparison √n times looser than any kernel can produce.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

# λ = 7: 2·exp(−24.5) ≈ 5e-11 per compared value, so a million-element comparison fails by chance with
# probability below 1e-4.
LAMBDA = 7.0


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u = eps / 2: the largest relative error of one rounding (2**-24 for float32, 2**-8 for bfloat16)."""
    return torch.finfo(dtype).eps / 2


def reorder_rel(width: int, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Relative distance between two evaluations that sum the same terms in different orders.

    Each evaluation of a width-n reduction is within λ·√n·u of the exact sum (relative to Σ|x_i|); two
    evaluations are within twice that of each other. `depth` reductions in sequence pass each layer's error on
    as a relative perturbation of the next layer's terms; under the same model (rounding errors independent,
    mean zero) they add in quadrature, as the n roundings of one sum do: λ·√(depth·n)·u."""
    return 2 * LAMBDA * math.sqrt(depth * width) * unit_roundoff(dtype)


def reorder_tol(scale: float, width: int, depth: int = 1, dtype: torch.dtype = torch.float32) -> float:
    """Absolute bound: `scale` is the size of the summed terms (Σ|x_i| of the last reduction, or the largest
    magnitude of the compared values where the terms do not cancel)."""
    return scale * reorder_rel(width, depth, dtype)


def adamw_tol(*, lr: float, steps: int, adam_eps: float, grad_scale: float, width: int, depth: int,
              dtype: torch.dtype = torch.float32) -> float:
    """Largest |w_a − w_b| after `steps` AdamW steps of two runs whose gradients differ only by summation order.

    AdamW's step lr·m̂/(√v̂ + ε) moves by at most 1.25·lr·δ/ε when every gradient moves by at most δ: m̂ is a
    convex combination of the gradients (factor 1/ε), √v̂ is 1-Lipschitz in them and |m̂|/(√v̂ + ε)² ≤ 1/(4ε)
    (factor 1/(4ε)); decoupled weight decay only contracts the difference. δ = reorder_tol(grad_scale, ...). The
    steps add up; a factor 2 covers the second-order drift (later gradients are taken at weights that already differ
    by this bound). The bound is linear in 1/ε, so a test that wants it to be tight sets `adam_eps` near the size
    of the gradient's elements (Adam's default 1e-8 makes the step a sign function, which no bound can follow
    near zero gradients). EMA weights are convex combinations of the weights and obey the same bound."""
    return 2 * steps * 1.25 * lr / adam_eps * reorder_tol(grad_scale, width, depth, dtype)


def network_shape(state: dict, positions: int) -> tuple[int, int]:
    """(width, depth) of a network from its weights: width = the longest reduction (the largest fan-in
    in·k·k of a weight, or `positions` = batch × spatial positions, which a weight's gradient sums over);
    depth = the number of weight matrices and kernels (an upper bound on the reductions any path meets)."""
    mats = [t for t in state.values() if t.dim() >= 2]
    fan_in = max(t[0].numel() for t in mats)
    return max(fan_in, positions), len(mats)


def training_tols(rows: list[dict], *, lr: float, adam_eps: float, width: int, depth: int, n_params: int,
                  grad_clip: float = 1.0) -> tuple[float, list[float]]:
    """(weights bound, per-step loss bounds) for two runs that differ only by summation order, from the
    reference run's logged rows (`loss`, `grad_norm`). (width, depth) is the network's (network_shape), n_params
    the number of trained parameters. The gradient's scale is the largest logged norm, clipped as the step clips
    it: ‖g‖₂ bounds every element, so the bound is conservative where the gradient spreads over many elements.
    The first step's loss sees equal weights and only its own reordering; step i adds the first-order drift of
    weights that differ by the bound after i steps: ‖∇L‖₂·‖δw‖₂ ≤ g·√n_params·adamw_tol(i)."""
    rows = [r for r in rows if "loss" in r]
    norms = [r["grad_norm"] for r in rows]
    g = min(max(norms), grad_clip) if grad_clip else max(norms)
    tol = lambda steps: adamw_tol(lr=lr, steps=steps, adam_eps=adam_eps, grad_scale=g,  # noqa: E731
                                  width=width, depth=depth)
    losses = [reorder_tol(abs(r["loss"]), width, depth) + g * math.sqrt(n_params) * tol(i) for i, r in enumerate(rows)]
    return tol(len(rows)), losses


def assert_close_tensors(got: dict, want: dict, tol: float, what: str = "") -> float:
    """Every tensor of `got` within `tol` of `want` (same keys); returns the largest difference seen."""
    assert got.keys() == want.keys(), f"{what}: keys differ"
    worst = max(((got[k].double() - want[k].double()).abs().max().item(), k) for k in want)
    assert worst[0] <= tol, f"{what}: {worst[1]} differs by {worst[0]:.3g} > derived bound {tol:.3g}"
    return worst[0]


def assert_close_losses(got: list[float], want: list[float], tols: list[float], what: str = "") -> None:
    assert len(got) == len(want) == len(tols), (what, got, want)
    for i, (a, b, t) in enumerate(zip(got, want, tols)):
        assert abs(a - b) <= t, f"{what}: loss at logged row {i} differs by {abs(a - b):.3g} > derived bound {t:.3g}"


def _metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_runs_match(ref, other, step: int, names=("model", "ema"), *, lr: float, adam_eps: float, positions: int,
                      net_state: dict | None = None, what: str = "") -> dict:
    """Two training runs that differ only by summation order (DDP vs one process, micro-batches vs one batch,
    gradient checkpointing) agree within the derived bounds: every logged loss (and held-out loss, at the step it
    was measured) and every tensor of checkpoint `step`'s `names` files. `net_state`: the whole network's weights
    when the checkpoint holds part of it (an adapter); by default the checkpoint's model file. Returns the bounds
    and the largest differences seen, for a test to print."""
    ckpt = lambda run, name: load_file(str(Path(run) / "checkpoints" / f"step-{step}" / f"{name}.safetensors"))  # noqa: E731
    trained = {f"{name}.{k}": v for name in names if name != "ema" for k, v in ckpt(ref, name).items()}
    width, depth = network_shape(net_state or trained, positions)
    n_params = sum(t.numel() for t in trained.values())  # every trained tensor (model, text encoder)
    rows = [r for r in _metrics(ref) if "loss" in r]
    w_tol, l_tols = training_tols(rows, lr=lr, adam_eps=adam_eps, width=width, depth=depth, n_params=n_params)
    got = [r["loss"] for r in _metrics(other) if "loss" in r]
    assert_close_losses(got, [r["loss"] for r in rows], l_tols, f"{what} training loss")
    g = max(r["grad_norm"] for r in rows)
    for key in ("val_loss", "val_loss_ema"):
        a, b = ([(r["step"], r[key]) for r in _metrics(run) if key in r] for run in (ref, other))
        assert [s for s, _ in a] == [s for s, _ in b], f"{what}: {key} measured at other steps"
        for (s, x), (_, y) in zip(a, b):
            tol = reorder_tol(abs(x), width, depth) + min(g, 1.0) * math.sqrt(n_params) * (w_tol * s / len(rows))
            assert abs(x - y) <= tol, f"{what}: {key} at step {s} differs by {abs(x - y):.3g} > derived {tol:.3g}"
    worst = {name: assert_close_tensors(ckpt(other, name), ckpt(ref, name), w_tol, f"{what} {name}") for name in names}
    return {"weights_tol": w_tol, "worst": worst, "width": width, "depth": depth}


def assert_same_function(got: torch.Tensor, want: torch.Tensor, net, *, positions: int = 1, evaluations: int = 1,
                         what: str = "") -> float:
    """Our network against the oracle's (diffusers) on the same weights and inputs: the same function computed
    with other kernels, fusions and summation orders. The bound is reorder_tol per evaluation with the scale of
    the oracle's output (the size of the last reduction's result; terms that cancel are covered by λ's slack),
    the network's (width, depth) from `net` (a module or a state dict) and `positions` (batch × positions a
    layer sums over); `evaluations` networks run in sequence (a sampler's steps, a VAE decode) add to first order.
    Returns the largest difference seen."""
    state = net.state_dict() if hasattr(net, "state_dict") else net
    width, depth = network_shape(state, positions)
    tol = evaluations * reorder_tol(want.detach().abs().max().item(), width, depth)
    diff = (got.detach().double() - want.detach().double()).abs().max().item()
    assert diff <= tol, f"{what}: differs by {diff:.3g} > derived bound {tol:.3g} (width {width}, depth {depth})"
    return diff


def sampling_evaluations(steps: int, cfg: float) -> int:
    """How many network evaluations' errors reach a generated image, to first order: each sampler step evaluates
    the UNet for both branches of classifier-free guidance, and u + s·(c − u) scales their errors by at most
    |1 − s| + s = 2s − 1 (s ≥ 1); the VAE decode adds one more. Solver steps are taken as passing an error on
    unamplified (the ODE solvers here move x towards the denoised estimate: a convex combination)."""
    return steps * max(1, math.ceil(2 * cfg - 1)) + 1
