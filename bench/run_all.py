"""Run every benchmark and write docs/BENCHMARKS.md (`make bench`).

    .venv/bin/python bench/run_all.py --out docs/BENCHMARKS.md [--model runs/demo/model]
        [--demo-runs FP32_DIR,BF16_DIR] [--sizes full|reduced|quick] [--quick]

Sections: 1. UNet training step vs diffusers (bf16 arms, the GEMM limit, what more optimisations would buy,
where the time goes op by op), 2. text→image vs StableDiffusionPipeline (+ a bf16 arm), 3. the data path,
4. steps vs quality on a trained model (plot next to the document), 5. GPU, 6. LoRA vs full fine-tune of the
SD 1.5-size UNet (~5 min, 13.2 GiB), 7. a full fine-tune step of the SD 1.5-size UNet (fp32/bf16 × gradient
checkpointing; ~7 min, ~13.5 GiB), 8. threads with a competing busy process, 9. bf16 training quality from two
demo runs (given, not run), 10. the SDXL-size UNet's LoRA step (~4 min, ~11 GiB). The document is rewritten
after every section. `--sizes reduced`: the same sections with fewer rounds (14–19 min on one thread here);
`--quick`: every section at a tiny size (the smoke test uses it); its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_attention  # noqa: E402
import bench_data_path  # noqa: E402
import bench_demo_precision  # noqa: E402
import bench_finetune  # noqa: E402
import bench_lora  # noqa: E402
import bench_sdxl  # noqa: E402
import bench_steps_quality  # noqa: E402
import bench_text2img  # noqa: E402
import bench_threads  # noqa: E402
import bench_unet  # noqa: E402
import bench_common as common  # noqa: E402

from latentforge.errors import UserError  # noqa: E402

FULL = {
    "unet": dict(configs=("small", "cpu-18m"), repeats=5, warmup=1, ablations=("cpu-18m",), profile=("small", "cpu-18m"),
                 precision=("small",), gemm_size=2048, attention_rounds=7, attention_batch=16,
                 attention_sample_batch=4),
    "text2img": dict(preset="small", steps=20, batch=2, repeats=5, warmup=1),
    "data": dict(n=64, size=64, batch=16, preset="small", repeats=5, warmup=1, epoch_repeats=3),
    # CFG 4.0: the demo's own evaluation setting. Not timed, so it runs on every core (threads=0).
    "quality": dict(steps=(5, 10, 20, 40), reference=1000, n=1, prompts=96, batch=96, cfg=4.0, threads=0),
    "finetune": dict(preset="sd15", steps=3, subprocess=True),  # ~7 min, ~13.5 GiB RSS per arm
    "threads": dict(preset="small", batch=8, steps=5, rounds=3),
    "lora": dict(preset="sd15", steps=2, ranks=(4, 16, 64), subprocess=True),  # ~5 min, 13.2 GiB for the full arm
    "sdxl": dict(preset="sdxl", steps=1, rank=16, subprocess=True),  # ~4 min, ~11 GiB
}
# For a run that has to fit in less time (14–19 min on one thread on the 2-core machine): the same sections and arms, fewer
# timed rounds and steps (the document says which set ran).
REDUCED = {**FULL,
           "text2img": dict(FULL["text2img"], repeats=3),
           "data": dict(FULL["data"], repeats=3, epoch_repeats=2),
           "quality": dict(FULL["quality"], steps=(5, 10, 20)),
           "finetune": dict(FULL["finetune"], steps=1),
           "lora": dict(FULL["lora"], steps=1)}
QUICK = {
    "unet": dict(configs=("tiny",), repeats=2, warmup=1, ablations=("tiny",), profile=("tiny",), precision=("tiny",),
                 gemm_size=256, attention_rounds=1, attention_batch=1,
                 attention_sample_batch=1),
    "text2img": dict(preset="tiny", steps=2, batch=1, repeats=2, warmup=1),
    "data": dict(n=8, size=32, batch=4, preset="tiny", repeats=2, warmup=1, epoch_repeats=1),
    "quality": dict(steps=(1, 2), reference=3, n=1, prompts=4, batch=4, cfg=4.0, threads=1),
    "finetune": dict(preset="tiny", steps=1, subprocess=False),
    "threads": dict(preset="tiny", batch=2, steps=1, rounds=1),
    "lora": dict(preset="tiny", steps=1, ranks=(4, 16), subprocess=False),
    "sdxl": dict(preset="sdxl-tiny", steps=1, rank=4, subprocess=False),
}
SIZES = {"full": FULL, "reduced": REDUCED, "quick": QUICK}


def find_model(requested: str | None) -> tuple[str | None, str]:
    """The model for steps-vs-quality and a sentence saying where it came from."""
    if requested:
        return requested, f"`{requested}` (given with --model)"
    for demo in (Path("runs/demo/model"), Path("runs/demo/unet/model")):  # `latentforge demo` writes the latter
        if (demo / "model_index.json").is_file():
            return str(demo), f"`{demo}`, written by `latentforge demo`"
    found = sorted(Path("runs").glob("**/model_index.json"), key=lambda p: p.stat().st_mtime) \
        if Path("runs").is_dir() else []
    if found:
        return str(found[-1].parent), (f"`{found[-1].parent}` — no demo model existed when this ran, so the newest "
                                       "trained model folder under runs/ was used")
    return None, ""


def section_unet(p: dict, device: str, dtype: str) -> tuple[dict, str]:
    res = bench_unet.run(p["configs"], device, dtype, p["repeats"], p["warmup"], ablations=p["ablations"],
                         profile=p["profile"], precision=p.get("precision", ()), gemm_size=p.get("gemm_size", 2048))
    res["flops_sd15_64"] = bench_unet.sd15_flops_per_image()
    lines = [bench_unet.markdown(res), ""]
    for r in res["rows"]:
        verdict = ("meets the goal (≥ 1.2×)" if r["ratio_cpu"] >= 1.2 else
                   "meets the floor (≥ 1.0×), not the 1.2× goal" if r["ratio_cpu"] >= 1.0 else "is BELOW the 1.0× floor")
        lines.append(f"- `{r['config']}` ({r['note']}; {r['params'] / 1e6:.1f} M parameters): latentforge at "
                     f"{r['ratio_cpu']:.2f}× diffusers' throughput by CPU time ({r['ratio_wall']:.2f}× by wall time) "
                     f"{verdict}.")
    heavier = [r["config"] for r in res["rows"] if "memory" in r["latentforge"]
               and r["latentforge"]["memory"]["step_peak_mib"] > 1.05 * r["diffusers"]["memory"]["step_peak_mib"]]
    if heavier and device == "cpu":
        lines.append(f"- Step memory is higher for latentforge on {', '.join(f'`{c}`' for c in heavier)}: on CPU, "
                     "attention heads narrower than 16 channels are zero-padded to 16 (same result, faster kernel), and "
                     "the padded q, k, v are what SDPA keeps for backward; with the padding switched off the step "
                     "peaks are equal (341 vs 341 MiB on `cpu-18m`, measured on 2026-11-25 with the padding disabled). A speed-for-memory "
                     "trade on CPU only; GPUs are not padded.")
    prec = bench_unet.markdown_precision(res)
    if prec:
        rounds = bench_unet.markdown_rounds(res)
        if rounds:
            prec += ("\n\nRound by round (the GEMM rates are arms of the same rounds: one "
                     f"{res['gemm_size']}² matmul per dtype between the steps; process CPU time). "
                     + _rounds_reading(res) + "\n\n" + rounds)
        lines += ["", "**bf16 on CPU** (extra arms in the same interleaved rounds; `precision=bf16` trains with the first "
                  "arm: a bf16 compute copy of the UNet, fp32 master weights, AdamW state and EMA; attention runs as bf16 "
                  "GEMMs and a softmax where its score matrix is small, else torch's flash kernel in fp32, whose bf16 "
                  "backward is several times slower — models/attend.py):", "", prec]
    abl = bench_unet.markdown_ablations(res)
    if abl:
        lines += ["", "**What one more optimisation would buy** (extra arms in the same interleaved rounds, each on "
                  "top of latentforge as `latentforge train` runs it):", "", abl]
    prof = bench_unet.markdown_profile(res)
    if prof:
        lines += ["", "**Where the time goes** (torch.profiler on the same weights and batch: self time of aten ops per "
                  "step, the two arms profiled one step at a time, interleaved, 2 rounds after a warm-up step; the "
                  "profiler's clock is wall time, so each step's op times are scaled by that step's process CPU time / "
                  "wall time — an estimate of CPU time that assumes the load slowed every op alike):", "", prof, "",
                  "By aten op (the largest first; calls per step in brackets):", "", bench_unet.markdown_ops(res), "",
                  _profile_reading(res)]
    if device == "cpu" and p.get("attention_rounds"):
        train = bench_attention.run(p["attention_rounds"], p["attention_batch"], grad=True)
        sample = bench_attention.run(p["attention_rounds"], p["attention_sample_batch"], grad=False)
        res["attention_routes"] = {"training": train, "sampling": sample}
        lines += ["", "**Attention routes on CPU** (`bench/bench_attention.py`: the explicit baddbmm/softmax/bmm route "
                  "and torch's flash kernel on the `small` UNet's attention shapes, interleaved, median process CPU "
                  "time per call; models/attend.py's `cpu_route` picks by these; training, then sampling):", "",
                  bench_attention.markdown(train, p["attention_batch"], True), "",
                  bench_attention.markdown(sample, p["attention_sample_batch"], False)]
    return res, "\n".join(lines)


def _rounds_reading(res: dict) -> str:
    """The spread of the bf16 GEMM rate and of the precision=bf16 step's gain over this run's rounds."""
    arm = next(a for a in bench_unet.PRECISION_ARMS if "precision=bf16" in a)
    text = []
    for r in res["rows"]:
        xs = r.get("rounds", [])
        if xs:
            g, s = [x["gemm_bf16"] for x in xs], [x[arm] for x in xs]
            text.append(f"On `{r['config']}` the bf16 GEMM rate over the rounds ran {min(g):.0f}–{max(g):.0f} GFLOP/s "
                        f"and the `precision=bf16` step's gain vs fp32 {min(s):.2f}–{max(s):.2f}×.")
    return " ".join(text)


KERNELS = ("convolution", "GEMM", "attention")  # bench_unet.CATEGORIES that are one oneDNN/MKL kernel call each


def _profile_reading(res: dict) -> str:
    """The op-by-op reading of the profile, from this run's numbers: what is kernel time, what is left."""
    return "\n\n".join(_profile_reading_one(r) for r in res["rows"] if r.get("profile"))


