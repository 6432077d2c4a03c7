"""The training step with one competing busy process: torch threads 1, 2 and latentforge's default.

    .venv/bin/python bench/bench_threads.py [--preset small] [--batch 8] [--steps 5] [--rounds 3]

A busy loop (`while True: pass`, one process) runs for the whole measurement. Each arm is a fresh
subprocess of bench_train_step.py (OpenMP reads its wait policy once, when torch loads it), the arms
interleaved over `--rounds`; reported: the median ms/step (wall) of each arm, its ratio to one thread, and the
paired ratio (median over rounds of the ratio to that round's 1-thread sample).
Arms: 1 thread; 2 threads with OpenMP's default (active, spinning) wait; latentforge's default
(threads.py: OMP_WAIT_POLICY=PASSIVE and the cores not busy at start, as the CLI sets them).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_common as common  # noqa: E402

ARMS = {"1 thread": ("1", "ACTIVE"), "2 threads, OpenMP's default (active) wait": ("2", "ACTIVE"),
        "latentforge default (threads.py: passive wait, free cores at start)": ("-1", "PASSIVE")}


def _step_ms(preset: str, batch: int, steps: int, threads: str, policy: str) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(OMP_WAIT_POLICY=policy, PYTHONPATH=str(HERE.parent / "src"))
    out = subprocess.run([sys.executable, str(HERE / "bench_train_step.py"), "--preset", preset, "--batch", str(batch),
                          "--steps", str(steps), "--threads", threads, "--device", "cpu"],
                         env=env, capture_output=True, text=True, timeout=900, check=True).stdout
    ms = float(re.search(r"\((\d+) ms/step", out).group(1))
    used = int(re.search(r"cpu, (\d+) threads", out).group(1))
    return ms, used


def run(preset: str = "small", batch: int = 8, steps: int = 5, rounds: int = 3) -> dict:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        times = {arm: [] for arm in ARMS}
        used = {}
        for _ in range(rounds):
            for arm, (threads, policy) in ARMS.items():
                ms, used[arm] = _step_ms(preset, batch, steps, threads, policy)
                times[arm].append(ms)
    finally:
        busy.kill()
        busy.wait()
    one = times["1 thread"]
    return {"preset": preset, "batch": batch, "steps": steps, "rounds": rounds, "cores": os.cpu_count(),
            "load_at_end": os.getloadavg()[0],
            "arms": {arm: {"ms": statistics.median(t), "all_ms": t, "threads": used[arm],
                           "vs_one_thread": statistics.median(one) / statistics.median(t),
                           # median over rounds of the ratio to the 1-thread sample of the same round
                           "paired_vs_one_thread": statistics.median(o / x for o, x in zip(one, t))}
                     for arm, t in times.items()}}


def markdown(r: dict) -> str:
    rows = [[arm, a["threads"], f"{a['ms']:.0f}", f"{a['vs_one_thread']:.2f}×",
             f"**{a.get('paired_vs_one_thread', a['vs_one_thread']):.2f}×**"] for arm, a in r["arms"].items()]
    return common.table(["arm", "torch threads used", "ms/step (wall, median)", "speed vs 1 thread (medians)",
                         "speed vs 1 thread (paired by round)"], rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    print(markdown(run(args.preset, args.batch, args.steps, args.rounds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
