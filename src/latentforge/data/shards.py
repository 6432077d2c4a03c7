"""Immutable, checksummed shard files of fixed-shape rows, found by key; atomic writes.

A shard is a few `.npy` files (one per array name) holding rows [0, n). Files are written to a
temporary name, fsync'ed and renamed, so a reader never sees half a shard; the caller writes the
manifest that lists a shard only after the shard is on disk. Shards are named by the keys they
hold and never rewritten: when their rows go stale they are repacked into new shards and deleted.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Dict, List, Optional

import numpy as np

from .. import io
from ..errors import UserError
from ..io import sha256_file, sha256_stream


def _identity(st: os.stat_result) -> tuple:
    return st.st_ino, st.st_size, st.st_mtime_ns


class CacheCorruptError(UserError):
    """A cache file does not match the checksum in its manifest."""


def atomic_write(path: str, write: Callable) -> None:
    """`io.atomic_write` (temporary name, fsync, rename); a failed write is one line, the old file untouched."""
    try:
        io.atomic_write(path, write)
    except OSError as e:  # disk full, quota, read-only
        raise UserError(f"{path}: cannot write ({e.strerror or e}) — free disk space (or fix permissions) "
                        "and re-run; finished shards are kept") from None


def write_json(path: str, obj) -> None:
    atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, sort_keys=True).encode("utf-8")))


class ShardStore:
    """Rows keyed by string, buffered in memory and written `shard_size` rows at a time.

    `index` maps key -> [shard name, row]; `shards` maps shard name -> {"rows": n, "files":
    {array: {"file", "sha256", "bytes"}}}. Both are plain JSON, kept in the cache manifest;
    `on_flush()` is called after each shard is on disk (the caller rewrites the manifest then).
    """

    def __init__(self, root: str, kind: str, state: Optional[dict], shard_size: int,
                 on_flush: Optional[Callable[[], None]] = None):
        self.root, self.kind, self.shard_size, self.on_flush = root, kind, shard_size, on_flush
        state = state or {}
        self.shards: Dict[str, dict] = dict(state.get("shards", {}))
        self.index: Dict[str, list] = dict(state.get("index", {}))
        self.pending_keys: List[str] = []
        self.pending: Dict[str, List[np.ndarray]] = {}
        self._open: Dict[str, Dict[str, np.ndarray]] = {}
        self._seen: Dict[str, tuple] = {}  # file -> (inode, size, mtime) when its bytes were last known good
        self._handles: Dict[str, object] = {}  # file -> the open file its memory map reads

    def state(self) -> dict:
        return {"shards": self.shards, "index": self.index}

    def __getstate__(self) -> dict:  # DataLoader workers under "spawn": re-open, don't copy, the maps
        return {**self.__dict__, "_open": {}, "_handles": {}, "on_flush": None}

    def __contains__(self, key: str) -> bool:
        return key in self.index

    # ---- checks ----------------------------------------------------------------------------

    def verify(self, name: str) -> None:
        """Raise CacheCorruptError naming the first file of shard `name` that is missing or altered."""
        for rec in self.shards[name]["files"].values():
            path = os.path.join(self.root, rec["file"])
            if not os.path.isfile(path):
                raise CacheCorruptError(f"{path}: listed in the manifest but missing — rebuild the cache "
                                        "(latentforge cache ...) to re-encode it")
            st = os.stat(path)
            if st.st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
                raise CacheCorruptError(f"{path}: checksum mismatch, the file is corrupt — delete it and "
                                        "re-run latentforge cache to re-encode it")
            self._seen[rec["file"]] = _identity(st)

    def check_unchanged(self) -> None:
        """Raise CacheCorruptError naming a memory-mapped file whose bytes changed since they were verified
        (written in place by another program, a disk error): an fstat per open file, a checksum only of a file
        whose inode, size or mtime moved. Files replaced by a rename are not read (the map holds the old inode)."""
        for file, f in self._handles.items():
            st = os.fstat(f.fileno())
            if _identity(st) == self._seen.get(file):
                continue
            rec = next(r for sh in self.shards.values() for r in sh["files"].values() if r["file"] == file)
            f.seek(0)
            if st.st_size != rec["bytes"] or sha256_stream(f) != rec["sha256"]:
                raise CacheCorruptError(f"{os.path.join(self.root, file)}: changed on disk while training read it "
                                        "(checksum mismatch)")
            self._seen[file] = _identity(st)

    def drop_bad_shards(self) -> List[str]:
        """Forget shards that fail `verify` (their rows get re-encoded); returns the messages."""
        problems = []
        for name in list(self.shards):
            try:
                self.verify(name)
            except CacheCorruptError as e:
                problems.append(str(e))
                self.forget(name)
        return problems

    def forget(self, name: str) -> None:
        for rec in self.shards[name]["files"].values():
            f = self._handles.pop(rec["file"], None)
            if f is not None:
                f.close()
        del self.shards[name]
        self._open.pop(name, None)
        self.index = {k: loc for k, loc in self.index.items() if loc[0] != name}

    # ---- reading ---------------------------------------------------------------------------

    def arrays(self, name: str) -> Dict[str, np.ndarray]:
        """The shard's arrays, memory-mapped (read-only)."""
        if name not in self._open:
            self._open[name] = {a: self._map(rec["file"]) for a, rec in self.shards[name]["files"].items()}
        return self._open[name]

    def _map(self, file: str) -> np.ndarray:
        """A read-only memory map of the .npy `file`, its file kept open for `check_unchanged`."""
        f = open(os.path.join(self.root, file), "rb")
        self._handles[file] = f
        self._seen.setdefault(file, _identity(os.fstat(f.fileno())))  # verified by path, or trusted (verify=False)
        fmt = np.lib.format
        read_header = fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0
        shape, fortran, dtype = read_header(f)
        return np.memmap(f, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=f.tell())

    def row(self, key: str) -> Dict[str, np.ndarray]:
        name, i = self.index[key]
        return {a: np.asarray(x[i]) for a, x in self.arrays(name).items()}

    # ---- writing ---------------------------------------------------------------------------

    def add(self, key: str, **arrays: np.ndarray) -> None:
        self.pending_keys.append(key)
        for a, x in arrays.items():
            self.pending.setdefault(a, []).append(np.asarray(x))
        if len(self.pending_keys) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending_keys:
            return
        keys = self.pending_keys
        name = f"{self.kind}-{hashlib.sha256(chr(10).join(keys).encode()).hexdigest()[:16]}"
        files = {}
        for a, rows in self.pending.items():
            fname = f"{name}.{a}.npy"
            path = os.path.join(self.root, fname)
            atomic_write(path, lambda f, x=np.stack(rows): np.save(f, x, allow_pickle=False))
            files[a] = {"file": fname, "sha256": sha256_file(path), "bytes": os.path.getsize(path)}
        self.shards[name] = {"rows": len(keys), "files": files}
        self.index.update({k: [name, i] for i, k in enumerate(keys)})
        self.pending_keys, self.pending = [], {}
        if self.on_flush is not None:
            self.on_flush()

    def keep_only(self, live: set, repack_below: float = 0.5) -> None:
        """Drop keys not in `live`; rows of mostly-stale shards are rewritten into new shards."""
        self.index = {k: loc for k, loc in self.index.items() if k in live}
        used: Dict[str, int] = {}
        for name, _ in self.index.values():
            used[name] = used.get(name, 0) + 1
        for name in list(self.shards):
            n_live = used.get(name, 0)
            if n_live == 0:
                self.forget(name)
            elif n_live < repack_below * self.shards[name]["rows"]:
                rows = [(k, self.row(k)) for k, loc in self.index.items() if loc[0] == name]
                self.forget(name)
                for k, arrays in rows:
                    self.add(k, **arrays)
        self.flush()

    def files(self) -> set:
        return {rec["file"] for s in self.shards.values() for rec in s["files"].values()}
