"""UNet training step, latentforge vs diffusers' UNet2DConditionModel: images/s, ratio, peak memory, FLOP/s.

One step = forward + MSE loss + backward + AdamW, on the same batch, the same weights (ours are
written with `save_pretrained` and read by diffusers' `UNet2DConditionModel.from_pretrained`, and
the two forwards are checked equal before timing), in one process, interleaved.

- latentforge runs what `latentforge train` runs: `train.step.train_step` and the optimizer from
  `train.setup.make_optimizer`.
- diffusers runs the recipe of its `examples/text_to_image/train_text_to_image.py`:
  `DDPMScheduler.add_noise`, `unet(...).sample`, `F.mse_loss(pred.float(), target.float())`,
  `torch.optim.AdamW(lr, betas, weight_decay=1e-2, eps=1e-8)` with torch's default implementation
  choice, `zero_grad()`. Its per-step `loss.item()` for logging is left out (no host sync on our side
  either).

Peak memory: each arm runs alone in a fresh subprocess (`--memory-arm`). On CPU it reports the peak
resident set size during 3 training steps minus the RSS just before the first one (weights already
loaded; optimizer state, gradients, activations and allocator caching are what is counted); on CUDA
`torch.cuda.max_memory_allocated` minus the allocation before the first step.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward + backward of our UNet on the meta
device (no memory, no time), per image. Model FLOP utilisation = FLOPs × images/s / peak FLOP/s of
the device (only known for GPUs; `--peak-tflops` sets it).

    .venv/bin/python bench/bench_unet.py                          # CPU: small + cpu-18m configs
    .venv/bin/python bench/bench_unet.py --device cuda --dtype bf16 --configs sd15,small
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

from latentforge.config import PRESETS, ScheduleConfig, TrainConfig, UNetConfig  # noqa: E402
from latentforge.models import UNet  # noqa: E402
from latentforge.schedule import NoiseSchedule  # noqa: E402
from latentforge.train.compile import compile_denoiser  # noqa: E402
from latentforge.train.precision import LowPrecisionCompute  # noqa: E402
from latentforge.train.setup import make_optimizer  # noqa: E402
from latentforge.train.step import Batch, Draws, train_step  # noqa: E402


@dataclass(frozen=True)
class BenchConfig:
    unet: UNetConfig
    batch: int
    latent: int  # latent side (h = w)
    context_len: int = 77
    note: str = ""


CONFIGS: Dict[str, BenchConfig] = {
    "small": BenchConfig(PRESETS["small"].unet, batch=16, latent=16, note="the `small` preset (4 heads per level)"),
    # The 18.5 M-parameter 8-head config: channels (64, 128, 256), 2 layers per level, attention on the first two levels,
    # cross-attention dim 384, 16×16×4 latents, batch 16. Heads: UNetConfig's default 8 per level.
    "cpu-18m": BenchConfig(UNetConfig(channels=(64, 128, 256), layers_per_level=2, attention=(True, True, False),
                                     cross_attention_dim=384, sample_size=16), batch=16, latent=16,
                          note="channels (64,128,256), 2 layers, attention on levels 1-2, 8 heads, ctx 384"),
    "tiny": BenchConfig(PRESETS["tiny"].unet, batch=2, latent=8, context_len=8, note="the `tiny` preset (smoke tests)"),
    "sd15": BenchConfig(PRESETS["sd15"].unet, batch=8, latent=64, note="SD 1.5 UNet (860 M), 64×64 latents (GPU)"),
}

# Dense bf16 tensor-core peak in TFLOP/s, from the vendors' data sheets (without sparsity).
GPU_PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0,
                        "H100 NVL": 835.0, "A100": 312.0}
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- models, batch, FLOPs -------------------------------------------------------------------


def make_pair(cfg: BenchConfig, folder: Path, device: torch.device, seed: int = 0):
    """(ours, theirs) with the same weights: ours random, saved, loaded by diffusers."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    ours = UNet(cfg.unet)
    with torch.no_grad():  # every weight non-trivial (fresh inits have zeros), so the check below means something
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ours.save_pretrained(folder)
    theirs = UNet2DConditionModel.from_pretrained(folder)
    return ours.to(device).train(), theirs.to(device).train()


