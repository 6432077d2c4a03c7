"""The SDXL-size UNet's LoRA training step on this CPU (issue 13, point 6): step time and peak memory.

A full fine-tune of the `sdxl` preset (2,567,463,684 parameters) does not fit a 24 GiB machine in fp32 AdamW:
weights + gradients + two moments = 4 × 4 B × 2.57 G ≈ 41 GB. What does fit is the LoRA step, measured here:
random weights (fp32 base, frozen), LoRA rank 16 on the attention projections (diffusers' default targets),
batch 1, 32×32×4 latents, a 77×2048 context, the pooled (1280) + six size/crop numbers of SDXL's
micro-conditioning, gradient checkpointing, bf16 autocast; one step = `train.step.train_step` + backward +
gradient clipping + fused AdamW over the adapter parameters. One warm-up step (optimizer state appears),
then `--steps` timed steps (median wall and process CPU time); peak RSS (VmHWM), in a fresh subprocess with
MALLOC_MMAP_THRESHOLD_=65536 so freed tensors go back to the OS.

    .venv/bin/python bench/bench_sdxl.py --steps 1
    .venv/bin/python bench/bench_sdxl.py --preset sdxl-tiny --steps 1     # smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

from latentforge import adapters  # noqa: E402
from latentforge.config import PRESETS, TrainConfig  # noqa: E402
from latentforge.models import UNet  # noqa: E402
from latentforge.schedule import NoiseSchedule  # noqa: E402
from latentforge.train.setup import make_optimizer  # noqa: E402
from latentforge.train.step import Batch, Draws, train_step  # noqa: E402


def _batch(cfg, latent: int, g: torch.Generator):
    u = cfg.unet
    pooled = u.addition_input_dim - 6 * u.addition_time_embed_dim
    batch = Batch(latent=torch.randn(1, 4, latent, latent, generator=g),
                  context=torch.randn(1, 77, u.cross_attention_dim, generator=g),
                  pooled=torch.randn(1, pooled, generator=g),
                  time_ids=torch.tensor([[8.0 * latent, 8.0 * latent, 0, 0, 8.0 * latent, 8.0 * latent]]))
    draws = Draws(t=torch.randint(0, 1000, (1,), generator=g), noise=torch.randn(1, 4, latent, latent, generator=g),
                  drop=torch.zeros(1, dtype=torch.bool))
    return batch, draws


def one_run(preset: str, steps: int, rank: int, latent: int = 32) -> dict:
    """In this (fresh) process: build, one warm-up step, `steps` timed steps."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=preset, unet=PRESETS[preset].unet, lr=1e-4)
    t0 = time.perf_counter()
    unet = UNet(cfg.unet).train()
    adapters.inject(unet, "lora", rank=rank, alpha=rank, targets="attention")
    unet.enable_gradient_checkpointing(True)
    build_s = time.perf_counter() - t0
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(unet, cfg, torch.device("cpu"))
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
    batch, draws = _batch(cfg, latent, torch.Generator().manual_seed(1))

    def step():
        loss = train_step(unet, batch, draws, ac, "epsilon", 0.0, torch.bfloat16, micro=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    first = step()  # warm-up
    wall, cpu, _ = common.timed_steps(step, steps)
    return {"preset": preset, "parameters": sum(p.numel() for p in unet.parameters()),
            "trainable": sum(p.numel() for p in params), "build_s": build_s, "first_loss": first,
            "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_rss_mib": common.status_mib("VmHWM")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1, help="timed steps (after one warm-up step)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--preset", default="sdxl", help="UNet preset (default sdxl; sdxl-tiny for a smoke run)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # the measured subprocess: print JSON
    args = p.parse_args()
    common.set_threads(args.threads)
    if args.run:
        print(json.dumps(one_run(args.preset, args.steps, args.rank)))
        return
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    r = common.run_json_subprocess([str(Path(__file__)), "--run", "--steps", str(args.steps), "--threads",
                                    str(args.threads), "--preset", args.preset, "--rank", str(args.rank)],
                                   timeout=3600, env=env)
    full_gb = 16 * (r["parameters"] - r["trainable"]) / 1e9  # the base's fp32 weights + gradients + Adam's 2 moments
    print("machine: " + ", ".join(f"{k} {v}" for k, v in common.machine().items()))
    print(f"{args.preset} UNet {r['parameters']:,} parameters (random), LoRA rank {args.rank} on attention "
          f"({r['trainable']:,} trainable), batch 1, 32×32×4 latents, 77×{PRESETS[args.preset].unet.cross_attention_dim} "
          f"context + micro-conditioning, gradient checkpointing, bf16 autocast, {args.threads} torch thread(s), "
          f"median of {args.steps} step(s) after one warm-up\n")
    print(common.table(["step wall s", "step CPU s", "peak RSS GiB", "build s", "full fine-tune fp32 AdamW GB"],
                       [[f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mib'] / 1024:.2f}",
                         f"{r['build_s']:.0f}", f"{full_gb:.1f}"]]))


if __name__ == "__main__":
    main()
