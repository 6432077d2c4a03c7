"""The GPU check: one command whose output is a markdown section for docs/BENCHMARKS.md (device, date, figures).

    bench/gpu_check.sh [--out FILE]          # one H100/H200: about 6-8 minutes
    bench/gpu_check.sh --dry-run             # CPU, tiny sizes, under a minute: the same code paths (make test)

1. The SD 1.5 UNet training step at B=32, 64×64 latents, bf16, one arm after the other in this process (each
   built, run and freed before the next): autocast over fp32 weights; the bf16 compute copy with fp32 masters
   (train/precision.py, what precision=bf16 trains with on CUDA); that copy under torch.compile (compile=true,
   train/compile.py); diffusers' UNet2DConditionModel with its train_text_to_image recipe (autocast). Each: img/s
   over `steps` timed steps bracketed by synchronisations, MFU (FLOPs counted on the meta device × img/s ÷ the
   device's dense bf16 peak), peak memory of a step above what stays resident, and the first step's seconds.
2. The CLI end to end on a random SD1.5-size model (UNet 860 M, SD VAE, 12-layer CLIP, saved as a diffusers
   folder): `latentforge shapes`, then `latentforge train --init … precision=bf16 batch_size=32` with
   LATENTFORGE_SYNC_DEBUG=error (torch.cuda.set_sync_debug_mode('error') between log steps: a host sync there
   stops the run), its img/s (median of the logged windows after the first) beside the bench's compute-copy step.
3. text→image at 512 px, 20 steps DPM++ 2M, CFG, 4 images: latentforge vs StableDiffusionPipeline on the same
   folder, fp32 and bf16 (bench_text2img.py), interleaved rounds.
A part that fails prints its error in the section and the others still run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402
import bench_text2img  # noqa: E402
import bench_unet  # noqa: E402

from latentforge.models import UNet  # noqa: E402


@dataclass(frozen=True)
class Sizes:
    device: str
    config: str  # bench_unet.CONFIGS
    batch: int
    steps: int  # timed steps per arm
    warmup: int  # untimed steps per arm (the first compiles)
    preset: str  # the model of parts 2 and 3
    text_layers: int
    images: int  # part 2's data set
    image_size: int
    train_steps: int
    log_every: int
    t2i_steps: int
    t2i_batch: int
    t2i_repeats: int
    compile_backend: str


GPU = Sizes("cuda", "sd15", 32, 10, 3, "sd15", 12, 64, 512, 40, 10, 20, 4, 3, "inductor")
# CPU: the same code at the tiny preset; torch.compile's backend `aot_eager` traces forward and backward as inductor
# does but generates no code (inductor compiles for minutes on a shared 2-core machine).
DRY = Sizes("cpu", "tiny", 2, 2, 1, "tiny", 2, 4, 32, 3, 1, 2, 1, 1, "aot_eager")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes: checks that every part runs")
    p.add_argument("--out", default=None, help="also write the section to this file")
    p.add_argument("--skip", default="", help="comma-separated parts to leave out: step, cli, text2img")
    args = p.parse_args(argv)
    sizes = DRY if args.dry_run else GPU
    if sizes.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device — run with --dry-run on a machine without one", file=sys.stderr)
        return 2
    skip = set(filter(None, args.skip.split(",")))
    parts, results = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = None
        if "step" not in skip:
            parts.append(_part("UNet training step", lambda: step_arms(sizes), results, "step"))
        if not {"cli", "text2img"} <= skip:  # the model folder parts 2 and 3 share
            t0 = time.perf_counter()
            folder = bench_text2img.write_model(Path(tmp) / "model", sizes.preset, text_layers=sizes.text_layers)
            results["model_s"] = time.perf_counter() - t0
        if "cli" not in skip:
            parts.append(_part("CLI end to end", lambda: cli_run(sizes, folder, Path(tmp), results.get("step")),
                               results, "cli"))
        if "text2img" not in skip:
            parts.append(_part("text→image", lambda: text2img(sizes, folder), results, "text2img"))
    section = "\n\n".join([header(sizes)] + parts) + "\n"
    print(section)
    if args.out:
        Path(args.out).write_text(section)
    return 0 if all(not isinstance(results.get(k), Exception) for k in ("step", "cli", "text2img")) else 1


def _part(title: str, fn, results: dict, key: str) -> str:
    """Run one part; its markdown, or its error (the traceback's last lines) where it failed."""
    t0 = time.perf_counter()
    try:
        results[key] = fn()
        body = MARKDOWN[key](results[key])
    except Exception as e:  # noqa: BLE001 — a failed part is reported in the section, the others still run
        results[key] = e
        body = "**failed:**\n\n```\n" + "".join(traceback.format_exception(e))[-2500:] + "\n```"
    return f"### {title}\n\n{body}\n\n({time.perf_counter() - t0:.0f} s)"


def header(s: Sizes) -> str:
    m = common.machine(s.device)
    try:  # the device machine's copy of the tree may have no .git (or no git)
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=common.ROOT, capture_output=True,
                             text=True).stdout.strip()
    except OSError:
        rev = ""
    what = "dry run on CPU, tiny sizes — no figure here is a GPU measurement" if s.device == "cpu" else m.get("gpu")
    return (f"## GPU check (`bench/gpu_check.sh`{' --dry-run' if s.device == 'cpu' else ''})\n\n"
            f"{what}; {m['date']}; torch {m['torch']}, diffusers {m['diffusers (oracle)']}, CPU {m['cpu']} "
            f"({m['cores']} cores); latentforge at {rev or 'an unknown commit'}.")


