"""`latentforge shapes --out DIR --n N --size S --seed K [--canvas 48x32,32x48]`: write the built-in captioned
data set (square, or on the given canvases in turn: non-square data for aspect-ratio buckets)."""

from __future__ import annotations

from ..errors import UserError


def add_arguments(p):
    p.add_argument("--out", required=True, help="folder to write 00000.png + 00000.txt ... into")
    p.add_argument("--n", type=int, default=2000, help="number of images (default 2000)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--jitter", type=float, default=0.03,
                   help="random shift/resize of the shape, fraction of the side (default 0.03)")
    p.add_argument("--canvas", default=None,
                   help="WxH[,WxH...]: draw image i on the i-th canvas in turn instead of --size squares")


def check_not_users(out) -> None:
    """Writing 00000.png, 00000.txt … into a folder of the user's would overwrite their files: only a new or
    empty folder, or an earlier shapes data set (nothing but NNNNN.png / NNNNN.txt), is written into."""
    import os
    import re

    if not os.path.isdir(out):
        return
    other = sorted(n for n in os.listdir(out) if not re.fullmatch(r"\d{5,}\.(png|txt)", n))
    if other:
        raise UserError(f"--out {out}: holds files that are not a shapes data set (e.g. {other[0]!r}) — pass a new "
                        "or empty folder (an earlier `latentforge shapes` folder is rewritten)")


def run(args):
    from ..data import shapes
    from ..io import check_out_dir

    if args.n < 1:
        raise UserError(f"--n {args.n}: must be at least 1")
    if args.size < 16:
        raise UserError(f"--size {args.size}: must be at least 16 pixels")
    if not 0 <= args.jitter <= 0.05:
        raise UserError(f"--jitter {args.jitter}: must be between 0 and 0.05 (shapes must stay in their quadrant)")
    check_out_dir(args.out)
    check_not_users(args.out)
    shapes.write_dataset(args.out, args.n, args.size, args.seed, args.jitter, canvases=parse_canvases(args.canvas))
    n_combos, n_held = len(shapes.all_combinations()), len(shapes.HELD_OUT)
    print(f"wrote {args.n} images to {args.out} ({n_combos - n_held} seen combinations, "
          f"{n_held} held out)")


def parse_canvases(text):
    if text is None:
        return None
    try:
        canvases = [tuple(int(v) for v in c.lower().split("x")) for c in text.split(",")]
        if not all(len(c) == 2 and min(c) >= 16 for c in canvases):
            raise ValueError
    except ValueError:
        raise UserError(f"--canvas {text}: expected WxH[,WxH...] with sides of at least 16 pixels, "
                        "e.g. 48x32,32x48") from None
    return canvases
