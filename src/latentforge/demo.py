"""The one-command demo: the whole flow on the built-in shapes data set, on a laptop CPU.

    shapes.write_dataset ─▶ train.vae.train_vae ─▶ data.cache.build_cache ─▶ train.loop.train
        ─▶ pipelines.Pipeline (text→image grid, image→image, inpainting) ─▶ evaluate.evaluate_shapes

Every stage is a call into the library (no copies), with its own progress bar. The sizes
(demo_budgets.py) were tuned on a shared 2-core CPU so that `--budget full` finishes in about 10 minutes on
one core with a bf16 UNet (578 s measured on an otherwise idle 2-core machine, 767 s beside another busy
process; 1,020 s in fp32) and the model follows ≥ 80 % of seen prompts on all four attributes (README,
report.md).
`--budget tiny` runs every stage for a few steps (the end-to-end test).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from . import evaluate, io
from .data import shapes
from .data.cache import LatentDataset, build_cache
from .demo_budgets import BUDGETS, PRECISIONS, Budget
from .errors import UserError
from .metrics.adherence import markdown_table
from .models import AutoencoderKL
from .pipelines import Pipeline
from .text import TextEncoder
from .threads import default_threads
from .train.loop import train
from .train.precision import NATIVE_BF16_FLAGS, cpu_native_bf16
from .train.report import read_metrics, smooth
from .train.vae import train_vae


class Stages:
    """Wall time of each named stage, printed as it goes."""

    def __init__(self, total: int):
        self.total, self.seconds, self._t0 = total, {}, time.perf_counter()

    def __call__(self, name: str):
        stages = self

        class _Stage:
            def __enter__(self):
                print(f"\n[{len(stages.seconds) + 1}/{stages.total}] {name}", flush=True)
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                stages.seconds[name] = time.perf_counter() - self.t

        return _Stage()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self._t0


def choose_precision(requested: str = "auto", cuda: bool | None = None, native: str | None = "?") -> tuple:
    """(precision of the UNet training, the reason in words). `auto` is fp32 everywhere: bf16 training (bf16
    compute copy, fp32 masters) is faster on a CPU with native bf16 instructions, but it is not shown to keep the
    demo's accuracy on every such processor (docs/PRECISION.md), so it is only ever chosen by name."""
    if requested not in PRECISIONS:
        raise UserError(f"--precision: unknown {requested!r} — use one of {', '.join(PRECISIONS)}")
    native = cpu_native_bf16() if native == "?" else native
    if requested == "bf16" and not (cuda if cuda is not None else torch.cuda.is_available()) and not native:
        return "bf16", (f"chosen with --precision bf16 (this CPU has no native bf16 instructions, "
                        f"{' / '.join(NATIVE_BF16_FLAGS)}: expect it slower than fp32)")
    if requested != "auto":
        return requested, f"chosen with --precision {requested}"
    faster = f" (--precision bf16 trains the UNet faster on this CPU, {native})" if native else ""
    return "fp32", ("auto: fp32 — bf16 training is not shown to keep the demo's accuracy on every processor "
                    f"(docs/PRECISION.md){faster}")


