"""Steps vs quality: shapes prompt adherence against sampling steps for DDIM, Euler and DPM++ 2M,
with DDPM at 1000 steps as the reference. Writes a table and a PNG plot.

Every point generates one image per prompt (`--n`) for the shapes prompts, from the SAME starting
noise per (prompt, seed) for every sampler and step count (a paired comparison: differences between
points come from the sampler, not from different noise), through latentforge's `Pipeline`, and
reads them back with `data.shapes.analyse`. Accuracy = all four attributes right, on the seen
combinations (held-out ones are reported separately), with a 95 % Wilson interval.

The expensive reference (DDPM, 1000 steps: ~4-15 min on 2 cores) is cached in a JSON file
(`--cache`) keyed by the model's weights (sha256 of `unet/`), steps, CFG, n, seed and prompts, so it
is computed once and reused while the model is unchanged; the sampler sweep is always recomputed.
The document says which points came from the cache.

    .venv/bin/python bench/bench_steps_quality.py --model runs/demo/model [--steps 5,10,20,50] [--n 1]
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

from latentforge.data import shapes  # noqa: E402
from latentforge.errors import UserError  # noqa: E402
from latentforge.evaluate import shapes_prompts  # noqa: E402
from latentforge.metrics import adherence  # noqa: E402
from latentforge.data.images import to_pil  # noqa: E402
from latentforge.pipelines import Pipeline  # noqa: E402

SAMPLERS = ("ddim", "euler", "dpmpp-2m")
NAMES = {"ddim": "DDIM", "euler": "Euler", "dpmpp-2m": "DPM++ 2M", "ddpm": "DDPM"}


class BatchedPipeline(Pipeline):
    """`Pipeline` whose text2img also takes a list of prompts: one image per prompt, one sampler call."""

    def _conditions(self, prompt, negative_prompt, class_label, n):
        if not isinstance(prompt, (list, tuple)):
            return super()._conditions(prompt, negative_prompt, class_label, n)
        ctx, mask = self.text_encoder.encode(list(prompt))  # (n, L, D), (n, L)
        nctx, nmask = self.text_encoder.encode([negative_prompt or ""] * n)
        cond, uncond = {"context": ctx}, {"context": nctx}
        if self.use_context_mask:
            cond["context_mask"], uncond["context_mask"] = mask, nmask
        return cond, uncond


def load(model: str, device: str) -> BatchedPipeline:
    pipe = BatchedPipeline.from_pretrained(model, device=device)
    if pipe.text_encoder is None:
        raise UserError(f"--model {model}: has no text encoder — the shapes benchmark needs a text-to-image model")
    return pipe


def start_noise(pipe: Pipeline, seeds: Sequence[int]) -> torch.Tensor:
    """(n, C, h, w): image i starts from N(0, I) drawn with seeds[i], as `Pipeline` draws it."""
    C, f = pipe.unet.config.in_channels, pipe.vae.downsample_factor
    W, H = pipe.default_size
    return torch.cat([torch.randn((1, C, H // f, W // f), generator=torch.Generator().manual_seed(s)) for s in seeds])


def generator(pipe: BatchedPipeline, sampler: str, steps: int, cfg: float):
    def generate(captions: List[str], seeds: List[int]):
        latents = pipe.text2img(list(captions), negative_prompt="", sampler=sampler, steps=steps, cfg=cfg,
                                seed=seeds[0], n=len(captions), latents=start_noise(pipe, seeds), output="latent",
                                progress=False)
        with torch.no_grad():
            return to_pil(pipe.vae.decode(latents).float())

    return generate


def fingerprint(model: str) -> str:
    h = hashlib.sha256()
    for p in sorted((Path(model) / "unet").iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def point(pipe, sampler: str, steps: int, cfg: float, n: int, seed: int, prompts, batch: int) -> dict:
    t0 = time.perf_counter()
    scores, records = adherence.run_benchmark(generator(pipe, sampler, steps, cfg), shapes.analyse, prompts, n=n,
                                              seed=seed, batch_size=batch)
    correct = [int(all(r["predicted"].get(a) == v for a, v in r["target"].items())) for r in records]
    return {"sampler": sampler, "steps": steps, "scores": scores, "correct": correct,
            "held_out": [int(r["held_out"]) for r in records], "seconds": round(time.perf_counter() - t0, 1),
            "computed": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def run(model: str, samplers: Sequence[str] = SAMPLERS, steps: Sequence[int] = (5, 10, 20, 50),
        reference: Optional[int] = 1000, cfg: Optional[float] = None, n: int = 1, seed: int = 0,
        prompts: int = 96, batch: int = 48, device: str = "cpu", cache: Optional[str] = None) -> dict:
    pipe = load(model, device)
    cfg = float(cfg if cfg is not None else 5.0)
    ps = shapes_prompts()
    ps = ps[:: max(1, len(ps) // prompts)][:prompts]
    key_base = f"{fingerprint(model)}|cfg={cfg}|n={n}|seed={seed}|prompts={len(ps)}"
    store = json.loads(Path(cache).read_text()) if cache and Path(cache).is_file() else {}
    jobs = [(s, k) for s in samplers for k in steps] + ([("ddpm", reference)] if reference else [])
    points = []
    for sampler, k in jobs:
        key = f"{key_base}|{sampler}|{k}"
        if sampler == "ddpm" and key in store:  # only the expensive reference is ever reused
            points.append(dict(store[key], from_cache=True))
            continue
        p = point(pipe, sampler, k, cfg, n, seed, ps, batch)
        points.append(dict(p, from_cache=False))
        if cache and sampler == "ddpm":
            store[key] = p
            Path(cache).write_text(json.dumps(store, indent=0) + "\n")
    return {"model": str(model), "fingerprint": key_base.split("|")[0], "cfg": cfg, "n": n, "seed": seed,
            "prompts": len(ps), "held_out_prompts": sum(p.held_out for p in ps), "reference": reference,
            "points": points}


def _acc(p: dict, split: str = "seen") -> Optional[dict]:
    return p["scores"].get(split, {}).get("all")


def markdown(r: dict) -> str:
    ref = next((p for p in r["points"] if p["sampler"] == "ddpm"), None)
    rows = []
    for p in r["points"]:
        seen, held = _acc(p), _acc(p, "held_out")
        delta = f"{100 * (seen['accuracy'] - _acc(ref)['accuracy']):+.1f}" if ref is not None and p is not ref else "–"
        rows.append([NAMES[p["sampler"]], p["steps"], f"{seen['accuracy']:.3f} [{seen['low']:.2f}, {seen['high']:.2f}]",
                     delta, f"{held['accuracy']:.3f} (n={held['n']})" if held else "–", p["seconds"],
                     "cached " + p["computed"] if p["from_cache"] else "this run"])
    ref_name = f"DDPM-{ref['steps']}" if ref is not None else "reference"
    out = [common.table(["sampler", "steps", "seen: all-attribute accuracy [95 % CI]", f"Δ vs {ref_name} (points)",
                         "held-out accuracy", "seconds", "computed"], rows)]
    goal = _goal(r)
    if goal:
        out += ["", goal]
    return "\n".join(out)


def _goal(r: dict) -> str:
    ref = next((p for p in r["points"] if p["sampler"] == "ddpm"), None)
    dpm = next((p for p in r["points"] if p["sampler"] == "dpmpp-2m" and p["steps"] == 20), None)
    if ref is None or dpm is None:
        return ""
    d = 100 * (_acc(dpm)["accuracy"] - _acc(ref)["accuracy"])
    verdict = "met" if d >= -2 else "NOT met"
    return (f"Goal (DPM++ 2M at 20 steps within 2 points of DDPM at {ref['steps']} steps): Δ = {d:+.1f} points — "
            f"**{verdict}**.")


def plot(r: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
    styles = {"ddim": dict(marker="s", linestyle="--", markersize=8, markerfacecolor="none"),
              "euler": dict(marker="o"), "dpmpp-2m": dict(marker="^")}  # DDIM open + dashed: it may hide under Euler
    for s in [s for s in SAMPLERS if any(p["sampler"] == s for p in r["points"])]:
        pts = sorted((p["steps"], _acc(p)) for p in r["points"] if p["sampler"] == s)
        xs, ys = [k for k, _ in pts], [a["accuracy"] for _, a in pts]
        ax.plot(xs, ys, label=NAMES[s], **styles[s])
        ax.fill_between(xs, [a["low"] for _, a in pts], [a["high"] for _, a in pts], alpha=0.12)
    ref = next((p for p in r["points"] if p["sampler"] == "ddpm"), None)
    if ref is not None:
        a = _acc(ref)["accuracy"]
        ax.axhline(a, color="k", linestyle="--", label=f"DDPM {ref['steps']} steps")
        ax.axhspan(a - 0.02, a + 0.02, color="k", alpha=0.08, label="± 2 points")
    ax.set_xscale("log")
    ticks = sorted({p["steps"] for p in r["points"] if p["sampler"] != "ddpm"})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("sampling steps")
    ax.set_ylabel("all-attribute accuracy (seen)")
    ax.set_ylim(0, 1.03)
    ax.set_title(f"shapes adherence vs steps (CFG {r['cfg']}, {r['prompts']} prompts × {r['n']})", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="runs/demo/model", help="a text-to-image model folder (diffusers layout)")
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--steps", default="5,10,20,50")
    p.add_argument("--reference-steps", type=int, default=1000, help="DDPM reference steps (0 = none)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default 5.0, the pipeline's)")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--prompts", type=int, default=96, help="use this many of the 96 shapes prompts (evenly spaced)")
    p.add_argument("--batch", type=int, default=48, help="images per sampler call")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--cache", default=None, help="JSON file of per-point results reused while the model is unchanged")
    p.add_argument("--plot", default=None, help="write the PNG plot here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    common.set_threads(args.threads)
    try:
        steps = [int(s) for s in args.steps.split(",") if s]
    except ValueError:
        raise UserError(f"--steps {args.steps!r}: expected comma-separated integers, e.g. 5,10,20,50") from None
    if not (Path(args.model) / "model_index.json").is_file():
        print(f"error: --model {args.model}: not a model folder (no model_index.json) — pass e.g. runs/demo/model",
              file=sys.stderr)
        return 2
    r = run(args.model, [s for s in args.samplers.split(",") if s], steps, args.reference_steps or None, args.cfg,
            args.n, args.seed, args.prompts, args.batch, args.device, args.cache)
    if args.plot:
        plot(r, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))
    print(markdown(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
