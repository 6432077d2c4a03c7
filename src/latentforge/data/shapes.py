"""The built-in captioned shapes data set, and the pixel analyser that grades generated images.

Each image shows one large shape on a plain background; its caption names four attributes:

    "a red circle at the top left on a white background"
       colour shape     position          background

4 colours x 3 shapes x 4 positions x 2 backgrounds = 96 combinations, of which `HELD_OUT` (8) are
never written by `write_dataset`; the evaluation asks the model for them to test compositional
generalisation. The attribute space is deliberately small and visually unambiguous so that a small
UNet trained for minutes on a CPU can learn it, and so that `analyse` can read the attributes back
from blurry, noisy generated images.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Dict, Iterator, List, Tuple

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage
from tqdm import tqdm

from .. import io

# ---- the caption grammar -------------------------------------------------------------------

COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {"white": (255, 255, 255), "black": (0, 0, 0)}
ATTRIBUTES = ("colour", "shape", "position", "background")

# Never emitted by write_dataset. Each attribute value, and each pair of values, still occurs in
# training; only these full combinations are new to the model.
HELD_OUT: Tuple[Tuple[str, str, str, str], ...] = (
    ("red", "circle", "top left", "white"),
    ("green", "square", "bottom right", "black"),
    ("blue", "triangle", "top right", "white"),
    ("yellow", "circle", "bottom left", "black"),
    ("red", "triangle", "bottom right", "black"),
    ("green", "circle", "top right", "white"),
    ("blue", "square", "bottom left", "black"),
    ("yellow", "square", "top left", "white"),
)

SIDE = 0.44  # object side as a fraction of the image side (each shape fills a quadrant)


def all_combinations() -> List[Dict[str, str]]:
    """Every attribute combination (seen and held out), in a fixed order."""
    values = (tuple(COLOURS), SHAPES, POSITIONS, tuple(BACKGROUNDS))
    return [dict(zip(ATTRIBUTES, combo)) for combo in itertools.product(*values)]


def is_held_out(attrs: Dict[str, str]) -> bool:
    return tuple(attrs[a] for a in ATTRIBUTES) in HELD_OUT


def seen_combinations() -> List[Dict[str, str]]:
    return [a for a in all_combinations() if not is_held_out(a)]


def held_out_combinations() -> List[Dict[str, str]]:
    return [a for a in all_combinations() if is_held_out(a)]


def caption(attrs: Dict[str, str]) -> str:
    return f"a {attrs['colour']} {attrs['shape']} at the {attrs['position']} on a {attrs['background']} background"


def parse_caption(text: str) -> Dict[str, str]:
    """Inverse of `caption` (raises ValueError for text outside the grammar)."""
    for attrs in all_combinations():
        if caption(attrs) == text.strip():
            return attrs
    raise ValueError(f"not a shapes caption: {text!r}")


# ---- drawing -------------------------------------------------------------------------------


def render(attrs: Dict[str, str], size: int = 32, rng: random.Random | None = None,
           jitter: float = 0.03, supersample: int = 4, canvas: Tuple[int, int] | None = None) -> Image.Image:
    """Draw one image, size x size (or on a `canvas` of (width, height): the shape, sized by the
    shorter side, sits at the centre of its quadrant). `jitter` (fraction of the side) moves and
    resizes the shape a little."""
    rng = rng or random.Random(0)
    W, H = canvas or (size, size)
    bw, bh, short = W * supersample, H * supersample, min(W, H) * supersample
    img = Image.new("RGB", (bw, bh), BACKGROUNDS[attrs["background"]])
    row, col = attrs["position"].split()
    cx = (0.25 if col == "left" else 0.75) + rng.uniform(-jitter, jitter)
    cy = (0.25 if row == "top" else 0.75) + rng.uniform(-jitter, jitter)
    side = SIDE + rng.uniform(-jitter, jitter)
    sx, sy = side / 2 * (short / bw), side / 2 * (short / bh)  # half-sides as fractions (square: side / 2)
    x0, y0, x1, y1 = bw * (cx - sx), bh * (cy - sy), bw * (cx + sx), bh * (cy + sy)
    draw, fill = ImageDraw.Draw(img), COLOURS[attrs["colour"]]
    if attrs["shape"] == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif attrs["shape"] == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return img.resize((W, H), Image.Resampling.BOX)  # area average = anti-aliased edges


def examples(n: int, seed: int = 0) -> Iterator[Dict[str, str]]:
    """n attribute dicts cycling through the seen combinations in shuffled rounds (balanced)."""
    rng, seen = random.Random(seed), seen_combinations()
    order: List[Dict[str, str]] = []
    for i in range(n):
        if i % len(seen) == 0:
            order = rng.sample(seen, len(seen))
        yield order[i % len(seen)]


def write_dataset(out: str, n: int, size: int = 32, seed: int = 0, jitter: float = 0.03,
                  canvases: List[Tuple[int, int]] | None = None) -> List[str]:
    """Write n png + txt pairs (`00000.png`, `00000.txt`, ...) into `out`; returns the png paths.
    `canvases` [(width, height), ...]: image i is drawn on canvases[i % len] instead of a square
    (e.g. [(48, 32), (32, 48)]: non-square data for aspect-ratio buckets)."""
    os.makedirs(out, exist_ok=True)
    rng, paths = random.Random(seed + 1), []
    width = max(5, len(str(n - 1)))
    for i, attrs in enumerate(tqdm(examples(n, seed), total=n, desc="shapes", unit="img")):
        stem = os.path.join(out, f"{i:0{width}d}")
        canvas = canvases[i % len(canvases)] if canvases else None
        io.save_image(render(attrs, size, rng, jitter, canvas=canvas), stem + ".png")
        io.write_text(stem + ".txt", caption(attrs) + "\n")
        paths.append(stem + ".png")
    return paths


# ---- the analyser --------------------------------------------------------------------------


def _nearest(colour: np.ndarray, palette: Dict[str, Tuple[int, int, int]]) -> str:
    names = list(palette)
    dists = [np.linalg.norm(colour - np.array(palette[k], dtype=np.float64)) for k in names]
    return names[int(np.argmin(dists))]


def _object_mask(x: np.ndarray, bg: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Pixels closer to the object's colour than to the background, as the largest blob."""
    dist = np.linalg.norm(x - bg, axis=-1)  # (H, W)
    coarse = dist > max(60.0, 0.5 * dist.max())
    if not coarse.any():
        return coarse, bg
    obj = np.median(x[coarse & (dist >= np.quantile(dist[coarse], 0.5))], axis=0)  # robust colour
    # Project each pixel onto the background -> object line; > 0.5 means nearer the object. A
    # half-way threshold keeps the area of a blurred shape unchanged.
    axis = obj - bg
    proj = ((x - bg) @ axis) / max(float(axis @ axis), 1e-6)
    labels, n = ndimage.label(proj > 0.5)
    if n == 0:
        return np.zeros_like(coarse), obj
    largest = 1 + int(np.argmax(ndimage.sum_labels(np.ones_like(proj), labels, range(1, n + 1))))
    return ndimage.binary_fill_holes(labels == largest), obj


