"""`latentforge cache --data DIR --vae MODEL --out CACHE [--text-encoder NAME_OR_DIR] [--size S] [--buckets]`:
encode a data folder once into a latent cache (re-runs encode only new or changed files).
With --buckets each image keeps its aspect ratio: it goes to the nearest of the buckets at the
area S x S (data/buckets.py) instead of being cropped to an S x S square."""

from __future__ import annotations

import os

from ..config import LABELS
from ..errors import UserError
from .common import choose_device, load_vae


def add_arguments(p):
    p.add_argument("--data", required=True, help="data folder (images + .txt, metadata.jsonl, .tar shards, class folders)")
    p.add_argument("--vae", required=True, help="VAE: a model folder (with vae/) or a vae/ folder")
    p.add_argument("--out", required=True, help="cache folder to create or update")
    p.add_argument("--text-encoder", default="default",
                   help="'default' (all-MiniLM-L6-v2, bundled), a local transformers model folder, a model "
                        "folder with text_encoder/, or 'none' (default: default)")
    p.add_argument("--max-length", type=int, default=None, help="caption tokens (default: min(tokenizer's, 77))")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the VAE's sample_size)")
    p.add_argument("--batch-size", type=int, default=16, help="images per VAE batch (default 16)")
    p.add_argument("--shard-size", type=int, default=1024, help="latents per shard file (default 1024)")
    p.add_argument("--flip", action="store_true", help="also cache each image's horizontal mirror")
    add_bucket_arguments(p)
    p.add_argument("--strict", action="store_true", help="fail if any file has to be skipped")
    p.add_argument("--caption-column", default="text", help="metadata.jsonl caption key (default text)")
    p.add_argument("--labels", choices=LABELS, default="auto",
                   help="class labels from sub-folders (default auto: when there are no captions)")
    p.add_argument("--min-size", type=int, default=None, help="skip images with a shorter side below this (default 16)")
    p.add_argument("--max-pixels", type=int, default=None,
                   help="decompression-bomb limit, width x height (default 8192*8192)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def add_bucket_arguments(p):
    p.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets at the area size x size (ratios 1:4 to 4:1) instead of squares")
    p.add_argument("--bucket-step", type=int, default=0,
                   help="bucket sides are multiples of this (default: the VAE factor x 8, 64 px for SD)")
    p.add_argument("--max-upscale", type=float, default=None,
                   help="enlarge an image at most this much to cover its bucket, else skip it (default 2)")
    p.add_argument("--random-crop", action="store_true",
                   help="crop at a random offset (seeded by the file, recorded) instead of the center")


def bucket_spec(args):
    """The BucketSpec the --buckets flags ask for, or None."""
    from ..data.buckets import MAX_UPSCALE
    from ..data.cache import BucketSpec

    if not args.buckets:
        if args.bucket_step or args.max_upscale is not None or args.random_crop:
            raise UserError("--bucket-step/--max-upscale/--random-crop: only apply with --buckets — add --buckets")
        return None
    return BucketSpec(step=args.bucket_step, max_upscale=MAX_UPSCALE if args.max_upscale is None else args.max_upscale,
                      crop="random" if args.random_crop else "center")


def run(args):
    from ..data.cache import build_cache
    from ..data.images import MAX_PIXELS, MIN_SIZE
    from ..io import check_out_dir

    check_out_dir(args.out)
    vae = load_vae(args.vae, choose_device(args.device))
    text_encoder = None if args.text_encoder.lower() == "none" else args.text_encoder  # loaded if captioned
    report = build_cache(
        args.data, vae, text_encoder, args.out, size=args.size, batch_size=args.batch_size, flip=args.flip,
        text_max_length=args.max_length,
        shard_size=args.shard_size, caption_column=args.caption_column, labels=args.labels,
        min_size=MIN_SIZE if args.min_size is None else args.min_size,
        max_pixels=MAX_PIXELS if args.max_pixels is None else args.max_pixels,
        strict=args.strict, progress=not args.quiet, buckets=bucket_spec(args))
    print(report)
    if report.skipped:
        print(f"skipped files are listed in {os.path.join(args.out, 'skipped.jsonl')}")
