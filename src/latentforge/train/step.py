"""One training step of the denoiser, and the per-sample randomness it needs.

    t ~ U{0..T-1} (or logit-normal),  ε ~ N(0, I) (+ offset noise),  x_t = √ᾱ_t x0 + √(1-ᾱ_t) ε
    loss = mean_b  w_b · ‖UNet(x_t, t, c) − target_b‖²        target: ε | v | x0,  w: 1 or min-SNR-γ

Every random draw of a sample is a function of (seed, position of the sample in the data stream)
only — not of the batch it lands in, the rank that processes it, or how often the run was
resumed. So 1 process with batch B and 2 processes with B/2 draw the same t and ε, and an
interrupted run continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Callable, List, Optional

import torch

from ..schedule import add_noise, min_snr_weight, target


@dataclass
class Batch:
    latent: torch.Tensor  # (B, C, h, w) scaled latents
    context: Optional[torch.Tensor] = None  # (B, L, D) text context
    mask: Optional[torch.Tensor] = None  # (B, L) bool
    label: Optional[torch.Tensor] = None  # (B,) long class labels
    ids: Optional[List[str]] = None
    pooled: Optional[torch.Tensor] = None  # (B, P) pooled text embedding (SDXL)
    time_ids: Optional[torch.Tensor] = None  # (B, 6) original size, crop, target size (SDXL)
    captions: Optional[List[str]] = None  # the captions (train_text_encoder re-encodes them every step)

    def to(self, device) -> "Batch":
        return self.moved(lambda x: x.to(device, non_blocking=True) if torch.is_tensor(x) else x)

    def moved(self, move: Callable) -> "Batch":
        """Every tensor through `move` (e.g. host_sync.Transfer: pinned, non-blocking)."""
        return replace(self, latent=move(self.latent), context=move(self.context), mask=move(self.mask),
                       label=move(self.label), pooled=move(self.pooled), time_ids=move(self.time_ids))

    def conditions(self, micro: bool) -> dict:
        """The UNet's keyword arguments besides the context; `micro`: the SDXL UNet's text_embeds + time_ids."""
        kw = {"class_labels": self.label}
        if micro:
            kw.update(text_embeds=self.pooled, time_ids=self.time_ids)
        return kw


@dataclass
class Draws:
    t: torch.Tensor  # (B,) long
    noise: torch.Tensor  # (B, C, h, w)
    drop: torch.Tensor  # (B,) bool: use the null condition (caption dropout)

    def moved(self, move: Callable) -> "Draws":
        """t and ε through `move`; the dropout coins stay where they are (the host decides with them)."""
        return replace(self, t=move(self.t), noise=move(self.noise))


def mix(*parts) -> int:
    """A 63-bit seed from any parts (seed, stream position, ...): decorrelated, platform-stable."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def draw(cfg, positions: List[int], shape, num_timesteps: int) -> Draws:
    """Timestep, noise and dropout coin for each sample, from its own generator (CPU, then moved)."""
    ts, noises, drops = [], [], []
    for p in positions:
        g = torch.Generator().manual_seed(mix(cfg.seed, p))
        if cfg.timestep_sampling == "logit_normal":  # Esser et al. 2024 (SD3), §3.1
            u = torch.randn(1, generator=g) * cfg.logit_std + cfg.logit_mean
            t = (torch.sigmoid(u) * num_timesteps).long().clamp(max=num_timesteps - 1)
        else:
            t = torch.randint(0, num_timesteps, (1,), generator=g)
        drop = torch.rand(1, generator=g) < cfg.caption_dropout
        noise = torch.randn(shape, generator=g)  # (C, h, w)
        if cfg.offset_noise > 0:  # Guttenberg 2023: a per-channel constant shifts the mean brightness
            noise = noise + cfg.offset_noise * torch.randn(shape[0], 1, 1, generator=g)
        ts.append(t), noises.append(noise), drops.append(drop)
    return Draws(torch.cat(ts), torch.stack(noises), torch.cat(drops))


def apply_dropout(batch: Batch, drop: torch.Tensor, null_context=None, null_mask=None, null_label=None,
                  null_pooled=None) -> Batch:
    """Replace the condition of the dropped samples with the null one (text "" or the null class; SDXL: the
    zeroed context and pooled embedding, as its original training drops them; size/crop ids are kept)."""
    if not any(drop.tolist()):  # drop is host data (draws are made on the CPU)
        return batch
    context, mask, label, pooled = batch.context, batch.mask, batch.label, batch.pooled
    if pooled is not None and null_pooled is not None:
        pooled = torch.where(drop[:, None].to(pooled.device), null_pooled.to(pooled), pooled)  # (B, P)
    if context is not None:
        keep = ~drop[:, None, None]
        context = torch.where(keep, context, null_context.to(context))  # (B, L, D)
        if mask is not None:
            mask = torch.where(~drop[:, None], mask, null_mask.to(mask))  # (B, L)
    if label is not None:
        label = torch.where(drop, torch.full_like(label, null_label), label)  # (B,)
    return replace(batch, context=context, mask=mask, label=label, pooled=pooled)


def train_step(model, batch: Batch, draws: Draws, alphas_cumprod: torch.Tensor, prediction_type: str = "epsilon",
               min_snr_gamma: float = 0.0, autocast_dtype: Optional[torch.dtype] = None,
               micro: Optional[bool] = None, compute_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Loss of one (micro-)batch as a float32 scalar; call `.backward()` on it. `micro` (default: the batch has
    pooled text and time ids) passes SDXL's micro-conditioning to the UNet. `compute_dtype`: the dtype of a
    model whose weights are already in low precision (train/precision.py): its float inputs are cast to it."""
    micro = batch.pooled is not None and batch.time_ids is not None if micro is None else micro
    x0, noise, t = batch.latent, draws.noise.to(batch.latent), draws.t.to(batch.latent.device)
    ac = alphas_cumprod.to(x0.device)
    x_t = add_noise(x0, noise, t, ac)  # (B, C, h, w)
    with torch.autocast(x0.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        # No context mask: captions are padded to a fixed length and, as in SD and diffusers'
        # pipeline, the UNet attends to the padding too — training and sampling must agree.
        cast = lambda u: u.to(compute_dtype) if compute_dtype and torch.is_tensor(u) and u.is_floating_point() else u  # noqa: E731
        conditions = {k: cast(v) for k, v in batch.conditions(micro).items()}
        pred = model(cast(x_t), t, cast(batch.context), **conditions)  # (B, C, h, w)
    err = (pred.float() - target(prediction_type, x0, noise, t, ac)).square().mean(dim=(1, 2, 3))  # (B,)
    if min_snr_gamma > 0:  # Hang et al. 2023
        err = err * min_snr_weight(t, ac, min_snr_gamma, prediction_type)
    return err.mean()
