"""Reliability, second round: `--resume` that must refuse, and two processes on one run folder.

2. The cache changed under the run (images added, removed, re-encoded): refuse naming what changed, or with
   --allow-changed-data continue and say what that means for the data order.
3. A second `train` on the same --out while the first trains: one line naming the holder's pid; after
   kill -9 of the holder the lock is gone by itself.
4. A refused resume (changed math) writes nothing: the run folder is byte-identical and the correct
   resume afterwards works.
5. Checkpoints that are all unusable (no COMPLETE marker, a checksum mismatch): refused with one line listing
   each; --restart sets them aside (kept byte for byte) and starts over.
"""

import os
import shutil
import signal
import time

import pytest

from rel_kit import (EVERY, FOREVER, build_tiny_cache, clear_error, logged_steps, record, run_cli, spawn,
                     tree_digest, wait_for)


def stopped_run(world, out, step=8, config=True):
    """A copy of the reference run as it was at `step` (its checkpoint and config.toml)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(world["ref"] / "checkpoints" / f"step-{step}", out / "checkpoints" / f"step-{step}")
    if config:
        shutil.copy(world["ref"] / "config.toml", out / "config.toml")
    return out


def short_resume(world, out, cache=None, *extra):
    """`train --resume` giving only the folders (settings from the run's config.toml) and max_steps."""
    return ["train", "--cache", cache or world["cache"], "--vae", world["vae"], "--out", out, "--resume", "--quiet",
            "max_steps=9", *extra]


def fresh(world, out, *extra):
    """`train` without --resume (settings from the run's config.toml are not read then: give the preset)."""
    return ["train", "--cache", world["cache"], "--vae", world["vae"], "--out", out, "--quiet", "model=tiny",
            "batch_size=4", *extra]


def changed_cache(world, tmp_path):
    """The world's data with one image added, one removed and one re-encoded (new pixels), re-cached."""
    data, cache = tmp_path / "data", tmp_path / "cache"
    shutil.copytree(world["data"], data)
    shutil.copytree(world["cache"], cache)
    shutil.copy(data / "reds" / "0.png", data / "reds" / "new.png")
    (data / "blues" / "3.png").unlink()
    from PIL import Image

    Image.open(data / "reds" / "1.png").transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(data / "reds" / "1.png")
    build_tiny_cache(data, world["vae"], cache)
    return cache


def test_resume_on_a_changed_cache_is_refused_or_explicitly_allowed(world, tmp_path, capsys):
    cache = changed_cache(world, tmp_path)
    run = stopped_run(world, tmp_path / "run")
    before = tree_digest(run)
    code, lines = run_cli(short_resume(world, run, cache), capsys)
    verdict = clear_error(code, lines, "1 latent(s) added")
    untouched = tree_digest(run) == before
    code2, lines2 = run_cli(short_resume(world, run, cache, "--allow-changed-data"), capsys)
    record("resume_changed_cache", refused=verdict, stderr=" / ".join(lines), folder_untouched=untouched,
           allowed_exit=code2, allowed_warning=" / ".join(l for l in lines2 if l.startswith("warning:")))
    assert verdict == "ok" and "1 removed" in lines[-1] and "1 re-encoded" in lines[-1], lines
    assert untouched
    assert code2 == 0 and any("--allow-changed-data" in l and "order" in l for l in lines2), lines2
    assert logged_steps(run)[-1] == 9


def mtimes(folder) -> dict:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_with_changed_data_is_refused_before_the_cache_is_rebuilt(world, tmp_path, capsys):
    """`train --resume --data DIR`: the cache identity is checked before RUN/cache is encoded, so the refusal
    of changed data leaves RUN/cache as it was (bytes and mtimes); the unchanged data resumes as before."""
    from types import SimpleNamespace

    from rel_kit import tiny_vae
    from latentforge.data.cache import LatentDataset, planned_entries
    from latentforge.train.resume import cache_identity

    run = stopped_run(world, tmp_path / "run")
    shutil.copytree(world["cache"], run / "cache")  # what `train --data` built there (the same settings)
    planned = planned_entries(str(world["data"]), tiny_vae(), str(run / "cache"), size=32)
    assert cache_identity(SimpleNamespace(entries=planned)) == cache_identity(LatentDataset(str(run / "cache")))
    data = tmp_path / "data"
    shutil.copytree(world["data"], data)
    (data / "blues" / "3.png").unlink()
    shutil.copy(data / "reds" / "0.png", data / "reds" / "new.png")
    before, stamps = tree_digest(run / "cache"), mtimes(run / "cache")
    argv = ["train", "--data", data, "--vae", world["vae"], "--out", run, "--resume", "--quiet", "max_steps=9"]
    code, lines = run_cli(argv, capsys)
    verdict = clear_error(code, lines, "1 latent(s) added", warnings_ok=False)
    untouched = tree_digest(run / "cache") == before and mtimes(run / "cache") == stamps
    code2, lines2 = run_cli([world["data"] if a == data else a for a in argv], capsys)
    record("resume_changed_data_before_cache", refused=verdict, stderr=" / ".join(lines), cache_untouched=untouched,
           unchanged_data_exit=code2)
    assert verdict == "ok" and len(lines) == 1 and "1 removed" in lines[0], lines
    assert untouched
    assert code2 == 0 and logged_steps(run)[-1] == 9, lines2


def test_refused_resume_writes_nothing_and_the_right_resume_then_works(world, tmp_path, capsys):
    run = stopped_run(world, tmp_path / "run")
    before = tree_digest(run)
    code, lines = run_cli(short_resume(world, run, None, "lr=5e-4"), capsys)
    verdict = clear_error(code, lines, "lr (0.001 -> 0.0005)")
    changed = sorted(k for k in set(before) | set(tree_digest(run)) if before.get(k) != tree_digest(run).get(k))
    code2, lines2 = run_cli(short_resume(world, run), capsys)
    record("resume_refused_writes_nothing", refused=verdict, files_changed_by_the_refusal=changed,
           correct_resume_exit=code2, stderr=" / ".join(lines2))
    assert verdict == "ok" and changed == [], (lines, changed)
    assert code2 == 0 and logged_steps(run)[-1] == 9, lines2


def break_checkpoints(run):
    (run / "checkpoints" / "step-8" / "COMPLETE").unlink()  # the process died while writing it
    model = run / "checkpoints" / "step-4" / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-5] ^= 1  # one bit of a float
    model.write_bytes(bytes(raw))