def run_demo(out: str | os.PathLike = "runs/demo", budget: str = "full", threads: int | None = None,
             precision: str = "auto", seed: int = 0) -> dict:
    """Run every stage into `out`; returns the summary also written to `out`/demo.json. `seed` draws the data
    set, both models' initial weights and their training noise (the evaluation's draws stay fixed)."""
    if budget not in BUDGETS:
        raise UserError(f"--budget: unknown {budget!r} — use one of {', '.join(BUDGETS)}")
    b = BUDGETS[budget]
    b = replace(b, seed=b.seed + seed, vae=replace(b.vae, seed=b.vae.seed + seed),
                unet=replace(b.unet, seed=b.unet.seed + seed))
    precision, why = choose_precision(precision)
    out = Path(out)
    _prepare(out)
    torch.set_num_threads(threads or default_threads())  # threads.py: the cores not already busy
    stages = Stages(total=6)

    with stages("shapes data set"):
        shapes.write_dataset(str(out / "data"), b.images, size=b.image_size, seed=b.seed)
    with stages("VAE"):
        trained = train_vae(b.vae, out / "data", out / "vae")
        if trained.stopped:  # the demo starts afresh each time: a stopped stage ends it
            raise KeyboardInterrupt
        vae_dir = trained.vae_dir
    with stages("latent cache"):
        vae = AutoencoderKL.from_pretrained(vae_dir).eval().requires_grad_(False)
        text = TextEncoder.from_pretrained("default", max_length=b.text_max_length)
        print(build_cache(str(out / "data"), vae, text, str(out / "cache"), size=b.image_size, batch_size=64))
        dataset = LatentDataset(str(out / "cache"))
    with stages("UNet"):
        torch.set_grad_enabled(True)
        train(replace(b.unet, vae_path=str(vae_dir), precision=precision), dataset, out / "unet", vae=vae, text_encoder=text)
    pipe = Pipeline.from_pretrained(out / "unet" / "model")
    options = dict(sampler=b.sampler, steps=b.steps, cfg=b.cfg)
    with stages("samples"):
        write_samples(pipe, out, b, options)
    with stages("evaluation"):
        generate = evaluate.pipeline_generator(pipe, **options)
        result = evaluate.evaluate_shapes(generate, out / "eval", n=b.eval_images_per_prompt, seed=1000,
                                          settings={**options, "model": str(out / "unet" / "model")})
    summary = {"budget": budget, "seconds": {k: round(v, 1) for k, v in stages.seconds.items()},
               "wall_seconds": round(stages.wall, 1), "scores": result["scores"], "sampling": options,
               "threads": torch.get_num_threads(), "precision": precision, "precision_reason": why, "seed": seed,
               "kernels": {k: os.environ[k] for k in KERNEL_SWITCHES if k in os.environ}}
    io.write_text(out / "demo.json", json.dumps(summary, indent=1) + "\n")
    write_loss_plot(out)
    write_report(out, b, summary)
    return summary


# The environment switches that choose CPU kernels (tests/kernel_settings.py): recorded with each run's accuracy.
KERNEL_SWITCHES = ("MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")

DEMO_MARKER = ".latentforge-demo"  # written first into every demo folder: only such a folder is ever replaced


def _prepare(out: Path) -> None:
    """A fresh output folder; an old demo run there (finished or not) is replaced, anything else is refused —
    a folder of the user's that merely has a data/ sub-folder is never deleted."""
    io.check_out_dir(out)
    if out.exists() and any(out.iterdir()):
        if not (out / DEMO_MARKER).is_file() and not (out / "demo.json").is_file():
            raise UserError(f"--out {out}: exists and is not a demo folder (no {DEMO_MARKER}, no demo.json) — "
                            "pass a new or empty folder")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    io.write_text(out / DEMO_MARKER, "written by `latentforge demo`; `demo --out` replaces this folder\n")


# ---- the pictures ---------------------------------------------------------------------------


