"""File writing that a crash cannot half-do: the one place for sha256, fsync and atomic writes.

    io.write_json(path, obj)         # JSON, atomically
    io.write_text(path, text)        # text, atomically
    io.save_image(image, path)       # PIL image (PNG, JPEG … from the suffix), atomically
    io.save_figure(fig, path)        # matplotlib figure, atomically
    io.atomic_write(path, write)     # anything: write(f) gets a binary file object
    with io.atomic_path(path) as tmp: save_file(tensors, tmp)   # writers that want a file name

Every output goes to a temporary name in the same folder (`<name>.tmp-<pid>`: same file system, so the
rename is atomic on POSIX), is flushed and fsynced, and only then renamed onto its final name; the folder
is fsynced after the rename. A SIGKILL or power cut at any moment leaves either the old file (or none)
or the complete new one under the final name — never a 0-byte or truncated file. On an error the
temporary file is removed and the OSError propagates (callers turn a full disk into one line).

Output locations are checked before work starts with `check_out_dir` (a `--out` that is a file, or
that lies under a file, is one line instead of a traceback after the work is done).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path
from typing import BinaryIO, Callable

from .errors import UserError

__all__ = ["sha256_file", "sha256_stream", "hash_weights", "fsync_file", "fsync_dir", "atomic_write", "atomic_path", "atomic_folder", "publish", "write_bytes", "write_text", "write_json",
           "save_image", "save_figure", "temp_name", "check_out_dir"]


def sha256_file(path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in `chunk`-byte blocks."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)


def sha256_stream(f, chunk: int = 1 << 20) -> str:
    """Hex sha256 of what is left to read in the binary file object `f`."""
    h = hashlib.sha256()
    while block := f.read(chunk):
        h.update(block)
    return h.hexdigest()


def hash_weights(h, module) -> None:
    """Feed a module's weights into the hash `h` (sorted state_dict keys, then each tensor's raw bytes): the one
    weight fingerprint (latent-cache keys of the VAE and the text encoders)."""
    import torch  # here, not at the top: io is imported by the CLI's --help, which loads no torch

    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())


def fsync_file(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(folder) -> None:
    """fsync a folder (makes a rename in it durable); a file system that refuses is tolerated."""
    try:
        fsync_file(folder)
    except OSError:
        pass


def temp_name(path) -> Path:
    """The temporary name `atomic_write` uses for `path`: same folder, `<name>.tmp-<pid>`."""
    path = Path(path)
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def atomic_write(path, write: Callable[[BinaryIO], object], exclusive: bool = False) -> Path:
    """`write(f)` into a temporary file beside `path`, fsync, rename onto `path`, fsync the folder.
    `exclusive`: never replace an existing `path` (FileExistsError instead; see `publish`)."""
    with atomic_path(path, exclusive) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def publish(tmp: Path, path: Path) -> None:
    """Give the finished file `tmp` the name `path` only if no file has it: a hard link (atomic, refused with
    FileExistsError when `path` exists — another process got there first), then the temporary name goes. A file
    system without hard links (FAT, some SMB mounts) gets a check and a rename: a race window, no lost file there
    unless two processes finish within it."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError:
        if path.exists():
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


@contextlib.contextmanager
def atomic_path(path, exclusive: bool = False):
    """For writers that want a file name (safetensors' save_file): yields the temporary name; when the block
    ends the file is fsynced and renamed onto `path` (`exclusive`: only if no file has that name, see `publish`)
    — or removed, if the block raised."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        fsync_file(tmp)
        publish(tmp, path) if exclusive else os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    fsync_dir(path.parent if str(path.parent) else ".")


@contextlib.contextmanager
def atomic_folder(path):
    """A folder written whole or not at all: yields a hidden temporary folder beside `path`
    (`.<name>.partial-<pid>`); when the block ends each file in it is fsynced and the folder is renamed onto `path`
    (which must not exist, or be an empty folder) — or deleted, if the block raised. A SIGKILL leaves only the
    hidden temporary folder, never a half-written `path`."""
    import shutil

    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)  # this pid's own leftover, if any
    try:
        tmp.mkdir(parents=True)
        yield tmp
        for f in sorted(tmp.rglob("*")):
            fsync_file(f)  # files and folders alike (O_RDONLY opens both)
        os.rename(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename:  # name what the user asked for, not the temporary folder
            e.filename = str(e.filename).replace(str(tmp), str(path))
        raise
    fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, indent: int | None = 1, sort_keys: bool = False) -> Path:
    return write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=str) + "\n")


def save_image(image, path, exclusive: bool = False, **save_kwargs) -> Path:
    """A PIL image, its format from the suffix (as `Image.save`), written atomically (`exclusive`: see atomic_write)."""
    from PIL import Image

    fmt = save_kwargs.pop("format", None) or Image.registered_extensions().get(Path(path).suffix.lower(), "PNG")
    return atomic_write(path, lambda f: image.save(f, format=fmt, **save_kwargs), exclusive)


def save_figure(fig, path, **savefig_kwargs) -> Path:
    """A matplotlib figure, written atomically (format from the suffix, PNG by default)."""
    fmt = Path(path).suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs))


def check_out_dir(path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be one (it is a file, or lies under a file) before any work.
    Nothing is created here; the folder may or may not exist."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is a file, not a folder — pass a folder name (a new one, or the "
                        "folder of an earlier run)")
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {path}: {parent} is a file, not a folder — choose another location")
            if not os.access(parent, os.W_OK | os.X_OK) and not path.exists():
                raise UserError(f"{flag} {path}: cannot create it, {parent} is not writable — choose another "
                                "location (or fix its permissions)")
            break
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder is not writable — choose another --out (or fix its permissions)")
    return path
