"""`latentforge demo [--out runs/demo] [--budget full|tiny]`: the whole flow on the shapes data set.

Writes the data set, trains a VAE, caches latents, trains the UNet, samples and evaluates; see
`latentforge.demo`. `--budget full` takes ~17 minutes on one CPU core (fp32; ~10 with --precision bf16); `tiny` seconds.
"""

from __future__ import annotations

from ..demo_budgets import BUDGETS, PRECISIONS  # not ..demo: it loads torch and the models


def add_arguments(p):
    p.add_argument("--out", default="runs/demo", help="output folder (replaced if it holds an earlier demo)")
    p.add_argument("--budget", choices=tuple(BUDGETS), default="full",
                   help="full: the real demo (~17 min on one CPU core in fp32, ~10 with --precision bf16); tiny: every "
                        "stage for a few steps")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the UNet's training precision; auto (default): fp32 (bf16, with fp32 master weights, is faster "
                        "on a CPU with native bf16 instructions but its accuracy differed between processors)")
    p.add_argument("--seed", type=int, default=0, help="draws the data set, the models' initial weights and training "
                                                        "noise (default 0)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the cores not already busy at start)")


def run(args):
    from ..demo import run_demo

    summary = run_demo(args.out, args.budget, threads=args.threads, precision=args.precision, seed=args.seed)
    seen = summary["scores"]["seen"]["all"]
    held = summary["scores"].get("held_out", {}).get("all")
    print(f"\nall-attribute accuracy: seen {seen['accuracy']:.3f} [{seen['low']:.3f}, {seen['high']:.3f}]"
          + (f", held-out {held['accuracy']:.3f} [{held['low']:.3f}, {held['high']:.3f}]" if held else ""))
    print(f"total {summary['wall_seconds']:.0f} s; report: {args.out}/report.md")
    return 0
