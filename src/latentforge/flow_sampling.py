"""Samplers for flow models: pure functions of (velocity function, starting latent, σ grid), in the style of
samplers.py, for the ODE dx/dσ = v(x, σ) from σ = 1 (noise) to σ = 0 (data) (Esser et al. 2024, §2).

    sigmas = flow_sigmas(steps, shift=3.0)              # or mu=flow.resolution_mu(tokens) (Flux, SD3.5)
    x = sample_flow_euler(velocity_fn, noise, sigmas)   # velocity_fn(x (B, C, ...), sigma (B,)) -> v

Grids and steps equal diffusers' FlowMatchEulerDiscreteScheduler / FlowMatchHeunDiscreteScheduler (the oracle in
tests/test_flow.py). Image→image starts part-way down the grid from flow.noised(x0, ε, σ_start).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from . import flow

VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def flow_sigmas(steps: int, num_train_timesteps: int = 1000, shift: float = 1.0, mu: Optional[float] = None,
                exponent: float = 1.0, kind: str = "exponential") -> torch.Tensor:
    """steps + 1 values from 1 down to 0, as FlowMatchEulerDiscreteScheduler.set_timesteps makes them: the
    training grid's ends (σ_min = the shifted 1/T when the shift is static), `steps` evenly spaced values between,
    shifted (static `shift`, or the resolution-dependent one when `mu` is given), then a final 0."""
    if steps < 1:
        raise ValueError(f"steps: must be at least 1, got {steps}")
    T = num_train_timesteps
    lowest = torch.tensor(1.0) / T  # float32, as the scheduler's training grid
    low = float(lowest if mu is not None else flow.shift(lowest, shift))
    grid = torch.linspace(1.0 * T, low * T, steps, dtype=torch.float64) / T  # float64 until the end, as numpy
    grid = flow.time_shift(grid, mu, exponent, kind) if mu is not None else flow.shift(grid, shift)
    return torch.cat([grid.float(), torch.zeros(1)])


def model_timestep(sigma: torch.Tensor, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The time input the network is given at σ: σ·T, as diffusers' flow schedulers' `timesteps` (and so its
    pipelines' transformer calls) are made; float32 in, float32 out."""
    return sigma * num_train_timesteps


def start_at(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """The tail of the grid an image→image run takes: from index ⌊steps − steps·strength⌋ on, as diffusers' flow
    img2img pipelines' `get_timesteps` (StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline: no rounding of
    steps·strength first, unlike the UNet pipelines' ⌊steps·strength⌋ steps; 4 steps at 0.6 run 3, not 2)."""
    run = steps - int(max(steps - steps * strength, 0))
    if run < 1:
        raise ValueError(f"strength {strength}: leaves no step of {steps} — raise it or the steps")
    return sigmas[steps - run:]


def sample_flow_euler(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                      callback: Optional[Callable] = None, disable: Optional[bool] = None) -> torch.Tensor:
    """Euler on dx/dσ = v: x ← x + (σ_{i+1} − σ_i)·v(x, σ_i); one velocity evaluation per step."""
    for i in tqdm(range(len(sigmas) - 1), desc="sample", disable=disable, leave=False):
        s = sigmas[i].expand(x.shape[0])  # (B,)
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, s)  # (B, C, ...)
        if callback is not None:
            callback(i, x)
    return x


def sample_flow_heun(velocity: VelocityFn, x: torch.Tensor, sigmas: torch.Tensor,
                     callback: Optional[Callable] = None, disable: Optional[bool] = None) -> torch.Tensor:
    """Heun (trapezoidal) on dx/dσ = v: an Euler guess, the velocity there, their mean; the last step (to σ = 0)
    is Euler. 2·steps − 1 velocity evaluations (FlowMatchHeunDiscreteScheduler)."""
    for i in tqdm(range(len(sigmas) - 1), desc="sample", disable=disable, leave=False):
        dt = sigmas[i + 1] - sigmas[i]
        d = velocity(x, sigmas[i].expand(x.shape[0]))  # (B, C, ...)
        if sigmas[i + 1] == 0:
            x = x + dt * d
        else:
            guess = x + dt * d
            x = x + dt * (d + velocity(guess, sigmas[i + 1].expand(x.shape[0]))) / 2
        if callback is not None:
            callback(i, x)
    return x


FLOW_SAMPLERS = {"euler": sample_flow_euler, "heun": sample_flow_heun}
