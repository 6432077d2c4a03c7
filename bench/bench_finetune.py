"""A full fine-tune step of the SD 1.5-size UNet on this CPU: fp32 vs precision=bf16, with and without
gradient checkpointing — step time and peak memory.

One step = what `latentforge train` runs: `train.step.train_step` (forward + MSE) + backward + gradient
clipping + AdamW from `train.setup.make_optimizer` (fused); bf16 = what `precision=bf16` trains on CPU (a bf16
compute copy of the UNet, fp32 master weights, gradients copied to them, train/precision.py); on the `sd15` preset UNet (859.5 M parameters,
random weights), batch 1, 32×32×4 latents, a 77×768 context.

Each arm runs alone in a fresh subprocess (`--arm`): build the UNet and optimizer, one warm-up step
(AdamW state appears, kernels initialise), then `--steps` timed steps. Reported per arm: the median step
time on two clocks (wall, and CPU time of the process — the steadier one on this shared 2-core box), the
process's peak resident set size (VmHWM: weights + gradients + AdamW state + activations), the peak above
what stays resident between steps (gradients are freed after each step: gradients + activations), and the
activations alone (that minus the fp32 gradient bytes; gradient checkpointing cuts this).
MALLOC_MMAP_THRESHOLD_=65536 makes glibc return freed tensors to the OS, so RSS follows live tensors.

    .venv/bin/python bench/bench_finetune.py --steps 3
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

from latentforge.config import PRESETS, TrainConfig  # noqa: E402
from latentforge.models import UNet  # noqa: E402
from latentforge.schedule import NoiseSchedule  # noqa: E402
from latentforge.train.precision import LowPrecisionCompute  # noqa: E402
from latentforge.train.setup import make_optimizer  # noqa: E402
from latentforge.train.step import Batch, Draws, train_step  # noqa: E402

ARMS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def one_arm(precision: str, checkpointing: bool, steps: int, preset: str = "sd15", latent: int = 32,
            batch: int = 1) -> dict:
    """In this (fresh) process: the step times and memory of one arm."""
    torch.manual_seed(0)
    cfg = TrainConfig(model=preset, unet=PRESETS[preset].unet, lr=1e-5)
    unet = UNet(cfg.unet).train().enable_gradient_checkpointing(checkpointing)
    opt = make_optimizer(unet, cfg, torch.device("cpu"))
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
    g = torch.Generator().manual_seed(1)
    batch_ = Batch(latent=torch.randn(batch, 4, latent, latent, generator=g),
                   context=torch.randn(batch, 77, cfg.unet.cross_attention_dim, generator=g))
    draws = Draws(t=torch.randint(0, 1000, (batch,), generator=g), noise=torch.randn(batch, 4, latent, latent, generator=g),
                  drop=torch.zeros(batch, dtype=torch.bool))

    # precision=bf16 on CPU trains a bf16 compute copy with fp32 master weights (train/precision.py), as here
    lowp = LowPrecisionCompute(unet, torch.bfloat16) if precision == "bf16" else None

    def step():
        model, dtype = (lowp.compute, torch.bfloat16) if lowp else (unet, None)
        loss = train_step(model, batch_, draws, ac, "epsilon", 0.0, None, compute_dtype=dtype)
        loss.backward()
        if lowp:
            lowp.grads_to_master()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if lowp:
            lowp.weights_to_compute()
        return loss.item()

    step()  # warm-up
    resident = common.status_mib("VmRSS")
    wall, cpu, losses = common.timed_steps(step, steps)
    peak = common.status_mib("VmHWM")
    grads = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20  # fp32 gradients, MiB
    return {"precision": precision, "checkpointing": checkpointing, "parameters": unet.num_parameters(),
            "gradients_mib": grads, "activations_mib": peak - resident - grads,
            "wall_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "samples": len(wall),
            "peak_rss_mib": peak, "resident_mib": resident, "above_resident_mib": peak - resident,
            "loss_finite": all(l == l and abs(l) < float("inf") for l in losses)}


def run(preset: str = "sd15", steps: int = 3, threads: int = 1, subprocess: bool = True) -> list[dict]:
    """Every arm's result; each arm in a fresh subprocess (`subprocess=False`: in this process, for smoke runs,
    where the memory columns mean nothing)."""
    if not subprocess:
        return [one_arm(precision, ckpt, steps, preset) for precision, ckpt in ARMS]
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    results = []
    for precision, ckpt in ARMS:
        results.append(common.run_json_subprocess(
            [str(Path(__file__)), "--arm", f"{precision}:{int(ckpt)}", "--steps", str(steps), "--threads", str(threads),
             "--preset", preset], timeout=3600, env=env))
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def markdown(results: list[dict], preset: str, steps: int, threads: int) -> str:
    rows = [[r["precision"], "on" if r["checkpointing"] else "off", f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}",
             f"{r['peak_rss_mib'] / 1024:.2f}", f"{r['above_resident_mib'] / 1024:.2f}",
             f"{r['above_resident_mib'] - r['parameters'] * 4 / 2**20:.0f}", "yes" if r["loss_finite"] else "NO"]
            for r in results]
    fp32 = {r["checkpointing"]: r for r in results if r["precision"] == "fp32"}
    head = (f"A full fine-tune step of the `{preset}` UNet ({results[0]['parameters']:,} parameters, random weights): "
            f"batch 1, 32×32×4 latents, 77×768 context, `train_step` + backward + clipping + fused AdamW; each arm "
            f"in a fresh process, median of {steps} timed steps after one warm-up, {threads} torch thread(s).")
    table = common.table(["precision", "gradient checkpointing", "step wall s", "step CPU s", "peak RSS GiB",
                          "peak above resident GiB", "of which activations MiB", "loss finite"], rows)
    reading = ""
    if True in fp32 and False in fp32:
        slower = fp32[True]["cpu_s"] / fp32[False]["cpu_s"]
        reading = (f"\n\nReading: the resident ~{fp32[False]['resident_mib'] / 1024:.1f} GiB are the fp32 weights and "
                   "AdamW's two moments (12 bytes per parameter); each step adds the fp32 gradients "
                   f"({results[0]['parameters'] * 4 / 2**30:.2f} GiB) and the activations. At 32×32 latents and batch 1 "
                   "the activations are small, so gradient checkpointing saves little memory here "
                   f"({rows[0][6]} → {rows[1][6]} MiB) and costs {slower:.2f}× the CPU time (the forward runs twice); "
                   "it pays at larger latents and batches.")
    bf16 = {r["checkpointing"]: r for r in results if r["precision"] == "bf16"}
    if False in bf16 and False in fp32:
        ratio = bf16[False]["cpu_s"] / fp32[False]["cpu_s"]
        extra = (bf16[False]["resident_mib"] - fp32[False]["resident_mib"]) / 1024
        reading += (f" precision=bf16 took {ratio:.2f}× the CPU time of fp32 here; it keeps the fp32 master weights "
                    f"and optimizer state and adds the bf16 compute copy (resident {extra:+.2f} GiB vs fp32).")
    return head + "\n\n" + table + reading


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed steps per arm (after one warm-up step)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per arm (default 1)")
    p.add_argument("--preset", default="sd15", help="UNet preset (default sd15; tiny for a smoke run)")
    p.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # "fp32:0" — run one arm, print JSON
    args = p.parse_args()
    common.set_threads(args.threads)
    if args.arm:
        precision, ckpt = args.arm.split(":")
        print(json.dumps(one_arm(precision, ckpt == "1", args.steps, args.preset)))
        return
    t0 = time.perf_counter()
    results = run(args.preset, args.steps, args.threads)
    print("machine: " + ", ".join(f"{k} {v}" for k, v in common.machine().items()) + "\n")
    print(markdown(results, args.preset, args.steps, args.threads))
    print(f"\n*Section time: {time.perf_counter() - t0:.0f} s.*")


if __name__ == "__main__":
    main()
