"""Resume-or-refuse: every check a `--resume` makes, before anything in the run folder is written; and the
one save / restore path of a TrainState, shared by the UNet loop (train/loop.py) and the VAE loop (train/vae.py).

    loaded = resume.prepare(run, cfg, dataset, resume=True, math=math_dict(cfg))  # (path, tensors, state) | None
    resume.restore(loaded, d, state)              # weights, EMA, optimizer, guard, scaler, step, this rank's RNG
    resume.write_checkpoint(run, cfg, d, state, data_position, extra={"cache": cache_identity(dataset)})

A checkpoint = TrainState.state_dict() (weights, EMA, optimizer, guard, scaler, step) + data position, config
hash + math keys, lr, every rank's RNG state, world size, and the caller's extras (files and JSON keys).

The checks, in order (each refusal is one line; none of them writes a byte):
  - the run folder holds checkpoints but `--resume` was not given -> refuse (or `restart`);
  - every `step-N` folder is unusable (no COMPLETE marker, a checksum mismatch) -> refuse, listing each
    with what is wrong; `restart` moves them to `checkpoints-set-aside-K/` (never deleted) and starts over;
  - no checkpoint, but a finished run's model/ (or lora/, vae/) is there (its checkpoints deleted to save
    space) -> refuse: step 0 would overwrite it; `restart` moves it to `model-set-aside-K/` as well;
  - max_steps is below the checkpoint's step -> refuse (the run is past it);
  - a setting that changes the math differs from the checkpoint's -> refuse naming the keys;
  - the checkpoint's data position does not match its step -> refuse (damaged state.json);
  - the latent cache is not the one the checkpoint was trained on (latents added, removed, re-encoded
    or reordered) -> refuse naming what changed; `allow_changed_data` continues with a warning saying
    that the data order from there on differs from an uninterrupted run.

`check_first` makes the refusals above that need no tensors (all but a damaged tensor file) for `train --data`,
before it builds RUN/cache: a refused run encodes nothing.

The checkpoint records the cache's identity (`cache_identity`): the number of latents, the sha256 of
their ordered (id, key) list, and a short hash per latent, so the refusal can say what changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..config_loading import config_hash, math_dict
from ..errors import UserError
from ..io import sha256_file
from . import checkpoint, distributed

SET_ASIDE = "{}-set-aside-{}"
_LIST_MAX = 200_000  # latents up to which the per-latent hashes are stored (to name what changed)


def _h(text: str, n: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def cache_identity(dataset) -> dict | None:
    """{n, order_sha256, rows: [[id hash, key hash], ...]} of a LatentDataset; None for other datasets."""
    entries = getattr(dataset, "entries", None)
    if entries is None:
        return None
    pairs = [(str(e["id"]), str(e["key"])) for e in entries]
    order = hashlib.sha256("\n".join(f"{i}\t{k}" for i, k in pairs).encode()).hexdigest()
    rows = [[_h(i, 10), k[:12]] for i, k in pairs] if len(pairs) <= _LIST_MAX else None
    return {"n": len(pairs), "order_sha256": order, "rows": rows}


def describe_change(old: dict, dataset) -> str | None:
    """None when `dataset` is the cache `old` describes; else what changed, in words."""
    new = cache_identity(dataset)
    if new is None or old is None or new["order_sha256"] == old["order_sha256"]:
        return None
    if old.get("rows") is None or new["rows"] is None:
        return f"the cache now holds {new['n']} latents (was {old['n']}) and their list differs"
    old_ids, new_ids = {i: k for i, k in old["rows"]}, {i: k for i, k in new["rows"]}
    ids = [str(e["id"]) for e in dataset.entries]
    added = [x for x, (i, _) in zip(ids, new["rows"]) if i not in old_ids]
    removed = [i for i in old_ids if i not in new_ids]
    changed = [x for x, (i, k) in zip(ids, new["rows"]) if i in old_ids and old_ids[i] != k]
    parts = [f"{len(added)} latent(s) added (e.g. {added[0]})" if added else "",
             f"{len(removed)} removed" if removed else "",
             f"{len(changed)} re-encoded (e.g. {changed[0]}: the file or its settings changed)" if changed else ""]
    parts = [p for p in parts if p] or ["the latents were reordered"]
    return f"{', '.join(parts)}; {old['n']} -> {new['n']} latents"


def check_cache(state: dict, dataset, path, allow_changed_data: bool, warn=None) -> None:
    """Refuse (or, allowed, warn about) a cache that differs from the one the checkpoint was trained on."""
    change = describe_change(state.get("cache"), dataset)
    if change is None:
        return
    if not allow_changed_data:
        raise UserError(f"--resume: the latent cache changed since {path} was written ({change}) — resume with the "
                        "cache it was trained on, or pass --allow-changed-data to continue on this one")
    (warn or _stderr)(f"warning: --allow-changed-data: the cache changed since {path} ({change}); continuing "
                      f"from step {state['step']} over {len(dataset)} latents — the data order from here on is not "
                      "an uninterrupted run's (epochs are re-drawn over the new set)")


def check_first(run, cfg, dataset, *, resume: bool, allow_changed_data: bool = False,
                from_data: frozenset = frozenset()) -> None:
    """`prepare`'s refusals that need no tensors, for `train --data` to make before it builds RUN/cache, so that
    a refused run encodes and writes nothing: checkpoints without `resume`, none usable, a setting that changes
    the math (but the keys `from_data`, which the loop fills in from the cache: `prepare` compares those), the
    data position, and the cache identity of `dataset` (the entries the cache would get:
    data.cache.planned_entries). Checked against the newest checkpoint whose state.json passes its checksum
    (no tensors read); `prepare` verifies every file later."""
    run = Path(run)
    ckpts = step_dirs(run / "checkpoints")
    if not ckpts:
        return
    if not resume:
        raise _not_resumed(run)
    for path in ckpts:
        state = _intact_state(path)
        if state is None:
            continue  # damaged: an older one is used, or `prepare` names them all
        keep = lambda math: {k: v for k, v in math.items() if k not in from_data}  # noqa: E731
        checkpoint.check_config({"math": keep(state.get("math", {}))}, keep(math_dict(cfg)), path)
        _check_position(state, cfg, path)
        check_cache(state, dataset, path, allow_changed_data, warn=lambda m: None)
        return
    raise _none_usable(ckpts)


def _intact_state(path: Path) -> dict | None:
    """A checkpoint's state.json if its COMPLETE marker records it with this content, else None."""
    try:
        sums = json.loads((path / checkpoint.MARKER).read_text())["sha256"]
        if sums.get("state.json") != sha256_file(path / "state.json"):
            return None
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _not_resumed(run: Path) -> UserError:
    return UserError(f"--out {run}: already holds checkpoints — pass --resume to continue it, "
                     "or choose a new --out (or --restart to set them aside and start over)")


