"""Aspect-ratio buckets: a list of (width, height) at one pixel area, each image's bucket, and how
it is resized and cropped into it (with the crop offset SDXL's micro-conditioning wants).

    buckets = bucket_list(area=512 * 512, step=64)       # 256x1024 ... 512x512 ... 1024x256
    p = place(800, 600, buckets)                          # nearest aspect: 576x448; cover + center crop
    img = fit(rgb_image, p)                               # exactly p.bucket's size

The list follows kohya-ss/sd-scripts `make_bucket_resolutions`: for every width that is a multiple
of `step`, the largest multiple-of-`step` height whose area stays within `area`, both orientations,
plus the square; here limited to aspect ratios from 1:max_ratio to max_ratio:1. An image goes to
the bucket nearest its aspect ratio in log space (|log(w/h) − log(bw/bh)|, so 2:1 and 1:2 are
equally far from 1:1), is scaled to *cover* the bucket (the short side fits, nothing is padded) and
the overhang is cropped — centered, or at a random offset. An image wider than max_ratio:1 (a
panorama) goes to the widest bucket and keeps its middle; one that would need more than
`max_upscale` times enlargement to cover its bucket is refused (`BadImage("below_bucket")`).
An image already of its bucket's size is not resampled at all.

Sizes follow SDXL's micro-conditioning (Podell et al. 2023, §2.2): `original_size` and
`target_size` are (height, width), `crop_top_left` is (top, left) in the resized image.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

from PIL import Image

from .images import BadImage

MAX_RATIO = 4.0  # aspect ratios from 1:4 to 4:1
MAX_UPSCALE = 2.0  # an image is enlarged at most 2x to cover its bucket, else skipped
CROPS = ("center", "random")


@dataclass(frozen=True, order=True)
class Bucket:
    width: int
    height: int

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}"

    @property
    def ratio(self) -> float:
        return self.width / self.height

    @classmethod
    def parse(cls, name: str) -> "Bucket":
        w, h = name.split("x")
        return cls(int(w), int(h))


@dataclass(frozen=True)
class Placement:
    """Where one image goes: its bucket, the cover-resize and the crop."""

    bucket: Bucket
    original_size: Tuple[int, int]  # (height, width) of the decoded image
    resized: Tuple[int, int]  # (width, height) after the cover-resize (= original: no resampling)
    crop_top_left: Tuple[int, int]  # (top, left) of the crop in the resized image

    @property
    def target_size(self) -> Tuple[int, int]:
        return self.bucket.height, self.bucket.width

    def flipped(self) -> "Placement":
        """The same crop seen in the mirrored image (its left offset counted from the other side)."""
        top, left = self.crop_top_left
        return Placement(self.bucket, self.original_size, self.resized,
                         (top, self.resized[0] - self.bucket.width - left))

    def record(self) -> dict:
        """The JSON fields a cache entry keeps (SDXL's `add_time_ids` inputs)."""
        return {"bucket": self.bucket.name, "original_size": list(self.original_size),
                "crop_top_left": list(self.crop_top_left), "target_size": list(self.target_size)}


def bucket_list(area: int, step: int, max_ratio: float = MAX_RATIO) -> List[Bucket]:
    """Buckets of at most `area` pixels with sides multiples of `step`, ratios within 1:max_ratio..max_ratio:1,
    sorted by aspect ratio (tallest first)."""
    if step < 1 or area < step * step:
        raise ValueError(f"area {area} must hold at least one {step}x{step} square")
    side = int(math.isqrt(area) // step * step)
    found = {Bucket(side, side)}
    w = step
    while w * w <= area * max_ratio:
        h = area // w // step * step
        if h >= step and max(w, h) <= max_ratio * min(w, h):
            found |= {Bucket(w, h), Bucket(h, w)}
        w += step
    return sorted(found, key=lambda b: (b.ratio, b.width))


def nearest(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio (ties: the first in `buckets`)."""
    r = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b.ratio) - r))


def place(width: int, height: int, buckets: Sequence[Bucket], crop: str = "center",
          rng: Optional[random.Random] = None, max_upscale: float = MAX_UPSCALE) -> Placement:
    """The bucket, cover-resize and crop for a width x height image; BadImage("below_bucket") when
    covering the bucket needs more than `max_upscale` times enlargement."""
    if crop not in CROPS:
        raise ValueError(f"crop={crop!r}: choose one of {', '.join(CROPS)}")
    b = nearest(width, height, buckets)
    scale = max(b.width / width, b.height / height)
    if scale > max_upscale:
        raise BadImage("below_bucket", f"{width}x{height} would need {scale:.2f}x enlargement to cover its "
                                       f"{b.name} bucket (limit {max_upscale:g}x)")
    if (width, height) == (b.width, b.height):
        new_w, new_h = width, height
    else:
        new_w, new_h = max(b.width, round(width * scale)), max(b.height, round(height * scale))
    if crop == "random":
        rng = rng or random.Random()
        top, left = rng.randint(0, new_h - b.height), rng.randint(0, new_w - b.width)
    else:
        top, left = (new_h - b.height) // 2, (new_w - b.width) // 2
    return Placement(b, (height, width), (new_w, new_h), (top, left))


def fit(img: Image.Image, p: Placement, flip: bool = False) -> Image.Image:
    """Resize (LANCZOS, only if needed) and crop `img` into its bucket; `flip` mirrors the result
    (the mirrored crop is `p.flipped()`)."""
    if img.size != p.resized:
        img = img.resize(p.resized, Image.Resampling.LANCZOS)
    top, left = p.crop_top_left
    if (left, top, img.size) != (0, 0, (p.bucket.width, p.bucket.height)):
        img = img.crop((left, top, left + p.bucket.width, top + p.bucket.height))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def histogram(names: Sequence[str]) -> List[Tuple[str, int]]:
    """(bucket name, count), in aspect-ratio order."""
    counts = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return sorted(counts.items(), key=lambda kv: (Bucket.parse(kv[0]).ratio, Bucket.parse(kv[0]).width))