def grid_prompts(n: int = 24) -> list:
    """All held-out combinations plus seen ones spread over the grammar: n prompts in total."""
    prompts = evaluate.shapes_prompts()
    held = [p for p in prompts if p.held_out]
    seen = [p for p in prompts if not p.held_out]
    step = max(1, len(seen) // (n - len(held)))
    chosen = seen[::step][: n - len(held)] + held
    return sorted(chosen, key=lambda p: prompts.index(p))


def write_samples(pipe, out: Path, b: Budget, options: dict) -> None:
    """grid.png (text→image, held-out marked), img2img.png and inpaint.png."""
    prompts = grid_prompts()
    images = [pipe.text2img(p.caption, seed=7, progress=False, **options)[0] for p in prompts]
    io.save_image(evaluate.caption_grid(images, [p.caption for p in prompts], [p.held_out for p in prompts],
                          cols=8), out / "grid.png")

    # image→image: a seen image from the data set, changed towards another colour and shape.
    source = shapes.render({"colour": "blue", "shape": "square", "position": "top left", "background": "white"},
                           b.image_size)
    target = "a yellow circle at the top left on a white background"
    outs = [pipe.img2img(source, target, strength=s, seed=3, progress=False, **{**options, "cfg": b.img2img_cfg})[0]
            for s in b.img2img_strengths]
    io.save_image(evaluate.caption_grid([source] + outs, ["input: a blue square"] + [f"strength {s}" for s in b.img2img_strengths],
                          cols=len(outs) + 1), out / "img2img.png")
    io.write_text(out / "img2img.txt", f"prompt: {target}\nCFG: {b.img2img_cfg}\n")

    # inpainting: repaint the bottom-right quadrant of an image, asking for a shape there.
    base = shapes.render({"colour": "red", "shape": "circle", "position": "top left", "background": "black"},
                         b.image_size)
    mask = Image.new("L", base.size, 0)
    s = b.image_size
    ImageDraw.Draw(mask).rectangle((s // 2, s // 2, s - 1, s - 1), fill=255)
    prompt = "a green square at the bottom right on a black background"
    painted = [pipe.inpaint(base, mask, prompt, seed=i, progress=False, **options)[0] for i in range(3)]
    io.save_image(evaluate.caption_grid([base, mask.convert("RGB")] + painted,
                          ["input", "mask (white = repaint)"] + [f"seed {i}" for i in range(3)],
                          cols=5), out / "inpaint.png")
    io.write_text(out / "inpaint.txt", f"prompt: {prompt}\n")


def write_loss_plot(out: Path) -> None:
    """loss.png: the VAE's and the UNet's training loss side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    for ax, run, title in zip(axes, ("vae", "unet"), ("VAE: L1 + β·KL", "UNet: ε-prediction MSE")):
        rows = [r for r in read_metrics(out / run / "metrics.jsonl") if isinstance(r.get("loss"), float)]
        steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
        ax.plot(steps, losses, alpha=0.3)
        ax.plot(steps, smooth(losses, max(1, len(losses) // 20)))
        ax.set(title=title, xlabel="step", ylabel="loss", yscale="log")
    fig.tight_layout()
    io.save_figure(fig, out / "loss.png")
    plt.close(fig)


# ---- the report -----------------------------------------------------------------------------


def write_report(out: Path, b: Budget, summary: dict) -> None:
    s = summary["scores"]
    seen, held = s["seen"]["all"], s.get("held_out", {}).get("all")
    lines = [
        "# latentforge demo", "",
        f"Budget `{summary['budget']}`: {b.images} shapes images of {b.image_size}x{b.image_size} px; "
        f"VAE {b.vae.max_steps} steps; UNet {b.unet.max_steps} steps of batch {b.unet.batch_size}; "
        f"sampling {b.sampler}, {b.steps} steps, CFG {b.cfg}; {summary['threads']} CPU threads; "
        f"seed {summary.get('seed', 0)}.", "",
        f"UNet training precision: **{summary['precision']}**"
        + (" (bf16 compute copy, fp32 master weights and AdamW state)" if summary["precision"] == "bf16" else "")
        + f" — {summary['precision_reason']}. The VAE trains and all sampling runs in fp32.", "",
        "## Prompt adherence", "",
        f"All four attributes right on **seen** combinations: **{seen['accuracy']:.3f}** "
        f"(95 % CI {seen['low']:.3f}–{seen['high']:.3f}, n = {seen['n']}).",
    ]
    if held:
        lines.append(f"On **held-out** combinations (never in training): **{held['accuracy']:.3f}** "
                     f"(95 % CI {held['low']:.3f}–{held['high']:.3f}, n = {held['n']}).")
    lines += ["", markdown_table(s), "", "## Time per stage", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in summary["seconds"].items()]
    lines += [f"| **total (wall)** | **{summary['wall_seconds']:.1f}** |", "",
              "## Files", "",
              "| file | what |", "|---|---|",
              "| grid.png | text→image for 24 prompts; red border = held-out combination |",
              "| img2img.png | image→image: the input, then increasing strength (prompt in img2img.txt) |",
              "| inpaint.png | inpainting the bottom-right quadrant (prompt in inpaint.txt) |",
              "| loss.png | VAE and UNet training loss |",
              "| eval/ | eval.json (every image's target and analysis), eval.md, eval_grid.png (all 96 prompts) |",
              "| unet/model/ | the trained model, diffusers layout: `latentforge sample --model runs/demo/unet/model` |",
              "| vae/, unet/ | the two training runs (config.toml, metrics.jsonl, report.md, logs/) |",
              "| data/, cache/ | the shapes data set and its latent cache |", "",
              "![samples](grid.png)", "", "![loss](loss.png)", ""]
    io.write_text(out / "report.md", "\n".join(lines))
