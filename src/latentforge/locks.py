"""One process at a time in a run folder or cache folder: an OS file lock that dies with its process.

    with folder_lock("runs/x", "latentforge train"):
        ...   # a second `latentforge train --out runs/x` now fails with one line naming this pid

The lock is `fcntl.flock` on `<folder>/.latentforge.lock`. The kernel releases it when the process
exits however it exits (kill -9 included), so there is never a stale lock to delete by hand; the
file itself stays. While held it names the holder's pid and command (for the message); on release it gets
back the bytes it had, so a command that only looked (or refused) leaves the folder unchanged. Only the main
process of a torchrun group takes it (`RANK` 0): the other ranks share the main rank's folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path

from .errors import UserError

LOCK_NAME = ".latentforge.lock"


class FolderBusy(UserError):
    """Another process holds the folder's lock."""


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        return "another process"
    pid, _, what = text.partition(" ")
    return f"pid {pid} ({what})" if pid.isdigit() else "another process"


# flock refused by the file system itself (some NFS and SMB/CIFS mounts, FUSE): no lock to be had
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


@contextlib.contextmanager
def folder_lock(folder, what: str, flag: str = "--out", shared: bool = False):
    """Hold a lock on `folder` for the `with` block: exclusive (a writer; the folder is created if missing), or
    `shared` (a reader, e.g. `train --cache`: any number of them, but no writer meanwhile). A file system without
    locks is a warning, not a failure; a reader that cannot create the lock file (a read-only cache) goes unlocked
    — no writer can change that folder either."""
    if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 holds it for the group
        yield None
        return
    folder = Path(folder)
    if not shared:
        folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        if not shared:
            raise
        yield None
        return
    try:
        if not _take(fd, path, folder, what, flag, shared):
            yield path
            return
        previous = os.pread(fd, 4096, 0)
        _rewrite(fd, f"{os.getpid()} {what}\n".encode())
        try:
            yield path
        finally:  # the holder's line was for the message only: put back what was there, so a command that
            _rewrite(fd, previous)  # refused leaves the folder byte for byte as it found it
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _take(fd: int, path: Path, folder: Path, what: str, flag: str, shared: bool) -> bool:
    """flock `fd`; False when the file system has no locks (said in one warning line)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in _NO_LOCKS:
            print(f"warning: {flag} {folder}: its file system cannot lock files ({e.strerror}) — make sure no other "
                  f"latentforge process uses it while {what} runs", file=sys.stderr)
            return False
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        raise FolderBusy(f"{flag} {folder}: in use by {_holder(path)} — wait for it to finish (or stop it), "
                         f"or choose another {flag}") from None
