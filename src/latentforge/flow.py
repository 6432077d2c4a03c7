"""Rectified flow (flow matching): the objective of the transformer families (SD3, Flux), family-independent.

Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image Synthesis" (SD3), §2–3:

    x_σ = (1 − σ)·x0 + σ·ε,  σ ∈ [0, 1]            the straight path from data (σ = 0) to noise (σ = 1), §3.1
    v   = dx_σ/dσ = ε − x0                          the network's target (the flow's velocity), §2
    loss = w(σ)·‖v_θ(x_σ, σ) − (ε − x0)‖²          with σ drawn from a density π(σ), §3.1

σ here is the flow's time (called t in the paper), not k-diffusion's noise level of samplers.py; this module is
the one owner of arithmetic on it. The densities are written as transforms of the per-sample draws a caller makes
(u ~ U[0, 1), z ~ N(0, 1) from the sample's own generator: train/step.py's (seed, position) rule), so training
draws stay pure functions of (seed, position) and resume stays bitwise. Where a formula comes from diffusers'
training scripts or its FlowMatchEulerDiscreteScheduler (the oracle), its name is given.
"""

from __future__ import annotations

import math

import torch

DENSITIES = ("uniform", "logit_normal", "mode", "cosmap")  # how σ is drawn for a training sample
LOSS_WEIGHTS = ("none", "sigma_sqrt", "cosmap")  # diffusers' compute_loss_weighting_for_sd3 schemes


def noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε; `sigma` (B,) broadcast over (B, C, ...)."""
    s = sigma.reshape(-1, *[1] * (x0.dim() - 1)).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The target: ε − x0 (the path's derivative in σ)."""
    return noise - x0


def density(name: str, u: torch.Tensor, z: torch.Tensor, *, logit_mean: float = 0.0, logit_std: float = 1.0,
            mode_scale: float = 1.29) -> torch.Tensor:
    """A draw in [0, 1] from the named density, as a transform of u ~ U[0, 1) and z ~ N(0, 1) (Esser et al. §3.1):
    uniform u; logit-normal sigmoid(m + s·z); mode (heavy tails) 1 − u − s·(cos²(πu/2) − 1 + u);
    CosMap 1 − 1/(tan(πu/2) + 1)."""
    if name == "uniform":
        return u
    if name == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * z)
    if name == "mode":
        return 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    if name == "cosmap":
        return 1 - 1 / (torch.tan(math.pi * u / 2) + 1)
    raise ValueError(f"unknown density {name!r}: use one of {', '.join(DENSITIES)}")


def shift(sigma: torch.Tensor, s: float) -> torch.Tensor:
    """The static shift σ' = s·σ / (1 + (s − 1)·σ): more time at high noise for s > 1 (Esser et al. §5.3.2;
    FlowMatchEulerDiscreteScheduler's `shift`, 3.0 for SD3)."""
    return s * sigma / (1 + (s - 1) * sigma)


def resolution_mu(tokens: int, base_tokens: int = 256, max_tokens: int = 4096, base_shift: float = 0.5,
                  max_shift: float = 1.15) -> float:
    """μ of the resolution-dependent shift: linear in the image's token count between (base_tokens, base_shift)
    and (max_tokens, max_shift) — diffusers' `calculate_shift` (Flux, SD3.5's dynamic shifting)."""
    slope = (max_shift - base_shift) / (max_tokens - base_tokens)
    return base_shift + slope * (tokens - base_tokens)


def time_shift(sigma: torch.Tensor, mu: float, exponent: float = 1.0, kind: str = "exponential") -> torch.Tensor:
    """The resolution-dependent shift: e^μ / (e^μ + (1/σ − 1)^exponent) ("exponential", Flux), or μ in place of
    e^μ ("linear") — FlowMatchEulerDiscreteScheduler.time_shift. For μ = log s and exponent 1 it is `shift`."""
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigma - 1) ** exponent)


def training_sigmas(t: torch.Tensor, num_train_timesteps: int = 1000, s: float = 1.0) -> torch.Tensor:
    """σ of a training sample from its density draw t ∈ [0, 1), as diffusers' SD3/Flux scripts pick it: the index
    ⌊t·T⌋ into the scheduler's descending grid σ_i = (T − i)/T, then shifted by s."""
    index = (t * num_train_timesteps).long().clamp(0, num_train_timesteps - 1)
    return shift((num_train_timesteps - index).float() / num_train_timesteps, s)  # float32, as the scheduler's grid


def loss_weight(name: str, sigma: torch.Tensor) -> torch.Tensor:
    """w(σ): none 1; sigma_sqrt σ⁻²; cosmap 2 / (π·(1 − 2σ + 2σ²)) — diffusers' compute_loss_weighting_for_sd3."""
    if name == "sigma_sqrt":
        return sigma.float() ** -2.0
    if name == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    if name == "none":
        return torch.ones_like(sigma)
    raise ValueError(f"unknown loss weighting {name!r}: use one of {', '.join(LOSS_WEIGHTS)}")


def validation_sigmas(n: int) -> torch.Tensor:
    """A fixed σ grid for held-out loss, the midpoints of n equal cells of (0, 1): the same every run."""
    return (torch.arange(n, dtype=torch.float64) + 0.5).div(n).float()
