"""Samplers: pure functions that integrate the reverse process from noise to a clean latent.

The k-diffusion view (Karras et al. 2022, "Elucidating the Design Space…"): write the noisy latent as
x = x0 + σ·ε, with σ = √((1-ᾱ)/ᾱ), so x = x_t / √ᾱ_t. A *denoiser* D(x, σ) ≈ E[x0 | x] is all a
sampler needs; `Denoiser` builds it from a UNet `model_fn(x_t, t, **cond)` of any prediction type.
Every sampler has the shape of k-diffusion's `sample_euler(model, x, sigmas, extra_args, callback)`:

    x = noise * plan.init_sigma                       # (B, C, h, w), at σ = sigmas[0]
    x = sample_euler(denoiser, x, plan.sigmas)        # at σ = sigmas[-1] (0 unless asked otherwise)

In these coordinates DDIM(η) *is* Euler-ancestral with η, and DDPM is DDIM with η = 1 (Song et al.
2021, §4.1; the DDPM posterior mean and variance equal DDIM's at η = 1), so three named samplers share
one update. Which timesteps, sigmas and starting scale a sampler uses follows diffusers' scheduler
of the same name (`plan`), so trajectories match diffusers step for step (tests/test_samplers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from tqdm.auto import trange

from .config import SPACINGS  # the names live in config.py (no torch), for the CLI's help
from .errors import UserError
from .schedule import convert_at


# ----------------------------------------------------------------------------- the denoiser

class Denoiser:
    """D(x, σ) = E[x0 | x0 + σε] from a UNet `model_fn(x_t, t, **cond)` (k-diffusion's `DiscreteSchedule`).

    x_t = x / √(1+σ²) is what the UNet was trained on; t is the (fractional) timestep whose σ this is.
    σ → t inverts how the plan built σ from t: linearly between table entries ("linear", diffusers'
    np.interp), or linearly in log σ ("log", k-diffusion / diffusers for Karras sigmas); `quantize`
    rounds t (diffusers' DPM-Solver with Karras sigmas).
    """

    def __init__(self, model_fn: Callable, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
                 interpolation: str = "linear", quantize: bool = False, clip_sample: Optional[float] = None,
                 thresholding: Optional[Tuple[float, float]] = None):
        self.model_fn = model_fn
        self.prediction_type = prediction_type
        self.sigma_table = sigma_table(alphas_cumprod).double()  # (T,) increasing in t
        self.interpolation = interpolation
        self.quantize = quantize
        self.clip_sample = clip_sample  # x0 clamped to [-r, r] (diffusers' clip_sample + clip_sample_range)
        self.thresholding = thresholding  # (ratio, max): dynamic thresholding; wins over clip_sample, as diffusers

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.double().cpu().reshape(-1)
        table = self.sigma_table
        if self.interpolation == "log":  # log of the float32 table, as diffusers' `_sigma_to_t`
            s, table = s.clamp(min=1e-10).log(), table.float().log().double()
        t = _interp(s, table, torch.arange(len(table), dtype=torch.float64))
        t = t.round() if self.quantize else t
        return t.to(torch.float32).reshape(sigma.shape).to(sigma.device)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.with_raw(x, sigma, **cond)[0]

    def with_raw(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> Tuple[torch.Tensor, torch.Tensor]:
        """-> (x0 after clipping/thresholding, x0 as the UNet predicted it); the same tensor when neither is on."""
        sigma = sigma.to(x.dtype)
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        alpha = 1 / (s**2 + 1).sqrt()  # √ᾱ
        x_t = x * alpha  # (B, C, h, w) the UNet's input scale
        out = self.model_fn(x_t, self.sigma_to_t(sigma), **cond)  # (B, C, h, w) ε, v or x0
        x0 = convert_at(out, x_t, alpha, s * alpha, self.prediction_type, "sample")  # (B, C, h, w)
        if self.thresholding is not None:
            return dynamic_threshold(x0, *self.thresholding), x0
        if self.clip_sample is not None:
            return x0.clamp(-self.clip_sample, self.clip_sample), x0
        return x0, x0


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, "Imagen", §2.3): s = the `ratio` quantile of |x0| per
    sample, clamped to [1, max_value]; x0 is clipped to [-s, s] and divided by s (diffusers' `_threshold_sample`)."""
    flat = x0.float().reshape(x0.shape[0], -1).abs()  # (B, C·h·w)
    s = torch.quantile(flat, ratio, dim=1).clamp(min=1, max=max_value)  # (B,)
    s = s.reshape(-1, *([1] * (x0.ndim - 1)))  # (B, 1, 1, 1)
    return (x0.float().clamp(-s, s) / s).to(x0.dtype)


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for increasing xp (clamped at the ends)."""
    return torch.from_numpy(np.interp(x.numpy(), xp.numpy(), fp.numpy()))


def sigma_table(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """σ_t for t = 0..T-1, float32. A zero-terminal-SNR schedule (ᾱ_T = 0, σ_T = ∞) is clamped to
    ᾱ_T = 2⁻²⁴ (σ_T ≈ 4096), as diffusers' Euler and DPM-Solver schedulers do."""
    ac = alphas_cumprod.float().clone()
    if ac[-1] == 0:
        ac[-1] = 2.0**-24
    return ((1 - ac) / ac) ** 0.5


def sigma_to_alpha_cumprod(sigma: torch.Tensor) -> torch.Tensor:
    """Inverse of `sigma_table`: ᾱ = 1/(1+σ²) (Karras et al. 2022, Table 1 'VP')."""
    return 1 / (1 + sigma**2)


# ----------------------------------------------------------------------------- sigma plans

@dataclass(frozen=True)
class SamplerInfo:
    fn: Callable
    family: str  # whose timestep definitions: "ddim" (DDPM/DDIM), "k" (Euler/Heun), "dpm" (DPM-Solver)
    display: str  # the name Stable Diffusion tools write in PNG metadata
    stochastic: bool  # adds fresh noise every step (DDIM only with η > 0)
    options: Tuple[str, ...] = ()  # the keyword options `sample` passes on to `fn`


@dataclass(frozen=True)
class SamplingPlan:
    """Everything a sampler run needs besides the model: where to start and which σ to visit."""

    sigmas: torch.Tensor  # (N+1,) float32, decreasing; the last is 0 (or σ_min)
    timesteps: torch.Tensor  # (N,) the UNet timestep at sigmas[:-1] (diffusers' `scheduler.timesteps`)
    init_sigma: float  # the starting latent is N(0, I) · init_sigma (diffusers' `init_noise_sigma`)
    interpolation: str  # Denoiser σ → t
    quantize: bool

    def denoiser(self, model_fn: Callable, alphas_cumprod: torch.Tensor, prediction_type: str,
                 **x0_options) -> Denoiser:
        """x0_options: clip_sample, thresholding (see Denoiser)."""
        return Denoiser(model_fn, alphas_cumprod, prediction_type, self.interpolation, self.quantize, **x0_options)

    def start_at(self, index: int) -> "SamplingPlan":
        """The same plan begun `index` steps down (image→image); the start is then x0 + σ·noise."""
        return SamplingPlan(self.sigmas[index:], self.timesteps[index:], float(self.sigmas[index]),
                            self.interpolation, self.quantize)

    def start(self, noise: torch.Tensor, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The sampler's first x: noise · init_sigma (text→image), or x0 noised to the plan's first σ
        (image→image on a plan begun part-way down, `start_at`)."""
        return noise * self.init_sigma if x0 is None else self.noised(x0, noise, self.sigmas[0])

    @staticmethod
    def noised(x0: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """x0 at noise level σ in k-diffusion coordinates: x0 + σ·ε (= add_noise(x0, ε, t) / √ᾱ_t)."""
        return x0 + noise * sigma

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """The sampler's last x back to the UNet's (and VAE's) scale; the last σ is 0 unless the plan ends
        at σ_min."""
        return self.to_unet_scale(x, self.sigmas[-1])

    @staticmethod
    def to_unet_scale(x: torch.Tensor, sigma) -> torch.Tensor:
        """k-diffusion x at noise level σ -> the UNet's x_t = x · √ᾱ = x / √(1+σ²)."""
        return x / (torch.as_tensor(sigma) ** 2 + 1).sqrt()


def spaced_timesteps(steps: int, T: int, spacing: str, steps_offset: int = 0, family: str = "k") -> np.ndarray:
    """Which of the T training timesteps to visit, high to low — diffusers' definitions, which differ
    slightly per scheduler family (see `set_timesteps` of DDIMScheduler, EulerDiscreteScheduler and
    DPMSolverMultistepScheduler; "leading"/"trailing" from Lin et al. 2023, Table 2).

    One deliberate difference: diffusers' DDIMScheduler always steps to t - T//steps, which is not the
    next listed timestep for "linspace" (or "trailing" when steps does not divide T); we step to the
    next listed one, so each step lands where the next model call assumes it is."""
    if spacing == "linspace":
        if family == "k":  # fractional timesteps, σ interpolated between table entries
            return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
        if family == "dpm":
            return np.linspace(0, T - 1, steps + 1).round()[::-1][:-1].copy()
        return np.linspace(0, T - 1, steps).round()[::-1].copy()
    if spacing == "leading":
        if family == "dpm":
            ratio = T // (steps + 1)
            return (np.arange(0, steps + 1) * ratio).round()[::-1][:-1].copy() + steps_offset
        ratio = T // steps
        return (np.arange(0, steps) * ratio).round()[::-1].copy() + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)) - 1.0
    raise UserError(f"--spacing: unknown {spacing!r} — use one of {', '.join(SPACINGS)}")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ (Karras et al. 2022, eq. 5)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def plan(alphas_cumprod: torch.Tensor, sampler: str, steps: int, *, spacing: str = "leading",
         steps_offset: int = 0, karras: bool = False, final_sigma: str = "zero") -> SamplingPlan:
    """The σ grid, timesteps and starting scale diffusers' scheduler for `sampler` would use.

    final_sigma: "zero" ends at a clean latent; "sigma_min" stops at σ_0 (diffusers' DDIM with
    set_alpha_to_one=False, `final_sigmas_type="sigma_min"`). Karras σ lie between the training
    timesteps; their t comes from log-σ interpolation, rounded for DPM-Solver as diffusers does.
    """
    info = get_sampler(sampler)
    if steps < 1:
        raise UserError(f"--steps: must be at least 1, got {steps}")
    table = sigma_table(alphas_cumprod).double().numpy()  # (T,)
    T = len(table)
    if steps > T:
        raise UserError(f"--steps: {steps} is more than the model's {T} training timesteps — use fewer")
    ts = spaced_timesteps(steps, T, spacing, steps_offset, info.family)
    sigmas = np.interp(ts, np.arange(T), table)  # σ at (possibly fractional) t, linear between entries
    interpolation, quantize = "linear", False
    if karras:
        lo, hi = (table[0], table[-1]) if info.family == "dpm" else (sigmas[-1], sigmas[0])
        sigmas = karras_sigmas(lo, hi, steps)
        log_table = np.log(table.astype(np.float32)).astype(np.float64)
        ts = np.interp(np.log(sigmas), log_table, np.arange(T))
        interpolation, quantize = "log", info.family == "dpm"
        ts = ts.round() if quantize else ts
    last = table[0] if final_sigma == "sigma_min" else 0.0
    sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
    smax = float(sigmas.max())
    # diffusers: Euler-family schedulers start at σ_max for linspace/trailing spacing, all others at
    # √(σ_max² + 1), i.e. a unit-variance x_T (x = x_t / √ᾱ).
    vp_start = info.family != "k" or spacing == "leading"
    init = math.sqrt(smax**2 + 1) if vp_start else smax
    return SamplingPlan(sigmas, torch.from_numpy(ts.astype(np.float32)), init, interpolation, quantize)


def start_index(steps: int, strength: float) -> int:
    """First step of image→image at `strength` ∈ (0, 1] (diffusers' `get_timesteps`)."""
    if not 0 < strength <= 1:
        raise UserError(f"--strength: must be in (0, 1], got {strength}")
    first = steps - min(int(steps * strength), steps)
    if first >= steps:
        raise UserError(f"--strength: {strength} × {steps} steps leaves no step to run — raise --strength or --steps")
    return first


# ----------------------------------------------------------------------------- the samplers

def _step_done(i, x, sigmas, denoised, callback, after_step):
    if after_step is not None:
        x = after_step(x, sigmas[i + 1])
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigmas[i], "sigma_next": sigmas[i + 1], "denoised": denoised})
    return x


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, after_step=None, disable=None):
    """Euler on the probability-flow ODE dx/dσ = (x - D(x, σ))/σ (Karras et al. 2022, eq. 3 / Alg. 1).

    Equals DDIM with η = 0 when the σ are on the training grid (Song et al. 2021).
    `after_step(x, σ_next) -> x` lets a caller edit x between steps (inpainting pastes the known region);
    `callback(dict)` sees x after each step.
    """
    extra_args = extra_args or {}
    s_in = x.new_ones(x.shape[0])  # (B,)
    for i in trange(len(sigmas) - 1, disable=disable, desc="euler"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)  # (B, C, h, w)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        x = _step_done(i, x, sigmas, denoised, callback, after_step)
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0):
    """Split σ → σ_next into a deterministic step to σ_down plus fresh noise of size σ_up.

    σ_up = η·√(σ_next²(σ² - σ_next²)/σ²) is DDIM's σ_t(η) (Song et al. 2021, eq. 16) divided by √ᾱ_next.
    """
    if not eta or sigma_next == 0:
        return sigma_next, 0.0 * sigma_next
    up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
    down = (sigma_next**2 - up**2) ** 0.5
    return down, up