def make_batch(cfg: BenchConfig, device: torch.device, batch: Optional[int] = None, seed: int = 1):
    """Latents x0, noise, timesteps and a text context: the same tensors for both arms."""
    g = torch.Generator().manual_seed(seed)
    b, u = batch or cfg.batch, cfg.unet
    x0 = torch.randn(b, u.in_channels, cfg.latent, cfg.latent, generator=g)  # (B, C, h, w)
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    ctx = torch.randn(b, cfg.context_len, u.cross_attention_dim, generator=g) if u.cross_attention_dim else None
    return [None if v is None else v.to(device) for v in (x0, noise, t, ctx)]


@torch.no_grad()
def max_difference(ours, theirs, cfg: BenchConfig, device: torch.device) -> float:
    """max |ours − theirs| of one fp32 forward on 2 samples (must be ≤ 1e-4 for the comparison to count)."""
    x0, _, t, ctx = make_batch(cfg, device, batch=2, seed=7)
    a = ours(x0, t, ctx)
    b = theirs(x0, t, encoder_hidden_states=ctx if ctx is not None else torch.zeros(2, 1, cfg.unet.channels[-1],
                                                                                   device=device)).sample
    return float((a - b).abs().max())


def train_flops_per_image(cfg: BenchConfig) -> float:
    """FLOPs of forward + backward of one image, counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = UNet(cfg.unet)
        x0, _, t, ctx = (torch.empty(1, cfg.unet.in_channels, cfg.latent, cfg.latent), None,
                         torch.zeros(1, dtype=torch.long),
                         torch.empty(1, cfg.context_len, cfg.unet.cross_attention_dim) if cfg.unet.cross_attention_dim else None)
        counter = FlopCounterMode(display=False)
        with counter:
            model(x0, t, ctx).sum().backward()
    return float(counter.get_total_flops())


# ---- the two training steps -----------------------------------------------------------------


def ours_step(model, cfg: BenchConfig, device: torch.device, dtype, optimizer=None, channels_last: bool = False):
    """latentforge's step. `optimizer`/`channels_last` are for the ablation arms only (see ABLATIONS)."""
    x0, noise, t, ctx = make_batch(cfg, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x0, noise = x0.to(memory_format=torch.channels_last), noise.to(memory_format=torch.channels_last)
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod.to(device)
    opt = optimizer(model) if optimizer else make_optimizer(model, TrainConfig(lr=1e-4), device)
    batch, draws = Batch(latent=x0, context=ctx), Draws(t=t, noise=noise, drop=torch.zeros_like(t, dtype=torch.bool))

    def step():
        loss = train_step(model, batch, draws, ac, autocast_dtype=dtype)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bf16_step(model, cfg: BenchConfig, device: torch.device, dtype, mode: str = "masters", compile_backend=None):
    """latentforge in bf16. mode `masters`: what `precision=bf16` trains with (bf16 compute copy, fp32
    master weights and AdamW, train/precision.py); `autocast`: torch.autocast over fp32 weights;
    `masters+channels_last`: the first with NHWC activations and weights. `compile_backend`: the compute copy
    under torch.compile with that backend, as `compile=true` runs it (train/compile.py)."""
    x0, noise, t, ctx = make_batch(cfg, device)
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod.to(device)
    opt = make_optimizer(model, TrainConfig(lr=1e-4), device)
    draws = Draws(t=t, noise=noise, drop=torch.zeros_like(t, dtype=torch.bool))
    if mode == "autocast":
        batch = Batch(latent=x0, context=ctx)
        return lambda: (train_step(model, batch, draws, ac, autocast_dtype=torch.bfloat16).backward(), opt.step(),
                        opt.zero_grad(set_to_none=True))
    lowp = LowPrecisionCompute(model, torch.bfloat16)
    if mode.endswith("channels_last"):
        lowp.compute.to(memory_format=torch.channels_last)
        x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
    batch = Batch(latent=x0, context=ctx)
    net = compile_denoiser(lowp.compute, backend=compile_backend) if compile_backend else lowp.compute

    def step():
        train_step(net, batch, draws, ac, compute_dtype=torch.bfloat16).backward()
        lowp.grads_to_master()
        opt.step()
        opt.zero_grad(set_to_none=True)
        lowp.weights_to_compute()

    return step


# bf16 arms (CPU): extra arms in the same interleaved rounds as the fp32 latentforge and diffusers steps.
PRECISION_ARMS = {"latentforge bf16 (precision=bf16: bf16 copy, fp32 masters)": "masters",
                  "latentforge bf16 autocast (fp32 weights)": "autocast",
                  "latentforge bf16 masters + channels_last": "masters+channels_last"}


def diffusers_step(model, cfg: BenchConfig, device: torch.device, dtype):
    from diffusers import DDPMScheduler

    x0, noise, t, ctx = make_batch(cfg, device)
    if ctx is None:
        ctx = torch.zeros(x0.shape[0], 1, cfg.unet.channels[-1], device=device)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)

    def step():
        noisy = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            pred = model(noisy, t, ctx, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        opt.step()
        opt.zero_grad()

    return step


ARMS = {"latentforge": ("ours", ours_step), "diffusers": ("theirs", diffusers_step)}

# What one more optimisation would buy, each on top of latentforge as `latentforge train` runs it
# (extra arms in the same interleaved rounds, on a copy of the same weights).
ABLATIONS = {
    "latentforge + fused AdamW": dict(optimizer=lambda m: torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.01,
                                                                            fused=True)),
    "latentforge + channels_last": dict(channels_last=True),
}


