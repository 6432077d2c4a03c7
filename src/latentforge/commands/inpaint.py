"""`latentforge inpaint --model M --image in.png --mask mask.png --prompt "…" --out DIR`: repaint the white part."""

from __future__ import annotations

from .common import add_generation_arguments, generate


def add_arguments(p):
    add_generation_arguments(p)
    p.add_argument("--image", required=True, help="the image to repaint (the output has its size, rounded down to the VAE "
                                                   "grid, unless --width/--height)")
    p.add_argument("--mask", required=True, help="same-size mask: white = repaint, black = keep")
    p.add_argument("--strength", type=float, default=1.0,
                   help="in (0, 1]: below 1 the masked part starts from the image, noised (default 1)")


def run(args):
    return generate(args, "inpaint", image=args.image, mask=args.mask, strength=args.strength)
