"""Reliability 1, 2 and 8: `latentforge train` killed (-9) at seeded-random steps, killed while a
checkpoint is being written, and stopped by SIGTERM / SIGINT; each `--resume` ends bitwise equal
(weights and EMA) to one uninterrupted run, and logs the same losses.

The interrupted runs are real child processes of `python -m latentforge train`; the resumes and the
reference run (the `world` fixture, conftest.py) call `latentforge.cli.main` in this process (same
code, one thread each — see rel_kit).
"""

import random
import signal
from pathlib import Path

import pytest

from latentforge.cli import main
from latentforge.train import checkpoint

from rel_kit import (FOREVER, MAX_STEPS, assert_bitwise, ckpt_steps, logged_steps, losses, record, spawn, wait_for,
                     weights)

pytestmark = pytest.mark.slow


def resume_and_compare(w, out, monkeypatch) -> list[str]:
    """`train --resume` in-process; -> the checkpoint folders it loaded. Asserts the bitwise end state."""
    loaded, real_load = [], checkpoint.load

    def spy(path):
        path = Path(path)
        assert (path / checkpoint.MARKER).is_file() and path.name.startswith("step-"), f"loaded {path}"
        loaded.append(path.name)
        return real_load(path)

    monkeypatch.setattr(checkpoint, "load", spy)
    assert main(w.train_argv(out, "--resume")) == 0
    n = sum(assert_bitwise(a, b) for a, b in zip(weights(out, MAX_STEPS), w["ref_final"]))
    assert losses(out) == w["ref_losses"]  # the lost steps were redone identically
    assert not list((out / "checkpoints").glob(".tmp-*"))  # the half-written folder is gone
    assert len(ckpt_steps(out)) == 2  # keep_checkpoints=2, pruned after the resume
    return loaded, n


def kill_at(proc, out, step, sig):
    wait_for(lambda: max(logged_steps(out), default=0) >= step, proc=proc, what=f"step {step}")
    at = max(logged_steps(out))
    proc.send_signal(sig)
    stdout, stderr = proc.communicate(timeout=120)
    return at, stdout, stderr


# ---- 1. kill -9 at three seeded-random steps ---------------------------------------------------

KILL_STEPS = sorted(random.Random(2024).sample(range(3, MAX_STEPS - 6), 3))


@pytest.mark.parametrize("step", KILL_STEPS)
def test_kill_9_at_a_random_step_resumes_bitwise(world, tmp_path, monkeypatch, step):
    out = tmp_path / "run"
    proc = spawn(*world.train_argv(out, FOREVER))
    at, _, stderr = kill_at(proc, out, step, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, stderr
    on_disk = ckpt_steps(out)
    assert on_disk and on_disk[-1] <= max(logged_steps(out))
    loaded, n = resume_and_compare(world, out, monkeypatch)
    assert loaded == [f"step-{on_disk[-1]}"]
    record(f"kill9_step{step}", target_step=step, killed_after_logged_step=at,
           complete_checkpoints_after_kill=on_disk, resumed_from=loaded[0], final_step=MAX_STEPS,
           tensors_bitwise_equal=n, losses_equal=len(world["ref_losses"]))


# ---- 2. kill -9 while a checkpoint is being written ---------------------------------------------

CRASH = """
import os, signal, sys
from pathlib import Path
from latentforge.train import checkpoint as c

mode, step = sys.argv[1], int(sys.argv[2])
mine = lambda p: f".tmp-step-{step}-" in str(p)  # the checkpoint being written
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
real_save_file, real_write, real_prune = c.save_file, c._write_synced, c.prune

def save_file(tensors, path, *a, **k):
    real_save_file(tensors, path, *a, **k)
    if mode == "mid-tensor-file" and mine(path) and Path(path).name == "model.safetensors":
        os.truncate(path, os.path.getsize(path) // 2)  # the bytes on disk when the kill lands mid-write
        die()

def write_synced(path, text):
    real_write(path, text)
    if mode == "before-rename" and mine(path) and Path(path).name == c.MARKER:
        die()

def prune(root, keep):
    if mode == "before-prune" and c.complete_steps(root)[-1] == step:
        die()
    real_prune(root, keep)

c.save_file, c._write_synced, c.prune = save_file, write_synced, prune
from latentforge.cli import main
sys.exit(main(sys.argv[3:]))
"""


@pytest.mark.parametrize("mode, expect", [("mid-tensor-file", 8), ("before-rename", 8), ("before-prune", 12)])
def test_kill_9_while_writing_a_checkpoint_resumes_from_a_complete_one(world, tmp_path, monkeypatch, mode, expect):
    """Killed while writing step-12 (the previous complete one is step-8)."""
    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    out = tmp_path / "run"
    proc = spawn(mode, 12, *world.train_argv(out), wrapper=str(script))
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    left = sorted(p.name for p in (out / "checkpoints").iterdir())
    half = [p for p in (out / "checkpoints").glob(".tmp-step-12-*")]
    half_files = sorted(f"{h.name}/{f.name} ({f.stat().st_size} bytes)" for h in half for f in h.iterdir())
    assert bool(half) == (mode != "before-prune") and ckpt_steps(out)[-1] == expect
    loaded, n = resume_and_compare(world, out, monkeypatch)
    assert loaded == [f"step-{expect}"]
    record(f"kill9_in_checkpoint_{mode}", killed_while_writing="step-12", folders_after_kill=left,
           half_written_files=half_files,
           resumed_from=loaded[0], tensors_bitwise_equal=n)


# ---- 8. SIGTERM / SIGINT: checkpoint at the next step boundary, exit, resume bitwise -------------

@pytest.mark.parametrize("sig, step", [(signal.SIGTERM, 9), (signal.SIGINT, 14)], ids=["SIGTERM", "SIGINT"])
def test_signal_checkpoints_at_the_next_step_and_resumes_bitwise(world, tmp_path, monkeypatch, sig, step):
    out = tmp_path / "run"
    proc = spawn(*world.train_argv(out, FOREVER))
    at, stdout, stderr = kill_at(proc, out, step, sig)
    assert proc.returncode == 0 and "Traceback" not in stderr, stderr[-3000:]
    line = next(l for l in stdout.splitlines() if l.startswith("stopped by"))
    stopped = int(line.split(" at step ")[1].split(";")[0])
    assert line.startswith(f"stopped by {sig.name} at step {stopped}; checkpoint saved")
    assert ckpt_steps(out)[-1] == stopped == max(logged_steps(out))  # at the step boundary, no step after it
    assert at <= stopped <= at + 3 and stopped < MAX_STEPS  # promptly (the signal lands during step at+1)
    loaded, n = resume_and_compare(world, out, monkeypatch)
    assert loaded == [f"step-{stopped}"]
    record(f"signal_{sig.name}", signal_sent_after_logged_step=at, checkpoint_written_at_step=stopped,
           exit_code=proc.returncode, message=line, resumed_from=loaded[0], tensors_bitwise_equal=n)
