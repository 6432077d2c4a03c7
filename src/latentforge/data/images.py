"""One image file -> one RGB square: checks, EXIF orientation, alpha, colour modes, resize + crop.

Every way a file can be unusable raises `BadImage(reason, detail)`, where `reason` is one of the
stable short codes in `REASONS` (the data scanner turns it into a `skipped.jsonl` line).
"""

from __future__ import annotations

import io
import os
import random
import sys
import warnings
from typing import BinaryIO, List, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageOps

# File extension -> the formats PIL may report for it (MPO: multi-picture JPEGs from cameras).
IMAGE_EXTENSIONS = {
    ".jpg": ("JPEG", "MPO"), ".jpeg": ("JPEG", "MPO"), ".png": ("PNG",), ".webp": ("WEBP",),
    ".bmp": ("BMP",), ".gif": ("GIF",), ".tif": ("TIFF",), ".tiff": ("TIFF",),
}
MAX_PIXELS = 8192 * 8192  # default decompression-bomb limit (width x height), configurable
MIN_SIZE = 16  # default smallest usable side in pixels, configurable
WHITE = (255, 255, 255)
# fit_image shrinks by whole factors while the image stays this many times the output: PIL's resize docs, "with
# reducing_gap greater or equal to 3.0, the result is indistinguishable from fair resampling in most cases".
REDUCING_GAP = 3.0


class BadImage(Exception):
    """An unusable file: `reason` is a stable short code, `detail` says what was seen."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


Source = Union[str, os.PathLike, bytes, BinaryIO]


def _as_file(src: Source) -> BinaryIO | str:
    return io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src


def open_checked(src: Source, name: str = "", max_pixels: int = MAX_PIXELS,
                 min_size: int = MIN_SIZE) -> Image.Image:
    """Open (header only, no pixel decode) and check format, extension and size."""
    if not name and isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
    ext = os.path.splitext(str(name))[1].lower()
    # We apply our own limit below; only keep PIL's built-in one from firing first.
    Image.MAX_IMAGE_PIXELS = max(Image.MAX_IMAGE_PIXELS or 0, max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(_as_file(src))
    except Image.DecompressionBombError as e:
        raise BadImage("decompression_bomb", str(e)) from None
    except Image.UnidentifiedImageError:
        raise BadImage("not_image", "not a readable image file") from None
    except OSError as e:
        raise _decode_error(e) from None
    w, h = img.size
    if w * h > max_pixels:
        raise BadImage("decompression_bomb", f"{w}x{h} = {w * h} pixels is over the limit of {max_pixels}")
    if ext in IMAGE_EXTENSIONS and img.format not in IMAGE_EXTENSIONS[ext]:
        raise BadImage("wrong_extension", f"content is {img.format} but the extension is {ext}; rename the file")
    if min(w, h) < min_size:
        raise BadImage("too_small", f"{w}x{h} is smaller than {min_size} pixels on a side")
    return img


def open_image(path) -> Image.Image:
    """Image.open (the header only: no pixel decoded) for an image given as a flag (img2img's --image, inpaint's
    --mask), then `fit_image`. PIL's DecompressionBombWarning (over Image.MAX_IMAGE_PIXELS) is left to `fit_image`'s
    one line; over twice the limit PIL raises DecompressionBombError as usual."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(path)


def fit_image(img: Image.Image, size: tuple, where: str | None = None) -> Image.Image:
    """`img` resized to `size` (W, H) with LANCZOS (as `img.resize`), decoded no larger than that needs, so memory
    follows the output's size rather than the file's: the image is first shrunk by an integer factor (`reduce`) while
    it stays ≥ REDUCING_GAP × `size` (PIL's `thumbnail` recipe; under that ratio the result is `img.resize`'s, bit for
    bit). `where` ("--image in.png") names a file from `open_image` whose pixels are not decoded yet: a JPEG then
    decodes at 1/2, 1/4 or 1/8 scale under the same rule (`draft`), and one over PIL's decompression-bomb limit gets
    one `warning: <where>: ...` line. None: an image the caller holds (left unchanged)."""
    w, h = img.size
    W, H = int(size[0]), int(size[1])
    if where is not None:
        if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
            print(f"warning: {where}: {w}x{h} = {w * h:,} pixels is over PIL's decompression-bomb limit of "
                  f"{Image.MAX_IMAGE_PIXELS:,} — it is read (slow) and used at {W}x{H}; resize the file if that is "
                  "not what you want", file=sys.stderr)
        img.draft(None, (int(W * REDUCING_GAP), int(H * REDUCING_GAP)))  # JPEG's DCT scaling; others ignore it
    gap = None if img.mode.startswith("I;16") else REDUCING_GAP  # PIL cannot `reduce` 16-bit integer images
    return img.resize((W, H), Image.Resampling.LANCZOS, reducing_gap=gap)