def _none_usable(ckpts: list[Path]) -> UserError:
    listing = "; ".join(f"{d}: {_problem(d) or 'unreadable'}" for d in ckpts)
    return UserError(f"--resume: no usable checkpoint ({listing}) — choose a new --out, "
                     "or pass --restart to set them aside (kept, not deleted) and start from step 0")


def _check_position(state: dict, cfg, path) -> None:
    if cfg.max_steps < state["step"]:
        raise UserError(f"--resume: max_steps={cfg.max_steps} is below step {state['step']}, where {path} already "
                        f"is — pass max_steps={state['step']} or more (or leave max_steps out to keep the run's)")
    if state["data_position"] != state["step"] * getattr(cfg, "grad_accum", 1) * cfg.batch_size:
        raise UserError(f"--resume: {path}/state.json: data position does not match step — the checkpoint is damaged")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)


def step_dirs(ckpt_root) -> list[Path]:
    """Every `step-N` folder (complete or not), newest first."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := checkpoint._STEP_DIR.match(d.name)) and d.is_dir()]
    return [d for _, d in sorted(found, reverse=True)]


def _problem(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder, or None if it verifies."""
    if not (ckpt / checkpoint.MARKER).is_file():
        return f"no {checkpoint.MARKER} marker (written while the process died)"
    if not (ckpt / "state.json").is_file():
        return "no state.json"
    try:
        checkpoint.verify(ckpt)
    except UserError as e:
        return str(e).split(" — ")[0].replace(str(ckpt) + os.sep, "")
    return None


