"""data/buckets.py: the bucket list equals kohya's make_bucket_resolutions, nearest-aspect assignment,
cover-resize + crop with the recorded offset, no resampling at the bucket's size, the upscale limit,
and the documented treatment of a panorama, a very tall and a tiny image."""

import math
import random

import numpy as np
import pytest
from PIL import Image

from latentforge.data.buckets import Bucket, bucket_list, fit, histogram, nearest, place
from latentforge.data.images import BadImage


def kohya_make_bucket_resolutions(max_reso, min_size=256, max_size=1024, divisible=64):
    """Transcribed from kohya-ss/sd-scripts library/model_util.py (make_bucket_resolutions)."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


@pytest.mark.parametrize("side,step", [(512, 64), (1024, 64), (768, 64)])
def test_bucket_list_is_kohyas_at_ratios_1_4_to_4_1(side, step):
    got = bucket_list(side * side, step)
    ref = kohya_make_bucket_resolutions((side, side), min_size=side // 2, max_size=side * 2, divisible=step)
    assert sorted((b.width, b.height) for b in got) == ref
    assert all(b.width % step == 0 and b.height % step == 0 for b in got)
    assert all(b.width * b.height <= side * side for b in got)
    assert min(b.ratio for b in got) == 0.25 and max(b.ratio for b in got) == 4.0
    assert [b.ratio for b in got] == sorted(b.ratio for b in got)


def test_six_aspect_ratios_land_in_the_expected_bucket():
    buckets = bucket_list(512 * 512, 64)
    expected = {(512, 512): (512, 512), (1024, 768): (576, 448), (768, 1024): (448, 576),
                (1920, 1080): (640, 384), (1080, 1920): (384, 640), (2000, 1000): (704, 320),
                (1000, 3000): (256, 832)}
    for (w, h), bucket in expected.items():
        b = nearest(w, h, buckets)
        assert (b.width, b.height) == bucket, (w, h)
        # it is the nearest: no bucket has a closer log aspect ratio
        assert all(abs(math.log(o.ratio / (w / h))) >= abs(math.log(b.ratio / (w / h))) for o in buckets)


def test_cover_resize_and_center_crop_record_the_offset():
    buckets = [Bucket(32, 48), Bucket(32, 32), Bucket(48, 32)]
    p = place(90, 50, buckets)  # 1.8:1 -> 48x32; scale 32/50 -> 58x32, crop 5 px off the left
    assert p.bucket == Bucket(48, 32) and p.resized == (58, 32) and p.crop_top_left == (0, 5)
    assert p.original_size == (50, 90) and p.target_size == (32, 48)
    assert p.record() == {"bucket": "48x32", "original_size": [50, 90], "crop_top_left": [0, 5],
                          "target_size": [32, 48]}
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    out = fit(img, p)
    assert out.size == (48, 32)
    ref = np.asarray(img.resize((58, 32), Image.Resampling.LANCZOS))[:, 5:53]
    np.testing.assert_array_equal(np.asarray(out), ref)
    # the mirrored twin: same pixels mirrored, its crop counted from the other side
    np.testing.assert_array_equal(np.asarray(fit(img, p, flip=True)), ref[:, ::-1])
    assert p.flipped().crop_top_left == (0, 58 - 48 - 5)


def test_random_crop_is_seeded_and_recorded():
    buckets = [Bucket(32, 32)]
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 80, 3), dtype=np.uint8))
    offsets = {place(80, 32, buckets, crop="random", rng=random.Random(s)).crop_top_left for s in range(20)}
    assert len(offsets) > 5 and all(t == 0 and 0 <= l <= 48 for t, l in offsets)
    p = place(80, 32, buckets, crop="random", rng=random.Random(7))
    assert p == place(80, 32, buckets, crop="random", rng=random.Random(7))
    left = p.crop_top_left[1]
    np.testing.assert_array_equal(np.asarray(fit(img, p)), np.asarray(img)[:, left:left + 32])


def test_an_image_of_its_bucket_size_is_not_resampled(monkeypatch):
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (48, 32, 3), dtype=np.uint8))
    p = place(32, 48, [Bucket(32, 48), Bucket(32, 32)])
    assert p.resized == (32, 48) and p.crop_top_left == (0, 0)
    monkeypatch.setattr(Image.Image, "resize", lambda *a, **k: pytest.fail("resampled"))
    assert fit(img, p) is img


def test_panorama_tall_and_tiny_images():
    buckets = bucket_list(512 * 512, 64)
    pano = place(6000, 600, buckets)  # 10:1: the widest bucket, the middle kept
    assert pano.bucket == Bucket(1024, 256) and pano.resized == (2560, 256)
    assert pano.crop_top_left == (0, (2560 - 1024) // 2)
    tall = place(300, 2400, buckets)  # 1:8: the tallest bucket (upscale 256/300 < 1)
    assert tall.bucket == Bucket(256, 1024) and tall.crop_top_left == ((2048 - 1024) // 2, 0)
    with pytest.raises(BadImage) as e:  # 100x100 would need 5.12x to cover 512x512
        place(100, 100, buckets)
    assert e.value.reason == "below_bucket" and "5.12x" in e.value.detail and "512x512" in e.value.detail
    assert place(100, 100, buckets, max_upscale=8).resized == (512, 512)  # a higher limit lets it in


def test_histogram_in_aspect_order():
    assert histogram(["48x32", "32x48", "48x32", "32x32"]) == [("32x48", 1), ("32x32", 1), ("48x32", 2)]
