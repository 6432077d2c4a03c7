"""The shapes data set: caption grammar, held-out combinations, writer, and the pixel analyser."""

import itertools
import os
import random

import numpy as np
from PIL import Image, ImageFilter

from latentforge.cli import main
from latentforge.data import shapes as S


def test_grammar_has_four_attributes_and_round_trips():
    combos = S.all_combinations()
    assert len(combos) == 4 * 3 * 4 * 2 == 96
    a = {"colour": "red", "shape": "circle", "position": "top left", "background": "white"}
    assert S.caption(a) == "a red circle at the top left on a white background"
    for attrs in combos:
        assert S.parse_caption(S.caption(attrs)) == attrs
    assert len({S.caption(a) for a in combos}) == 96  # captions are unambiguous


def test_held_out_are_few_and_every_pair_is_still_seen():
    held = S.held_out_combinations()
    assert len(held) == len(S.HELD_OUT) == 8  # 8 / 96 = 8 %
    assert all(tuple(h[k] for k in S.ATTRIBUTES) in S.HELD_OUT for h in held)
    seen = S.seen_combinations()
    assert len(seen) + len(held) == 96
    for k1, k2 in itertools.combinations(S.ATTRIBUTES, 2):
        pairs_all = {(a[k1], a[k2]) for a in S.all_combinations()}
        pairs_seen = {(a[k1], a[k2]) for a in seen}
        assert pairs_seen == pairs_all, (k1, k2)


def test_write_dataset_is_deterministic_balanced_and_never_writes_held_out(tmp_path):
    n = 2 * 88 + 10
    paths = S.write_dataset(str(tmp_path / "a"), n, size=32, seed=3)
    S.write_dataset(str(tmp_path / "b"), 12, size=32, seed=3)
    assert len(paths) == n and sorted(os.listdir(tmp_path / "a"))[:2] == ["00000.png", "00000.txt"]
    captions = [open(p[:-4] + ".txt", encoding="utf-8").read().strip() for p in paths]
    attrs = [S.parse_caption(c) for c in captions]
    assert not any(S.is_held_out(a) for a in attrs)
    counts = {}
    for c in captions:
        counts[c] = counts.get(c, 0) + 1
    assert len(counts) == 88 and set(counts.values()) <= {2, 3}  # whole shuffled rounds
    for i in range(12):  # same seed -> same bytes
        name = f"{i:05d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    img = Image.open(paths[0])
    assert img.size == (32, 32) and img.mode == "RGB"


def test_analyser_reads_the_written_data_set(tmp_path):
    paths = S.write_dataset(str(tmp_path), 300, size=32, seed=0)
    images = [Image.open(p) for p in paths]
    truth = [S.parse_caption(open(p[:-4] + ".txt", encoding="utf-8").read()) for p in paths]
    assert S.accuracy(images, truth) >= 0.98


def test_analyser_at_another_size_and_on_held_out_combinations():
    rng = random.Random(0)
    held = S.held_out_combinations()
    assert S.accuracy([S.render(a, 64, rng) for a in held], held) == 1.0


def _degrade(img, rng, blur=1.0, noise=20.0):
    """Gaussian blur, a 1-pixel shift, a global colour cast and per-pixel noise (0..255 scale)."""
    x = np.asarray(img.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float64)
    x = np.roll(x, (rng.integers(-1, 2), rng.integers(-1, 2)), axis=(0, 1))
    x = x + rng.normal(0, 15, (1, 1, 3)) + rng.normal(0, noise, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_analyser_is_robust_to_blur_noise_and_jitter():
    rng, np_rng = random.Random(1), np.random.default_rng(1)
    attrs = list(S.examples(300, seed=5))
    degraded = [_degrade(S.render(a, 32, rng), np_rng) for a in attrs]
    assert S.accuracy(degraded, attrs) >= 0.95
    assert S.accuracy([x.astype(np.float32) / 255 for x in degraded[:50]], attrs[:50]) >= 0.95


def test_analyser_on_an_empty_image_reads_only_the_background():
    out = S.analyse(Image.new("RGB", (32, 32), (0, 0, 0)))
    assert out == {"colour": None, "shape": None, "position": None, "background": "black"}


def test_cli_shapes_writes_the_data_set(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path / "d"), "--n", "6", "--size", "24", "--seed", "1"]) == 0
    files = sorted(os.listdir(tmp_path / "d"))
    assert len(files) == 12 and Image.open(tmp_path / "d" / "00005.png").size == (24, 24)
    assert "wrote 6 images" in capsys.readouterr().out


def test_cli_shapes_bad_flag_is_one_line_exit_2(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path), "--n", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --n 0") and err.count("\n") == 1


def test_non_square_canvases_are_written_and_read_back(tmp_path, capsys):
    assert main(["shapes", "--out", str(tmp_path / "d"), "--n", "8", "--canvas", "48x32,32x48"]) == 0
    sizes = [Image.open(tmp_path / "d" / f"{i:05d}.png").size for i in range(8)]
    assert sizes == [(48, 32), (32, 48)] * 4
    for i in range(8):
        attrs = S.parse_caption((tmp_path / "d" / f"{i:05d}.txt").read_text())
        assert S.analyse(Image.open(tmp_path / "d" / f"{i:05d}.png")) == attrs
    assert main(["shapes", "--out", str(tmp_path / "e"), "--canvas", "48x8"]) == 2
    assert "--canvas 48x8" in capsys.readouterr().err
