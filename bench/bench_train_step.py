"""Training throughput: images/s of one full UNet optimizer step (the loop's own pieces).

    .venv/bin/python bench/bench_train_step.py [--preset small] [--batch 16] [--steps 10]
                                               [--precision fp32|bf16|fp16] [--device cpu|cuda] [--threads 1]

One step = per-sample draws (t, ε, dropout) -> train_step (noising, UNet forward, MSE) -> backward ->
grad-norm clip -> AdamW -> EMA update, on random latents of the preset's latent size and a random
text context (77 tokens x the preset's cross-attention width). Prints the median over `--steps`
timed steps after 2 warm-up steps. Not a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from latentforge.config import load_train_config  # noqa: E402
from latentforge.models import UNet  # noqa: E402
from latentforge.schedule import NoiseSchedule  # noqa: E402
from latentforge.train.ema import EMA  # noqa: E402
from latentforge.train.setup import autocast_dtype, make_optimizer  # noqa: E402
from latentforge.train.step import Batch, apply_dropout, draw, train_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; -1: latentforge's default, threads.py)")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()
    if args.threads == -1:  # latentforge's default (what the CLI does): threads.py
        from latentforge.threads import configure

        configure()
    elif args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    cfg = load_train_config(None, [f"model={args.preset}", f"batch_size={args.batch}", f"precision={args.precision}"])
    torch.manual_seed(0)
    unet = UNet(cfg.unet).to(dev).enable_gradient_checkpointing(args.gradient_checkpointing)
    ema, opt = EMA(unet, cfg.ema_decay), make_optimizer(unet, cfg, dev)
    scaler = torch.amp.GradScaler("cuda") if args.precision == "fp16" else None
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod.to(dev)
    C, s, D = cfg.unet.in_channels, cfg.unet.sample_size, cfg.unet.cross_attention_dim
    latents, context = torch.randn(args.batch, C, s, s), torch.randn(args.batch, 77, D)
    null = torch.zeros(77, D), torch.ones(77, dtype=torch.bool), None

    def step(i: int) -> None:
        positions = list(range(i * args.batch, (i + 1) * args.batch))
        draws = draw(cfg, positions, (C, s, s), ac.shape[0])
        batch = apply_dropout(Batch(latents, context, torch.ones(args.batch, 77, dtype=torch.bool)), draws.drop, *null)
        loss = train_step(unet, batch.to(dev), draws, ac, cfg.schedule.prediction_type, 0.0,
                          autocast_dtype(args.precision))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), cfg.grad_clip)
        scaler.step(opt) if scaler else opt.step()
        if scaler:
            scaler.update()
        opt.zero_grad(set_to_none=True)
        ema.update(unet)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for i in range(2):  # warm-up
        step(i)
    times = []
    for i in range(args.steps):
        sync()
        t = time.perf_counter()
        step(2 + i)
        sync()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    print(f"preset {args.preset}: UNet {unet.num_parameters():,} parameters, batch {args.batch}, latents {C}x{s}x{s}, "
          f"context 77x{D}, {args.precision}, {where}")
    print(f"train step: {args.batch / med:.1f} images/s ({med * 1000:.0f} ms/step, median of {args.steps}; "
          f"min {min(times) * 1000:.0f} ms, load average {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
