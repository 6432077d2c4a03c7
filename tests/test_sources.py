"""Data sources (folder+txt, metadata.jsonl, webdataset tar, unconditional, class folders), every
kind of bad file with its exact skip reason, and the image handling (EXIF, alpha, modes, crops)."""

import io
import json
import os
import random
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.data import sources
from latentforge.data.images import load_image, to_pil, to_tensor
from latentforge.data.sources import scan
from latentforge.errors import UserError


def png(path, size=(32, 32), colour=(200, 30, 30), fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def png_bytes(size=(32, 32), colour=(10, 20, 30), fmt="PNG"):
    b = io.BytesIO()
    Image.new("RGB", size, colour).save(b, fmt)
    return b.getvalue()


def write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return path


def tar_with(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


# ---- source types --------------------------------------------------------------------------


def test_nested_folder_with_txt_captions(tmp_path):
    png(tmp_path / "a.png")
    write(tmp_path / "a.txt", "a red square\n")
    png(tmp_path / "sub" / "deeper" / "b.jpg", fmt="JPEG")
    write(tmp_path / "sub" / "deeper" / "b.txt", "\ufeffdeep caption")  # a UTF-8 BOM is fine
    png(tmp_path / "sub" / "c.webp", fmt="WEBP")  # no caption in a captioned set -> ""
    items, skipped = scan(str(tmp_path), verify=True)
    assert skipped == []
    assert [(i.id, i.caption, i.label) for i in items] == [
        ("a.png", "a red square", None), ("sub/c.webp", "", None), ("sub/deeper/b.jpg", "deep caption", None)]
    assert sources.class_names(items) is None


def test_hf_imagefolder_metadata_jsonl(tmp_path):
    png(tmp_path / "train" / "x.png")
    png(tmp_path / "train" / "imgs" / "y.png")
    write(tmp_path / "train" / "metadata.jsonl",
          '{"file_name": "x.png", "prompt": "first"}\n\n{"file_name": "imgs/y.png", "prompt": "second"}\n')
    items, skipped = scan(str(tmp_path), caption_column="prompt")
    assert skipped == []
    assert [(i.id, i.caption) for i in items] == [("train/imgs/y.png", "second"), ("train/x.png", "first")]


def test_webdataset_tar_shards(tmp_path):
    tar_with(tmp_path / "shard-000.tar", {
        "k1.jpg": png_bytes(fmt="JPEG"), "k1.txt": b"one",
        "k2.png": png_bytes(), "k2.json": json.dumps({"caption": "two", "w": 3}).encode(),
        "sub/k3.webp": png_bytes(fmt="WEBP"), "sub/k3.txt": b"three",
    })
    items, skipped = scan(str(tmp_path), verify=True)
    assert skipped == []
    assert [(i.id, i.caption) for i in items] == [
        ("shard-000.tar/k1", "one"), ("shard-000.tar/k2", "two"), ("shard-000.tar/sub/k3", "three")]
    assert items[1].read_bytes() == png_bytes()
    assert load_image(items[1].read_bytes(), 16, name=items[1].name).getpixel((0, 0)) == (10, 20, 30)


def test_no_captions_is_unconditional(tmp_path):
    png(tmp_path / "a.png")
    png(tmp_path / "b.png")
    png(tmp_path / "sub" / "c.png")  # images at the top too -> not class folders
    items, skipped = scan(str(tmp_path))
    assert skipped == [] and [i.caption for i in items] == [None] * 3 and [i.label for i in items] == [None] * 3


def test_class_folders_give_labels(tmp_path):
    png(tmp_path / "dogs" / "1.png")
    png(tmp_path / "cats" / "1.png")
    png(tmp_path / "cats" / "kittens" / "2.png")  # nested: still the first folder's class
    items, skipped = scan(str(tmp_path))
    assert skipped == [] and sources.class_names(items) == ["cats", "dogs"]
    assert [(i.id, i.label, i.caption) for i in items] == [
        ("cats/1.png", 0, None), ("cats/kittens/2.png", 0, None), ("dogs/1.png", 1, None)]
    assert all(i.label is None for i in scan(str(tmp_path), labels="none")[0])
    png(tmp_path / "loose.png")
    items, skipped = scan(str(tmp_path), labels="folders")
    assert [(s.reason, os.path.basename(s.path)) for s in skipped] == [("no_class_folder", "loose.png")]
    with pytest.raises(UserError, match="labels"):
        scan(str(tmp_path), labels="maybe")


def test_missing_data_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="nope: not a data folder"):
        scan(str(tmp_path / "nope"))


# ---- bad files -----------------------------------------------------------------------------


def test_every_kind_of_bad_file_is_skipped_with_its_reason(tmp_path, monkeypatch):
    d = tmp_path / "data"
    good = png(d / "good.png")
    write(d / "good.txt", "fine")
    write(d / "zero.png", b"")
    write(d / "text.png", b"this is not an image at all")
    png(d / "really_png.jpg")  # PNG bytes named .jpg
    write(d / "notes.docx", b"PK\x03\x04")
    full = png_bytes((64, 64))
    write(d / "trunc.png", full[: len(full) // 2])
    broken = bytearray(full)
    broken[len(full) // 2: len(full) // 2 + 8] = bytes(b ^ 0xFF for b in broken[len(full) // 2: len(full) // 2 + 8])
    write(d / "broken.png", bytes(broken))
    png(d / "tiny.png", size=(8, 40))
    png(d / "huge.png", size=(100, 90))
    png(d / "badcap.png")
    write(d / "badcap.txt", b"caf\xe9 latin-1")
    write(d / "orphan.txt", "a caption with no image")
    os.symlink("loop_b.png", d / "loop_a.png")
    os.symlink("loop_a.png", d / "loop_b.png")
    os.makedirs(d / "sub")
    os.symlink("..", d / "sub" / "up")  # a folder loop: walking it would never end
    os.symlink("missing.png", d / "dangling.png")
    secret = str(png(d / "secret.png"))
    os.chmod(secret, 0)
    if os.geteuid() == 0:  # root reads mode-000 files anyway; answer os.access as a normal user would
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m, **k: False if os.fspath(p) == secret else real_access(p, m, **k))
    png(d / "meta" / "listed.png")
    png(d / "meta" / "unlisted.png")
    write(d / "meta" / "metadata.jsonl", '{"file_name": "listed.png", "text": "ok"}\n{oops\n'
          '{"file_name": "gone.png", "text": "x"}\n{"file_name": "listed.png"}\n')
    write(d / "junk.tar", b"\x00garbage" * 200)
    tar_with(d / "s.tar", {"a.png": png_bytes(), "a.json": b"{not json", "b.txt": b"lonely", "c.png": b""})

    items, skipped = scan(str(d), max_pixels=64 * 64, verify=True)
    got = {(os.path.relpath(s.path, d), s.reason) for s in skipped}
    assert got == {
        ("zero.png", "zero_bytes"),
        ("text.png", "not_image"),
        ("really_png.jpg", "wrong_extension"),
        ("notes.docx", "unsupported_extension"),
        ("trunc.png", "truncated"),
        ("broken.png", "decode_error"),
        ("tiny.png", "too_small"),
        ("huge.png", "decompression_bomb"),
        ("badcap.txt", "caption_not_utf8"),
        ("orphan.txt", "caption_without_image"),
        ("loop_a.png", "symlink_loop"),
        ("loop_b.png", "symlink_loop"),
        ("sub/up", "symlink_loop"),
        ("dangling.png", "broken_symlink"),
        ("secret.png", "unreadable"),
        ("meta/unlisted.png", "not_in_metadata"),
        ("meta/metadata.jsonl:2", "metadata_bad_line"),
        ("meta/metadata.jsonl:4", "metadata_bad_line"),
        ("meta/gone.png", "missing_file"),
        ("junk.tar", "bad_tar"),
        ("s.tar/a.json", "caption_bad_json"),
        ("s.tar/b", "caption_without_image"),
        ("s.tar/c.png", "zero_bytes"),
    }
    assert len({s.reason for s in skipped}) >= 10
    by_path = {os.path.relpath(s.path, d): s for s in skipped}
    assert by_path["huge.png"].detail == "100x90 = 9000 pixels is over the limit of 4096"
    assert by_path["really_png.jpg"].detail == "content is PNG but the extension is .jpg; rename the file"
    assert by_path["tiny.png"].detail == "8x40 is smaller than 16 pixels on a side"
    assert [(i.id, i.caption) for i in items] == [("good.png", "fine"), ("meta/listed.png", "ok"), ("s.tar/a", "")]
    assert items[0].path == str(good)

    # Header-only scan: the two files whose damage is inside the pixel data pass the scan, and
    # load_image names the same reason when the cache decodes them.
    items, skipped = scan(str(d), max_pixels=64 * 64)
    assert {"trunc.png", "broken.png"} <= {i.id for i in items}
    from latentforge.data.images import BadImage
    for name, reason in [("trunc.png", "truncated"), ("broken.png", "decode_error")]:
        with pytest.raises(BadImage) as e:
            load_image(str(d / name), 32)
        assert e.value.reason == reason

    # skipped.jsonl and the summary line
    sources.write_skipped(str(tmp_path / "skipped.jsonl"), skipped)
    rows = [json.loads(line) for line in open(tmp_path / "skipped.jsonl", encoding="utf-8")]
    assert len(rows) == len(skipped) and set(rows[0]) == {"path", "reason", "detail"}
    assert sources.summary(skipped).startswith(f"skipped {len(skipped)} file(s): ")
    assert set(r["reason"] for r in rows) <= set(sources.REASONS)


def test_pil_default_limit_does_not_preempt_a_higher_configured_limit(tmp_path):
    # A 1-bit PNG of 10000 x 9000 = 90 M pixels (over PIL's 89.5 M default) is a small file.
    path = str(tmp_path / "big.png")
    Image.new("1", (10000, 9000)).save(path)
    items, skipped = scan(str(tmp_path), max_pixels=100_000_000)
    assert skipped == [] and len(items) == 1
    items, skipped = scan(str(tmp_path))  # default limit 8192^2 = 67 M
    assert [s.reason for s in skipped] == ["decompression_bomb"]


def test_a_folder_linked_twice_is_read_once(tmp_path):
    png(tmp_path / "real" / "a.png")
    os.symlink("real", tmp_path / "alias")
    items, skipped = scan(str(tmp_path), labels="none")
    assert [i.id for i in items] == ["alias/a.png"]  # sorted walk meets the alias first
    assert [(os.path.basename(s.path), s.reason) for s in skipped] == [("real", "duplicate_folder")]


# ---- image handling ------------------------------------------------------------------------


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    img.save(tmp_path / "r.png", exif=exif)
    out = np.asarray(load_image(str(tmp_path / "r.png"), 20))
    assert out.shape == (20, 20, 3)
    assert (out[:10] == (255, 0, 0)).all() and (out[10:] == (0, 0, 255)).all()  # red on top now


def test_alpha_palette_gray_cmyk_and_16_bit_become_rgb(tmp_path):
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
    rgba.paste((255, 0, 0, 255), (0, 0, 8, 16))
    rgba.save(tmp_path / "a.png")
    out = load_image(str(tmp_path / "a.png"), 16)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((15, 0)) == (255, 255, 255)
    Image.new("LA", (16, 16), (0, 128)).save(tmp_path / "la.png")
    assert load_image(str(tmp_path / "la.png"), 16).getpixel((3, 3)) == (127, 127, 127)
    pal = Image.new("P", (16, 16), 1)
    pal.putpalette([0, 255, 0, 10, 20, 30] + [0] * 762)
    pal.save(tmp_path / "p.png", transparency=1)
    assert load_image(str(tmp_path / "p.png"), 16).getpixel((0, 0)) == (255, 255, 255)
    pal.save(tmp_path / "p2.gif")
    assert load_image(str(tmp_path / "p2.gif"), 16).getpixel((0, 0)) == (10, 20, 30)
    Image.new("L", (16, 16), 100).save(tmp_path / "g.png")
    assert load_image(str(tmp_path / "g.png"), 16).getpixel((0, 0)) == (100, 100, 100)
    Image.new("CMYK", (16, 16), (255, 0, 0, 0)).save(tmp_path / "c.jpg")
    r, g, b = load_image(str(tmp_path / "c.jpg"), 16).getpixel((8, 8))
    assert r < 10 and g > 245 and b > 245  # cyan
    x = np.zeros((16, 16), np.uint16)
    x[:, 8:] = 65535
    x[:, :8] = 32896  # = 128 * 257
    Image.fromarray(x).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    out = load_image(str(tmp_path / "16.png"), 16)
    assert out.getpixel((0, 0)) == (128, 128, 128) and out.getpixel((15, 0)) == (255, 255, 255)


def test_resize_shorter_side_then_center_crop_random_crop_and_flip(tmp_path):
    x = np.zeros((20, 60, 3), np.uint8)
    x[..., 0] = np.arange(60)[None, :]  # red = column index
    Image.fromarray(x).save(tmp_path / "wide.png")
    out = np.asarray(load_image(str(tmp_path / "wide.png"), 20))  # no resize needed
    assert out.shape == (20, 20, 3) and list(out[0, :, 0]) == list(range(20, 40))
    rng = random.Random(3)
    left = random.Random(3).randint(0, 40)
    out = np.asarray(load_image(str(tmp_path / "wide.png"), 20, random_crop=True, rng=rng))
    assert list(out[0, :, 0]) == list(range(left, left + 20))
    out = np.asarray(load_image(str(tmp_path / "wide.png"), 20, flip=True))
    assert list(out[0, :, 0]) == list(range(39, 19, -1))
    tall = np.zeros((80, 40, 3), np.uint8)
    tall[:20] = 255  # top quarter white: falls outside the center crop after 40x80 -> 20x40
    Image.fromarray(tall).save(tmp_path / "tall.png")
    out = np.asarray(load_image(str(tmp_path / "tall.png"), 20))
    assert out.shape == (20, 20, 3) and out[2:].max() < 8 and out.mean() < 20


def test_tensor_round_trip():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    t = to_tensor(img)
    assert t.shape == (3, 8, 8) and t.min() >= -1 and t.max() <= 1
    assert np.array_equal(np.asarray(to_pil(t)), np.asarray(img))


def test_pixel_convention_is_batch_aware_and_rounds_as_diffusers():
    """One pair for every module: lists / uint8 tensors in, (B, 3, H, W) out; to_pil of a batch is a list,
    each image rounded exactly as diffusers' VaeImageProcessor.numpy_to_pil (the pipeline's oracle)."""
    from diffusers.image_processor import VaeImageProcessor

    rng = np.random.default_rng(1)
    imgs = [Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)) for _ in range(3)]
    batch = to_tensor(imgs)
    assert batch.shape == (3, 3, 6, 10) and torch.equal(batch[1], to_tensor(imgs[1]))
    u8 = torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in imgs])  # (3, 3, 6, 10)
    assert torch.equal(to_tensor(u8), batch)
    assert torch.equal(to_tensor(imgs[0].convert("L")), to_tensor(imgs[0].convert("L").convert("RGB")))
    x = torch.randn(3, 3, 6, 10, generator=torch.Generator().manual_seed(2)) * 0.7  # decoder-like, past ±1 too
    ours = to_pil(x)
    ref = VaeImageProcessor.numpy_to_pil(VaeImageProcessor.pt_to_numpy((x / 2 + 0.5).clamp(0, 1)))
    assert isinstance(ours, list) and len(ours) == 3
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(ours, ref))
    assert [np.asarray(im).tolist() for im in to_pil(batch)] == [np.asarray(im).tolist() for im in imgs]
