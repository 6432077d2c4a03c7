"""Reliability 4: a fuzzed bad-data folder through the real `latentforge cache` command.

Named kinds of broken input each get their exact skip reason; hard-but-valid images (CMYK, 16-bit,
palette + transparency, EXIF-rotated, mode-000 as root) are cached; and a seeded batch of randomly
damaged PNG/JPEG files (truncated, bytes flipped, garbage spliced in) is each either cached or skipped
with a reason — never both, never lost, never a crash. Then the same folder again as an unprivileged
user (root without its permission override), where mode 000 really is unreadable.
"""

import io
import json
import os
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.data.cache import LatentDataset
from latentforge.data.sources import REASONS

from rel_kit import cli, record, save_tiny_vae

pytestmark = pytest.mark.slow


def noise_image(size, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    w, h = size
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).convert(mode)


def encoded(img, fmt, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return path


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int) -> bytes:
    """A real decompression bomb: a 1-bit side x side PNG of zeros (decodes to side² RGB pixels)."""
    raw = zlib.compress(b"\x00" * (side * (1 + (side + 7) // 8)), 9)  # filter byte + packed row, per row
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")


def exif_rotated() -> bytes:
    img = Image.new("RGB", (48, 32), (255, 0, 0))
    img.paste((0, 0, 255), (24, 0, 48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    return encoded(img, "JPEG", exif=exif)


def make_folder(d: Path) -> tuple[dict, set, list]:
    """-> (expected skips {relative path: reason}, expected cached ids, fuzz mutant ids)."""
    png = encoded(noise_image((40, 40)), "PNG")
    jpg = encoded(noise_image((48, 40), seed=1), "JPEG", quality=90)
    bad = {}

    def bad_file(name, data, reason):
        write(d / name, data)
        bad[name] = reason

    # ---- the named kinds of broken input -------------------------------------------------------
    bad_file("zero.png", b"", "zero_bytes")
    bad_file("truncated.png", png[: len(png) // 2], "truncated")
    bad_file("truncated.jpg", jpg[: len(jpg) * 6 // 10], "truncated")
    bad_file("page.jpg", "<!doctype html><html><body>404 Not Found</body></html>\n", "not_image")
    bad_file("one_pixel.png", encoded(Image.new("RGB", (1, 1)), "PNG"), "too_small")
    bad_file("bomb.png", png_bomb(9000), "decompression_bomb")  # 81 M pixels > the 67 M default limit
    bad_file("png_named.jpg", png, "wrong_extension")
    flipped = bytearray(png)
    flipped[len(png) // 2: len(png) // 2 + 16] = bytes(b ^ 0xFF for b in flipped[len(png) // 2: len(png) // 2 + 16])
    bad_file("corrupt_data.png", bytes(flipped), "decode_error")
    bad_file("notes.docx", b"PK\x03\x04 not a picture", "unsupported_extension")
    write(d / "latin1.png", png)
    bad_file("latin1.txt", "un caf\xe9 cr\xe8me".encode("latin-1"), "caption_not_utf8")
    bad_file("orphan.txt", "a caption whose image was deleted", "caption_without_image")
    os.symlink("loop_b.png", d / "loop_a.png")
    os.symlink("loop_a.png", d / "loop_b.png")
    bad.update({"loop_a.png": "symlink_loop", "loop_b.png": "symlink_loop"})
    (d / "nested").mkdir()
    os.symlink("..", d / "nested" / "up")  # a folder loop
    bad["nested/up"] = "symlink_loop"
    os.symlink("gone.png", d / "dangling.png")
    bad["dangling.png"] = "broken_symlink"
    bad_file("junk.tar", b"\x00not a tar" * 100, "bad_tar")

    # ---- hard but valid: these must be cached ---------------------------------------------------
    good = {
        "plain.png": png, "nested/deep.jpg": jpg,
        "cmyk.jpg": encoded(noise_image((40, 40), "CMYK", seed=2), "JPEG"),
        "gray16.png": encoded(Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 28).astype(np.uint16)), "PNG"),
        "palette_alpha.png": encoded(noise_image((40, 40), seed=3).convert("P"), "PNG", transparency=0),
        "exif_rotated.jpg": exif_rotated(),
        "rgba.png": encoded(noise_image((40, 40), "RGBA", seed=4), "PNG"),
        "mode000.png": png,
    }
    for name, data in good.items():
        write(d / name, data)
    write(d / "plain.txt", "ok, utf-8")
    write(d / "mode000.txt", "\ufeffa BOM is still UTF-8".encode("utf-8"))
    os.chmod(d / "mode000.png", 0)  # root still reads it; see the unprivileged run below

    # ---- fuzz: seeded random damage to a good PNG and JPEG --------------------------------------
    rng, fuzz = random.Random(20240601), []
    for i in range(24):
        src, ext = (png, "png") if i % 2 == 0 else (jpg, "jpg")
        data = bytearray(src)
        how = ("truncate", "flip", "splice", "header")[i % 4]
        if how == "truncate":
            data = data[: rng.randrange(1, len(data))]
        elif how == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif how == "splice":
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:  # damage the first 32 bytes (signature, IHDR / SOI, APP0)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(32)] = rng.randrange(256)
        name = f"fuzz/{i:02d}-{how}.{ext}"
        write(d / name, bytes(data))
        fuzz.append(name)
    return bad, set(good), fuzz


def run_cache(data: Path, vae_root: Path, out: Path, **kw):
    return cli("cache", "--data", data, "--vae", vae_root, "--out", out, "--text-encoder", "none", "--size", "32",
               "--quiet", "--device", "cpu", **kw)


def check_run(p, data: Path, out: Path):
    """No crash; skipped.jsonl rows well-formed; -> ({rel path: reason}, cached ids)."""
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    for r in rows:
        assert set(r) == {"path", "reason", "detail"} and r["reason"] in REASONS and r["detail"], r
        assert os.path.isabs(r["path"]) and r["path"].startswith(str(data)), r
    assert f"skipped {len(rows)} file(s)" in p.stdout
    skipped = {os.path.relpath(r["path"], data): r["reason"] for r in rows}
    assert len(skipped) == len(rows)  # one line per file
    ds = LatentDataset(str(out))
    for i in range(len(ds)):
        assert torch.isfinite(ds[i]["latent"]).all()
    return skipped, {ds[i]["id"] for i in range(len(ds))}


def test_fuzzed_bad_data_folder_is_cached_without_a_crash(tmp_path):
    data, out = tmp_path / "data", tmp_path / "cache"
    bad, good, fuzz = make_folder(data)
    vae_root = save_tiny_vae(tmp_path / "model")
    p = run_cache(data, vae_root, out)
    skipped, cached = check_run(p, data, out)

    assert {k: v for k, v in skipped.items() if not k.startswith("fuzz/")} == bad  # exact reasons
    assert {c for c in cached if not c.startswith("fuzz/")} == good  # every good image, nothing else
    fuzz_skipped = {k: v for k, v in skipped.items() if k.startswith("fuzz/")}
    fuzz_cached = {c for c in cached if c.startswith("fuzz/")}
    assert not fuzz_skipped.keys() & fuzz_cached and fuzz_skipped.keys() | fuzz_cached == set(fuzz)
    assert len({r for r in bad.values()}) >= 12
    details = {os.path.relpath(json.loads(l)["path"], data): json.loads(l)["detail"]
               for l in (out / "skipped.jsonl").read_text().splitlines()}
    assert "9000x9000" in details["bomb.png"] and "67108864" in details["bomb.png"]  # size and the limit, named
    record("bad_data", files=len(bad) + len(good) + len(fuzz) + 2, named_bad=len(bad),
           reasons=sorted(set(bad.values())), good_cached=sorted(good), fuzz_mutants=len(fuzz),
           fuzz_cached=len(fuzz_cached), fuzz_skipped=dict(sorted(fuzz_skipped.items())),
           summary=next(l for l in p.stdout.splitlines() if "skipped" in l and "file(s)" in l))


def drop_file_permission_override():
    """preexec_fn: drop CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH from the bounding set, so the root child
    obeys file modes like any user (prctl(PR_CAPBSET_DROP); the exec then recomputes its capabilities)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_mode_000_is_skipped_as_unreadable_without_root_override(tmp_path):
    """Tests run as root, who reads mode-000 files (cached above). Without the permission override
    (what every ordinary user has), the same kind of file is skipped as unreadable, image or caption."""
    data, out = tmp_path / "data", tmp_path / "cache"
    for i in range(2):
        write(data / f"ok{i}.png", encoded(noise_image((32, 32), seed=i), "PNG"))
    write(data / "locked.png", encoded(noise_image((32, 32), seed=9), "PNG"))
    write(data / "locked_caption.png", encoded(noise_image((32, 32), seed=8), "PNG"))
    write(data / "locked_caption.txt", "a caption nobody may read")
    os.chmod(data / "locked.png", 0)
    os.chmod(data / "locked_caption.txt", 0)
    vae_root = save_tiny_vae(tmp_path / "model")
    root = os.geteuid() == 0
    p = run_cache(data, vae_root, out, **({"preexec_fn": drop_file_permission_override} if root else {}))
    skipped, cached = check_run(p, data, out)
    assert skipped == {"locked.png": "unreadable", "locked_caption.txt": "unreadable"}
    assert cached == {"ok0.png", "ok1.png"}
    record("bad_data_unprivileged", how="root without CAP_DAC_OVERRIDE" if root else f"uid {os.geteuid()}",
           skipped=skipped, cached=sorted(cached))