# ---- where the time goes --------------------------------------------------------------------

CATEGORIES = {  # aten op name fragments -> category (first match wins)
    "convolution": ("convolution", "conv2d"),  # conv2d: aten::_slow_conv2d_forward, torch's non-oneDNN path
    # the UNet's only batched GEMMs and softmax are attention's explicit route (models/attend.py)
    "attention (SDPA, or bmm/softmax)": ("scaled_dot_product", "flash_attention", "aten::bmm", "aten::baddbmm",
                                         "softmax"),
    "GEMM (linear, matmul)": ("aten::mm", "aten::addmm"),
    "optimizer": ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt"),
    "normalisation": ("group_norm", "layer_norm"),
    "copies (copy/cat/pad)": ("copy_", "aten::cat", "pad", "clone", "contiguous"),
}


def profile_breakdown(steps: Dict[str, object], n: int = 2) -> tuple:
    """(ms per step by op category, ms and calls per step by aten op) from torch.profiler's self time of aten ops,
    for each arm. The arms are profiled one step at a time, interleaved, n rounds after one warm-up step each.
    torch.profiler's clock is wall time, which a loaded machine inflates; each profiled step's op times are
    scaled by that step's process CPU time / wall time, so that the figures estimate CPU time like the tables."""
    import time

    from torch.profiler import ProfilerActivity, profile

    other = "other (elementwise, reductions, …)"
    out = {name: {c: 0.0 for c in [*CATEGORIES, other]} for name in steps}
    ops = {name: {} for name in steps}
    for step in steps.values():
        step()
    for _ in range(n):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                c0, w0 = time.process_time(), time.perf_counter()
                step()
                scale = min(1.0, (time.process_time() - c0) / (time.perf_counter() - w0))
            for e in prof.key_averages():
                if not e.key.startswith("aten::"):
                    continue
                cat = next((c for c, keys in CATEGORIES.items() if any(k in e.key for k in keys)), other)
                ms = e.self_cpu_time_total / 1e3 * scale / n
                out[name][cat] += ms
                o = ops[name].setdefault(e.key, {"ms": 0.0, "calls": 0.0, "category": cat})
                o["ms"] += ms
                o["calls"] += e.count / n
    return out, ops


# ---- memory (one arm per subprocess) --------------------------------------------------------


def measure_memory(arm: str, config: str, device: str, dtype: str, batch: int = 0, steps: int = 2) -> dict:
    """In a fresh process: build one arm, warm it up, then the peak memory of `steps` training steps
    above what stays resident between steps (weights, AdamW state, allocator caches).

    CPU: the peak-RSS mark is reset by writing 5 to /proc/self/clear_refs (Linux ≥ 4.0) after the
    warm-up step, and `run_memory_subprocess` starts us with MALLOC_MMAP_THRESHOLD_=65536 so that glibc
    returns every freed tensor to the OS at once (RSS then follows the live tensors, not the heap).
    CUDA: `max_memory_allocated` after `reset_peak_memory_stats`.
    """
    dev, cfg = torch.device(device), CONFIGS[config] if not batch else replace(CONFIGS[config], batch=batch)
    torch.manual_seed(0)
    if arm == "latentforge":
        model = UNet(cfg.unet).to(dev).train()
    else:
        from diffusers import UNet2DConditionModel

        from latentforge.formats.diffusers import unet_to_diffusers

        d = {k: v for k, v in unet_to_diffusers(cfg.unet).items() if not k.startswith("_")}
        model = UNet2DConditionModel(**d).to(dev).train()
    step = ARMS[arm][1](model, cfg, dev, DTYPES[dtype])
    step()  # warm-up: AdamW state, lazy initialisation of kernels
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return {"arm": arm, "step_peak_mib": (torch.cuda.max_memory_allocated() - before) / 2**20,
                "resident_mib": before / 2**20, "method": "cuda"}
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = common.status_mib("VmRSS")
    for _ in range(steps):
        step()
    return {"arm": arm, "step_peak_mib": common.status_mib("VmHWM") - before, "resident_mib": before, "method": "rss"}


