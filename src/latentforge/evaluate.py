"""Evaluation: the shapes prompt-adherence benchmark and FID/KID against a reference folder.

Both take a `generate(captions, seeds) -> list[PIL.Image]` function, so they run the same on a
trained model (`pipeline_generator`) and on a fake generator in tests. The metric arithmetic lives
in `latentforge.metrics`; this module wires generation, analysis, files and tables together.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from . import io
from .data import shapes
from .data.images import BadImage, open_checked, to_rgb, to_tensor
from .data.sources import REASONS, Item, scan, summary
from .errors import UserError
from .metrics import adherence, fid as fidlib
from .metrics.adherence import Prompt

Generate = Callable[[list, list], Sequence[Image.Image]]


def shapes_prompts() -> list[Prompt]:
    """Every combination of the shapes caption grammar, seen and held out (96 prompts)."""
    return [Prompt(shapes.caption(a), a, shapes.is_held_out(a)) for a in shapes.all_combinations()]


def pipeline_generator(pipe, sampler: str | None = None, steps: int | None = None, cfg: float | None = None,
                       negative_prompt: str | None = None) -> Generate:
    """Adapt a `pipelines.Pipeline` to `generate(captions, seeds)`.

    Runs of one caption with consecutive seeds s, s+1, … become one `text2img(caption, seed=s, n=k)`
    call (the pipeline seeds image i with seed + i), so the UNet sees batches of k (2k with CFG).
    """
    options = {k: v for k, v in dict(sampler=sampler, steps=steps, cfg=cfg).items() if v is not None}
    if pipe.text_encoder is not None and not isinstance(pipe.text_encoder, MemoTextEncoder):
        pipe.text_encoder = MemoTextEncoder(pipe.text_encoder)  # a benchmark repeats few captions

    def generate(captions, seeds):
        if isinstance(pipe.text_encoder, MemoTextEncoder):
            pipe.text_encoder.encode(list(captions) + [negative_prompt or ""])  # one batched call
        images, i = [], 0
        while i < len(captions):
            j = i + 1
            while j < len(captions) and captions[j] == captions[i] and seeds[j] == seeds[j - 1] + 1:
                j += 1
            images += pipe.text2img(captions[i], negative_prompt=negative_prompt, seed=seeds[i], n=j - i,
                                    progress=False, **options)
            i = j
        return images

    return generate


class MemoTextEncoder:
    """A TextEncoder that remembers each caption's (context, mask): the benchmark asks for the same
    96 captions (and "") over and over, and encoding them dominated the time of short runs."""

    def __init__(self, encoder):
        self.encoder, self._memo = encoder, {}

    def __getattr__(self, name):
        return getattr(self.encoder, name)

    def encode(self, captions):
        captions = [captions] if isinstance(captions, str) else list(captions)
        todo = sorted({c for c in captions if c not in self._memo})
        if todo:
            ctx, mask = self.encoder.encode(todo)
            self._memo.update({c: (ctx[i], mask[i]) for i, c in enumerate(todo)})
        return (torch.stack([self._memo[c][0] for c in captions]),
                torch.stack([self._memo[c][1] for c in captions]))


# ---- the adherence benchmark ----------------------------------------------------------------


def evaluate_shapes(generate: Generate, out: str | os.PathLike | None = None, n: int = 4, seed: int = 0,
                    batch_size: int = 16, settings: dict | None = None) -> dict:
    """Generate n images for each of the 96 shapes prompts, analyse them, score seen vs held-out.

    Writes `eval.json` (scores, settings, per-image records), `eval.md` (the table) and
    `eval_grid.png` (the first image of every prompt, held-out ones marked) into `out` if given.
    """
    prompts = shapes_prompts()
    firsts: dict[str, Image.Image] = {}

    def keep_first(p, s, image, predicted):
        firsts.setdefault(p.caption, image)

    t0 = time.perf_counter()
    scores, records = adherence.run_benchmark(generate, shapes.analyse, prompts, n=n, seed=seed,
                                              batch_size=batch_size, on_image=keep_first)
    result = {"benchmark": "shapes", "images_per_prompt": n, "seed": seed, "settings": settings or {},
              "seconds": round(time.perf_counter() - t0, 2), "scores": scores, "records": records}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        io.write_text(out / "eval.json", json.dumps(result, indent=1) + "\n")
        io.write_text(out / "eval.md", "# Prompt adherence (shapes)\n\n" + adherence.markdown_table(scores) + "\n")
        io.save_image(caption_grid([firsts[p.caption] for p in prompts], [p.caption for p in prompts],
                                   [p.held_out for p in prompts], cols=12), out / "eval_grid.png")
    return result


# ---- grids ----------------------------------------------------------------------------------


def caption_grid(images: Sequence[Image.Image], labels: Sequence[str], marked: Sequence[bool] | None = None,
                 cols: int = 8, cell: int = 96, mark_label: str = "HELD OUT") -> Image.Image:
    """Images scaled (nearest) to fit `cell` px, aspect kept (`letterbox`), each over its wrapped label; marked
    cells get a red border and `mark_label` in red."""
    marked = marked or [False] * len(images)
    font = ImageFont.load_default()
    text_h, pad = 58, 4
    rows = (len(images) + cols - 1) // cols
    w, h = cell + 2 * pad, cell + 2 * pad + text_h
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (img, label, mark) in enumerate(zip(images, labels, marked)):
        x, y = (i % cols) * w, (i // cols) * h
        if mark:
            draw.rectangle((x, y, x + w - 1, y + cell + 2 * pad - 1), fill=(220, 0, 0))
        grid.paste(letterbox(img, cell), (x + pad, y + pad))
        lines = _wrap(label, chars=max(8, cell // 6))[:4]
        if mark:
            lines = [mark_label] + lines
        for j, line in enumerate(lines):
            colour = (220, 0, 0) if mark and j == 0 else (0, 0, 0)
            draw.text((x + pad, y + cell + 2 * pad + j * 11), line, fill=colour, font=font)
    return grid


def letterbox(img: Image.Image, side: int, fill=(255, 255, 255)) -> Image.Image:
    """`img` scaled (nearest) so its longer side is `side`, centred on a side x side `fill` square: a
    non-square image keeps its aspect instead of being squashed; a square one is a plain resize."""
    w, h = img.size
    fw, fh = max(1, round(w * side / max(w, h))), max(1, round(h * side / max(w, h)))
    out = Image.new("RGB", (side, side), fill)
    out.paste(img.convert("RGB").resize((fw, fh), Image.Resampling.NEAREST), ((side - fw) // 2, (side - fh) // 2))
    return out


def _wrap(text: str, chars: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > chars:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return lines + ([line] if line else [])


# ---- FID / KID ------------------------------------------------------------------------------


def reference_items(reference_dir: str | os.PathLike) -> list[Item]:
    """Every usable image under the folder, read as training data is (`data.sources.scan`: same-name .txt,
    metadata.jsonl or webdataset captions; unusable files skipped with their reason on stderr); caption None = ''."""
    root = Path(reference_dir)
    if not root.is_dir():
        raise UserError(f"--reference: {root} is not a folder — give a folder of reference images")
    items, skipped = scan(str(root), labels="none")
    if skipped:
        print(f"--reference {root}: " + summary(skipped), file=sys.stderr)
    if len(items) < 2:
        raise UserError(f"--reference: {root} holds {len(items)} usable images — FID/KID need at least 2")
    return items


def reference_image(item: Item) -> Image.Image:
    """A reference image as the data pipeline decodes it (EXIF orientation, alpha on white, RGB)."""
    try:
        return to_rgb(open_checked(item.read_bytes(), item.name))
    except BadImage as e:  # scan reads headers only; the pixels may still be broken
        raise UserError(f"--reference {item.id}: {REASONS[e.reason]} ({e.detail}) — replace or remove it") from None


def inception_input(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of any sizes -> (B, 3, 299, 299) in [-1, 1], resized as pytorch-fid does (torch bilinear)."""
    out = [torch.nn.functional.interpolate(to_tensor(im)[None], size=(299, 299), mode="bilinear", align_corners=False)
           for im in images]  # (1, 3, 299, 299) each
    return torch.cat(out)  # (B, 3, 299, 299)


