"""Reliability 3: the disk fills up while a checkpoint or a cache shard is being written.

Two ways to fill it: a real tmpfs mounted just too small (tests run as root; where mounting is not
allowed the test says so in its figures and injects instead), and an injected OSError(ENOSPC) at the
write. Each time: one clear `error:` line (exit 2), the previous checkpoint / cache untouched, and a
later run — with space again — continues to the same bits as a run that never failed.
"""

import contextlib
import errno
import os
import subprocess
from pathlib import Path

import pytest

from latentforge.data import shards
from latentforge.data.cache import LatentDataset, read_manifest
from latentforge.train import checkpoint

from rel_kit import (MAX_STEPS, assert_bitwise, ckpt_steps, class_folders, clear_error, losses, record, run_cli,
                     tree_digest, weights)

@contextlib.contextmanager
def tmpfs(folder: Path, size: int):
    """A tmpfs of `size` bytes at `folder`; yields resize(size) or None where mounting is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if p.returncode != 0:
        yield None
        return
    try:
        yield lambda n: subprocess.run(["mount", "-o", f"remount,size={n}", str(folder)], check=True)
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def enospc(path=""):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


# ---- checkpoints -------------------------------------------------------------------------------

def inject_checkpoint_enospc(monkeypatch, step):
    """The optimizer file of checkpoint `step` fails half-way: some bytes on disk, then ENOSPC."""
    real = checkpoint.save_file

    def save_file(tensors, path, *a, **k):
        if f".tmp-step-{step}-" in str(path) and Path(path).name == "optimizer.safetensors":
            Path(path).write_bytes(b"\0" * 4096)
            raise enospc(path)
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(checkpoint, "save_file", save_file)


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_while_writing_a_checkpoint(world, tmp_path, monkeypatch, capsys, how):
    ref_ckpt = world["ref"] / "checkpoints" / "step-4"
    ckpt_bytes = sum(f.stat().st_size for f in ref_ckpt.iterdir())
    out = tmp_path / "disk" / "run"
    # room for one checkpoint and the logs, not for a second one (keep_checkpoints=2 keeps both)
    with tmpfs(tmp_path / "disk", int(ckpt_bytes * 1.5)) if how == "tmpfs" else contextlib.nullcontext() as resize:
        mode = "real tmpfs" if resize else "injected OSError(ENOSPC)"
        if resize is None:
            inject_checkpoint_enospc(monkeypatch, 8)
        code, lines = run_cli(world.train_argv(out), capsys)
        left = sorted(p.name for p in (out / "checkpoints").iterdir())
        # the previous checkpoint is complete and byte-for-byte what the reference run wrote at step 4
        assert ckpt_steps(out) == [4]
        assert tree_digest(out / "checkpoints" / "step-4") == tree_digest(ref_ckpt)
        monkeypatch.undo()
        if resize:
            resize(64 << 20)  # space again
        code2, lines2 = run_cli(world.train_argv(out, "--resume"), capsys)
        assert code2 == 0, lines2
        n = sum(assert_bitwise(a, b) for a, b in zip(weights(out, MAX_STEPS), world["ref_final"]))
        assert losses(out) == world["ref_losses"]
        assert not list((out / "checkpoints").glob(".tmp-*"))
    record(f"disk_full_checkpoint_{how}", how=mode, filesystem_bytes=int(ckpt_bytes * 1.5) if resize else None,
           checkpoint_bytes=ckpt_bytes, exit_code=code, stderr=lines, folders_after_failure=left,
           resumed_to_step=MAX_STEPS, tensors_bitwise_equal=n)
    v = clear_error(code, lines, "space")  # exit 2, one "error: ... space ..." line
    assert v == "ok", f"{v}; stderr {lines}"


# ---- cache shards ------------------------------------------------------------------------------

def inject_shard_enospc(monkeypatch):
    """Every latent shard write fails half-way: a partial temporary file on disk, then ENOSPC."""
    real = shards.atomic_write

    def atomic_write(path, write):
        if os.path.basename(path).startswith("latent-"):
            def partial(f):
                f.write(b"\x93NUMPY partial")
                raise enospc(path)
            return real(path, partial)
        return real(path, write)

    monkeypatch.setattr(shards, "atomic_write", atomic_write)


def cache_argv(world, data, out):
    return ["cache", "--data", data, "--vae", world["vae"], "--out", out, "--text-encoder", "none", "--size", "32",
            "--quiet", "--device", "cpu"]


def used_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


@pytest.mark.parametrize("how", ["tmpfs", "injected"])
def test_disk_full_while_writing_a_cache_shard(world, tmp_path, monkeypatch, capsys, how):
    data = class_folders(tmp_path / "data", n_per_class=4)
    with tmpfs(tmp_path / "disk", 64 << 20) if how == "tmpfs" else contextlib.nullcontext() as resize:
        mode = "real tmpfs" if resize else "injected OSError(ENOSPC)"
        out = tmp_path / "disk" / "cache"
        code, lines = run_cli(cache_argv(world, data, out), capsys)
        assert code == 0, lines
        before = tree_digest(out)
        old = read_manifest(str(out))
        class_folders(tmp_path / "data2", n_per_class=24, seed=1)  # 48 new images: one 48-row shard
        for cls in ("reds", "blues"):
            for p in (tmp_path / "data2" / cls).iterdir():
                p.rename(data / cls / f"new-{p.name}")
        if resize:
            resize(used_bytes(tmp_path / "disk") + 12 * 1024)  # room for 3 pages: not for the new shard
        else:
            inject_shard_enospc(monkeypatch)
        code, lines = run_cli(cache_argv(world, data, out), capsys)
        # the previous cache: every file it had is unchanged; whatever manifest is there lists only
        # shards that verify, and still holds every latent cached before
        after = tree_digest(out)
        unchanged = {k: v for k, v in after.items() if k in before}
        assert {k: v for k, v in unchanged.items() if k != "manifest.json"} == {
            k: v for k, v in before.items() if k in unchanged and k != "manifest.json"}
        manifest = read_manifest(str(out))
        ds = LatentDataset(str(out), verify=False)
        for store in (ds.latents, ds.texts):
            for name in store.shards:
                store.verify(name)  # CacheCorruptError if anything listed is damaged
        assert set(old["latents"]["index"]) <= set(manifest["latents"]["index"])
        still_usable = manifest["complete"]
        leftovers = sorted(k for k in after if k not in before)
        monkeypatch.undo()
        if resize:
            resize(64 << 20)
        code2, lines2, summary = run_cli(cache_argv(world, data, out), capsys, want_stdout=True)
        assert code2 == 0, lines2
        assert "56 latents (48 encoded, 8 reused, 0 dropped)" in summary  # only the new images
        ds = LatentDataset(str(out))
        assert len(ds) == 56
        assert not [k for k in tree_digest(out) if ".tmp-" in k]  # partial files cleaned up
    record(f"disk_full_cache_{how}", how=mode, exit_code=code, stderr=lines,
           old_cache_still_opens=still_usable, files_left_by_the_failed_run=leftovers,
           rerun=summary.splitlines()[0])
    v = clear_error(code, lines, "space")  # exit 2, one "error: ... space ..." line
    assert v == "ok", f"{v}; stderr {lines}"