def run_memory_subprocess(arm: str, config: str, device: str, dtype: str, batch: int) -> dict:
    env = {"MALLOC_MMAP_THRESHOLD_": "65536"}
    return common.run_json_subprocess([str(Path(__file__)), "--memory-arm", arm, "--configs", config, "--batch",
                                       str(batch), "--device", device, "--dtype", dtype], env=env)


# ---- the benchmark --------------------------------------------------------------------------


def run(configs=("small", "cpu-18m"), device: str = "cpu", dtype: str = "fp32", repeats: int = 7, warmup: int = 2,
        steps_per_sample: int = 1, memory: bool = True, batch: Optional[int] = None,
        peak_tflops: Optional[float] = None, progress: bool = True, ablations: Sequence[str] = (),
        profile: Sequence[str] = (), precision: Sequence[str] = (), gemm_size: int = 2048) -> dict:
    """Both arms on each config; `ablations`/`profile`: the configs that also get ABLATIONS arms / a profile."""
    dev = torch.device(device)
    peak = peak_tflops or gpu_peak_tflops(dev, dtype)
    gemm = common.gemm_rate(("fp32", "bf16"), n=gemm_size, device=dev)  # this machine's limit, this run
    rows = []
    for name in configs:
        cfg = CONFIGS[name] if not batch else replace(CONFIGS[name], batch=batch)
        row = compare(name, cfg, dev, DTYPES[dtype], repeats, warmup, steps_per_sample, progress,
                      with_ablations=name in ablations, with_profile=name in profile,
                      with_precision=name in precision and dev.type == "cpu" and dtype == "fp32", gemm_n=gemm_size)
        limit = gemm["bf16" if dtype == "bf16" else "fp32"]
        for arm in ARMS:
            row[arm]["gemm_fraction"] = row[arm]["gflops_per_cpu_s" if dev.type == "cpu" else "gflops_per_s"] / limit
        for a in row["precision"].values():
            a["gemm_fraction"] = a["gflops_per_cpu_s"] / gemm["bf16"]
        for arm in ARMS:
            if peak:
                row[arm]["mfu"] = row[arm]["gflops_per_s"] / (peak * 1e3)
            if memory:
                row[arm]["memory"] = run_memory_subprocess(arm, name, device, dtype, cfg.batch)
        rows.append(row)
    return {"device": device, "dtype": dtype, "repeats": repeats, "warmup": warmup,
            "steps_per_sample": steps_per_sample, "peak_tflops": peak, "gemm_gflops": gemm, "gemm_size": gemm_size,
            "rows": rows}


