"""`latentforge train-vae --data DIR --out RUN [--config FILE.toml] [key=value ...] [--resume]`

Train a KL autoencoder on a data folder; writes RUN/vae/ (diffusers layout) for `cache` / `train --vae`,
and the held-out reconstruction PSNR in RUN/report.md.
"""

from __future__ import annotations

from ..errors import UserError


def add_arguments(p):
    p.add_argument("--data", help="data folder of images (captions are ignored)")
    p.add_argument("--out", help="run folder (config.toml, vae/, checkpoints/, samples/, logs/, report.md)")
    p.add_argument("--config", help="TOML file with settings (see --print-config)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint in RUN")
    from .train import add_restart_argument

    add_restart_argument(p)
    p.add_argument("--print-config", action="store_true", help="print the resolved settings as TOML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="settings, e.g. model=tiny max_steps=500 kl_weight=1e-6 discriminator=true")
    from .train import allow_intermixed

    allow_intermixed(p)


def run(args):
    from ..config import VAETrainConfig, to_toml
    from .train import resolve_config

    cfg = resolve_config(args, VAETrainConfig)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    if not args.out or not args.data:
        raise UserError("--data and --out: both required — e.g. latentforge train-vae --data shapes/ --out runs/vae")
    from ..io import check_out_dir
    from ..locks import folder_lock
    from ..train.vae import train_vae

    from .train import disk_full_is_one_line

    check_out_dir(args.out)
    with folder_lock(args.out, "latentforge train-vae"), disk_full_is_one_line(args.out):
        vae_dir = train_vae(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet,
                            restart=args.restart)
    print(f"done: VAE in {vae_dir} (use it with --vae {vae_dir}); report in {args.out}/report.md")
    return 0
