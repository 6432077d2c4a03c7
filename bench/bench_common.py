"""What every benchmark shares: the machine, interleaved timing, peak memory in a subprocess, tables.

Timing rule: two arms A and B run in ONE process, interleaved A, B, A, B, … after a
warm-up, and we report the median of at least 5 samples of each plus the ratio. On this shared
2-core box other people's test runs steal the CPU at random moments, so every sample records two
clocks: wall time (what a user waits) and process CPU time (user + system of this process, which a
stolen core does not inflate). With one torch thread the CPU clock is the steadier measure of the
work done; both are reported. A GPU sample is bracketed by `torch.cuda.synchronize()` only at its
edges (one sample = several steps), so the steps themselves run without host synchronisation.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]


# ---- machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str = "cpu") -> Dict[str, str]:
    """What the numbers were measured on: CPU, cores, threads, library versions, GPU if any, date."""
    import diffusers

    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers (oracle)": diffusers.__version__,
        "load average (1 min) at start": f"{os.getloadavg()[0]:.1f}",
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def set_threads(n: int) -> None:
    """torch intra-op threads (0 = leave torch's default)."""
    if n > 0:
        torch.set_num_threads(n)


# ---- timing ---------------------------------------------------------------------------------


@dataclass
class Samples:
    """Seconds per sample on two clocks; `items` = images (or steps) per sample."""

    items: int
    wall: List[float] = field(default_factory=list)
    cpu: List[float] = field(default_factory=list)

    def rate(self, clock: str = "wall") -> float:
        """items per second from the median sample."""
        return self.items / statistics.median(getattr(self, clock))

    def median(self, clock: str = "wall") -> float:
        return statistics.median(getattr(self, clock))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_once(fn: Callable[[], object], device: torch.device) -> tuple:
    _sync(device)
    c0, w0 = time.process_time(), time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - w0, time.process_time() - c0


def interleaved(arms: Dict[str, Callable[[], object]], items: int, repeats: int, warmup: int,
                device: torch.device = torch.device("cpu"), progress: bool = True) -> Dict[str, Samples]:
    """Run the arms A, B, C, A, B, C, … `warmup` untimed rounds, then `repeats` timed rounds."""
    from tqdm import tqdm

    for _ in range(warmup):
        for fn in arms.values():
            fn()
    out = {name: Samples(items) for name in arms}
    for _ in tqdm(range(repeats), desc="timed rounds", unit="round", disable=not progress, leave=False):
        for name, fn in arms.items():
            wall, cpu = time_once(fn, device)
            out[name].wall.append(wall)
            out[name].cpu.append(cpu)
    return out


def paired_ratio(a: Samples, b: Samples, clock: str = "wall") -> float:
    """Median over rounds of time(b) / time(a): each pair ran back to back under the same load."""
    return statistics.median(tb / ta for ta, tb in zip(getattr(a, clock), getattr(b, clock)))


def gemm_rate(dtypes: Sequence[str] = ("fp32", "bf16"), n: int = 2048, repeats: int = 5,
              device: torch.device = torch.device("cpu")) -> Dict[str, float]:
    """This machine's measured dense GEMM rate in GFLOP/s for each dtype: an n×n @ n×n matmul (2n³ FLOPs),
    the dtypes interleaved, median of `repeats`; per second of process CPU time on CPU, of wall time on GPU.
    It is the ceiling a training step's FLOP rate is compared with ("fraction of the GEMM rate")."""
    samples = interleaved(gemm_arms(dtypes, n, device), 1, repeats, warmup=1, device=device, progress=False)
    clock = "wall" if device.type == "cuda" else "cpu"
    return {d: 2 * n**3 / samples[d].median(clock) / 1e9 for d in dtypes}


def gemm_arms(dtypes: Sequence[str] = ("fp32", "bf16"), n: int = 2048,
              device: torch.device = torch.device("cpu")) -> Dict[str, Callable[[], object]]:
    """One n×n @ n×n matmul (2n³ FLOPs) per dtype, as arms for `interleaved` (keys: the dtype names)."""
    torch_dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    g = torch.Generator().manual_seed(0)
    mats = {d: [torch.randn(n, n, generator=g).to(device, torch_dtypes[d]) for _ in range(2)] for d in dtypes}
    return {d: (lambda a=a, b=b: a @ b) for d, (a, b) in mats.items()}


# ---- memory ---------------------------------------------------------------------------------


def status_mib(key: str) -> float:
    """VmRSS / VmHWM (peak RSS) of this process from /proc/self/status, in MiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) / 1024


def timed_steps(step: Callable[[], object], steps: int) -> tuple:
    """Run `step` `steps` times: (wall seconds per step, process CPU seconds per step, its return values)."""
    wall, cpu, out = [], [], []
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        out.append(step())
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    return wall, cpu, out


def run_json_subprocess(args: Sequence[str], timeout: float = 600, env: Dict[str, str] | None = None) -> dict:
    """Run `python <args>` from the repo root (extra `env` variables); its last stdout line is JSON."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- tables ---------------------------------------------------------------------------------


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 2) -> str:
    return f"{x:.{digits}f}"