def test_unusable_checkpoints_are_listed_and_restart_sets_them_aside(world, tmp_path, capsys):
    run = stopped_run(world, tmp_path / "run", step=8)
    shutil.copytree(world["ref"] / "checkpoints" / "step-4", run / "checkpoints" / "step-4")
    break_checkpoints(run)
    before = tree_digest(run)
    code, lines = run_cli(short_resume(world, run), capsys)
    listed = clear_error(code, lines, "step-8: no COMPLETE marker")
    untouched = tree_digest(run) == before
    code_new, lines_new = run_cli(fresh(world, run, "max_steps=2"), capsys)  # without --resume: refused too
    old = {k: v for k, v in before.items() if k.startswith("checkpoints/")}
    code2, lines2 = run_cli(fresh(world, run, "--restart", "max_steps=2"), capsys)
    kept = tree_digest(run / "checkpoints-set-aside-1")
    record("resume_unusable_checkpoints", refused=listed, stderr=" / ".join(lines), folder_untouched=untouched,
           without_resume=clear_error(code_new, lines_new, "--resume"), restart_exit=code2,
           restart_warning=" / ".join(lines2), set_aside_identical=kept == {k[len("checkpoints/"):]: v for k, v in old.items()})
    assert listed == "ok" and "step-4: model.safetensors: checksum mismatch" in lines[-1], lines
    assert untouched
    assert clear_error(code_new, lines_new, "--resume") == "ok", lines_new
    assert code2 == 0 and logged_steps(run)[-1] == 2, lines2
    assert kept == {k[len("checkpoints/"):]: v for k, v in old.items()}


def test_only_markerless_checkpoints_are_refused_not_overwritten(world, tmp_path, capsys):
    run = stopped_run(world, tmp_path / "run", step=8)
    (run / "checkpoints" / "step-8" / "COMPLETE").unlink()
    before = tree_digest(run)
    code, lines = run_cli(short_resume(world, run), capsys)
    record("resume_markerless_only", verdict=clear_error(code, lines, "step-8"), stderr=" / ".join(lines))
    assert clear_error(code, lines, "step-8: no COMPLETE marker") == "ok", lines
    assert tree_digest(run) == before


def test_a_second_train_on_the_same_run_folder_is_refused_until_the_first_dies(world, tmp_path, capsys):
    run = tmp_path / "run"
    child = spawn(*world.train_argv(run, FOREVER))
    try:
        wait_for(lambda: len(logged_steps(run)) >= EVERY + 1, proc=child, what="the first process at step 5")
        steps_before = logged_steps(run)
        code, lines = run_cli(world.train_argv(run, "--resume", "max_steps=6"), capsys)
        verdict = clear_error(code, lines, f"pid {child.pid}")
        time.sleep(0.3)
        still_training = child.poll() is None and len(logged_steps(run)) >= len(steps_before)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.communicate()
    t = time.perf_counter()
    code2, lines2 = run_cli(world.train_argv(run, "--resume", f"max_steps={max(logged_steps(run)) + 1}"), capsys)
    record("lock_train_run", second_process=verdict, stderr=" / ".join(lines), first_kept_training=still_training,
           after_kill_9_exit=code2, after_kill_9_seconds=round(time.perf_counter() - t, 1))
    assert verdict == "ok", lines
    assert still_training
    assert code2 == 0, lines2