def inception_features(extractor, images: Sequence[Image.Image], batch_size: int = 16, desc: str = "inception") -> np.ndarray:
    """pool3 features (N, 2048) of PIL images."""
    feats = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch"):
        feats.append(extractor(inception_input(images[i : i + batch_size])).double().numpy())
    return np.concatenate(feats)


def evaluate_fid(generate: Generate, reference_dir, extractor, n: int | None = None, seed: int = 0,
                 batch_size: int = 16, kid_subsets: int = 100, kid_subset_size: int = 1000) -> dict:
    """Generate one image per reference caption (the first n), compare Inception features."""
    items = reference_items(reference_dir)[: n or None]
    references = [reference_image(it) for it in items]
    captions = [it.caption or "" for it in items]
    generated = []
    for i in tqdm(range(0, len(captions), batch_size), desc="generate", unit="batch"):
        chunk = captions[i : i + batch_size]
        generated += list(generate(chunk, [seed + i + j for j in range(len(chunk))]))
    f_ref = inception_features(extractor, references, batch_size, "inception (reference)")
    f_gen = inception_features(extractor, generated, batch_size, "inception (generated)")
    kid_mean, kid_std = fidlib.kid_score(f_gen, f_ref, kid_subsets, kid_subset_size, seed)
    return {"fid": fidlib.fid_score(f_gen, f_ref), "kid": kid_mean, "kid_std": kid_std,
            "n_generated": len(generated), "n_reference": len(references)}
