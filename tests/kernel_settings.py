"""The kernel settings other processors would pick, and the numerically sensitive tests run under each of them.

One CPU runs one set of kernels: MKL picks its GEMM code path by instruction set (and vendor), ATen its
vectorised kernels (softmax, SDPA, norms) by instruction set, oneDNN its convolution and bf16 kernels by ISA. A
tolerance tuned on one of them can fail on another processor. Each environment switch below forces the choice
another processor would make, on this machine:

    .venv/bin/python tests/kernel_settings.py --probe      # which switch changes which op's bits, here
    .venv/bin/python tests/kernel_settings.py              # the probe, then the sensitive tests under each setting

`make test-kernels` runs the second line (not part of `make test`: about 6 times the sensitive tests' time).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "mkl-avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2"},  # MKL's AVX2 GEMMs (no AVX-512; MKL also dispatches by vendor)
    "aten-avx2": {"ATEN_CPU_CAPABILITY": "avx2"},  # ATen's AVX2 kernels (softmax, SDPA, reductions)
    "onednn-avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2"},  # oneDNN's AVX2 convolutions and bf16 ops
    "onednn-avx512-core": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE"},  # AVX-512 without bf16/fp16 instructions
    "avx2-machine": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}

# Tests that compare two computations which sum in different orders, or ours against the diffusers oracle.
SENSITIVE = ["test_tolerance.py", "test_unet.py", "test_vae.py", "test_attend.py", "test_schedule.py",
             "test_samplers.py", "test_pipelines.py", "test_pipelines_sdxl.py", "test_single_file.py",
             "test_single_file_sdxl.py", "test_text.py", "test_adapters.py", "test_lora_files.py",
             "test_lora_features.py", "test_lora_train.py", "test_train_loop.py", "test_train_step.py",
             "test_finetune.py", "test_train_sdxl.py", "test_buckets_train.py", "test_train_validation.py",
             "test_precision.py", "test_scheduler_config.py", "test_script_oracles.py", "test_kohya_oracle.py",
             "test_lora_precision.py", "test_resume_refusals.py", "test_flow.py", "test_mmdit.py",
             "test_text_sd3.py"]

PROBE = """
import hashlib, latentforge, torch, torch.nn.functional as F  # latentforge first: its MKL setting, as the product runs
torch.manual_seed(0)
x, w = torch.randn(4, 64, 32, 32), torch.randn(64, 64, 3, 3)
a, b, q = torch.randn(256, 320), torch.randn(320, 640), torch.randn(2, 4, 256, 40)
xr = x.clone().requires_grad_()
F.conv2d(xr, w, padding=1).square().sum().backward()
ops = {"conv2d": F.conv2d(x, w, padding=1), "conv2d backward": xr.grad, "matmul": a @ b,
       "group_norm": F.group_norm(x, 32), "layer_norm": F.layer_norm(a, (320,)), "softmax": torch.softmax(a, -1),
       "sdpa": F.scaled_dot_product_attention(q, q, q), "sum": a.sum(0),
       "bf16 matmul": (a.bfloat16() @ b.bfloat16()).float(), "bf16 conv2d": F.conv2d(x.bfloat16(), w.bfloat16(), padding=1).float()}
for k, v in ops.items():
    print(k + "\\t" + hashlib.sha1(v.contiguous().numpy().tobytes()).hexdigest()[:10])
"""


def _env(name: str) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **SETTINGS[name]}


def probe() -> str:
    """A markdown table: for each op, whether each setting changes its result's bits on this machine."""
    runs = {name: dict(line.split("\t") for line in subprocess.run(
        [sys.executable, "-c", PROBE], env=_env(name), capture_output=True, text=True, check=True).stdout.splitlines())
        for name in SETTINGS}
    ref = runs["default"]
    head = "| op | " + " | ".join(n for n in SETTINGS if n != "default") + " |"
    rows = [f"| {op} | " + " | ".join("changed" if runs[n][op] != h else "same" for n in SETTINGS if n != "default")
            + " |" for op, h in ref.items()]
    return "\n".join([head, "|" + "---|" * (len(SETTINGS))] + rows)


def run_tests(names, workers: int) -> list[tuple[str, int, float]]:
    tests = Path(__file__).parent
    results = []
    for name in names:
        t0 = time.time()
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(["-n", str(workers), "--dist",
               "loadfile"] if workers > 1 else []), *[str(tests / f) for f in SENSITIVE]]
        print(f"== {name}: {' '.join(f'{k}={v}' for k, v in SETTINGS[name].items()) or '(no switch)'}", flush=True)
        rc = subprocess.run(cmd, env=_env(name)).returncode
        results.append((name, rc, time.time() - t0))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--probe", action="store_true", help="only print which switch changes which op, here")
    p.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated names (default: all)")
    p.add_argument("-n", type=int, default=2, help="pytest-xdist workers")
    args = p.parse_args(argv)
    print(probe(), flush=True)
    if args.probe:
        return 0
    results = run_tests(args.settings.split(","), args.n)
    for name, rc, secs in results:
        print(f"{name:20s} {'passed' if rc == 0 else f'FAILED (exit {rc})'}  {secs:.0f} s")
    return max(rc for _, rc, _ in results)


if __name__ == "__main__":
    sys.exit(main())