def _kernel_split(p: dict, goal: float) -> tuple:
    """From a profile by category (bench_unet.profile_breakdown): (total ms per arm, kernel ms per arm, latentforge's
    non-kernel rest, the ms latentforge must cut for `goal`× diffusers)."""
    tot = {arm: sum(c.values()) for arm, c in p.items()}
    ker = {arm: sum(v for c, v in cats.items() if c.startswith(KERNELS)) for arm, cats in p.items()}
    return tot, ker, tot["latentforge"] - ker["latentforge"], tot["latentforge"] - tot["diffusers"] / goal


def _profile_reading_one(r: dict) -> str:
    p, ops = r["profile"], r["profile_ops"]
    tot, ker, rest, need = _kernel_split(p, 1.2)
    per = {c: (p["latentforge"][c], p["diffusers"][c]) for c in p["latentforge"] if c.startswith(KERNELS)}
    conv = {arm: ops[arm].get("aten::convolution", {}).get("calls", 0) for arm in ops}
    text = (f"On `{r['config']}` the profiled step is {tot['latentforge']:.0f} ms (latentforge) vs "
            f"{tot['diffusers']:.0f} ms (diffusers): {tot['diffusers'] / tot['latentforge']:.2f}× in this profile, "
            f"{r['ratio_cpu']:.2f}× by the interleaved CPU-time medians above. Convolutions, GEMMs and the attention kernels "
            f"take {100 * ker['latentforge'] / tot['latentforge']:.0f} % of latentforge's step and "
            f"{100 * ker['diffusers'] / tot['diffusers']:.0f} % of diffusers' ("
            + ", ".join(f"{c.split(' (')[0]} {x:.0f} vs {y:.0f} ms" for c, (x, y) in per.items()) + "). ")
    if conv["diffusers"] != conv["latentforge"]:
        text += (f"diffusers runs {conv['diffusers'] - conv['latentforge']:+.0f} convolutions per step "
                 f"({conv['diffusers']:.0f} vs {conv['latentforge']:.0f}): its transformer blocks' proj_in/proj_out are "
                 "1×1 convolutions on (B, C, H, W), which latentforge runs as the GEMMs they are on (B, HW, C) tokens "
                 "(models/layers.py; the same FLOPs). ")
    text += ("Otherwise both call the same oneDNN/MKL convolution and GEMM kernels on the same shapes (same "
             "architecture, same FLOPs): that time is zero-sum between them; so is attention's: in fp32 both run "
             "torch's flash kernel (models/attend.py; latentforge zero-pads heads narrower than 16 channels on CPU, "
             "the same function through a faster kernel). What an fp32 eager-mode "
             f"change can still shrink is the rest: {rest:.0f} ms of latentforge's step (elementwise ops, copies, "
             "normalisation, AdamW). ")
    if need > 0:
        text += (f"1.2× diffusers' step needs {need:.0f} ms less per step, {100 * need / rest:.0f} % of that rest; "
                 f"with the rest at zero the step would be {tot['diffusers'] / ker['latentforge']:.2f}× diffusers'.")
    else:
        text += f"With the rest at zero the step would be {tot['diffusers'] / ker['latentforge']:.2f}× diffusers'."
    if abs(tot["diffusers"] / tot["latentforge"] / r["ratio_cpu"] - 1) > 0.1:
        text += (" The profile's ratio and the CPU-time ratio differ by more than 10 %: the machine's load changed "
                 "during the profiled steps, so read the profile's shares and call counts, and the CPU-time ratio for "
                 "the speed.")
    return text


