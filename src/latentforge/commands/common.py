"""What several sub-commands share: the run-settings flags and their resolution into a config, the device
choice, the VAE folder check and the disk-full wrapper."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
import tempfile
from pathlib import Path

from ..errors import UserError

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
    from ..config import TrainConfig, replace
    from ..config_loading import load_train_config

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

