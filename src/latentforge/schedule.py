"""The forward noising process q(x_t | x_0) as pure functions.

    x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε,     ε ~ N(0, I)                      (Ho et al. 2020, eq. 4)

Notation used throughout: α = √ᾱ_t (signal scale), σ = √(1-ᾱ_t) (noise scale). The k-diffusion
view of the same process divides by α: x_t / α = x0 + σ_k · ε with σ_k = √((1-ᾱ)/ᾱ) (Karras et al.
2022), which is what the samplers integrate over; that conversion (both ways) lives in samplers.py only.

Everything takes `alphas_cumprod` (ᾱ, a float32 (T,) tensor) explicitly; `NoiseSchedule` just
bundles it with the betas and the prediction type. Prediction types use diffusers' names:
`epsilon`, `v_prediction`, `sample`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import BETA_SCHEDULES, PREDICTION_TYPES  # noqa: F401 (the names are config.py's; used here)
from .errors import UserError


# ----------------------------------------------------------------------------- betas and ᾱ

def make_betas(schedule: str, num_train_timesteps: int = 1000, beta_start: float = 0.00085,
               beta_end: float = 0.012) -> torch.Tensor:
    """β_1..β_T as float32 (T,). Same arithmetic as diffusers' DDPMScheduler, so values match bit for bit."""
    T = num_train_timesteps
    if schedule == "linear":  # Ho et al. 2020
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float32)
    if schedule == "scaled_linear":  # Latent Diffusion / Stable Diffusion: linear in √β
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float32) ** 2
    if schedule in ("squaredcos_cap_v2", "cosine"):  # Nichol & Dhariwal 2021, eq. 17, β capped at 0.999
        return cosine_betas(T)
    raise UserError(f"schedule.beta_schedule: unknown {schedule!r} — use one of {', '.join(BETA_SCHEDULES)}")


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> torch.Tensor:
    """β_t = 1 - ᾱ(t+1)/ᾱ(t) with ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2) (Nichol & Dhariwal 2021)."""
    def alpha_bar(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale √ᾱ so that √ᾱ_T = 0 and √ᾱ_1 is unchanged (Lin et al. 2023, Algorithm 1)."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * (first / (first - last))
    ac = sqrt_ac**2
    alphas = torch.cat([ac[0:1], ac[1:] / ac[:-1]])  # undo the cumulative product
    return 1.0 - alphas


def alphas_cumprod(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = ∏_{s≤t} (1 - β_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


@dataclass(frozen=True)
class NoiseSchedule:
    """Betas, ᾱ and the prediction type the UNet was trained with."""

    betas: torch.Tensor  # (T,) float32
    alphas_cumprod: torch.Tensor  # (T,) float32
    prediction_type: str = "epsilon"

    @classmethod
    def from_config(cls, cfg) -> "NoiseSchedule":
        """From a `config.ScheduleConfig` (or anything with the same attribute names)."""
        if cfg.prediction_type not in PREDICTION_TYPES:
            raise UserError(f"schedule.prediction_type: unknown {cfg.prediction_type!r} — "
                            f"use one of {', '.join(PREDICTION_TYPES)}")
        betas = make_betas(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
        if cfg.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        return cls(betas=betas, alphas_cumprod=alphas_cumprod(betas), prediction_type=cfg.prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self.betas.shape[0]


# ----------------------------------------------------------------------------- noising and targets

def _coef(values: torch.Tensor, t, like: torch.Tensor) -> torch.Tensor:
    """values[t] shaped to broadcast against `like`: (B,) -> (B, 1, 1, ...)."""
    t = torch.as_tensor(t, device=values.device)
    v = values.to(like.device)[t.long()].to(like.dtype)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


def _alpha_sigma(t, ac: torch.Tensor, like: torch.Tensor):
    a = _coef(ac, t, like)
    return a.sqrt(), (1 - a).sqrt()  # α = √ᾱ_t, σ = √(1-ᾱ_t)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t, ac: torch.Tensor) -> torch.Tensor:
    """x_t = √ᾱ_t · x0 + √(1-ᾱ_t) · ε (Ho et al. 2020, eq. 4)."""
    alpha, sigma = _alpha_sigma(t, ac, x0)
    return alpha * x0 + sigma * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, t, ac: torch.Tensor) -> torch.Tensor:
    """v = √ᾱ_t · ε - √(1-ᾱ_t) · x0 (Salimans & Ho 2022, §4)."""
    alpha, sigma = _alpha_sigma(t, ac, x0)
    return alpha * noise - sigma * x0


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, t, ac: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses to for `prediction_type`."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return velocity(x0, noise, t, ac)
    if prediction_type == "sample":
        return x0
    raise UserError(f"prediction_type: unknown {prediction_type!r} — use one of {', '.join(PREDICTION_TYPES)}")


def convert(pred: torch.Tensor, x_t: torch.Tensor, t, ac: torch.Tensor, src: str, dst: str) -> torch.Tensor:
    """Turn a prediction of type `src` at (x_t, t) into type `dst` (see `convert_at`)."""
    if src == dst:
        return pred
    alpha, sigma = _alpha_sigma(t, ac, x_t)
    return convert_at(pred, x_t, alpha, sigma, src, dst)


def convert_at(pred: torch.Tensor, x_t: torch.Tensor, alpha, sigma, src: str, dst: str) -> torch.Tensor:
    """The one place ε / v / x0 meet: convert a prediction at x_t = α x0 + σ ε (α² + σ² = 1).

    With v = α ε - σ x0 (Salimans & Ho 2022):
      x0 = α x_t - σ v,  ε = σ x_t + α v,  x0 = (x_t - σ ε)/α,  ε = (x_t - α x0)/σ.
    `alpha`, `sigma` broadcast against x_t (samplers pass values between the discrete timesteps).
    """
    if src == dst:
        return pred
    if src == "v_prediction":
        x0, eps = alpha * x_t - sigma * pred, sigma * x_t + alpha * pred
    elif src == "epsilon":
        x0, eps = (x_t - sigma * pred) / alpha, pred
    elif src == "sample":
        x0, eps = pred, (x_t - alpha * pred) / sigma
    else:
        raise UserError(f"prediction_type: unknown {src!r} — use one of {', '.join(PREDICTION_TYPES)}")
    if dst == "sample":
        return x0
    if dst == "epsilon":
        return eps
    if dst == "v_prediction":
        return alpha * eps - sigma * x0
    raise UserError(f"prediction_type: unknown {dst!r} — use one of {', '.join(PREDICTION_TYPES)}")


# ----------------------------------------------------------------------------- SNR and loss weights

def snr(t, ac: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1-ᾱ_t), shape of t."""
    a = ac[torch.as_tensor(t, device=ac.device).long()]
    return a / (1 - a)


def min_snr_weight(t, ac: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weight (Hang et al. 2023, eq. 10) for a loss on the given target, shape of t.

    The x0-loss weight is min(SNR, γ); an ε-loss equals an x0-loss divided by SNR, a v-loss an x0-loss
    divided by SNR+1, so the weights are min(SNR, γ)/SNR = min(1, γ/SNR) and min(SNR, γ)/(SNR+1).
    min(1, γ/SNR) is finite at SNR = 0 (zero-terminal-SNR schedules), where it is 1.
    """
    s = snr(t, ac)
    if prediction_type == "sample":
        return s.clamp(max=gamma)
    if prediction_type == "epsilon":
        return (gamma / s).clamp(max=1.0)
    if prediction_type == "v_prediction":
        return s.clamp(max=gamma) / (s + 1)
    raise UserError(f"prediction_type: unknown {prediction_type!r} — use one of {', '.join(PREDICTION_TYPES)}")