# ---- 1. the training step arms ----------------------------------------------------------------


def step_arms(s: Sizes) -> dict:
    dev = torch.device(s.device)
    cfg = replace(bench_unet.CONFIGS[s.config], batch=s.batch)
    flops = bench_unet.train_flops_per_image(cfg)
    peak = bench_unet.gpu_peak_tflops(dev, "bf16")
    arms = {
        "autocast (fp32 weights)": lambda m: bench_unet.ours_step(m, cfg, dev, torch.bfloat16),
        "bf16 compute copy, fp32 masters (precision=bf16)": lambda m: bench_unet.bf16_step(m, cfg, dev, None),
        "compute copy + torch.compile (compile=true)":
            lambda m: bench_unet.bf16_step(m, cfg, dev, None, compile_backend=s.compile_backend),
        "diffusers UNet2DConditionModel (autocast)": lambda m: bench_unet.diffusers_step(m, cfg, dev, torch.bfloat16),
    }
    rows = {}
    for name, make in arms.items():
        rows[name] = measure(lambda: make(_model(cfg, dev, diffusers=name.startswith("diffusers"))), dev, s)
        rows[name]["mfu"] = flops * rows[name]["images_per_s"] / (peak * 1e12) if peak else None
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return {"config": s.config, "batch": s.batch, "flops_per_image": flops, "peak_tflops": peak, "arms": rows}


def _model(cfg, dev: torch.device, diffusers: bool = False):
    """A random UNet of the config, made on the device (ours, or diffusers' of the same architecture)."""
    torch.manual_seed(0)
    with dev:
        if not diffusers:
            return UNet(cfg.unet).train()
        from diffusers import UNet2DConditionModel

        from latentforge.formats.diffusers import unet_to_diffusers

        d = {k: v for k, v in unet_to_diffusers(cfg.unet).items() if not k.startswith("_")}
        return UNet2DConditionModel(**d).train()


def measure(build, dev: torch.device, s: Sizes) -> dict:
    """First step (seconds: the compile, if any), warm-up, then `s.steps` steps timed between two
    synchronisations, with the peak memory of those steps above what was resident before them (CUDA)."""
    step = build()
    wall, _ = common.time_once(step, dev)
    for _ in range(s.warmup - 1):
        step()
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        resident = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    total, _ = common.time_once(lambda: [step() for _ in range(s.steps)], dev)
    out = {"images_per_s": s.batch * s.steps / total, "first_step_s": wall}
    if cuda:
        out["step_peak_gib"] = (torch.cuda.max_memory_allocated() - resident) / 2**30
        out["resident_gib"] = resident / 2**30
    return out


def markdown_steps(r: dict) -> str:
    gib = lambda a, k: f"{a[k]:.1f}" if k in a else "–"  # noqa: E731
    rows = [[name, common.fmt(a["images_per_s"], 1), f"{a['mfu']:.1%}" if a["mfu"] is not None else "–",
             gib(a, "step_peak_gib"), gib(a, "resident_gib"), f"{a['first_step_s']:.1f}"]
            for name, a in r["arms"].items()]
    peak = f"{r['peak_tflops']} TFLOP/s dense bf16" if r["peak_tflops"] else "unknown here"
    return (f"`{r['config']}` UNet, B={r['batch']}, {r['flops_per_image'] / 1e9:.4g} GFLOP per image per step "
            f"(forward + backward, counted); MFU against {peak}.\n\n"
            + common.table(["arm", "img/s", "MFU", "step peak GiB", "resident GiB", "first step s"], rows))