def section_text2img(p: dict, device: str) -> tuple[dict, str]:
    r = bench_text2img.run(p["preset"], p["steps"], p["batch"], repeats=p["repeats"], warmup=p["warmup"], device=device)
    text = bench_text2img.markdown(r) + (
        f"\n\nSame model folder for both (written by latentforge, random `{r['preset']}` UNet + VAE, a 2-layer random "
        "CLIP text encoder with a character-level tokenizer); both decode to PIL. The images of the two pipelines from "
        f"the same starting noise differ by at most {r['max_abs_diff']:.1e} (in [0, 1]).")
    if r.get("profile"):
        res = {"rows": [{"config": f"{r['preset']} text→image", "profile": r["profile"], "profile_ops": r["profile_ops"]}]}
        text += ("\n\n**Where the time goes** (the profiler as in §1: self time of aten ops of one call of each "
                 "pipeline, after a warm-up call, scaled to CPU time):\n\n" + bench_unet.markdown_profile(res, "call")
                 + "\n\n" + bench_unet.markdown_ops(res, 12, "call") + "\n\n" + _t2i_profile_reading(r))
    return r, text


def _t2i_profile_reading(r: dict, goal: float = 1.3) -> str:
    """What the text→image profile says about the goal ratio, from this run's numbers (the profiled calls alone)."""
    tot, ker, rest, need = _kernel_split(r["profile"], goal)
    text = (f"In the profiled calls aten ops take {tot['latentforge']:.0f} ms (latentforge) vs {tot['diffusers']:.0f} ms "
            f"(diffusers), {tot['diffusers'] / tot['latentforge']:.2f}× (the timed rounds above: {r['ratio_cpu']:.2f}×). "
            f"Convolutions, GEMMs and the attention kernels take {ker['latentforge']:.0f} vs {ker['diffusers']:.0f} ms: "
            "the same UNet and VAE shapes through the same oneDNN/MKL kernels (attention: torch's flash kernel in "
            "both, models/attend.py), so that time is shared, not ours to cut. The rest of latentforge's aten time is "
            f"{rest:.0f} ms (elementwise, copies, normalisation, sampler arithmetic). ")
    if need > 0:
        text += (f"{goal}× diffusers needs {need:.0f} ms less per call, {100 * need / rest:.0f} % of that rest; with "
                 f"the rest at zero the call would be {tot['diffusers'] / ker['latentforge']:.2f}× diffusers'.")
    return text


