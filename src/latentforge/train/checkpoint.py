"""Resumable checkpoints, written atomically.

    checkpoints/step-N/
      model.safetensors  ema.safetensors  optimizer.safetensors   tensors, safetensors only
      state.json         step, data position, config hash + math keys, optimizer scalars,
                         EMA count, RNG states (python, numpy, torch) per rank, guard counters
      COMPLETE           written last: the sha256 of every other file; a folder without it is never read

A checkpoint is written into `checkpoints/.tmp-step-N-<pid>/`, every file fsynced, the marker
written, then the folder renamed to `step-N` (rename is atomic on POSIX) and the parent fsynced.
Older checkpoints are pruned only after that. A kill at any moment leaves either the previous
complete checkpoint or the new one — never a half-written `step-N`. A full disk removes the
temporary folder and raises a one-line UserError. On load every file is checked against its
sha256, so a damaged file is named and never used (`resume_candidates` then falls back to an
older complete checkpoint).
"""

from __future__ import annotations

import base64
import errno
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..io import fsync_dir, fsync_file, sha256_file

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step-(\d+)$")


# ----------------------------------------------------------------------------- write / find / prune

class CheckpointCorrupt(UserError):
    """A checkpoint file does not match the checksum recorded when it was written."""


def save(ckpt_root, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict, keep: int = 2) -> Path:
    """Write `tensors` (file stem -> flat tensor dict) and `state` (JSON) as `ckpt_root/step-<step>`."""
    root = Path(ckpt_root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step-*"):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    try:
        tmp.mkdir()
        for stem, flat in tensors.items():
            path = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().to("cpu").contiguous() for k, v in flat.items()}, str(path))
            fsync_file(path)
        _write_synced(tmp / "state.json", json.dumps(state, indent=1))
        sums = {p.name: sha256_file(p) for p in sorted(tmp.iterdir())}
        _write_synced(tmp / MARKER, json.dumps({"step": step, "sha256": sums}, indent=1))
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "os error 28" in str(e):  # 28 = ENOSPC
            previous = latest_complete(root)
            raise UserError(f"{root}: no space left on the device while writing checkpoint step-{step} — free some "
                            f"space and run again with --resume (it continues from "
                            f"{previous.name if previous else 'the start'})") from None
        raise
    final = root / f"step-{step}"
    if final.exists():  # re-saving the same step (e.g. a signal right after resuming)
        old = root / f".tmp-step-{step}-old-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    fsync_dir(root)
    prune(root, keep)
    return final


def complete_steps(ckpt_root) -> list[int]:
    """Steps of every complete checkpoint, ascending; incomplete folders are ignored."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    steps = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and (d / MARKER).is_file() and (d / "state.json").is_file():
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_complete(ckpt_root) -> Path | None:
    """The newest complete checkpoint folder, or None."""
    steps = complete_steps(ckpt_root)
    return Path(ckpt_root) / f"step-{steps[-1]}" if steps else None


def prune(ckpt_root, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all)."""
    if keep <= 0:
        return
    for step in complete_steps(ckpt_root)[:-keep]:
        # Rename first (atomic), then delete: a kill mid-delete never leaves a `step-N` missing files.
        doomed = Path(ckpt_root) / f".tmp-step-{step}-pruned-{os.getpid()}"
        (Path(ckpt_root) / f"step-{step}").rename(doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def verify(ckpt_dir) -> None:
    """Raise CheckpointCorrupt naming the first file whose sha256 differs from the marker's record."""
    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / MARKER).is_file():
        raise UserError(f"{ckpt_dir}: checkpoint is incomplete (no {MARKER} marker) — resume from another one")
    try:
        sums = json.loads((ckpt_dir / MARKER).read_text())["sha256"]
    except (ValueError, KeyError, TypeError):
        raise CheckpointCorrupt(f"{ckpt_dir / MARKER}: unreadable checksum record — the checkpoint is damaged; "
                                "resume from another one") from None
    for name, digest in sums.items():
        path = ckpt_dir / name
        if not path.is_file() or sha256_file(path) != digest:
            raise CheckpointCorrupt(f"{path}: checksum mismatch — the file is damaged; "
                                    "resume from another checkpoint")


def load(ckpt_dir) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(tensors by file stem, state) of a complete checkpoint folder, verified against its checksums."""
    ckpt_dir = Path(ckpt_dir)
    verify(ckpt_dir)
    tensors = {p.stem: load_file(str(p)) for p in sorted(ckpt_dir.glob("*.safetensors"))}
    state = json.loads((ckpt_dir / "state.json").read_text())
    return tensors, state


def load_newest_intact(ckpt_root, warn=print) -> tuple[Path, dict, dict] | None:
    """(folder, tensors, state) of the newest complete checkpoint that passes its checksums; each damaged
    newer one is named through `warn` and skipped. None when there is no complete checkpoint."""
    damaged = []
    for step in reversed(complete_steps(ckpt_root)):
        path = Path(ckpt_root) / f"step-{step}"
        try:
            tensors, state = load(path)
        except CheckpointCorrupt as e:
            warn(f"warning: {e}")
            damaged.append(str(e))
            continue
        if damaged:
            warn(f"warning: resuming from the older intact checkpoint {path}")
        return path, tensors, state
    if damaged:
        raise CheckpointCorrupt(damaged[0])
    return None


def check_config(state: dict, math: dict, ckpt_dir) -> None:
    """Refuse to resume when a setting that changes the math differs, naming the keys."""
    old = state.get("math", {})
    changed = sorted(k for k in set(old) | set(math) if old.get(k, "<unset>") != math.get(k, "<unset>"))
    if changed:
        diffs = ", ".join(f"{k} ({old.get(k, '<unset>')!r} -> {math.get(k, '<unset>')!r})" for k in changed)
        raise UserError(f"--resume: {ckpt_dir} was trained with different settings that change the math: "
                        f"{diffs} — revert them, or start a new run with another --out")


# ----------------------------------------------------------------------------- optimizer state

def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Optimizer state_dict -> (tensors 'state.<param>.<key>', JSON-able rest). No pickle."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for key, value in _nested_items(entries):  # bitsandbytes nests its quantisation state one level down
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _nested_items(entries: dict, prefix: str = ""):
    """(key, value) with a nested dict's keys joined by '/' ('__bnb_optimizer_quant_state__/state1')."""
    for key, value in entries.items():
        if isinstance(value, dict):
            yield from _nested_items(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value


def _set_nested(d: dict, key: str, value) -> None:
    *outer, last = key.split("/")
    for k in outer:
        d = d.setdefault(k, {})
    d[last] = value


def unflatten_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        _set_nested(state.setdefault(int(pid), {}), key, value)
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        _set_nested(state.setdefault(int(pid), {}), key, value)
    groups = meta["param_groups"]
    for g in groups:  # JSON turned tuples into lists
        g.update({k: tuple(v) for k, v in g.items() if k == "betas"})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------- RNG state

def rng_state() -> dict:
    """This process's python, numpy and torch (CPU, CUDA) RNG states as JSON (bytes in base64)."""
    v, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [v, list(mt), gauss], "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": _b64(torch.get_rng_state())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    v, mt, gauss = state["python"]
    random.setstate((v, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(_unb64(state["torch"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_unb64(s) for s in state["cuda"]])


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


# ----------------------------------------------------------------------------- fsync helpers

def _write_synced(path: Path, text: str) -> None:
    """A file inside the temporary checkpoint folder (the folder's rename is what makes it atomic)."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
