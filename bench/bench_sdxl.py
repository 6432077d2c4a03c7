"""The SDXL-size UNet's LoRA training step on this CPU: step time and peak memory.

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


def run(preset: str = "sdxl", steps: int = 1, rank: int = 16, threads: int = 2, subprocess: bool = True) -> dict:
    """The measured run, in a fresh subprocess (`subprocess=False`: in this process, for smoke runs)."""
    if subprocess:
        env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
        r = common.run_json_subprocess([str(Path(__file__)), "--run", "--steps", str(steps), "--threads", str(threads),
                                        "--preset", preset, "--rank", str(rank)], timeout=3600, env=env)
    else:
        r = one_run(preset, steps, rank)
    # a full fine-tune in fp32 AdamW: the base's weights + gradients + Adam's 2 moments, 16 B per parameter
    r.update(steps=steps, rank=rank, threads=threads, full_finetune_gb=16 * (r["parameters"] - r["trainable"]) / 1e9)
    return r


def markdown(r: dict) -> str:
    return (f"A full fine-tune of the `{r['preset']}` UNet ({r['parameters']:,} parameters) needs 16 B per parameter "
            f"in fp32 AdamW (weights, gradients, two moments) = **{r['full_finetune_gb']:.1f} GB**. The LoRA step: "
            f"random weights (fp32 base, frozen), LoRA rank {r['rank']} on the attention projections "
            f"({r['trainable']:,} trainable parameters), batch 1, 32×32×4 latents, a "
            f"77×{PRESETS[r['preset']].unet.cross_attention_dim} context, the pooled text + six size/crop numbers of "
            "SDXL's micro-conditioning, gradient checkpointing, bf16 autocast; one step = `train_step` + backward + "
            "gradient clipping + fused AdamW over the adapter; one warm-up step, then the median of "
            f"{r['steps']} timed step(s), {r['threads']} torch thread(s); peak RSS = VmHWM with "
            "`MALLOC_MMAP_THRESHOLD_=65536`, in a fresh process.\n\n"
            + common.table(["step wall s", "step CPU s", "peak RSS GiB", "build s (random init)"],
                           [[f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{r['peak_rss_mib'] / 1024:.2f}",
                             f"{r['build_s']:.0f}"]])
            + "\n\nThe resident memory is mostly the fp32 base weights "
            f"({(r['parameters'] - r['trainable']) / 1e9:.2f} G × 4 B = "
            f"{(r['parameters'] - r['trainable']) * 4 / 2**30:.1f} GiB).")


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
    r = run(args.preset, args.steps, args.rank, args.threads)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in common.machine().items()) + "\n")
    print(markdown(r))


if __name__ == "__main__":
    main()