def section_data(p: dict, device: str) -> tuple[dict, str]:
    r = bench_data_path.run(p["n"], p["size"], p["batch"], p["preset"], p["repeats"], p["warmup"], p["epoch_repeats"],
                            device)
    worst = max(a["ratio_cpu"] for k, a in r["steps"].items() if k != "model only")
    text = bench_data_path.markdown(r) + (
        f"\n\n{r['n']} shapes images at {r['size']} px cached with the `small` VAE and the default text encoder; "
        f"`{r['preset']}` UNet, batch {r['batch']}, main-process loading (no workers). The loader arms include the "
        "per-sample draws (t, ε, dropout coin) the training loop makes every step. Worst loader step / model-only "
        f"step (CPU time): **{worst:.3f}×** — goal ≤ 1.05× {'met' if worst <= 1.05 else 'NOT met'}.")
    b = bench_data_path.run_buckets(max(p["n"], 3 * p["batch"]), p["batch"], p["preset"], p["repeats"], p["warmup"],
                                    device)
    r["buckets"] = b
    text += ("\n\nWith aspect-ratio buckets (`cache --buckets`): " + f"{b['n']} shapes images drawn on 80x48, 48x80 "
             "and 64x64 canvases, cached in buckets of multiples of 16 px at the area 64²; every batch from one "
             "bucket (`BucketStream`); the model-only arm replays the same batches in the same order.\n\n"
             + bench_data_path.markdown_buckets(b) + "\n\nBucket stream step / model-only step (CPU time): "
             f"**{b['ratio_cpu']:.3f}×** — goal ≤ 1.05× {'met' if b['ratio_cpu'] <= 1.05 else 'NOT met'}.")
    return r, text


def section_threads(p: dict) -> tuple[dict, str]:
    r = bench_threads.run(p["preset"], p["batch"], p["steps"], p["rounds"])
    text = bench_threads.markdown(r) + (
        f"\n\n`{r['preset']}` UNet, batch {r['batch']}, {r['steps']} timed steps per arm and round, {r['rounds']} "
        f"round(s), one `while True: pass` process competing on this {r['cores']}-core machine (plus whatever else "
        f"ran: load average {r['load_at_end']:.1f} at the end). The default picks its thread count from the load "
        "average when it starts, so it counts processes that were already running.")
    return r, text