def compare(name: str, cfg: BenchConfig, dev: torch.device, dtype, repeats: int, warmup: int, steps_per_sample: int,
            progress: bool, with_ablations: bool, with_profile: bool, with_precision: bool = False,
            gemm_n: int = 2048) -> dict:
    """One config: equality check, optional profile, interleaved timing of both arms (+ ablation arms)."""
    with tempfile.TemporaryDirectory() as tmp:
        ours, theirs = make_pair(cfg, Path(tmp) / "unet", dev)
    diff = max_difference(ours, theirs, cfg, dev)
    steps = {"latentforge": ours_step(ours, cfg, dev, dtype), "diffusers": diffusers_step(theirs, cfg, dev, dtype)}
    if with_ablations:
        for arm, kw in ABLATIONS.items():
            steps[arm] = ours_step(copy.deepcopy(ours), cfg, dev, dtype, **kw)
    if with_precision:
        for arm, mode in PRECISION_ARMS.items():
            steps[arm] = bf16_step(copy.deepcopy(ours), cfg, dev, dtype, mode)
    breakdown, ops = profile_breakdown({k: steps[k] for k in ARMS}) if with_profile else (None, None)
    arms = {k: (lambda f=f: [f() for _ in range(steps_per_sample)]) for k, f in steps.items()}
    if with_precision:  # this machine's GEMM rate in every round, beside the steps it limits
        arms.update({f"GEMM {d}": f for d, f in common.gemm_arms(("fp32", "bf16"), gemm_n, dev).items()})
    samples = common.interleaved(arms, cfg.batch * steps_per_sample, repeats, warmup, dev, progress)
    flops = train_flops_per_image(cfg)
    row = {"config": name, "note": cfg.note, "batch": cfg.batch, "latent": cfg.latent, "max_abs_diff": diff,
           "profile": breakdown, "profile_ops": ops, "flops_per_image": flops, "params": count_parameters(cfg.unet)}
    for arm in ARMS:
        s = samples[arm]
        row[arm] = {"images_per_s": s.rate("wall"), "images_per_cpu_s": s.rate("cpu"), "wall": s.wall, "cpu": s.cpu,
                    "gflops_per_s": flops * s.rate("wall") / 1e9, "gflops_per_cpu_s": flops * s.rate("cpu") / 1e9}
    a, b = samples["latentforge"], samples["diffusers"]
    row.update(ratio_wall=a.rate("wall") / b.rate("wall"), ratio_cpu=a.rate("cpu") / b.rate("cpu"),
               paired_ratio_wall=common.paired_ratio(a, b, "wall"), paired_ratio_cpu=common.paired_ratio(a, b, "cpu"))
    row["ablations"] = {arm: {"images_per_s": s.rate("wall"), "images_per_cpu_s": s.rate("cpu"),
                              "vs_latentforge_cpu": common.paired_ratio(s, a, "cpu"),
                              "vs_diffusers_cpu": common.paired_ratio(s, b, "cpu"),
                              "vs_diffusers_wall": common.paired_ratio(s, b, "wall"), "wall": s.wall, "cpu": s.cpu}
                        for arm, s in samples.items() if arm not in ARMS and arm not in PRECISION_ARMS
                        and not arm.startswith("GEMM")}
    row["precision"] = {arm: {"images_per_s": s.rate("wall"), "images_per_cpu_s": s.rate("cpu"),
                              "gflops_per_cpu_s": flops * s.rate("cpu") / 1e9,
                              "vs_fp32_cpu": common.paired_ratio(s, a, "cpu"), "vs_fp32_wall": common.paired_ratio(s, a, "wall"),
                              "vs_diffusers_cpu": common.paired_ratio(s, b, "cpu"), "wall": s.wall, "cpu": s.cpu}
                        for arm, s in samples.items() if arm in PRECISION_ARMS}
    if with_precision:
        row["rounds"] = _rounds(samples, a, gemm_n)
    return row


def _rounds(samples: dict, fp32, n: int) -> list:
    """Per timed round: the GEMM rates measured in it and each bf16 arm's step speed vs that round's fp32 step."""
    out = []
    for i in range(len(fp32.cpu)):
        r = {f"gemm_{d}": 2 * n**3 / samples[f"GEMM {d}"].cpu[i] / 1e9 for d in ("fp32", "bf16")}
        r.update({arm: fp32.cpu[i] / samples[arm].cpu[i] for arm in PRECISION_ARMS})
        out.append(r)
    return out


def count_parameters(cfg: UNetConfig) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in UNet(cfg).parameters())


def gpu_peak_tflops(device: torch.device, dtype: str) -> Optional[float]:
    if device.type != "cuda" or dtype != "bf16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_BF16_TFLOPS.items() if k in name), None)


def sd15_parameters() -> int:
    return count_parameters(CONFIGS["sd15"].unet)


def sd15_flops_per_image() -> float:
    """Training FLOPs (forward + backward) of the SD 1.5 UNet on one 64×64 latent, 77-token context."""
    return train_flops_per_image(CONFIGS["sd15"])


