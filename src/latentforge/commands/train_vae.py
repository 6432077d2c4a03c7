"""`latentforge train-vae --data DIR --out RUN [--config FILE.toml] [key=value ...] [--resume]`

Train a KL autoencoder on a data folder; writes RUN/vae/ (diffusers layout) for `cache` / `train --vae`,
and the held-out reconstruction PSNR in RUN/report.md.
"""

from __future__ import annotations

from ..errors import UserError
from ..io import check_out_dir
from ..locks import folder_lock
from .common import add_run_arguments, disk_full_is_one_line, resolve_config


def add_arguments(p):
    p.add_argument("--data", help="data folder of images (captions are ignored)")
    p.add_argument("--out", help="run folder (config.toml, vae/, checkpoints/, samples/, logs/, report.md)")
    add_run_arguments(p, "settings", "model=tiny max_steps=500 kl_weight=1e-6 discriminator=true")


def run(args):
    from ..config import VAETrainConfig
    from ..config_loading import to_toml
    from ..train.vae import train_vae

    cfg = resolve_config(args, VAETrainConfig)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    if not args.out or not args.data:
        raise UserError("--data and --out: both required — e.g. latentforge train-vae --data shapes/ --out runs/vae")
    check_out_dir(args.out)
    with folder_lock(args.out, "latentforge train-vae"), disk_full_is_one_line(args.out):
        result = train_vae(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet,
                           restart=args.restart)
    if result.stopped:
        print(f"stopped by {result.stopped} at step {result.step}; checkpoint saved — continue with the same "
              "command plus --resume")
    else:
        print(f"done: VAE in {result.vae_dir} (use it with --vae {result.vae_dir}); report in {args.out}/report.md")
    return 0
