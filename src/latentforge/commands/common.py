"""What several sub-commands share.

- training runs (train, train-vae): `add_run_arguments`, `resolve_config`, `disk_full_is_one_line`
- generation (sample, img2img, inpaint): `add_generation_arguments`, `generate` and its checks
- all: `choose_device`, `load_vae`, `parse_lora` (also merge), `parse_size`
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from ..config import PREDICTION_TYPES, SAMPLER_NAMES, SPACINGS, TrainConfig, replace
from ..config_loading import load_train_config
from ..errors import UserError
from ..io import check_out_dir

# ---------------------------------------------------------------------------------- training runs: train, train-vae

# flag (args attribute) -> the config key it sets
FLAG_SETTINGS = (("vae", "vae_path"), ("text_encoder", "text_encoder"), ("init", "init"))


def add_run_arguments(p, what: str, example: str) -> None:
    """The flags of a training command: --config, --resume, --restart, --print-config, --quiet, key=value ...
    (key=value settings may stand anywhere between the flags: cli.py parses sub-commands intermixed)."""
    p.add_argument("--config", help=f"TOML file with {what} (see --print-config)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    p.add_argument("--restart", action="store_true",
                   help="start RUN over from step 0: its checkpoints/ is moved to checkpoints-set-aside-N/ (kept)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=f"settings, e.g. {example}")


def resolve_config(args, cls=None):
    """Preset <- the --init model <- --config (or RUN/config.toml when resuming) <- key=value <- flags."""
    cls = cls or TrainConfig
    path, resumed = args.config, False
    if path is None and getattr(args, "resume", False) and args.out and (Path(args.out) / "config.toml").is_file():
        path, resumed = Path(args.out) / "config.toml", True  # resuming: the run's own settings are the base
    overrides = list(args.overrides) + [f"{key}={getattr(args, flag)}" for flag, key in FLAG_SETTINGS
                                        if getattr(args, flag, None)]
    if getattr(args, "merge", False):
        overrides.append("lora.merge=true")
    overrides = [_quote(o) for o in overrides]
    cfg = load_train_config(path, overrides, cls=cls)  # (TrainConfig: the from-scratch situational defaults)
    if getattr(cfg, "init", "") and not resumed:  # config.toml of a run already holds what --init gave
        from ..train.init import check_against_init, init_base, read_init

        init = read_init(_init_folder(cfg.init, args))
        base = init_base(init)
        cfg = load_train_config(path, overrides, cls=cls, base=base, init=True)  # fine-tuning defaults
        cfg = replace(cfg, init=init.source)  # the folder (a single file's conversion), not the file
        if cfg.model != base.model:  # a preset would replace the model's UNet and schedule
            raise UserError(f"model={cfg.model}: a preset cannot be combined with --init {init.source} — the model "
                            "brings its own architecture and schedule; drop model=")
        check_against_init(cfg.unet, init)
    if cls is TrainConfig:
        from ..train.adapter import check

        check(cfg)  # before a --data cache is built
    return cfg


def _quote(override: str) -> str:
    """Paths and names (vae_path, text_encoder, init) are strings, whatever they look like."""
    key, _, value = override.partition("=")
    return f"{key}={json.dumps(value)}" if key in dict(FLAG_SETTINGS).values() else override


def _init_folder(init: str, args) -> str:
    """The --init model as a folder: a single file is converted into RUN/init/ first."""
    from ..formats.single_file import is_single_file
    from ..train.init import from_single_file

    if not is_single_file(init):
        return init
    out = Path(args.out) / "init" if getattr(args, "out", None) else Path(tempfile.mkdtemp()) / "init"
    folder = from_single_file(init, out, tokenizer=getattr(args, "tokenizer", None))
    print(f"--init {init}: converted to {folder} (diffusers layout)", file=sys.stderr)
    return folder


# ------------------------------------------------------------------------ generation: sample, img2img, inpaint

def add_generation_arguments(p, cfg_default: float = 5.0):
    """The flags of sample, img2img and inpaint."""
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
    p.add_argument("--sampler", default=None, help=f"{' | '.join(SAMPLER_NAMES)} (default: dpmpp-2m; an SD3 model: "
                                                   "euler or heun, default euler)")
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


def _parse_crop(text, flag: str):
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
    from .. import load
    from ..formats.single_file import is_single_file
    from ..samplers import get_sampler, start_index
    from ..text import quiet_transformers

    # the cheap checks first: a typo should not wait for the model to load
    if args.sampler is not None:
        get_sampler(args.sampler)
    if args.steps < 1:
        raise UserError(f"--steps: must be at least 1, got {args.steps}")
    if args.n < 1:
        raise UserError(f"--n: must be at least 1, got {args.n}")
    if "strength" in inputs:
        start_index(args.steps, inputs["strength"])
    for flag, v in (("--width", args.width), ("--height", args.height)):
        if v is not None and v < 1:
            raise UserError(f"{flag}: must be a positive number of pixels, got {v}")
    if args.spacing is not None and args.spacing not in SPACINGS:
        raise UserError(f"--spacing: unknown {args.spacing!r} — use one of {', '.join(SPACINGS)}")
    loras = [parse_lora(spec) for spec in args.lora]
    micro = micro_conditioning(args)
    check_numbers(args, inputs)
    device = choose_device(args.device)
    out = check_out_dir(args.out)  # before the model loads and the images are made, not after
    quiet_transformers()
    extra = dict(tokenizer=args.tokenizer, prediction_type=args.prediction_type) if is_single_file(args.model) else {}
    pipe = load(args.model, device=device, **extra)
    if not hasattr(pipe, mode):  # an SD3 model has no inpainting yet
        raise UserError(f"--model {args.model}: {type(pipe).__name__} has no {mode} — use sample or img2img")
    for file, scale in loras:
        pipe.with_lora(file, scale)
    chosen = {} if args.sampler is None else {"sampler": args.sampler}  # None: the model's default
    images = getattr(pipe, mode)(prompt=args.prompt, negative_prompt=args.negative, **chosen,
                                 steps=args.steps, cfg=args.cfg, seed=args.seed, n=args.n,
                                 class_label=args.class_label, karras=args.karras, eta=args.eta,
                                 spacing=args.spacing, width=args.width, height=args.height, **micro, **inputs)
    out.mkdir(parents=True, exist_ok=True)
    number = next_index(out)  # an earlier run's images in the same folder are kept, never overwritten
    for i, im in enumerate(images):
        path, number = save_numbered(im, out, number, args.seed + i)
        print(path)
    return 0


def save_numbered(image, out: Path, number: int, seed: int):
    """Write `image` as out/<number>-<seed>.png, or under the next free number if another process (a second
    `sample` into the same --out) took that name meanwhile: never over its file. -> (path, the next number)."""
    from ..png import save_png

    while True:
        try:
            return save_png(image, out / f"{number:05d}-{seed}.png", image.info["parameters"], exclusive=True), number + 1
        except FileExistsError:
            number = max(number + 1, next_index(out))


def check_numbers(args, inputs) -> None:
    """nan/inf guidance or η gives a black image without a word; a seed past 64 bits a traceback."""
    for flag, value in (("--cfg", args.cfg), ("--eta", args.eta), ("--strength", inputs.get("strength", 1.0))):
        if not math.isfinite(value):
            raise UserError(f"{flag} {value}: not a finite number — give a real value")
    if args.eta < 0:
        raise UserError(f"--eta {args.eta}: must be at least 0 (0 deterministic … 1 DDPM-like)")
    if not 0 <= args.seed <= 2 ** 64 - args.n:
        raise UserError(f"--seed {args.seed}: must be between 0 and 2^64 - n (each image i uses seed + i)")


def next_index(out) -> int:
    """1 + the highest `NNNNN-` number of the PNGs already in `out` (0 for an empty folder)."""
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := re.match(r"^(\d{5,})-.*\.png$", p.name))]
    return max(numbers, default=-1) + 1


# ------------------------------------------------------------------------------------------------ all commands

def choose_device(text, flag: str = "--device"):
    """None or "auto": cuda if available, else cpu; otherwise a device that exists here (a typo or a missing
    GPU is one line)."""
    import torch

    if text in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UserError(f"{flag} {text}: not a device — use cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {text}: only cpu and cuda are supported")
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise UserError(f"{flag} {text}: no such CUDA device here — use --device cpu")
    return device


def load_vae(path: str, device):
    """The VAE of --vae (a model folder with vae/, or a vae/ folder) on `device`, eval mode, frozen."""
    from ..models import AutoencoderKL

    if not path:
        raise UserError("--vae: required — pass the VAE the latents were encoded with (a model folder or vae/ "
                        "folder; `latentforge train-vae` makes one)")
    if not os.path.isdir(path):
        raise UserError(f"--vae {path}: no such folder — pass a model folder (with vae/) or a vae/ folder")
    return AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)


@contextlib.contextmanager
def disk_full_is_one_line(out):
    """A full disk while writing logs, samples or the model: one line, not a traceback."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"{e.filename or out}: no space left on the device — free some space, then run the same "
                        "command with --resume") from None


def parse_size(text, flag: str = "--size"):
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
    file, sep, scale = spec.rpartition(":")
    try:
        path, value = (Path(file), float(scale)) if sep else (Path(spec), 1.0)
    except ValueError:
        path, value = Path(spec), 1.0  # a ':' inside the path, no scale
    if not path.exists():
        raise UserError(f"--lora {spec}: no such file — pass FILE[:SCALE], e.g. runs/x/lora/"
                        "pytorch_lora_weights.safetensors:0.8")
    return path, value
