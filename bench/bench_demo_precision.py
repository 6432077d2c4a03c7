"""bf16 training quality on the demo: two `latentforge demo` runs, fp32 and `--precision bf16`, side by side.

Reads what each run wrote (eval/eval.json: adherence; unet/metrics.jsonl: the logged training loss; demo.json, where
present: the stage times)
and checks the quality goal for `precision=bf16`: all-attribute adherence on seen prompts ≥ 0.95 and the
final UNet training loss within 10 % of fp32's. "Final" = the mean of the last `n` logged losses (the same n for
both runs), so one noisy log step does not decide. Nothing is timed here; the two runs are given.

    .venv/bin/python bench/bench_demo_precision.py runs/demo-fp32 runs/demo-bf16 [--n 10]
    .venv/bin/python bench/bench_demo_precision.py RUN RUN RUN ...      # one row per run: precision × seed × kernels
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as common  # noqa: E402

from latentforge.errors import UserError  # noqa: E402
from latentforge.train.report import read_metrics  # noqa: E402


SAME = ("sampler", "steps", "cfg")  # evaluation settings both runs must share


def read_run(folder: str | Path, n: int) -> dict:
    """One run: the adherence from its evaluation (eval/eval.json, which `latentforge demo` writes, as does
    `latentforge eval --out RUN/eval`), the logged UNet losses, the precision from unet/config.toml, and the UNet
    stage's seconds where demo.json has them."""
    folder = Path(folder)
    for need in ("eval/eval.json", "unet/metrics.jsonl", "unet/config.toml"):
        if not (folder / need).is_file():
            raise UserError(f"{folder}: no {need} — give the folder of a finished `latentforge demo` run")
    ev = json.loads((folder / "eval" / "eval.json").read_text())
    demo = json.loads((folder / "demo.json").read_text()) if (folder / "demo.json").is_file() else {}
    losses = [r["loss"] for r in read_metrics(folder / "unet" / "metrics.jsonl") if isinstance(r.get("loss"), float)]
    config = (folder / "unet" / "config.toml").read_text()
    precision = next((line.split("=")[1].strip().strip('"') for line in config.splitlines()
                      if line.startswith("precision")), "fp32")
    return {"folder": str(folder), "precision": precision, "seen": ev["scores"]["seen"]["all"],
            "held_out": ev["scores"].get("held_out", {}).get("all"), "unet_s": demo.get("seconds", {}).get("UNet"),
            "final_loss": statistics.mean(losses[-n:]), "logged": len(losses),
            "eval": {**{k: ev.get("settings", {}).get(k) for k in SAME}, "seed": ev.get("seed"),
                     "images_per_prompt": ev.get("images_per_prompt")}}


def spread(folders, n: int = 10) -> dict:
    """Many demo runs (precision × seed × kernel setting): one row each, and per precision the lowest and the
    mean seen accuracy, so a default's worst case is visible, not only one run's."""
    runs = []
    for folder in folders:
        r = read_run(folder, n)
        demo = json.loads((Path(folder) / "demo.json").read_text()) if (Path(folder) / "demo.json").is_file() else {}
        kernels = {k: v for k, v in demo.get("kernels", {}).items() if k != "MKL_CBWR"}
        r.update(seed=demo.get("seed", 0), kernels=" ".join(f"{k}={v}" for k, v in kernels.items()) or "default")
        runs.append(r)
    by = {}
    for r in runs:
        by.setdefault(r["precision"], []).append(r["seen"]["accuracy"])
    return {"n": n, "runs": runs, "summary": {p: {"runs": len(a), "min": min(a), "mean": statistics.mean(a)}
                                             for p, a in by.items()}}


def spread_markdown(s: dict) -> str:
    acc = lambda x: f"{x['accuracy']:.3f} [{x['low']:.3f}, {x['high']:.3f}]" if x else "–"  # noqa: E731
    rows = [[r["precision"], str(r["seed"]), r["kernels"], acc(r["seen"]), acc(r["held_out"]), f"{r['final_loss']:.5f}",
             f"{r['unet_s']:.0f}" if r["unet_s"] else "–"] for r in s["runs"]]
    table = common.table(["UNet precision", "seed", "kernel setting", "seen all-attribute accuracy [95 % CI]",
                          "held-out", f"final loss (mean of last {s['n']})", "UNet stage s (wall)"], rows)
    lines = [f"{p}: {v['runs']} run(s), seen accuracy lowest {v['min']:.3f}, mean {v['mean']:.3f}"
             for p, v in s["summary"].items()]
    return table + "\n\n" + "; ".join(lines) + "."


def compare(fp32: str | Path, bf16: str | Path, n: int = 10) -> dict:
    a, b = read_run(fp32, n), read_run(bf16, n)
    if a["eval"] != b["eval"]:
        raise UserError(f"{bf16}: evaluated with {b['eval']}, {fp32} with {a['eval']} — evaluate both alike")
    loss_ratio = b["final_loss"] / a["final_loss"]
    speed = a["unet_s"] / b["unet_s"] if a["unet_s"] and b["unet_s"] else None
    return {"n": n, "fp32": a, "bf16": b, "loss_ratio": loss_ratio, "unet_speed": speed,
            "met": b["seen"]["accuracy"] >= 0.95 and abs(loss_ratio - 1) <= 0.10}


def markdown(r: dict) -> str:
    acc = lambda s: f"{s['accuracy']:.3f} [{s['low']:.3f}, {s['high']:.3f}] (n={s['n']})" if s else "–"  # noqa: E731
    rows = [[arm, f"`{x['folder']}`", x["precision"], acc(x["seen"]), acc(x["held_out"]), f"{x['final_loss']:.5f}",
             f"{x['unet_s']:.0f}" if x["unet_s"] else "–"] for arm, x in (("fp32", r["fp32"]), ("bf16", r["bf16"]))]
    table = common.table(["run", "folder", "UNet precision (config.toml)", "seen: all-attribute accuracy [95 % CI]",
                          "held-out accuracy", f"final loss (mean of last {r['n']} logged)", "UNet stage s (wall)"],
                         rows)
    b = r["bf16"]
    return (table + f"\n\nGoal: seen accuracy ≥ 0.95 in bf16 — **{b['seen']['accuracy']:.3f}**; final training loss "
            f"within 10 % of fp32's — bf16 / fp32 = **{r['loss_ratio']:.3f}** (final = the mean of the last {r['n']} of "
            f"{b['logged']} logged losses in each run): **{'met' if r['met'] else 'NOT met'}**. Both evaluated alike "
            f"({', '.join(f'{k} {v}' for k, v in b['eval'].items())})."
            + (f" The UNet stage's wall time (fp32 / bf16): {r['unet_speed']:.2f}× — the two runs were not interleaved, "
               "so this is no speed claim (§1 has the interleaved bf16 step)." if r["unet_speed"] else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("fp32")
    p.add_argument("bf16")
    p.add_argument("more", nargs="*", help="more runs: then every run is one row of a precision × seed × kernel table")
    p.add_argument("--n", type=int, default=10, help="final loss = mean of the last n logged losses")
    args = p.parse_args(argv)
    try:
        if args.more:
            print(spread_markdown(spread([args.fp32, args.bf16, *args.more], args.n)))
            return 0
        print(markdown(compare(args.fp32, args.bf16, args.n)))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