def section_quality(p: dict, model: str | None, origin: str, out_dir: Path, quick: bool, device: str) -> tuple[dict, str]:
    tmp = None
    if model is None:
        tmp = tempfile.TemporaryDirectory()
        model = str(bench_text2img.write_model(Path(tmp.name) / "model", "tiny"))
        origin = ("a RANDOM `tiny` model (" + ("quick mode" if quick else "no trained model folder existed when this "
                  "ran: no `runs/demo/model`, nothing under runs/") + ") — the accuracies below only show that the "
                  "benchmark runs; rerun `make bench` after `make demo`")
    cache = None if quick else str(out_dir / "steps_vs_quality.json")
    threads = torch.get_num_threads()
    torch.set_num_threads(p["threads"] or os.cpu_count())
    try:
        r = bench_steps_quality.run(model, steps=p["steps"], reference=p["reference"], cfg=p["cfg"], n=p["n"],
                                    prompts=p["prompts"], batch=p["batch"], device=device, cache=cache)
    finally:
        torch.set_num_threads(threads)
    plot = out_dir / "steps_vs_quality.png"
    bench_steps_quality.plot(r, str(plot))
    if tmp is not None:
        tmp.cleanup()
    text = (f"Model: {origin} (UNet sha256 `{r['fingerprint']}`). {r['prompts']} shapes prompts "
            f"({r['held_out_prompts']} held out) × {r['n']} image, CFG {r['cfg']}, the same starting noise for every "
            "point. The sampler sweep is computed in every run; the DDPM reference, where marked *cached*, was computed "
            "by an earlier run on the same weights and settings and read from "
            f"`{Path(cache).name if cache else '-'}`.\n\n" + bench_steps_quality.markdown(r)
            + _ddim_euler_note(r) + f"\n\n![steps vs quality]({plot.name})")
    return r, text


def _ddim_euler_note(r: dict) -> str:
    acc = lambda s: {p["steps"]: p["correct"] for p in r["points"] if p["sampler"] == s}  # noqa: E731
    ddim, euler = acc("ddim"), acc("euler")
    if ddim and ddim == euler:
        return ("\n\nDDIM (η = 0) and Euler get every image right or wrong alike at every step count: deterministic "
                "DDIM is Euler's method on the probability-flow ODE (Karras et al. 2022, Table 1).")
    return ""


NO_GPU = "not measurable here: no GPU"


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def _glance_training(raw: dict) -> list:
    """The training-step goals: the GEMM limit, bf16 ≥ 1.6× fp32 and its quality, fp32 ≥ 1.2× diffusers."""
    rows, unet = [], raw.get("unet", {})
    for r in unet.get("rows", []):
        rows.append([f"fp32 training step vs diffusers, `{r['config']}`", f"{r['ratio_cpu']:.2f}× (CPU time), "
                     f"{r['ratio_wall']:.2f}× (wall)", "≥ 1.2× (or the op-by-op explanation, §1)",
                     _verdict(r["ratio_cpu"] >= 1.2) + ("" if r["ratio_cpu"] >= 1.2 else
                                                        (" — explained op by op in §1" if r.get("profile") else ""))])
        for arm, a in r.get("precision", {}).items():
            if "precision=bf16" in arm:
                rows.append([f"bf16 training step vs fp32, `{r['config']}` (CPU)",
                             f"{a['vs_fp32_cpu']:.2f}× (CPU time), {a['vs_fp32_wall']:.2f}× (wall)", "≥ 1.6×",
                             _verdict(a["vs_fp32_cpu"] >= 1.6)])
        if "gemm_fraction" in r.get("latentforge", {}):
            rows.append([f"fp32 step's fraction of the measured fp32 GEMM rate, `{r['config']}`",
                         f"{r['latentforge']['gemm_fraction']:.0%} (diffusers {r['diffusers']['gemm_fraction']:.0%}); "
                         f"GEMM fp32 {unet['gemm_gflops']['fp32']:.0f} / bf16 {unet['gemm_gflops']['bf16']:.0f} GFLOP/s",
                         "reported", "reported"])
    q = raw.get("demo_precision")
    if q:
        rows.append(["bf16 demo quality: seen accuracy; final loss bf16 / fp32",
                     f"{q['bf16']['seen']['accuracy']:.3f}; {q['loss_ratio']:.3f}", "≥ 0.95; within 10 %",
                     _verdict(q["met"]) + " (two demo runs, §9)"])
    elif "demo_precision" in raw:
        rows.append(["bf16 demo quality", "no demo runs given", "≥ 0.95; within 10 %", "not measured in this run"])
    rows.append(["no host sync per step (GPU `set_sync_debug_mode('error')`, 20 steps)", "–", "raises nothing",
                 NO_GPU])
    return rows


def _glance_sampling(raw: dict) -> list:
    rows = []
    if "text2img" in raw:
        t = raw["text2img"]
        rows.append([f"text→image {t['steps']} steps vs StableDiffusionPipeline", f"{t['ratio_cpu']:.2f}× (CPU "
                     f"time), {t['ratio_wall']:.2f}× (wall); same images (max abs Δ {t['max_abs_diff']:.0e})", "≥ 1.3×",
                     _verdict(t["ratio_cpu"] >= 1.3) + ("" if t["ratio_cpu"] >= 1.3 or not t.get("profile")
                                                        else " — where the time goes: §2")])
        if "bf16" in t:
            b = t["bf16"]
            rows.append(["bf16 inference (UNet in bf16) vs fp32 latentforge", f"{b['vs_fp32_cpu']:.2f}× (CPU "
                         f"time); image Δ max {b['max_abs_diff']:.1e}, mean {b['mean_abs_diff']:.1e}",
                         "an option, difference reported", "reported"])
    if "quality" in raw:
        q = raw["quality"]
        ref = next((p for p in q["points"] if p["sampler"] == "ddpm"), None)
        dpm = next((p for p in q["points"] if p["sampler"] == "dpmpp-2m" and p["steps"] == 20), None)
        if ref and dpm:
            d = 100 * (dpm["scores"]["seen"]["all"]["accuracy"] - ref["scores"]["seen"]["all"]["accuracy"])
            rows.append([f"DPM++ 2M 20 steps vs DDPM {ref['steps']} steps (seen accuracy)", f"{d:+.1f} points",
                         "within 2 points", _verdict(d >= -2)])
    return rows


