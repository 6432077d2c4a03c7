"""The small helpers behind the third round of reliability fixes (tests/reliability/test_rel_careless.py runs them
through the CLI): hand-written text files by their byte-order mark, names claimed without replacing a file,
folders written whole, shard files changed under a reader, out-of-memory errors told apart from other errors."""

import errno
import os
import re
from types import SimpleNamespace

import numpy as np
import pytest

from latentforge import io
from latentforge.data.shards import CacheCorruptError, ShardStore
from latentforge.oom import is_out_of_memory, message
from latentforge.textfile import TextFileError, decode


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_text_is_read_in_every_encoding_an_editor_marks_or_ascii_utf16(encoding):
    # utf-16 / utf-32 / utf-8-sig write a BOM; utf-16-le/-be without one are recognised by their NUL pattern
    assert decode("a red circle".encode(encoding)) == "a red circle"
    assert decode("un café".encode("utf-16")) == "un café"  # non-ASCII needs the BOM, and has it


@pytest.mark.parametrize("data, why", [(b"un caf\xe9 cr\xe8me", "byte 6: invalid continuation byte (UTF-8)"),
                                       (b"a red \x00circle", "byte 6: a NUL byte"),
                                       (b"\xff\xfea\x00\x00\xd8", "byte 4: unexpected end of data (UTF-16-LE)")])
def test_text_that_is_not_is_named_by_its_first_bad_byte(data, why):
    with pytest.raises(TextFileError, match=re.escape(why)):
        decode(data)


def test_an_exclusive_write_never_replaces_a_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "00000-0.png"
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        io.atomic_write(path, lambda f: f.write(b"mine"), exclusive=True)
    assert path.read_bytes() == b"theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["00000-0.png"]
    io.atomic_write(tmp_path / "new", lambda f: f.write(b"mine"), exclusive=True)
    assert (tmp_path / "new").read_bytes() == b"mine"

    def no_links(src, dst):  # FAT, some SMB mounts
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(io.os, "link", no_links)
    with pytest.raises(FileExistsError):
        io.atomic_write(path, lambda f: f.write(b"mine"), exclusive=True)
    io.atomic_write(tmp_path / "other", lambda f: f.write(b"mine"), exclusive=True)
    assert path.read_bytes() == b"theirs" and (tmp_path / "other").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00000-0.png", "new", "other"]


def test_a_folder_is_written_whole_or_not_at_all(tmp_path):
    out = tmp_path / "model"
    with pytest.raises(OSError) as e:
        with io.atomic_folder(out) as tmp:
            (tmp / "unet").mkdir()
            (tmp / "unet" / "w").write_bytes(b"1")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "vae"))
    assert list(tmp_path.iterdir()) == [] and e.value.filename == str(out / "vae")  # the name the user gave
    with io.atomic_folder(out) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "w").write_bytes(b"1")
    assert [p.name for p in tmp_path.iterdir()] == ["model"] and (out / "unet" / "w").read_bytes() == b"1"


def _store(tmp_path):
    store = ShardStore(str(tmp_path), "latent", None, shard_size=2)
    store.add("a", latent=np.arange(4, dtype=np.float32))
    store.add("b", latent=-np.arange(4, dtype=np.float32))
    reader = ShardStore(str(tmp_path), "latent", store.state(), 2)
    name = next(iter(reader.shards))
    reader.verify(name)
    return reader, tmp_path / reader.shards[name]["files"]["latent"]["file"]


def test_a_shard_changed_in_place_under_a_reader_is_named(tmp_path):
    reader, path = _store(tmp_path)
    assert reader.row("b")["latent"].tolist() == [0, -1, -2, -3]
    reader.check_unchanged()  # nothing happened
    os.utime(path, ns=(1, 1))  # touched, same bytes: not a change
    reader.check_unchanged()
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x40  # another program rewrites a float in place; the memory map sees it
    with open(path, "r+b") as f:
        f.write(bytes(raw))
    assert reader.row("b")["latent"].tolist() != [0, -1, -2, -3]
    with pytest.raises(CacheCorruptError, match=f"{path.name}: changed on disk while training read it"):
        reader.check_unchanged()


def test_a_shard_replaced_by_a_rename_is_not_read_and_not_a_change(tmp_path):
    reader, path = _store(tmp_path)
    reader.row("a")
    other = tmp_path / "replacement"
    other.write_bytes(b"\0" * path.stat().st_size)
    os.replace(other, path)  # a rebuild renames new files into place: the map keeps the old inode
    assert reader.row("b")["latent"].tolist() == [0, -1, -2, -3]
    reader.check_unchanged()


def test_out_of_memory_is_told_apart_and_names_what_to_lower():
    import torch

    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"))
    assert "lower --n" in message("sample", SimpleNamespace(), MemoryError())
    assert "no checkpoint was written yet" in message("train", SimpleNamespace(out=None), MemoryError())


def test_sighup_stops_like_sigterm_unless_nohup_ignores_it():
    import signal

    from latentforge.train.signals import StopRequest

    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # as in a login shell (the suite may run under nohup)
    try:
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGHUP)
            assert stop.name == "SIGHUP"
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # what `nohup` leaves the process
        with StopRequest() as stop:
            signal.raise_signal(signal.SIGHUP)
            assert not stop.requested and signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
