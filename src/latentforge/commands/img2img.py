"""`latentforge img2img --model M --image in.png --prompt "…" --strength 0.6 --out DIR`: image + text → image."""

from __future__ import annotations

from .common import add_generation_arguments, generate


def add_arguments(p):
    add_generation_arguments(p)
    p.add_argument("--image", required=True, help="the starting image (the output has its size, rounded down to the VAE grid, "
                                                   "unless --width/--height)")
    p.add_argument("--strength", type=float, default=0.6,
                   help="how much to change it, in (0, 1]: 1 ignores the image (default 0.6)")


def run(args):
    return generate(args, "img2img", image=args.image, strength=args.strength)
