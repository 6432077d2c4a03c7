"""`latentforge sample --model M --prompt "…" --out DIR`: text → image.

The generation flags shared with `img2img` and `inpaint` live here too; each writes PNGs carrying their
settings in a `parameters` text chunk (A1111 layout), named `00000-<seed>.png`, …
"""

from __future__ import annotations

from ..config import PREDICTION_TYPES
from ..samplers import SAMPLERS, SPACINGS
from .common import choose_device


def add_common_arguments(p, cfg_default: float = 5.0):
    p.add_argument("--model", required=True,
                   help="model folder (diffusers layout, e.g. runs/x/model) or an SD 1.x/2.x .safetensors single file")
    p.add_argument("--tokenizer", default=None, help="CLIP tokenizer folder, for a single-file --model (it holds none)")
    p.add_argument("--prediction-type", default=None,
                   help=f"single-file --model: {' | '.join(PREDICTION_TYPES)}, overriding the inferred one "
                        "(SD 2.x-base: epsilon)")
    p.add_argument("--prompt", default="", help="what to draw (text-conditional models)")
    p.add_argument("--negative", default=None, help="negative prompt: what to steer away from")
    p.add_argument("--class", dest="class_label", type=int, default=None,
                   help="class label (class-conditional models)")
    p.add_argument("--sampler", default="dpmpp-2m", help=f"{' | '.join(SAMPLERS)} (default: %(default)s)")
    p.add_argument("--karras", action="store_true", default=None,
                   help="Karras et al. (2022) sigma spacing (default: the model's use_karras_sigmas)")
    p.add_argument("--spacing", default=None,
                   help=f"timestep spacing {' | '.join(SPACINGS)} (default: the model's scheduler config)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η: 0 deterministic … 1 DDPM-like (default 0)")
    p.add_argument("--steps", type=int, default=25, help="sampling steps (default 25)")
    p.add_argument("--cfg", type=float, default=cfg_default, help=f"guidance scale; ≤ 1 turns guidance off "
                                                                   f"(default {cfg_default:g})")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    p.add_argument("--n", type=int, default=1, help="number of images (default 1)")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                   help="apply a LoRA/LoCon/LoHa/LoKr/DoRA file (diffusers or kohya format) at SCALE (default 1); "
                        "repeat to stack several")
    p.add_argument("--out", required=True, help="folder to write the PNGs into")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto (default: cuda if available)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels, a multiple of the VAE factor")
    p.add_argument("--height", type=int, default=None, help="image height in pixels, a multiple of the VAE factor")
    xl = p.add_argument_group("SDXL micro-conditioning (SDXL models only; defaults as diffusers)")
    xl.add_argument("--original-size", default=None, help="WxH the model is told the source image had "
                                                          "(default: the output size)")
    xl.add_argument("--crop", default=None, help="TOP,LEFT crop offset in pixels the model is told (default 0,0)")
    xl.add_argument("--target-size", default=None, help="WxH target size (default: the output size)")
    xl.add_argument("--negative-original-size", default=None, help="WxH for the negative branch (with "
                                                                   "--negative-target-size; default: as above)")
    xl.add_argument("--negative-crop", default=None, help="TOP,LEFT for the negative branch (default 0,0)")
    xl.add_argument("--negative-target-size", default=None, help="WxH for the negative branch")


def add_arguments(p):
    add_common_arguments(p)
    p.add_argument("--size", default=None, help="WxH in pixels, multiples of the VAE factor (default: the model's); "
                                                "or --width/--height")


def parse_size(text, flag: str = "--size"):
    from ..errors import UserError

    if text is None:
        return None
    parts = text.lower().split("x")
    try:
        w, h = (int(parts[0]), int(parts[0])) if len(parts) == 1 else (int(parts[0]), int(parts[1]))
        if len(parts) > 2 or w < 1 or h < 1:
            raise ValueError
    except ValueError:
        raise UserError(f"{flag} {text}: expected WxH in pixels, e.g. 64x64") from None
    return w, h


def parse_lora(spec: str):
    """'FILE[:SCALE]' -> (Path, float); a missing file is one line now, before the model loads."""
    from pathlib import Path

    from ..errors import UserError

    file, sep, scale = spec.rpartition(":")
    try:
        path, value = (Path(file), float(scale)) if sep else (Path(spec), 1.0)
    except ValueError:
        path, value = Path(spec), 1.0  # a ':' inside the path, no scale
    if not path.exists():
        raise UserError(f"--lora {spec}: no such file — pass FILE[:SCALE], e.g. runs/x/lora/"
                        "pytorch_lora_weights.safetensors:0.8")
    return path, value