def _glance_rest(raw: dict, on_gpu: bool) -> list:
    rows = []
    if "threads" in raw:
        arms = raw["threads"]["arms"]
        default = next(a for k, a in arms.items() if k.startswith("latentforge default"))
        two = next(a for k, a in arms.items() if k.startswith("2 threads"))
        rows.append(["step with a competing busy process: default / 2 active threads / 1 thread",
                     f"{default['ms']:.0f} / {two['ms']:.0f} / {arms['1 thread']['ms']:.0f} ms",
                     "default not slower than 1 thread (paired by round, within 5 %)",
                     _verdict(default.get("paired_vs_one_thread", default["vs_one_thread"]) >= 0.95)])
    rows.append(["GPU bf16 step of the SD 1.5 UNet, MFU; LoRA step", "see §1" if on_gpu else "–", "MFU ≥ 45 %",
                 "" if on_gpu else NO_GPU])
    if raw.get("lora"):
        g = bench_lora.goal(raw["lora"])
        if g:
            rows.append([f"LoRA rank 16 vs full fine-tune (`{raw['lora']['preset']}` UNet): peak RSS; step CPU time",
                         f"{g['rss']:.2f}×; {g['cpu']:.2f}×", "≤ 0.4×; ≤ 0.8×", _verdict(g["met"])])
    if "data" in raw:
        d = raw["data"]
        worst = max(a["ratio_cpu"] for k, a in d["steps"].items() if k != "model only")
        rows.append(["loader step / model-only step", f"{worst:.3f}×", "≤ 1.05×", _verdict(worst <= 1.05)])
        if "buckets" in d:
            rows.append(["loader step / model-only step, aspect-ratio buckets", f"{d['buckets']['ratio_cpu']:.3f}×",
                         "≤ 1.05×", _verdict(d["buckets"]["ratio_cpu"] <= 1.05)])
        rows.append(["epoch on the fly / cached", f"{d['epoch']['ratio']:.0f}×", "≥ 5×", _verdict(d["epoch"]["ratio"] >= 5)])
    return rows


def summary(raw: dict, device: str = "cpu") -> str:
    """One line per benchmark goal (speed, LoRA memory, the data path), from this run."""
    rows = _glance_training(raw) + _glance_sampling(raw) + _glance_rest(raw, device.startswith("cuda"))
    return common.table(["goal", "this run", "target", "verdict"], rows)


def section_lora(p: dict, threads: int) -> tuple[dict, str]:
    r = bench_lora.run(p["preset"], p["steps"], p["ranks"], threads, p["subprocess"])
    return r, bench_lora.markdown(r)


def section_sdxl(p: dict, threads: int) -> tuple[dict, str]:
    r = bench_sdxl.run(p["preset"], p["steps"], p["rank"], threads, p["subprocess"])
    return r, bench_sdxl.markdown(r)


def section_demo_precision(runs: str | None, note: str = "") -> tuple[dict | None, str]:
    """bf16 training quality from two demo runs given with --demo-runs FP32,BF16 (not run by this script:
    a demo run takes ~15 min)."""
    if not runs:
        return None, ("No demo runs were given (`--demo-runs FP32_DIR,BF16_DIR`: the folders of `latentforge demo "
                      "--precision fp32` and `--precision bf16`), so bf16 training quality is not in this document.")
    if len(runs.split(",")) > 2:  # many runs: one row each (precision × seed × kernel setting)
        try:
            s = bench_demo_precision.spread(runs.split(","))
        except UserError as e:
            return None, f"The demo runs given with `--demo-runs` could not be read: {e}."
        return None, ("`latentforge demo` runs read back by `bench/bench_demo_precision.py` (not re-run by this "
                      "script)." + (f" {note}" if note else "") + "\n\n" + bench_demo_precision.spread_markdown(s))
    fp32, bf16 = runs.split(",")
    try:
        r = bench_demo_precision.compare(fp32, bf16)
    except UserError as e:  # e.g. a demo run that had not finished when this section ran
        return None, f"The demo runs given with `--demo-runs` could not be read: {e}."
    return r, ("`latentforge demo` run twice, `--precision fp32` and `--precision bf16` (the UNet stage; the VAE and "
               "all sampling run in fp32), read back by `bench/bench_demo_precision.py`; these two runs are not "
               "re-run by this script." + (f" {note}" if note else "") + "\n\n" + bench_demo_precision.markdown(r))


