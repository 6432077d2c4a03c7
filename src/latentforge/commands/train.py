"""`latentforge train --data DIR | --cache DIR --out RUN [--init MODEL | --vae VAE] [--config FILE.toml] [key=value ...] [--resume]`

Train the UNet on a latent cache (built or reused first from --data), from random weights or, with
`--init MODEL`, fine-tuning a pretrained model (its VAE and text encoder are then the defaults). Settings: a preset
(`model=tiny|small|sd15`), then the TOML file, then key=value overrides; `--print-config` lists them.
Several processes: `torchrun --nproc_per_node=N -m latentforge train ...`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from pathlib import Path

from ..errors import UserError
from ..io import check_out_dir
from ..locks import folder_lock


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data folder; its latent cache is built (or reused) in RUN/cache first")
    src.add_argument("--cache", help="a latent cache made by `latentforge cache`")
    p.add_argument("--out", help="run folder (config.toml, model/, checkpoints/, samples/, logs/, report.md)")
    p.add_argument("--config", help="TOML file with training settings (see --print-config)")
    p.add_argument("--vae", help="the VAE the latents come from: a model folder with vae/, or a vae/ folder "
                                 "(same as vae_path=...); needed to decode samples and for model/")
    p.add_argument("--text-encoder", help="text encoder of a captioned cache (same as text_encoder=...; "
                                          "default: the bundled all-MiniLM-L6-v2)")
    p.add_argument("--init", help="start from a pretrained model: a diffusers model folder or an SD 1.x/2.x single "
                                   ".safetensors (its UNet, schedule, VAE and text encoder; same as init=...)")
    p.add_argument("--tokenizer", help="CLIP tokenizer folder for a single-file --init (it holds none), e.g. an SD "
                                       "model's tokenizer/")
    p.add_argument("--merge", action="store_true",
                   help="with adapter=: also write model/ with the adapter merged in (same as lora.merge=true)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    add_restart_argument(p)
    p.add_argument("--allow-changed-data", action="store_true",
                   help="--resume even though the latent cache changed since the checkpoint (the data order from "
                        "there on differs from an uninterrupted run's)")
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. model=tiny lr=3e-4 max_steps=500")
    allow_intermixed(p)


def _inside(path, folder) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def add_restart_argument(p) -> None:
    p.add_argument("--restart", action="store_true",
                   help="start RUN over from step 0: its checkpoints/ is moved to checkpoints-set-aside-N/ (kept)")


def allow_intermixed(parser) -> None:
    """Let key=value settings sit anywhere between the flags (`--out R lr=1e-3 --resume max_steps=9`).

    Plain argparse takes a positional list only once; this sub-parser parses "intermixed" instead.
    """
    plain, busy = parser.parse_known_args, []

    def parse_known_args(args=None, namespace=None):
        if busy:  # parse_known_intermixed_args calls back into parse_known_args
            return plain(args, namespace)
        busy.append(True)
        try:
            return parser.parse_known_intermixed_args(args, namespace)
        finally:
            busy.pop()

    parser.parse_known_args = parse_known_args


def resolve_config(args, cls=None):
    """Preset <- the --init model <- --config (or RUN/config.toml when resuming) <- key=value <- flags."""
    from ..config import TrainConfig, load_train_config, replace

    cls = cls or TrainConfig
    path, resumed = args.config, False
    if path is None and getattr(args, "resume", False) and args.out and (Path(args.out) / "config.toml").is_file():
        path, resumed = Path(args.out) / "config.toml", True  # resuming: the run's own settings are the base
    overrides = list(args.overrides)
    for flag, key in (("vae", "vae_path"), ("text_encoder", "text_encoder"), ("init", "init")):
        if getattr(args, flag, None):
            overrides.append(f"{key}={getattr(args, flag)}")
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


def _init_folder(init: str, args) -> str:
    """The --init model as a folder: a single file is converted into RUN/init/ first."""
    from ..formats.single_file import is_single_file

    if not is_single_file(init):
        return init
    import tempfile

    from ..train.init import from_single_file

    out = Path(args.out) / "init" if getattr(args, "out", None) else Path(tempfile.mkdtemp()) / "init"
    folder = from_single_file(init, out, tokenizer=getattr(args, "tokenizer", None))
    print(f"--init {init}: converted to {folder} (diffusers layout)", file=sys.stderr)
    return folder


def _quote(override: str) -> str:
    """Paths and names given as flags are strings, whatever they look like."""
    key, _, value = override.partition("=")
    return f"{key}={_toml_str(value)}" if key in ("vae_path", "text_encoder", "init") else override


def _toml_str(s: str) -> str:
    import json

    return json.dumps(s)


def run(args):
    from ..config import situation_notes, to_toml

    cfg = resolve_config(args)
    if args.print_config:
        print(to_toml(cfg, situation_notes(cfg, bool(cfg.init))), end="")
        return 0
    if not args.out:
        raise UserError("--out: required — name the run folder, e.g. --out runs/first")
    if not (args.data or args.cache):
        raise UserError("--data or --cache: one is required — pass the data folder or a latent cache")
    if args.cache and not os.path.isdir(args.cache):
        raise UserError(f"--cache {args.cache}: no such folder — build one with `latentforge cache` or pass --data")
    check_out_dir(args.out)
    if args.data and _inside(args.out, args.data):
        raise UserError(f"--out {args.out}: is inside --data {args.data} — the run's samples and plots would become "
                        "training images on the next cache build; put the run folder elsewhere")
    with folder_lock(args.out, "latentforge train"):
        return _run(args, cfg)


def _run(args, cfg):
    import torch

    from ..train import distributed
    from ..train.loop import train

    d = distributed.setup(cfg.device)
    vae = load_vae(cfg.vae_path, d.device)
    cache = args.cache or str(Path(args.out) / "cache")
    if args.data:
        if d.is_main:
            from ..data.cache import BucketSpec, build_cache

            spec = BucketSpec(step=cfg.bucket_step) if cfg.buckets else None
            if args.resume and not args.restart:  # a resume the new data would refuse: before encoding it
                _check_data_first(args, cfg, vae, cache, spec)
            print(build_cache(args.data, vae, cfg.text_encoder, cache, size=cfg.image_size or None,
                              progress=not args.quiet, buckets=spec))
        distributed.barrier(d)
    dataset, text_encoder = open_cache(cache, vae, cfg.text_encoder, d.device)
    torch.set_grad_enabled(True)
    with disk_full_is_one_line(args.out):
        result = train(cfg, dataset, args.out, resume=args.resume, vae=vae, text_encoder=text_encoder,
                       progress=not args.quiet, restart=args.restart, allow_changed_data=args.allow_changed_data)
    if d.is_main:
        if result.stopped:
            print(f"stopped by {result.stopped} at step {result.step}; checkpoint saved — continue with the same "
                  f"command plus --resume")
        else:
            print(f"done: {result.step} steps; model in {os.path.join(args.out, 'model')}, report in "
                  f"{os.path.join(args.out, 'report.md')}")
    return 0


def _check_data_first(args, cfg, vae, cache, spec) -> None:
    """--resume --data: the checkpoint's cache identity against the cache --data would give, found without
    encoding (train/resume.check_cache_first); a refusal leaves RUN/cache as it was."""
    from types import SimpleNamespace

    from ..data.cache import planned_entries
    from ..train.resume import check_cache_first

    planned = planned_entries(args.data, vae, cache, size=cfg.image_size or None, buckets=spec)
    check_cache_first(args.out, SimpleNamespace(entries=planned), args.allow_changed_data)


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


def load_vae(path: str, device):
    from ..models import AutoencoderKL

    if not path:
        raise UserError("--vae: required — pass the VAE the latents were encoded with (a model folder or vae/ "
                        "folder; `latentforge train-vae` makes one)")
    if not os.path.isdir(path):
        raise UserError(f"--vae {path}: no such folder — pass a model folder (with vae/) or a vae/ folder")
    return AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)


def open_cache(cache: str, vae, text_encoder_name: str, device):
    """LatentDataset + the text encoder it was built with; refuses a VAE or encoder that differs."""
    from ..data.cache import LatentDataset, module_fingerprint

    dataset = LatentDataset(cache)
    settings = dataset.manifest["settings"]
    if settings.get("vae") and settings["vae"] != module_fingerprint(vae.cpu(), vae.config):
        raise UserError(f"--vae: {cache} was encoded with a different VAE — pass the VAE used by "
                        "`latentforge cache`, or rebuild the cache with this one")
    vae.to(device)
    text_encoder = None
    if dataset.conditioning == "text":
        from ..text import TextEncoder

        text_encoder = TextEncoder.from_pretrained(text_encoder_name, max_length=settings.get("max_length"),
                                                   device=device)
        if settings.get("text_encoder") and text_encoder.fingerprint() != settings["text_encoder"]:
            raise UserError(f"--text-encoder {text_encoder_name}: {cache} was built with a different text encoder "
                            "— pass the one given to `latentforge cache`")
    return dataset, text_encoder