def _parse_crop(text, flag: str):
    from ..errors import UserError

    try:
        top, left = (int(v) for v in text.split(","))
        if top < 0 or left < 0:
            raise ValueError
    except ValueError:
        raise UserError(f"{flag} {text}: expected TOP,LEFT in pixels (non-negative), e.g. 0,0") from None
    return top, left


def micro_conditioning(args) -> dict:
    """The SDXL size/crop flags given, as the pipeline's (height, width) / (top, left) keywords."""
    out = {}
    for key in ("original_size", "target_size", "negative_original_size", "negative_target_size"):
        size = parse_size(getattr(args, key, None), "--" + key.replace("_", "-"))
        if size is not None:
            out[key] = (size[1], size[0])  # WxH on the command line, (height, width) in diffusers' order
    for flag, key in (("crop", "crops_coords_top_left"), ("negative_crop", "negative_crops_coords_top_left")):
        if getattr(args, flag, None) is not None:
            out[key] = _parse_crop(getattr(args, flag), "--" + flag.replace("_", "-"))
    return out


def generate(args, mode: str, **inputs) -> int:
    """Load the model, run `mode` (text2img | img2img | inpaint), write one PNG per image."""
    from .. import load, samplers
    from ..io import check_out_dir
    from ..errors import UserError
    from ..png import save_png
    from ..text import quiet_transformers

    # the cheap checks first: a typo should not wait for the model to load
    samplers.get_sampler(args.sampler)
    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1, got {args.steps}")
    if args.n < 1:
        raise UserError(f"--n: must be at least 1, got {args.n}")
    if "strength" in inputs:
        samplers.start_index(args.steps, inputs["strength"])
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v is not None and v < 1:
            raise UserError(f"{flag}: must be a positive number of pixels, got {v}")
    if args.spacing is not None and args.spacing not in samplers.SPACINGS:
        raise UserError(f"--spacing: unknown {args.spacing!r} — use one of {', '.join(samplers.SPACINGS)}")
    loras = [parse_lora(spec) for spec in args.lora]
    micro = micro_conditioning(args)
    check_numbers(args, inputs)
    device = choose_device(args.device)
    out = check_out_dir(args.out)  # before the model loads and the images are made, not after
    quiet_transformers()
    from ..formats.single_file import is_single_file

    extra = dict(tokenizer=args.tokenizer, prediction_type=args.prediction_type) if is_single_file(args.model) else {}
    pipe = load(args.model, device=device, **extra)
    for file, scale in loras:
        pipe.with_lora(file, scale)
    images = getattr(pipe, mode)(prompt=args.prompt, negative_prompt=args.negative, sampler=args.sampler,
                                 steps=args.steps, cfg=args.cfg, seed=args.seed, n=args.n,
                                 class_label=args.class_label, karras=args.karras, eta=args.eta,
                                 spacing=args.spacing, width=args.width, height=args.height, **micro, **inputs)
    out.mkdir(parents=True, exist_ok=True)
    first = next_index(out)  # an earlier run's images in the same folder are kept, never overwritten
    for i, im in enumerate(images):
        path = save_png(im, out / f"{first + i:05d}-{args.seed + i}.png", im.info["parameters"])
        print(path)
    return 0


def check_numbers(args, inputs) -> None:
    """nan/inf guidance or η gives a black image without a word; a seed past 64 bits a traceback."""
    import math

    from ..errors import UserError

    for flag, value in (("--cfg", args.cfg), ("--eta", args.eta), ("--strength", inputs.get("strength", 1.0))):
        if not math.isfinite(value):
            raise UserError(f"{flag} {value}: not a finite number — give a real value")
    if args.eta < 0:
        raise UserError(f"--eta {args.eta}: must be at least 0 (0 deterministic … 1 DDPM-like)")
    if not 0 <= args.seed <= 2 ** 64 - args.n:
        raise UserError(f"--seed {args.seed}: must be between 0 and 2^64 - n (each image i uses seed + i)")


def next_index(out) -> int:
    """1 + the highest `NNNNN-` number of the PNGs already in `out` (0 for an empty folder)."""
    import re

    numbers = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"^(\d{5,})-.*\.png$", p.name))]
    return max(numbers, default=-1) + 1


def run(args):
    return generate(args, "text2img", size=parse_size(args.size))