def randn_like(x: torch.Tensor, generator=None) -> torch.Tensor:
    """N(0, I) shaped like x from one generator, or one generator per sample (a list), so that sample i
    of a batch equals a batch of one drawn with generator i (as diffusers' `randn_tensor`)."""
    if isinstance(generator, (list, tuple)):
        return torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=x.dtype, device=g.device)
                          for g in generator]).to(x.device)
    device = x.device if generator is None else generator.device  # drawn where the generator lives
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=device).to(x.device)


NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor, generator=None) -> NoiseSampler:
    """k-diffusion's `noise_sampler`: a callable (σ, σ_next) -> fresh N(0, I) shaped like x, drawn from
    `generator` (one, or a list with one per sample; see `randn_like`). Every stochastic step draws through
    one of these, so a caller may swap in another noise source (e.g. Brownian-tree noise) for all samplers."""
    return lambda sigma, sigma_next: randn_like(x, generator)


def _denoise(model, x, sigma, extra_args, raw_eps: bool):
    """-> (x0, x0 the ε direction comes from): the clipped x0 twice, or (clipped, raw) for `raw_eps`."""
    if raw_eps and hasattr(model, "with_raw"):
        return model.with_raw(x, sigma, **extra_args)
    denoised = model(x, sigma, **extra_args)
    return denoised, denoised