# ---- 2. the CLI end to end --------------------------------------------------------------------


def cli_run(s: Sizes, folder: Path, tmp: Path, steps) -> dict:
    """`latentforge shapes` + `latentforge train --init` in subprocesses, LATENTFORGE_SYNC_DEBUG=error."""
    data, run = tmp / "data", tmp / "run"
    _cli(["shapes", "--out", str(data), "--n", str(s.images), "--size", str(s.image_size), "--seed", "0"])
    t0 = time.perf_counter()
    _cli(["train", "--init", str(folder), "--data", str(data), "--out", str(run), "--quiet", f"device={s.device}",
          "precision=bf16", f"batch_size={s.batch}", f"max_steps={s.train_steps}", f"log_every={s.log_every}",
          "sample_every=0", "val_fraction=0", f"checkpoint_every={10 * s.train_steps}", "keep_checkpoints=1"],
         {"LATENTFORGE_SYNC_DEBUG": "error"})
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"img_per_s"' in x]
    later = sorted(r["img_per_s"] for r in rows[1:]) or [rows[0]["img_per_s"]]
    bench = (steps or {}).get("arms", {}) if isinstance(steps, dict) else {}
    copy = bench.get("bf16 compute copy, fp32 masters (precision=bf16)", {}).get("images_per_s")
    return {"images_per_s": later[len(later) // 2], "windows": [r["img_per_s"] for r in rows], "bench": copy,
            "batch": s.batch, "steps": s.train_steps, "log_every": s.log_every, "wall_s": time.perf_counter() - t0,
            "losses": [r["loss"] for r in rows]}


def _cli(args, env=None) -> None:
    env = dict(os.environ, **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "latentforge", *args], cwd=common.ROOT, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"latentforge {args[0]} exited {proc.returncode}:\n{proc.stderr[-2000:]}")


def markdown_cli(r: dict) -> str:
    vs = f"{r['images_per_s'] / r['bench']:.1%}" if r.get("bench") else "–"
    return ("`latentforge train --init <random SD1.5-size folder> precision=bf16` under "
            "`LATENTFORGE_SYNC_DEBUG=error` (a host sync between log steps would have stopped it: none did).\n\n"
            + common.table(["B", "steps", "img/s (median window after the first)", "bench step img/s (compute copy)",
                            "CLI / bench", "img/s per log window", "loss per log window"],
                           [[r["batch"], r["steps"], common.fmt(r["images_per_s"], 1),
                             common.fmt(r["bench"], 1) if r.get("bench") else "–", vs,
                             ", ".join(f"{x:.1f}" for x in r["windows"]), ", ".join(f"{x:.3f}" for x in r["losses"])]]))


# ---- 3. text→image ----------------------------------------------------------------------------


def text2img(s: Sizes, folder: Path) -> dict:
    return bench_text2img.run(s.preset, steps=s.t2i_steps, batch=s.t2i_batch, repeats=s.t2i_repeats, warmup=1,
                              device=s.device, progress=False, bf16=True, profile=False, folder=folder,
                              diffusers_bf16=True)


def markdown_t2i(r: dict) -> str:
    a, b, lb, db = r["latentforge"], r["diffusers"], r["bf16"], r["diffusers_bf16"]
    rows = [["fp32", common.fmt(a["images_per_s"], 2), common.fmt(b["images_per_s"], 2),
             f"**{r['paired_ratio_wall']:.2f}×**", f"{r['max_abs_diff']:.1e}"],
            ["bf16", common.fmt(lb["images_per_s"], 2), common.fmt(db["images_per_s"], 2),
             f"**{lb['vs_diffusers_bf16_wall']:.2f}×**", f"{lb['max_abs_diff']:.1e} (vs our fp32)"]]
    return (f"`{r['preset']}` model, {r['size']}×{r['size']} px, {r['steps']} steps {r['sampler']}, CFG {r['cfg']}, "
            f"{r['batch']} image(s) per call, {r['repeats']} interleaved rounds.\n\n"
            + common.table(["precision", "latentforge img/s", "StableDiffusionPipeline img/s",
                            "latentforge / diffusers (paired, wall)", "max abs Δ image"], rows))


MARKDOWN = {"step": markdown_steps, "cli": markdown_cli, "text2img": markdown_t2i}

if __name__ == "__main__":
    sys.exit(main())