def markdown(res: dict) -> str:
    # CPU: FLOP/s per second of process CPU time (what one core does); GPU: per second of wall time.
    gf, gf_name = ("gflops_per_s", "wall") if res["device"].startswith("cuda") else ("gflops_per_cpu_s", "CPU time")
    rows = []
    for r in res["rows"]:
        a, b = r["latentforge"], r["diffusers"]
        mem = lambda x: common.fmt(x["memory"]["step_peak_mib"], 0) if "memory" in x else "–"  # noqa: E731
        rows.append([f"`{r['config']}` (B={r['batch']}, {r['latent']}²)", common.fmt(a["images_per_s"]),
                     common.fmt(b["images_per_s"]), f"**{r['ratio_wall']:.2f}×**", common.fmt(a["images_per_cpu_s"]),
                     common.fmt(b["images_per_cpu_s"]), f"**{r['ratio_cpu']:.2f}×**",
                     f"{r['paired_ratio_wall']:.2f}× / {r['paired_ratio_cpu']:.2f}×", mem(a), mem(b),
                     f"{a[gf]:.1f} / {b[gf]:.1f}", _fraction(a, b), f"{r['max_abs_diff']:.1e}"])
    header = ["config", "latentforge img/s (wall)", "diffusers img/s (wall)", "ratio (wall)",
              "latentforge img/s (CPU time)", "diffusers img/s (CPU time)", "ratio (CPU time)",
              "paired ratio wall / CPU", "step peak MiB latentforge", "step peak MiB diffusers",
              f"GFLOP/s ({gf_name}) latentforge / diffusers",
              f"fraction of the measured {res['dtype']} GEMM rate latentforge / diffusers", "max abs Δ fwd"]
    g = res["gemm_gflops"]
    out = [common.table(header, rows), "", f"Measured dense GEMM rate in this run ({res['gemm_size']}² matmul, "
           f"{gf_name}): **fp32 {g['fp32']:.0f} GFLOP/s, bf16 {g['bf16']:.0f} GFLOP/s** — the limit the fraction "
           "column divides by (model FLOPs × images/s ÷ GEMM FLOP/s)."]
    if any("mfu" in r["latentforge"] for r in res["rows"]):
        out.append("")
        out.append(common.table(["config", "MFU latentforge", "MFU diffusers", "peak TFLOP/s"],
                                [[r["config"], f"{r['latentforge'].get('mfu', 0):.1%}", f"{r['diffusers'].get('mfu', 0):.1%}",
                                  res["peak_tflops"]] for r in res["rows"]]))
    return "\n".join(out)


def _fraction(a: dict, b: dict) -> str:
    return f"{a['gemm_fraction']:.0%} / {b['gemm_fraction']:.0%}" if "gemm_fraction" in a else "–"


def markdown_precision(res: dict) -> str:
    rows = [[f"`{r['config']}`", arm, common.fmt(a["images_per_cpu_s"]), f"**{a['vs_fp32_cpu']:.2f}×**",
             f"{a['vs_fp32_wall']:.2f}×", f"{a['vs_diffusers_cpu']:.2f}×", f"{a['gemm_fraction']:.0%}"]
            for r in res["rows"] for arm, a in r.get("precision", {}).items()]
    return common.table(["config", "arm", "img/s (CPU time)", "vs latentforge fp32 (paired, CPU)",
                         "vs latentforge fp32 (paired, wall)", "vs diffusers fp32 (paired, CPU)",
                         "fraction of the measured bf16 GEMM rate"], rows) if rows else ""


def markdown_rounds(res: dict) -> str:
    """Round by round: the measured GEMM rates and the bf16 arms' speed vs fp32 in that same round."""
    rows = []
    for r in res["rows"]:
        for i, x in enumerate(r.get("rounds", [])):
            rows.append([f"`{r['config']}`", str(i + 1), f"{x['gemm_fp32']:.0f}", f"{x['gemm_bf16']:.0f}"]
                        + [f"{x[arm]:.2f}×" for arm in PRECISION_ARMS])
    heads = ["config", "round", "GEMM fp32 GFLOP/s", "GEMM bf16 GFLOP/s"] + [f"{arm} vs fp32" for arm in PRECISION_ARMS]
    return common.table(heads, rows) if rows else ""


def markdown_ablations(res: dict) -> str:
    rows = [[f"`{r['config']}`", arm, common.fmt(a["images_per_cpu_s"]), f"{a['vs_latentforge_cpu']:.3f}×",
             f"**{a['vs_diffusers_cpu']:.2f}×**", f"{a['vs_diffusers_wall']:.2f}×"]
            for r in res["rows"] for arm, a in r["ablations"].items()]
    return common.table(["config", "arm", "img/s (CPU time)", "vs latentforge as trained (paired, CPU)",
                         "vs diffusers (paired, CPU)", "vs diffusers (paired, wall)"], rows) if rows else ""