@torch.no_grad()
def sample_euler_ancestral(model, x, sigmas, extra_args=None, callback=None, after_step=None, disable=None,
                           eta=1.0, noise_sampler: Optional[NoiseSampler] = None, raw_eps=False):
    """Euler step to σ_down, then add N(0, σ_up²) noise from `noise_sampler(σ, σ_next)` (k-diffusion;
    default: unseeded, see `default_noise_sampler`). `raw_eps`: the direction ε comes from the UNet's
    own x0 while the step lands at the clipped x0 (diffusers' DDIM, `use_clipped_model_output=False`)."""
    extra_args = extra_args or {}
    noise_sampler = noise_sampler or default_noise_sampler(x)
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, disable=disable, desc="ancestral"):
        denoised, raw = _denoise(model, x, sigmas[i] * s_in, extra_args, raw_eps)
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = (x - raw) / sigmas[i]
        x = x + d * (down - sigmas[i]) if raw is denoised else denoised + d * down
        if sigmas[i + 1] > 0 and up > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * up
        x = _step_done(i, x, sigmas, denoised, callback, after_step)
    return x


def sample_ddim(model, x, sigmas, extra_args=None, callback=None, after_step=None, disable=None,
                eta=0.0, noise_sampler: Optional[NoiseSampler] = None):
    """DDIM (Song et al. 2021): x_{t'} = √ᾱ' x̂0 + √(1-ᾱ'-σ_η²) ε̂ + σ_η z — Euler-ancestral with η here.
    With x0 clipping, x̂0 is clipped and ε̂ is the UNet's own, as diffusers' DDIMScheduler."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, after_step, disable, eta, noise_sampler,
                                  raw_eps=True)


def sample_ddpm(model, x, sigmas, extra_args=None, callback=None, after_step=None, disable=None,
                noise_sampler: Optional[NoiseSampler] = None):
    """Ancestral DDPM (Ho et al. 2020, Alg. 2; posterior variance β̃_t) = DDIM with η = 1."""
    return sample_euler_ancestral(model, x, sigmas, extra_args, callback, after_step, disable, 1.0, noise_sampler)


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, after_step=None, disable=None):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1 without churn); Euler for the last step to 0."""
    extra_args = extra_args or {}
    s_in = x.new_ones(x.shape[0])
    for i in trange(len(sigmas) - 1, disable=disable, desc="heun"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
        x = _step_done(i, x, sigmas, denoised, callback, after_step)
    return x


@torch.no_grad()
def sample_dpmpp_2m(model, x, sigmas, extra_args=None, callback=None, after_step=None, disable=None,
                    lower_order_final=True, euler_at_final=False, total_steps=None):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2), in λ = -log σ, midpoint form. The last step is first
    order as in diffusers' DPMSolverMultistepScheduler: always when it ends at σ = 0 (λ = ∞, where the
    second-order term is undefined), with `euler_at_final`, or with `lower_order_final` when the run has
    fewer than 15 steps (`total_steps`, default len(sigmas) - 1); otherwise it is second order."""
    extra_args = extra_args or {}
    s_in = x.new_ones(x.shape[0])
    n = len(sigmas) - 1
    first_order_last = (bool(sigmas[-1] == 0) or euler_at_final
                        or (lower_order_final and (total_steps or n) < 15))
    old_denoised = None
    for i in trange(n, disable=disable, desc="dpm++ 2m"):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        lam, lam_next = -sigmas[i].log(), -sigmas[i + 1].log()  # λ_next = ∞ at σ = 0
        h = lam_next - lam
        if old_denoised is None or (i == n - 1 and first_order_last):
            d = denoised  # DPM-Solver++(1) = DDIM
        else:
            r = (lam - (-sigmas[i - 1].log())) / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * d
        old_denoised = denoised
        x = _step_done(i, x, sigmas, denoised, callback, after_step)
    return x


_SOLVER_OPTIONS = ("lower_order_final", "euler_at_final", "total_steps")
SAMPLERS = {  # config.SAMPLER_NAMES, in that order (the CLI's help, without torch)
    "ddpm": SamplerInfo(sample_ddpm, "ddim", "DDPM", True, ("noise_sampler",)),
    "ddim": SamplerInfo(sample_ddim, "ddim", "DDIM", False, ("noise_sampler", "eta")),
    "euler": SamplerInfo(sample_euler, "k", "Euler", False),
    "euler-a": SamplerInfo(sample_euler_ancestral, "k", "Euler a", True, ("noise_sampler",)),
    "heun": SamplerInfo(sample_heun, "k", "Heun", False),
    "dpmpp-2m": SamplerInfo(sample_dpmpp_2m, "dpm", "DPM++ 2M", False, _SOLVER_OPTIONS),
}


def get_sampler(name: str) -> SamplerInfo:
    if name not in SAMPLERS:
        raise UserError(f"--sampler: unknown {name!r} — use one of {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def sample(name: str, model, x, sigmas, *, extra_args=None, callback=None, after_step=None, disable=None,
           generator=None, noise_sampler: Optional[NoiseSampler] = None, eta: Optional[float] = None,
           lower_order_final: Optional[bool] = None, euler_at_final: Optional[bool] = None,
           total_steps: Optional[int] = None):
    """Run sampler `name`. The stochastic steps draw from `noise_sampler` (default: `default_noise_sampler(x,
    generator)`); `eta` is DDIM's η; lower_order_final, euler_at_final and total_steps are dpmpp-2m's. Each
    option reaches the samplers that take it (`SamplerInfo.options`); None leaves a sampler's default."""
    info = get_sampler(name)
    given = dict(noise_sampler=noise_sampler or default_noise_sampler(x, generator), eta=eta,
                 lower_order_final=lower_order_final, euler_at_final=euler_at_final, total_steps=total_steps)
    kwargs = {k: v for k, v in given.items() if k in info.options and v is not None}
    return info.fn(model, x, sigmas, extra_args=extra_args, callback=callback, after_step=after_step,
                   disable=disable, **kwargs)
