"""`latentforge sample --model M --prompt "…" --out DIR`: text → image.

Writes PNGs carrying their settings in a `parameters` text chunk (A1111 layout), named `00000-<seed>.png`, …
(the generation flags and `generate`, shared with `img2img` and `inpaint`, are in commands/common.py).
"""

from __future__ import annotations

from .common import add_generation_arguments, generate, parse_size


def add_arguments(p):
    add_generation_arguments(p)
    p.add_argument("--size", default=None, help="WxH in pixels, multiples of the VAE factor (default: the model's); "
                                                "or --width/--height")


def run(args):
    return generate(args, "text2img", size=parse_size(args.size))
