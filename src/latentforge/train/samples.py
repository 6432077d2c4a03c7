"""Validation grids during training and the final model folder (EMA weights, diffusers layout)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from PIL import Image


def ema_unet(unet, ema):
    """A copy of `unet` holding the EMA weights, in eval mode."""
    model = copy.deepcopy(unet)
    ema.copy_to(model)
    return model.eval().requires_grad_(False)


def export_model(run: Path, cfg, unet, ema, vae=None, text_encoder=None) -> Path:
    """run/model/: the EMA UNet, the VAE, the scheduler config (+ text_encoder/, tokenizer/)."""
    from ..formats.diffusers import save_model_folder

    return save_model_folder(Path(run) / "model", ema_unet(unet, ema), vae, cfg.schedule, text_encoder)


def sample_grid(cfg, unet, ema, vae, text_encoder=None) -> Image.Image:
    """One row of validation images with fixed seeds: the prompts (text), the first classes (class)
    or len(prompts) seeds (unconditional). Same seeds every time, so grids are comparable across steps."""
    from ..pipelines import Pipeline
    from ..schedule import NoiseSchedule

    pipe = Pipeline(ema_unet(unet, ema), vae, NoiseSchedule.from_config(cfg.schedule), text_encoder, name="validation")
    n = len(cfg.sample_prompts)
    opts = dict(steps=cfg.sample_steps, cfg=cfg.sample_guidance, progress=False)
    if cfg.conditioning == "text":
        images = [pipe.text2img(p, seed=cfg.sample_seed, **opts)[0] for p in cfg.sample_prompts]
    elif cfg.conditioning == "class":
        classes = range(min(n, cfg.unet.num_class_embeds - 1))
        images = [pipe.text2img(seed=cfg.sample_seed, class_label=c, **opts)[0] for c in classes]
    else:
        images = pipe.text2img(seed=cfg.sample_seed, n=n, **opts)
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for i, im in enumerate(images):
        grid.paste(im, (i * w, 0))
    return grid


def maybe_sample(run: Path, step: int, cfg, unet, ema, vae=None, text_encoder=None) -> Path | None:
    """Write samples/step-N.png (nothing without a VAE to decode with)."""
    if vae is None:
        return None
    path = Path(run) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # sampling must not disturb the training RNG
        sample_grid(cfg, unet, ema, vae, text_encoder).save(path)
    return path
