"""LoRA vs full fine-tuning of the SD 1.5-size UNet on this CPU: trainable parameters, optimizer-state bytes,
step time and peak memory for LoRA rank 4 / 16 / 64 (targets=attention, diffusers' default) against the full
fine-tune.

One step = what `latentforge train` runs: `train.step.train_step` (forward + MSE) + backward + gradient
clipping + the optimizer from `train.setup.make_optimizer` (fused AdamW) over the trainable parameters, on
the `sd15` preset UNet (859.5 M parameters, random weights), batch 1, 32×32×4 latents, a 77×768 context.
Each arm runs alone in a fresh subprocess: build, one warm-up step (optimizer state appears), `--steps`
timed steps; median step time on the wall clock and in process CPU time; peak RSS (VmHWM). With
MALLOC_MMAP_THRESHOLD_=65536 freed tensors go back to the OS, so RSS follows the live tensors.

    .venv/bin/python bench/bench_lora.py --steps 3
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



def _optimizer_bytes(opt) -> int:
    return sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


def one_arm(arm: str, steps: int, preset: str = "sd15", latent: int = 32) -> dict:
    """In this (fresh) process: parameters, optimizer state, step times and memory of one arm."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=preset, unet=PRESETS[preset].unet, lr=1e-4)
    unet = UNet(cfg.unet).train()
    if arm != "full":
        rank = int(arm[4:])
        adapters.inject(unet, "lora", rank=rank, alpha=rank, targets="attention")
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = make_optimizer(unet, cfg, torch.device("cpu"))
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    batch = Batch(latent=torch.randn(1, 4, latent, latent, generator=g),
                  context=torch.randn(1, 77, cfg.unet.cross_attention_dim, generator=g))
    draws = Draws(t=torch.randint(0, 1000, (1,), generator=g), noise=torch.randn(1, 4, latent, latent, generator=g),
                  drop=torch.zeros(1, dtype=torch.bool))

    def step():
        loss = train_step(unet, batch, draws, ac, "epsilon", 0.0, None)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up: optimizer state appears
    wall, cpu, _ = common.timed_steps(step, steps)
    return {"arm": arm, "parameters": sum(p.numel() for p in unet.parameters()),
            "trainable": sum(p.numel() for p in params), "optimizer_bytes": _optimizer_bytes(opt),
            "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "peak_rss_mib": common.status_mib("VmHWM")}


def run(preset: str = "sd15", steps: int = 3, ranks=(4, 16, 64), threads: int = 1, subprocess: bool = True) -> dict:
    """Every arm ("full", "lora4", ...): each in a fresh subprocess (`subprocess=False`: in this process, for smoke
    runs, where the memory columns mean nothing)."""
    results = {}
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    for arm in ["full"] + [f"lora{r}" for r in ranks]:
        if not subprocess:
            results[arm] = one_arm(arm, steps, preset)
            continue
        results[arm] = common.run_json_subprocess([str(Path(__file__)), "--arm", arm, "--steps", str(steps),
                                                   "--threads", str(threads), "--preset", preset],
                                                  timeout=3600, env=env)
        print(json.dumps(results[arm]), file=sys.stderr)
    return {"preset": preset, "steps": steps, "threads": threads, "ranks": list(ranks), "arms": results}


def goal(r: dict) -> dict | None:
    """The LoRA goal at rank 16: peak RSS ≤ 0.4× and step CPU time ≤ 0.8× the full fine-tune's."""
    full, r16 = r["arms"]["full"], r["arms"].get("lora16")
    if r16 is None:
        return None
    rss, cpu = r16["peak_rss_mib"] / full["peak_rss_mib"], r16["cpu_s"] / full["cpu_s"]
    return {"rss": rss, "cpu": cpu, "met": rss <= 0.4 and cpu <= 0.8}


def markdown(r: dict) -> str:
    full = r["arms"]["full"]
    rows = [[a, f"{x['trainable']:,}", f"{x['optimizer_bytes'] / 2**20:,.1f}", f"{x['wall_s']:.2f}", f"{x['cpu_s']:.2f}",
             f"{x['peak_rss_mib'] / 1024:.2f}", f"{x['peak_rss_mib'] / full['peak_rss_mib']:.2f}",
             f"{x['cpu_s'] / full['cpu_s']:.2f}"] for a, x in r["arms"].items()]
    text = (f"`{r['preset']}` UNet ({full['parameters']:,} parameters, random weights), batch 1, 32×32×4 latents, "
            "fp32; one step = `train_step` forward + MSE + backward + gradient clipping + fused AdamW over the "
            "trainable parameters; LoRA on the attention projections (to_q/k/v/out.0, alpha = rank). Each arm in a "
            f"fresh process: one warm-up step, then the median of {r['steps']} timed step(s), {r['threads']} torch "
            "thread(s); peak RSS = VmHWM with `MALLOC_MMAP_THRESHOLD_=65536`.\n\n")
    text += common.table(["arm", "trainable parameters", "optimizer state MiB", "step wall s", "step CPU s",
                          "peak RSS GiB", "RSS / full", "CPU time / full"], rows)
    g = goal(r)
    if g:
        text += (f"\n\nGoal (rank 16): peak RSS ≤ 0.4× the full fine-tune's — measured **{g['rss']:.2f}×**; "
                 f"step time ≤ 0.8× — measured **{g['cpu']:.2f}×** (CPU time): {'met' if g['met'] else 'NOT met'}. "
                 "What remains of a LoRA step is the frozen base's forward and its input-gradient backward (no weight "
                 "gradients, no AdamW over the base); the resident memory is mostly the fp32 base weights.")
    return text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    p.add_argument("--preset", default="sd15", help="UNet preset (default sd15; tiny for a smoke run)")
    p.add_argument("--ranks", default="4,16,64", help="LoRA ranks to compare with the full fine-tune")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # run one arm, print JSON
    args = p.parse_args()
    common.set_threads(args.threads)
    if args.arm:
        print(json.dumps(one_arm(args.arm, args.steps, args.preset)))
        return
    t0 = time.perf_counter()
    r = run(args.preset, args.steps, [int(x) for x in args.ranks.split(",")], args.threads)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in common.machine().items()) + "\n")
    print(markdown(r))
    print(f"\n*Section time: {time.perf_counter() - t0:.0f} s.*")


if __name__ == "__main__":
    main()
