"""bench/gpu_check.sh --dry-run: the GPU check's every part runs on CPU at tiny sizes, so the script cannot rot
before a GPU is lent. Asserts the section's structure and the checks made along the way (the CLI ran under
LATENTFORGE_SYNC_DEBUG=error to the end; the two text→image pipelines agree in fp32) — never timings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_writes_every_part(tmp_path):
    out = tmp_path / "gpu.md"
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = out.read_text()
    assert doc.startswith("## GPU check (`bench/gpu_check.sh` --dry-run)") and "failed" not in doc
    for part in ("### UNet training step", "### CLI end to end", "### text→image"):
        assert part in doc
    for arm in ("autocast (fp32 weights)", "bf16 compute copy, fp32 masters (precision=bf16)",
                "compute copy + torch.compile (compile=true)", "diffusers UNet2DConditionModel (autocast)"):
        assert len([line for line in doc.splitlines() if line.startswith(f"| {arm} |")]) == 1, arm
    cli = [line for line in doc.splitlines() if line.startswith("| 2 | 3 |")]  # B=2, 3 steps: the run finished
    assert len(cli) == 1
    fp32 = next(line for line in doc.splitlines() if line.startswith("| fp32 |"))
    # same folder, same sampler, same starting noise: float32 images agree to rounding (bench_text2img's check)
    assert float(fp32.strip("|").split("|")[-1]) < 1e-4
