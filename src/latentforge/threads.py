"""torch's CPU threads and OpenMP's wait policy, chosen for a machine that other processes share.

On a 2-core box with one other busy process, two torch threads that spin-wait between parallel
regions (OpenMP's default, active policy) run a training step several times slower than one thread:
every region waits for the thread whose core the other process holds. So, unless the user chose:

- `OMP_WAIT_POLICY=PASSIVE` (idle threads sleep instead of spinning), set before torch loads OpenMP;
- threads = the cores not already busy at start (cores − 1-minute load average, rounded, ≥ 1).

The bench measures the step with a competing busy process for threads 1, 2 and this default
(bench/bench_threads.py, docs/BENCHMARKS.md).
"""

from __future__ import annotations

import os


def prepare_environment() -> None:
    """Call before torch is imported (the CLI does it first thing); a user's own setting wins."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_threads(cores: int | None = None, load: float | None = None) -> int:
    """The cores not already busy: round(cores − load), clamped to [1, cores]."""
    cores = cores or os.cpu_count() or 1
    if load is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return max(1, min(cores, round(cores - load)))


def configure(threads: int | None = None) -> int:
    """Set torch's intra-op threads: `threads` if given, else OMP_NUM_THREADS if the user set it (torch
    already follows it), else `default_threads()`. Returns the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    elif not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
    return torch.get_num_threads()
