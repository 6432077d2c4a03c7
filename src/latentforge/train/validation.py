"""Held-out validation: a deterministic split of the images, and a loss measured the same way every time.

    split      image id i is held out  ⇔  u(seed, i) < val_fraction,   u = mix(seed, "val", i) / 2^63
    the loss   every held-out latent x0 at K fixed timesteps t_k = ⌊(k + ½)·T / K⌋, k = 0..K-1, each with
               its own fixed noise ε(seed, i, k):   L = mean over (i, k) of ‖UNet(x_t, t_k, c_i) − target‖²

The split depends on (seed, image id) only — not on the order of the data, the other images, the number
of processes or how often a run was resumed — and a mirrored twin (`id#flip`) goes with its image. The
loss uses no caption dropout and no loss weighting, and draws nothing from the global RNG: the number is
comparable across steps, resumes and runs (DESIGN.md: "Validation is measurement").
"""

from __future__ import annotations

import dataclasses
import math
from typing import List, Sequence, Tuple

import torch

from ..errors import UserError
from ..schedule import add_noise, target
from .data import collate
from .samples import ema_unet
from .step import mix

AUTO_MIN_IMAGES, AUTO_FRACTION = 100, 0.05  # val_fraction < 0 (auto): 5 % of data sets with >= 100 images


def image_id(item_id: str) -> str:
    """The image an item comes from: a cached mirror twin `x.png#flip` is the image `x.png`."""
    return str(item_id).removesuffix("#flip")


def is_held_out(item_id: str, fraction: float, seed: int) -> bool:
    return mix(seed, "val", image_id(item_id)) < fraction * 2**63


def held_out_ids(ids: Sequence[str], fraction: float, seed: int) -> List[str]:
    """The ids (of `ids`) kept out of training, in their given order. For callers such as validation prompts."""
    return [i for i in ids if is_held_out(i, fraction, seed)]


def dataset_ids(dataset) -> List[str]:
    """Every item's id, without reading latents where the dataset lists them (LatentDataset, InMemoryLatents)."""
    if hasattr(dataset, "entries"):
        return [str(e["id"]) for e in dataset.entries]
    if hasattr(dataset, "ids"):
        return [str(i) for i in dataset.ids]
    return [str(dataset[i]["id"]) for i in range(len(dataset))]


def resolve_fraction(fraction: float, ids: Sequence[str]) -> float:
    """A negative `val_fraction` (auto) becomes 0.05 with at least 100 distinct images, else 0."""
    if fraction >= 0:
        return fraction
    return AUTO_FRACTION if len({image_id(i) for i in ids}) >= AUTO_MIN_IMAGES else 0.0


class Subset(torch.utils.data.Dataset):
    """The items `indices` of `dataset`; its other attributes (null_context, classes, ...) show through."""

    def __init__(self, dataset, indices: List[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]

    def __getattr__(self, name):
        if name in ("dataset", "indices", "entries", "ids"):  # never the parent's full listing
            raise AttributeError(name)
        if name == "buckets":  # a bucketed cache: the bucket of each of these items
            parent = getattr(self.dataset, "buckets", None)
            return None if parent is None else [parent[k] for k in self.indices]
        return getattr(self.dataset, name)


def split(dataset, fraction: float, seed: int) -> Tuple[Subset, Subset]:
    """(training items, held-out items) of `dataset`."""
    held = [is_held_out(i, fraction, seed) for i in dataset_ids(dataset)]
    return (Subset(dataset, [k for k, h in enumerate(held) if not h]),
            Subset(dataset, [k for k, h in enumerate(held) if h]))


def fixed_timesteps(num_timesteps: int, k: int) -> torch.Tensor:
    """(k,) long: the midpoints of k equal strata of [0, T) — spread over the whole schedule."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * num_timesteps / k).floor().long()


def fixed_noise(seed: int, item_id: str, k: int, shape) -> torch.Tensor:
    """(C, h, w): the noise of item `item_id` at its k-th validation timestep, the same at every evaluation."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(mix(seed, "val-noise", str(item_id), k)))


@torch.no_grad()
def validation_loss(model, val, alphas_cumprod: torch.Tensor, prediction_type: str, seed: int, timesteps: int,
                    batch_size: int = 16, autocast_dtype=None, encode=None) -> float:
    """The mean squared error on the held-out items `val` (see the module docstring); nan when there are none.
    `encode(captions) -> (context, mask)` re-encodes the captions (a text encoder being trained)."""
    device = next(model.parameters()).device
    ac = alphas_cumprod.to(device)
    ts = fixed_timesteps(ac.shape[0], timesteps)
    buckets, groups = getattr(val, "buckets", None), {}  # a bucketed cache: one latent shape per chunk
    for i in range(len(val)):
        groups.setdefault(buckets[i] if buckets else "", []).extend((i, k) for k in range(timesteps))
    total, count = 0.0, 0
    for chunk in (g[s:s + batch_size] for g in groups.values() for s in range(0, len(g), batch_size)):
        batch = collate([val[i] for i, _ in chunk])
        if encode is not None:
            batch.context, batch.mask = encode(batch.captions)
        batch = batch.to(device)
        x0 = batch.latent  # (b, C, h, w)
        noise = torch.stack([fixed_noise(seed, id_, k, x0.shape[1:]) for id_, (_, k) in zip(batch.ids, chunk)])
        noise, t = noise.to(x0), ts[[k for _, k in chunk]].to(device)  # (b, C, h, w), (b,)
        x_t = add_noise(x0, noise, t, ac)
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            pred = model(x_t, t, batch.context, **batch.conditions(batch.pooled is not None))  # (b, C, h, w)
        err = (pred.float() - target(prediction_type, x0, noise, t, ac)).square().mean(dim=(1, 2, 3))  # (b,)
        total, count = total + err.double().sum().item(), count + len(chunk)
    return total / count if count else math.nan


def held_out_split(cfg, dataset):
    """(cfg with val_fraction resolved, training items, held-out items). The training items are all of
    `dataset` (not a view) when nothing is held out."""
    fraction = resolve_fraction(cfg.val_fraction, dataset_ids(dataset))
    cfg = dataclasses.replace(cfg, val_fraction=fraction)
    if fraction <= 0:
        return cfg, dataset, Subset(dataset, [])
    train, val = split(dataset, fraction, cfg.seed)
    if len(train) == 0:
        raise UserError(f"val_fraction={fraction}: holds out all {len(dataset)} images — lower val_fraction")
    return cfg, train, val


def evaluate(cfg, step: int, unet, ema, val, alphas_cumprod, autocast_dtype=None, encode=None) -> dict:
    """One metrics row: the held-out loss of the training weights (val_loss) and of the EMA weights (val_loss_ema)."""
    kw = dict(alphas_cumprod=alphas_cumprod, prediction_type=cfg.schedule.prediction_type, seed=cfg.seed,
              timesteps=cfg.val_timesteps, batch_size=cfg.batch_size, autocast_dtype=autocast_dtype, encode=encode)
    row = {"step": step, "val_loss": validation_loss(unet, val, **kw)}
    if ema is not None:
        row["val_loss_ema"] = validation_loss(ema_unet(unet, ema), val, **kw)
    row["val_images"] = len({image_id(val[i]["id"]) for i in range(len(val))})
    return row
