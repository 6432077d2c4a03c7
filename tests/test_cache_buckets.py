"""The bucketed latent cache: a folder of 8 aspect ratios lands in the expected buckets, latents have
their bucket's shape, an image of its bucket's size equals a direct encode, SDXL's size/crop fields
are recorded (flipped twins too), a panorama / tall / tiny image get their documented treatment,
re-runs reuse everything, and `latentforge cache --buckets` on the command line."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.cli import main
from latentforge.config import preset
from latentforge.data.buckets import Bucket, bucket_list, fit, place
from latentforge.data.cache import BucketSpec, LatentDataset, build_cache
from latentforge.data.images import to_tensor
from latentforge.errors import UserError
from latentforge.models import AutoencoderKL

STEP, SIZE = 16, 64  # tiny VAE (4x down): buckets of multiples of 16 px at the area 64 x 64
# image size -> expected bucket (nearest log aspect ratio among bucket_list(64*64, 16))
EXPECTED = {"square.png": ((64, 64), "64x64"), "exact-wide.png": ((80, 48), "80x48"),
            "portrait.png": ((60, 100), "48x80"), "three-one.png": ((96, 32), "96x32"),
            "one-three.png": ((30, 90), "32x96"), "wide.png": ((200, 50), "128x32"),
            "panorama.png": ((400, 40), "128x32"), "very-tall.png": ((20, 300), "32x128"),
            "landscape.png": ((110, 100), "64x64")}


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(preset("tiny").vae).eval()


def noise_png(path, size, seed):
    a = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(a).save(path)


@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for i, (name, (size, _)) in enumerate(sorted(EXPECTED.items())):
        noise_png(d / name, size, i)
    noise_png(d / "tiny.png", (20, 20), 99)  # would need 3.2x enlargement to cover 64x64
    return str(d)


def test_each_image_lands_in_its_bucket_with_its_shape_and_sizes(tmp_path, folder):
    vae, out = tiny_vae(), str(tmp_path / "c")
    r = build_cache(folder, vae, None, out, size=SIZE, batch_size=3, flip=True, progress=False,
                    buckets=BucketSpec(step=STEP))
    assert r.entries == 2 * len(EXPECTED) and r.encoded == 2 * len(EXPECTED)
    assert [(s.path.rsplit("/", 1)[-1], s.reason) for s in r.skipped] == [("tiny.png", "below_bucket")]
    assert "3.20x" in r.skipped[0].detail
    rows = [json.loads(line) for line in open(os.path.join(out, "skipped.jsonl"))]
    assert [(os.path.basename(x["path"]), x["reason"]) for x in rows] == [("tiny.png", "below_bucket")]
    assert dict(r.buckets) == {"64x64": 4, "80x48": 2, "48x80": 2, "96x32": 2, "32x96": 2, "128x32": 4,
                               "32x128": 2}
    assert "buckets 32x128: 2, 32x96: 2, 48x80: 2, 64x64: 4, 80x48: 2, 96x32: 2, 128x32: 4" in str(r)
    ds = LatentDataset(out)
    blist = bucket_list(SIZE * SIZE, STEP)
    for i, e in enumerate(ds.entries):
        name = e["id"].split("#")[0]
        (w, h), bucket = EXPECTED[name]
        b = Bucket.parse(bucket)
        assert e["bucket"] == ds.buckets[i] == bucket, name
        assert ds[i]["latent"].shape == (4, b.height // 4, b.width // 4) == ds.bucket_shapes[bucket]
        p = place(w, h, blist)
        assert e["original_size"] == [h, w] and e["target_size"] == [b.height, b.width]
        assert e["crop_top_left"] == list(p.flipped().crop_top_left if e["flip"] else p.crop_top_left)
    pano = next(e for e in ds.entries if e["id"] == "panorama.png")
    assert pano["crop_top_left"] == [0, (320 - 128) // 2]  # 400x40 -> 320x32, the middle 128 kept


def test_bucket_sized_image_is_not_resampled_and_latents_equal_direct_encode(tmp_path, folder):
    vae, out = tiny_vae(), str(tmp_path / "c")
    build_cache(folder, vae, None, out, size=SIZE, batch_size=2, progress=False, buckets=BucketSpec(step=STEP))
    ds = LatentDataset(out)
    by_id = {e["id"]: i for i, e in enumerate(ds.entries)}
    for name in ("exact-wide.png", "three-one.png", "square.png"):
        img = Image.open(os.path.join(folder, name)).convert("RGB")  # its bucket's size: the pixels as they are
        with torch.no_grad():
            direct = vae.encode(to_tensor(img)[None])[0]
        torch.testing.assert_close(ds[by_id[name]]["latent"], direct, atol=1e-6, rtol=0)
    img = Image.open(os.path.join(folder, "portrait.png")).convert("RGB")  # resized + cropped: as fit() does
    with torch.no_grad():
        direct = vae.encode(to_tensor(fit(img, place(60, 100, bucket_list(SIZE * SIZE, STEP))))[None])[0]
    torch.testing.assert_close(ds[by_id["portrait.png"]]["latent"], direct, atol=1e-6, rtol=0)


def test_rerun_reuses_random_crops_are_recorded_and_square_caches_differ(tmp_path, folder):
    out = str(tmp_path / "c")
    spec = BucketSpec(step=STEP, crop="random", max_upscale=4)
    a = build_cache(folder, tiny_vae(), None, out, size=SIZE, progress=False, buckets=spec)
    assert a.encoded == len(EXPECTED) + 1 and a.skipped == []  # a 4x limit lets the 20x20 image in
    b = build_cache(folder, tiny_vae(), None, out, size=SIZE, progress=False, buckets=spec)
    assert (b.encoded, b.reused) == (0, len(EXPECTED) + 1)
    ds = LatentDataset(out)
    wide = next(e for e in ds.entries if e["id"] == "wide.png")  # 200x50 resizes to exactly 128x32: no choice
    offsets = {e["crop_top_left"][1] for e in ds.entries if e["id"] in ("panorama.png", "square.png", "landscape.png")}
    assert wide["crop_top_left"] == [0, 0] and offsets != {0}  # 400x40 -> 320x32: a left offset in 0..192
    # switching back to squares re-encodes into the square store and drops the bucket shards
    c = build_cache(folder, tiny_vae(), None, out, size=32, progress=False)
    assert c.encoded == len(EXPECTED) + 1 and c.removed == len(EXPECTED) + 1
    assert not [f for f in os.listdir(out) if f.startswith("latent-") and "x" in f.split("-")[1]]
    assert LatentDataset(out).buckets is None and LatentDataset(out)[0]["latent"].shape == (4, 8, 8)


def test_bad_bucket_settings_are_one_line(tmp_path, folder):
    with pytest.raises(UserError, match="--bucket-step 18: must be a positive multiple"):
        build_cache(folder, tiny_vae(), None, str(tmp_path / "a"), size=SIZE, progress=False,
                    buckets=BucketSpec(step=18))
    with pytest.raises(UserError, match="--size 32: the bucket area 32x32 is below one 64x64 bucket"):
        build_cache(folder, tiny_vae(), None, str(tmp_path / "b"), size=32, progress=False,
                    buckets=BucketSpec(step=64))


def test_cli_cache_buckets(tmp_path, folder, capsys):
    root = tmp_path / "model"
    tiny_vae().save_pretrained(str(root / "vae"))
    argv = ["cache", "--data", folder, "--vae", str(root), "--out", str(tmp_path / "c"), "--text-encoder", "none",
            "--size", str(SIZE), "--buckets", "--bucket-step", str(STEP), "--quiet", "--device", "cpu"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{len(EXPECTED)} latents ({len(EXPECTED)} encoded" in out and "buckets 32x128: 1," in out
    assert "1 below_bucket" in out and "skipped.jsonl" in out
    no_buckets = [a for a in argv if a != "--buckets"]
    assert main(no_buckets + ["--max-upscale", "4"]) == 2
    assert "only apply with --buckets" in capsys.readouterr().err