def set_aside(run: Path, name: str = "checkpoints") -> Path:
    """Move run/<name> to run/<name>-set-aside-K (the first free K); nothing is deleted."""
    k = 1
    while (run / SET_ASIDE.format(name, k)).exists():
        k += 1
    target = run / SET_ASIDE.format(name, k)
    (run / name).rename(target)
    return target


def prepare(run, cfg, dataset, *, resume: bool, math: dict, restart: bool = False,
            allow_changed_data: bool = False, warn=_stderr, is_main: bool = True, outputs=("model", "lora")):
    """-> (path, tensors, state) of the checkpoint to continue from, or None to start at step 0.
    `outputs`: the folders a finished run writes into `run` (a new run from step 0 would replace them).

    Every check is made here, before the caller writes config.toml or touches any log."""
    run = Path(run)
    ckpts = step_dirs(run / "checkpoints")
    finished = [name for name in outputs if (run / name).exists()]
    if (ckpts or finished) and restart:
        if is_main:
            kept = ", ".join(f"{name}/ in {set_aside(run, name)}" for name in ["checkpoints"] * bool(ckpts) + finished)
            warn(f"warning: --restart: the earlier run's {kept} (kept); starting from step 0")
        return None
    if ckpts and not resume:
        raise _not_resumed(run)
    if not ckpts:
        if finished:  # a finished run whose checkpoints were deleted: step 0 would overwrite its model
            raise UserError(f"--out {run}: holds a finished run's {finished[0]}/ and no checkpoint to "
                            f"{'resume from' if resume else 'continue'} — choose a new --out (or pass --restart "
                            f"to set {finished[0]}/ aside, kept, and start over)")
        if resume and is_main:
            warn(f"--resume: no checkpoint in {run / 'checkpoints'} yet — starting from step 0")
        return None
    held: list[str] = []  # warnings about damaged newer checkpoints: said only if an older one is used
    try:
        loaded = checkpoint.load_newest_intact(run / "checkpoints", held.append)
    except checkpoint.CheckpointCorrupt:
        loaded = None
    if loaded is None:
        raise _none_usable(ckpts)
    for message in held if is_main else ():
        warn(message)
    path, tensors, state = loaded
    checkpoint.check_config(state, math, path)
    _check_position(state, cfg, path)
    check_cache(state, dataset, path, allow_changed_data, warn if is_main else (lambda m: None))
    return path, tensors, state


def write_checkpoint(run: Path, cfg, d, state, data_position: int, tensors=None, extra=None) -> None:
    """Write checkpoints/step-<state.step> (rank 0; every rank's RNG is gathered first). `tensors` / `extra`:
    more file stems / JSON keys (the VAE's discriminator, the cache identity)."""
    state.flush()  # the guard's pending verdicts (a collective: every rank saves at the same step)
    rng = distributed.gather_json(checkpoint.rng_state(), d)  # every rank's RNG, gathered to all
    if d.is_main:
        weights, meta = state.state_dict()
        meta.update(data_position=data_position, config_hash=config_hash(cfg), math=math_dict(cfg),
                    lr={"schedule": cfg.lr_schedule, "value": state.optimizer.param_groups[0]["lr"]},
                    world_size=d.world_size, rng=rng, **(extra or {}))
        checkpoint.save(Path(run) / "checkpoints", state.step, {**weights, **(tensors or {})}, meta,
                        keep=cfg.keep_checkpoints)
    distributed.barrier(d)


def restore(loaded, d, state) -> None:
    """Load a checkpoint that `prepare` has checked, `(path, tensors, meta)`, into `state`, and this rank's RNG
    (when the world size is unchanged: otherwise the per-rank streams are new, the math is not)."""
    _, tensors, meta = loaded
    state.load_state_dict(tensors, meta)
    if meta["world_size"] == d.world_size:
        checkpoint.set_rng_state(meta["rng"][d.rank])
