"""`latentforge train --data DIR | --cache DIR --out RUN [--init MODEL | --vae VAE] [--config FILE.toml] [key=value ...] [--resume]`

Train the UNet on a latent cache (built or reused first from --data), from random weights or, with
`--init MODEL`, fine-tuning a pretrained model (its VAE and text encoder are then the defaults). Settings: a preset
(`model=`, a name in config.PRESETS), then the TOML file, then key=value overrides; `--print-config` lists them.
Several processes: `torchrun --nproc_per_node=N -m latentforge train ...`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from ..io import check_out_dir
from ..locks import folder_lock
from .common import add_run_arguments, disk_full_is_one_line, load_vae, resolve_config


def add_arguments(p):
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="data folder; its latent cache is built (or reused) in RUN/cache first")
    src.add_argument("--cache", help="a latent cache made by `latentforge cache`")
    p.add_argument("--out", help="run folder (config.toml, model/, checkpoints/, samples/, logs/, report.md)")
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
    p.add_argument("--allow-changed-data", action="store_true",
                   help="--resume even though the latent cache changed since the checkpoint (the data order from "
                        "there on differs from an uninterrupted run's)")
    add_run_arguments(p, "training settings", "model=tiny lr=3e-4 max_steps=500")


def _inside(path, folder) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


def run(args):
    from ..config import situation_notes
    from ..config_loading import to_toml

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

    from ..data.cache import BucketSpec, build_cache, open_cache
    from ..train import distributed
    from ..train.loop import train

    d = distributed.setup(cfg.device)
    vae = load_vae(cfg.vae_path, d.device)
    cache = args.cache or str(Path(args.out) / "cache")
    if args.data:
        if d.is_main:
            spec = BucketSpec(step=cfg.bucket_step) if cfg.buckets else None
            if not args.restart:  # a run the settings or the new data would refuse: refused before encoding
                _check_run_first(args, cfg, vae, cache, spec)
            print(build_cache(args.data, vae, cfg.text_encoder, cache, size=cfg.image_size or None,
                              progress=not args.quiet, buckets=spec))
        distributed.barrier(d)
    # a shared lock while training reads the cache: `latentforge cache` on it (a writer) waits for this run
    with folder_lock(cache, "latentforge train", flag="--cache", shared=True), disk_full_is_one_line(args.out):
        dataset, text_encoder = open_cache(cache, vae, cfg.text_encoder, d.device)  # refuses another VAE or encoder
        torch.set_grad_enabled(True)
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


def _check_run_first(args, cfg, vae, cache, spec) -> None:
    """train --data on a run folder with checkpoints: every refusal the loop's `resume.prepare` would make that
    needs no tensors (no --resume, no usable checkpoint, changed settings, a changed cache: its identity from
    the entries --data would give, found without encoding) is made before RUN/cache is built, so that a refused
    run encodes and writes nothing."""
    from types import SimpleNamespace

    from ..data.cache import planned_entries
    from ..train.resume import check_first, step_dirs
    from ..train.setup import FROM_DATA

    if not step_dirs(Path(args.out) / "checkpoints"):
        return  # a new run: nothing to refuse, nothing to plan
    planned = planned_entries(args.data, vae, cache, size=cfg.image_size or None, buckets=spec) if args.resume else []
    check_first(args.out, cfg, SimpleNamespace(entries=planned), resume=args.resume,
                allow_changed_data=args.allow_changed_data, from_data=FROM_DATA)