def _shape_of(mask: np.ndarray) -> str:
    """Classify the blob by two blur-tolerant features of its bounding box (b = box side).

    - centroid height within the box: 2/3 for an upright triangle (apex on top), 1/2 for a circle
      or square; a symmetric blur leaves it nearly unchanged.
    - extent along the diagonals / extent along the axes: sqrt(2) for a square, 1 for a circle
      (blur rounds the square's corners, so the threshold sits below the midpoint).
    """
    ys, xs = np.nonzero(mask)
    h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    centroid_height = (ys.mean() - ys.min() + 0.5) / h
    if centroid_height > 0.56:
        return "triangle"
    d1, d2 = xs + ys, xs - ys
    diagonal = ((d1.max() - d1.min() + 1) + (d2.max() - d2.min() + 1)) / (2 * np.sqrt(2))
    return "square" if diagonal / ((h + w) / 2) > 1.12 else "circle"


def analyse(image) -> Dict[str, str | None]:
    """Read colour, shape, position and background from an image's pixels (PIL or (H, W, 3) array).

    background = nearest palette colour to the median border pixel; object = pixels nearer the
    object colour than the background (largest connected blob); colour = nearest palette colour to
    the object's median; position = the centroid's quadrant; shape = centroid height and diagonal
    extent in the bounding box (see `_shape_of`). Attributes that cannot be read are None.
    """
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    x = np.asarray(image, dtype=np.float64)[..., :3]  # (H, W, 3) in 0..255
    if x.max() <= 1.0:  # a float image in [0, 1]
        x = x * 255.0
    h, w = x.shape[:2]
    border = np.concatenate([x[0], x[-1], x[1:-1, 0], x[1:-1, -1]])  # (2H + 2W - 4, 3)
    bg = np.median(border, axis=0)
    out: Dict[str, str | None] = dict(colour=None, shape=None, position=None,
                                      background=_nearest(bg, BACKGROUNDS))
    mask, obj = _object_mask(x, bg)
    if mask.sum() < 4:
        return out
    ys, xs = np.nonzero(mask)
    out["colour"] = _nearest(np.median(x[mask], axis=0), COLOURS)
    out["position"] = f"{'top' if ys.mean() < h / 2 else 'bottom'} {'left' if xs.mean() < w / 2 else 'right'}"
    out["shape"] = _shape_of(mask)
    return out


def accuracy(images, attrs_list) -> float:
    """Fraction of images whose four attributes are all read back correctly."""
    hits = [analyse(img) == {a: attrs[a] for a in ATTRIBUTES} for img, attrs in zip(images, attrs_list)]
    return sum(hits) / max(len(hits), 1)