def markdown_profile(res: dict, per: str = "step") -> str:
    rows = []
    for r in res["rows"]:
        if not r.get("profile"):
            continue
        p = r["profile"]
        cats = list(p["latentforge"])
        tot = {arm: sum(p[arm].values()) for arm in p}
        for c in cats + ["total"]:
            vals = {arm: tot[arm] if c == "total" else p[arm][c] for arm in p}
            if not any(vals.values()):
                continue  # e.g. no optimizer in a sampling call
            rows.append([f"`{r['config']}`", c] + [f"{vals[arm]:.0f} ({100 * vals[arm] / tot[arm]:.0f} %)" for arm in p]
                        + [f"{vals['latentforge'] - vals['diffusers']:+.0f}"])
    return common.table(["config", "op category", f"latentforge ms/{per} (share)", f"diffusers ms/{per} (share)",
                         "Δ ms"], rows) if rows else ""


def markdown_ops(res: dict, top: int = 14, per: str = "step") -> str:
    """Per aten op: self CPU ms per step and calls per step of each arm, the ops with the largest time first
    (their sum in either arm), and the difference latentforge − diffusers."""
    rows = []
    for r in res["rows"]:
        ops = r.get("profile_ops")
        if not ops:
            continue
        a, b = ops["latentforge"], ops["diffusers"]
        names = sorted(set(a) | set(b), key=lambda k: -(a.get(k, {}).get("ms", 0) + b.get(k, {}).get("ms", 0)))
        z = {"ms": 0.0, "calls": 0.0}
        for k in names[:top]:
            x, y = a.get(k, z), b.get(k, z)
            rows.append([f"`{r['config']}`", f"`{k}`", (x.get("category") or y.get("category", "")).split(" (")[0],
                         f"{x['ms']:.0f} ({x['calls']:.0f})", f"{y['ms']:.0f} ({y['calls']:.0f})",
                         f"{x['ms'] - y['ms']:+.0f}"])
        rest = [k for k in names[top:]]
        ra, rb = sum(a.get(k, z)["ms"] for k in rest), sum(b.get(k, z)["ms"] for k in rest)
        rows.append([f"`{r['config']}`", f"{len(rest)} other ops", "", f"{ra:.0f}", f"{rb:.0f}", f"{ra - rb:+.0f}"])
    return common.table(["config", "aten op", "category", f"latentforge ms/{per} (calls)",
                         f"diffusers ms/{per} (calls)", "Δ ms"], rows) if rows else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="small,cpu-18m", help=f"comma-separated, from {', '.join(CONFIGS)}")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="autocast dtype for both arms (fp32 = none)")
    p.add_argument("--repeats", type=int, default=7, help="timed rounds (median reported; at least 5 for the doc)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps-per-sample", type=int, default=1, help="steps between two clock reads (use ~10 on GPU)")
    p.add_argument("--batch", type=int, default=0, help="override every config's batch size")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    p.add_argument("--no-memory", action="store_true")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: known GPUs, bf16)")
    p.add_argument("--ablations", default="", help="configs that also get the ABLATIONS arms (e.g. cpu-18m)")
    p.add_argument("--profile", default="", help="configs whose step is also profiled by op category")
    p.add_argument("--precision", default="", help="configs that also get the bf16 arms (CPU, --dtype fp32)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.add_argument("--memory-arm", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    configs = [c for c in args.configs.split(",") if c]
    if args.memory_arm:
        print(json.dumps(measure_memory(args.memory_arm, configs[0], args.device, args.dtype, args.batch)))
        return 0
    split = lambda v: [c for c in v.split(",") if c]  # noqa: E731
    res = run(configs, args.device, args.dtype, args.repeats, args.warmup, args.steps_per_sample, not args.no_memory,
              args.batch or None, args.peak_tflops, ablations=split(args.ablations), profile=split(args.profile),
              precision=split(args.precision))
    res["flops_sd15_64"] = sd15_flops_per_image()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    print(markdown(res))
    for extra in (markdown_precision(res), markdown_ablations(res), markdown_profile(res), markdown_ops(res)):
        if extra:
            print("\n" + extra)
    print(f"\nSD 1.5 UNet, 64×64 latent: {res['flops_sd15_64'] / 1e12:.2f} TFLOP per image per training step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