def section_finetune(p: dict, threads: int) -> tuple[list, str]:
    r = bench_finetune.run(p["preset"], p["steps"], threads, p["subprocess"])
    return r, bench_finetune.markdown(r, p["preset"], p["steps"], threads)


def section_gpu(device: str) -> str:
    if device.startswith("cuda"):
        return (f"Measured in §1 on {torch.cuda.get_device_name()}. To rerun: `.venv/bin/python bench/bench_unet.py "
                "--device cuda --dtype bf16 --configs sd15,small --steps-per-sample 10 --threads 0`.")
    return ("**No GPU was available for this run**, so the GPU points (the sync-debug check over 20 training "
            "steps, the bf16 step of the SD 1.5-size UNet with its MFU, the LoRA step on a GPU) are not measured here. "
            "`make bench-gpu` (`bench/gpu_check.sh`) measures them on one H100/H200 in about 8 minutes and prints "
            "a markdown section for this document; no GPU has run it yet.")


# Run in this order (the document orders them by number): steps vs quality, whose DDPM reference may still be
# computing (or cached) by a separate bench_steps_quality.py run, and the demo runs come last.
SECTIONS = ("unet", "text2img", "data", "gpu", "lora", "finetune", "threads", "sdxl", "quality", "demo_precision")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/BENCHMARKS.md")
    ap.add_argument("--model", default=None, help="trained text-to-image model for steps vs quality "
                                                  "(default: runs/demo/model, else the newest runs/*/model)")
    ap.add_argument("--model-note", default="", help="where the --model folder came from (written into the document)")
    ap.add_argument("--demo-runs", default=None, help="FP32_DIR,BF16_DIR: two `latentforge demo` runs "
                                                      "(--precision fp32 / bf16) for the bf16 quality section")
    ap.add_argument("--demo-note", default="", help="how the --demo-runs came about (written into the document)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(bench_unet.DTYPES))
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the timed sections (0 = torch's default)")
    ap.add_argument("--quality-threads", type=int, default=0,
                    help="torch threads for the (untimed) steps-vs-quality section (0 = every core)")
    ap.add_argument("--sizes", choices=list(SIZES), default="full",
                    help="full: `make bench`; reduced: the same sections and arms with fewer timed rounds and steps "
                         "(14–19 min on one thread here); quick: tiny sizes, numbers mean nothing")
    ap.add_argument("--quick", action="store_true", help="= --sizes quick (the smoke test)")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--reference-steps", type=int, default=None,
                    help="DDPM reference steps for steps-vs-quality (default 1000; 0 = none). A new model's 1000-step "
                         "reference takes ~15 min on 2 cores, once: it is cached next to --out for later runs")
    ap.add_argument("--json", default=None, help="also write every raw result here")
    return ap


def _runners(args, sizes: dict, out: Path) -> dict:
    """Section name -> a function returning (raw result, markdown)."""
    threads = max(args.threads, 1)
    quality = dict(sizes["quality"], threads=1 if args.quick else args.quality_threads)
    if args.reference_steps is not None:
        quality["reference"] = args.reference_steps or None
    # --quick never picks up a trained model from runs/ (the smoke test stays hermetic)
    model, origin = find_model(args.model) if (args.model or not args.quick) else (None, "")
    origin += f" — {args.model_note}" if args.model_note and model else ""
    return {
        "unet": lambda: section_unet(sizes["unet"], args.device, args.dtype),
        "text2img": lambda: section_text2img(sizes["text2img"], args.device),
        "data": lambda: section_data(sizes["data"], args.device),
        "quality": lambda: section_quality(quality, model, origin, out.parent, args.quick, args.device),
        "gpu": lambda: (None, section_gpu(args.device)),
        "lora": lambda: section_lora(sizes["lora"], threads),
        "finetune": lambda: section_finetune(sizes["finetune"], threads),
        "threads": lambda: section_threads(sizes["threads"]),
        "demo_precision": lambda: section_demo_precision(args.demo_runs, args.demo_note),
        "sdxl": lambda: section_sdxl(sizes["sdxl"], threads),
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.sizes = "quick"
    args.quick = args.sizes == "quick"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    common.set_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wanted = [s for s in SECTIONS if s in set(args.sections.split(","))]
    info = common.machine(args.device)
    t_start, raw, parts = time.perf_counter(), {}, {}
    runners = _runners(args, SIZES[args.sizes], out)
    for name in wanted:
        t = time.perf_counter()
        print(f"== {name}", file=sys.stderr)
        raw[name], text = runners[name]()
        parts[name] = f"{text}\n\n*Section time: {time.perf_counter() - t:.0f} s.*"
        done = name == wanted[-1]
        minutes = (time.perf_counter() - t_start) / 60  # the document is rewritten after every section
        out.write_text(document(info, parts, minutes, args, argv, summary(raw, args.device), done))
        if args.json:
            Path(args.json).write_text(json.dumps(raw, indent=1, default=str))
    print(f"wrote {out} ({(time.perf_counter() - t_start) / 60:.1f} min)", file=sys.stderr)
    return 0


SIZE_NOTES = {
    "full": "",
    "reduced": ("**Reduced sizes** (`--sizes reduced`): every section and arm of `make bench`, with fewer timed rounds "
                "and steps — 3 interleaved rounds instead of 5 in §2–§3 (§1 keeps 5), 1 timed step instead of 3 in "
                "§7 and of 2 in §6, samplers at 5, 10 and 20 steps (not 40) in §4 — for a run that has to fit in "
                "less time (on this 2-core machine: about 16 min on one thread at load ≈ 1). "
                "Read the paired CPU-time ratios; medians of 3 are noisier than of 5."),
    "quick": "**QUICK MODE: tiny sizes, the numbers mean nothing.**",
}


def document(info: dict, parts: dict, minutes: float, args, argv, at_a_glance: str, done: bool = True) -> str:
    cmd = ".venv/bin/python bench/run_all.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    load = os.getloadavg()[0]
    head = [
        "# Benchmarks: latentforge side by side with diffusers",
        "",
        "Generated by `make bench`; do not edit by hand. " + SIZE_NOTES[args.sizes],
        "",
        f"- Command: `{cmd.strip()}`",
        f"- Date: {info['date']}; whole run: {minutes:.1f} min"
        + ("" if done else f" so far — **RUN IN PROGRESS: {len(parts)} section(s) written**"),
        "",
        "## At a glance",
        "",
        at_a_glance,
        "",
        "## Machine",
        "",
        common.table(["", ""], [[k, v] for k, v in info.items() if k != "date"] +
                     [["load average (1 min) at the end", f"{load:.1f}"]]),
        "",
        "**Caveat: the machine's load.** Other processes shared these 2 cores with the benchmark at times (the load "
        "averages above were sampled), so wall-clock times can be inflated and noisy. That is why every comparison runs its arms "
        "interleaved in one process, and why each table also gives throughput by *process CPU time* (user + system "
        "time of this process; a core taken by someone else does not count) — with one torch thread that is the "
        "steadier measure of the work each library does. Ratios, not absolute times, are the result.",
        "",
        "## How it is measured",
        "",
        "- **Interleaved**: the arms of a comparison run A, B, A, B, … in one process, after warm-up rounds; "
        "reported: the median per arm, the ratio of the medians, and the *paired ratio* (median over rounds of "
        "the ratio of the two back-to-back samples, which cancels load that changes between rounds).",
        f"- **Threads**: torch runs {info['torch threads']} intra-op thread(s) (`--threads`), so a stolen core shows "
        "up as wall time, not as CPU time.",
        "- **Same weights, same inputs**: latentforge writes the weights (diffusers layout) and diffusers loads them; "
        "the forward outputs (or images) are compared before timing (`max abs Δ`).",
        "- **Peak memory** (training step): each arm alone in a fresh subprocess, started with "
        "`MALLOC_MMAP_THRESHOLD_=65536` so glibc hands freed tensors back to the OS at once (RSS then tracks live "
        "tensors); after one warm-up step the kernel's peak-RSS mark is reset (`echo 5 > /proc/self/clear_refs`) and "
        "the peak over two more steps minus the RSS before them is reported: activations, gradients and temporaries "
        "of a step, above the weights and AdamW state that stay resident (identical for both: same parameters). "
        "tracemalloc does not see torch's allocations; on CUDA the script uses `torch.cuda.max_memory_allocated`.",
        "- **FLOPs**: `torch.utils.flop_counter.FlopCounterMode` over forward + backward on the meta device "
        "(attention counted as its matmuls); GFLOP/s = FLOPs per image × images/s (wall).",
        "",
    ]
    titles = {"unet": "1. UNet training step (forward + backward + AdamW)",
              "text2img": "2. Text→image vs StableDiffusionPipeline", "data": "3. The data path",
              "quality": "4. Steps vs quality", "gpu": "5. GPU",
              "lora": "6. LoRA vs full fine-tune (sd15-size UNet, CPU; bench/bench_lora.py)",
              "finetune": "7. Fine-tuning step: the SD 1.5-size UNet on this CPU (bench/bench_finetune.py)",
              "threads": "8. Threads with a competing busy process",
              "demo_precision": "9. bf16 training quality: the demo in fp32 and bf16",
              "sdxl": "10. SDXL-size UNet: the LoRA step on this CPU (bench/bench_sdxl.py)"}
    body = []
    for key, title in titles.items():
        if key in parts:
            body += [f"## {title}", "", parts[key], ""]
    return "\n".join(head + body)


if __name__ == "__main__":
    sys.exit(main())