def oriented_size(img: Image.Image) -> tuple:
    """(width, height) after the EXIF rotation `to_rgb` applies, read from the header alone."""
    w, h = img.size
    try:
        orientation = img.getexif().get(0x0112, 1)
    except (OSError, SyntaxError, ValueError):
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)  # 5-8: transposed or rotated by 90 degrees


def _decode_error(e: Exception) -> BadImage:
    msg = str(e) or type(e).__name__
    return BadImage("truncated" if "truncat" in msg.lower() else "decode_error", msg)


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode the pixels and return RGB uint8: EXIF orientation applied, alpha composited on white,
    grayscale / CMYK / palette / 16-bit converted."""
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
            img = _high_bit_depth_to_l(img)
        if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
            canvas = Image.new("RGBA", img.size, WHITE + (255,))
            img = Image.alpha_composite(canvas, img.convert("RGBA"))
        return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise _decode_error(e) from None


def _high_bit_depth_to_l(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit / float grayscale -> 8-bit "L", scaling by the type's range (PIL clips)."""
    x = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        top = 1.0 if x.max() <= 1.0 else 255.0
    else:
        top = 65535.0 if x.max() > 255 or img.mode.startswith("I;16") else 255.0
    return Image.fromarray(np.clip(np.round(x / top * 255.0), 0, 255).astype(np.uint8), "L")


def resize_crop(img: Image.Image, size: int, random_crop: bool = False, flip: bool = False,
                rng: random.Random | None = None) -> Image.Image:
    """Resize the shorter side to `size`, then crop a size x size square (center or random)."""
    w, h = img.size
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    if random_crop:
        rng = rng or random.Random()
        left, top = rng.randint(0, new_w - size), rng.randint(0, new_h - size)
    else:
        left, top = (new_w - size) // 2, (new_h - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img


def load_image(src: Source, size: int, name: str = "", random_crop: bool = False, flip: bool = False,
               rng: random.Random | None = None, max_pixels: int = MAX_PIXELS,
               min_size: int = MIN_SIZE) -> Image.Image:
    """A file (path, bytes or binary file) -> checked, RGB, size x size PIL image.
    Raises BadImage. `name` gives the extension when `src` is bytes."""
    img = open_checked(src, name, max_pixels, min_size)
    return resize_crop(to_rgb(img), size, random_crop, flip, rng)


def to_tensor(images: Union[Image.Image, Sequence[Image.Image], torch.Tensor]) -> torch.Tensor:
    """Pixels -> float32 in [-1, 1], the one pixel convention: a PIL image -> (3, H, W); a sequence of
    same-size PIL images -> (B, 3, H, W); a uint8 tensor (..., 3, H, W) -> the same shape. Not-RGB images
    are converted with PIL's `convert("RGB")` (data files go through `to_rgb` first)."""
    if isinstance(images, torch.Tensor):
        return images.float().div(127.5).sub(1.0)
    if not isinstance(images, Image.Image):
        return torch.stack([to_tensor(im) for im in images])  # (B, 3, H, W)
    rgb = images if images.mode == "RGB" else images.convert("RGB")
    x = torch.from_numpy(np.asarray(rgb, dtype=np.uint8).copy())  # (H, W, 3)
    return x.permute(2, 0, 1).float().div(127.5).sub(1.0)  # (3, H, W)


def to_pil(x: torch.Tensor) -> Union[Image.Image, List[Image.Image]]:
    """[-1, 1] -> RGB PIL, rounded as diffusers' `numpy_to_pil`: (3, H, W) -> an image, (B, 3, H, W) -> a list."""
    if x.ndim == 4:
        return [to_pil(one) for one in x]
    a = ((x.detach().float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)  # (3, H, W)
    return Image.fromarray(a.permute(1, 2, 0).cpu().numpy(), "RGB")
