"""Validation grids during training and the final model folder (EMA weights, diffusers layout).

The grid shows the user's own data: prompts are captions chosen from the data (the held-out split when
there is one), class names for class folders, seeds for unconditional data; each cell is labelled with
its prompt and the image the caption came from is shown beside it. `sample_prompts` overrides the choice.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from PIL import Image, PngImagePlugin

MAX_CLASS_CELLS = 16  # class-conditional grids show at most this many classes

from .. import io
from ..data.images import to_pil
from ..evaluate import caption_grid
from ..formats.diffusers import save_model_folder
from ..pipelines import Pipeline
from ..schedule import NoiseSchedule


def ema_unet(unet, ema):
    """A copy of `unet` holding the EMA weights, in eval mode."""
    model = copy.deepcopy(unet)
    if ema is not None:  # None: `unet` already holds the weights to use (a merged adapter)
        ema.copy_to(model)
    return model.eval().requires_grad_(False)


def export_model(run: Path, cfg, unet, ema, vae=None, text_encoder=None) -> Path:
    """run/model/: the EMA UNet, the VAE, the scheduler config (+ text_encoder/, tokenizer/)."""
    return save_model_folder(Path(run) / "model", ema_unet(unet, ema), vae, cfg.schedule, text_encoder)


@dataclass(frozen=True)
class Preview:
    """One cell of the validation grid."""

    label: str  # what the cell is labelled with (the prompt, the class name, or the seed)
    prompt: Optional[str] = None  # text prompt (text-conditional runs)
    class_label: Optional[int] = None  # class index (class-conditional runs)
    source: Optional[int] = None  # dataset index of the image the caption/class came from
    held_out: bool = False  # the source image is from the held-out (validation) split


def _rank(seed: int, item_id: str) -> str:
    """A fixed pseudo-random order of ids: a pure function of (seed, id), so the choice survives resumes."""
    return hashlib.sha256(f"{seed}/{item_id}".encode()).hexdigest()


def _entries(dataset) -> list:
    """(index, id, caption, label) of every item whose metadata the dataset exposes without loading latents."""
    entries = getattr(dataset, "entries", None)
    if entries is None:
        return []
    return [(i, e["id"], e.get("caption"), e.get("label")) for i, e in enumerate(entries)
            if "#flip" not in e["id"]]  # a flipped copy is not a separate image


def choose_previews(cfg, dataset, held_out: Sequence[str] = ()) -> list[Preview]:
    """The grid's cells: `cfg.sample_prompts` if set, else `cfg.sample_count` distinct captions of the data,
    drawn in the fixed order of `_rank(sample_seed, id)` from the held-out ids when there are any, else from
    all; class names for class data; `sample_count` seeds for unconditional data."""
    n, seed = cfg.sample_count, cfg.sample_seed
    if cfg.conditioning == "text" and cfg.sample_prompts:
        return [Preview(label=p, prompt=p) for p in cfg.sample_prompts]
    rows = _entries(dataset)
    held = set(held_out)
    pool = [r for r in rows if r[1] in held] or rows
    pool.sort(key=lambda r: _rank(seed, r[1]))
    if cfg.conditioning == "text":
        cells, seen = [], set()
        for i, item_id, caption, _ in pool:
            if caption and caption not in seen:
                seen.add(caption)
                cells.append(Preview(label=caption, prompt=caption, source=i, held_out=item_id in held))
        return cells[:n] or [Preview(label="(empty prompt: the data exposes no captions)", prompt="")]
    if cfg.conditioning == "class":
        names = list(getattr(dataset, "classes", None) or range(cfg.unet.num_class_embeds - 1))
        first = {}  # class -> (index, held out) of its first image in the fixed order
        for i, item_id, _, label in pool:
            first.setdefault(label, (i, item_id in held))
        cells = []
        for c, name in enumerate(names[:MAX_CLASS_CELLS]):
            source, is_held = first.get(c, (None, False))
            cells.append(Preview(label=str(name), class_label=c, source=source, held_out=is_held))
        return cells
    return [Preview(label=f"seed {seed + k}") for k in range(n)]


def _source_image(vae, dataset, index: int) -> Image.Image:
    """The cached latent of item `index`, decoded: what the model was shown (or held out from)."""
    p = next(vae.parameters())
    latent = torch.as_tensor(dataset[index]["latent"])[None].to(p.device, p.dtype)  # (1, C, h, w)
    with torch.no_grad():
        return to_pil(vae.decode(latent)[0])


def sample_grid(cfg, unet, ema, vae, text_encoder=None, dataset=None, held_out: Sequence[str] = ()):
    """(grid image, cells): one cell per preview with fixed seeds — the same every time, so grids are
    comparable across steps — each followed by the data image it came from, when there is one."""
    pipe = Pipeline(ema_unet(unet, ema), vae, NoiseSchedule.from_config(cfg.schedule), text_encoder, name="validation")
    opts = dict(steps=cfg.sample_steps, cfg=cfg.sample_guidance, progress=False)
    cells = choose_previews(cfg, dataset, held_out)
    images, labels, marked = [], [], []
    for k, c in enumerate(cells):
        if cfg.conditioning == "none":
            images.append(pipe.text2img(seed=cfg.sample_seed + k, **opts)[0])
        elif cfg.conditioning == "class":
            images.append(pipe.text2img(seed=cfg.sample_seed, class_label=c.class_label, **opts)[0])
        else:
            images.append(pipe.text2img(c.prompt, seed=cfg.sample_seed, **opts)[0])
        labels.append(c.label)
        marked.append(False)
        if c.source is not None and dataset is not None:
            images.append(_source_image(vae, dataset, c.source))
            labels.append("held-out image of this caption" if c.held_out else "training image of this caption")
            marked.append(c.held_out)
    size = max(96, min(256, images[0].size[0]))
    per_row = 2 if any(c.source is not None for c in cells) and dataset is not None else 1
    cols = per_row * min(len(cells), 4)
    return caption_grid(images, labels, marked, cols=cols, cell=size, mark_label="HELD OUT"), cells


def maybe_sample(run: Path, step: int, cfg, unet, ema, vae=None, text_encoder=None, dataset=None,
                 held_out: Sequence[str] = ()) -> Path | None:
    """Write samples/step-N.png (nothing without a VAE to decode with). Its PNG text chunk
    `latentforge:cells` lists each cell's label, prompt, class and source image id."""
    if vae is None:
        return None
    path = Path(run) / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):  # sampling must not disturb the training RNG
        grid, cells = sample_grid(cfg, unet, ema, vae, text_encoder, dataset, held_out)
    ids = {r[0]: r[1] for r in _entries(dataset)} if dataset is not None else {}
    info = PngImagePlugin.PngInfo()
    info.add_text("latentforge:cells", json.dumps([
        {"label": c.label, "prompt": c.prompt, "class": c.class_label, "source_id": ids.get(c.source),
         "held_out": c.held_out} for c in cells]))
    io.save_image(grid, path, pnginfo=info)
    return path
