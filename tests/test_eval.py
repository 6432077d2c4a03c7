"""Adherence statistics and aggregation; the eval command's user errors; FID wiring on a fake generator."""

import json
import random

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge import evaluate
from latentforge.cli import main
from latentforge.data import shapes
from latentforge.metrics import adherence, inception
from latentforge.metrics.adherence import Prompt


def test_wilson_interval_closed_form():
    # The Wilson interval is the set of p with (p̂ − p)² = z² p (1 − p) / n: the roots of
    # (1 + z²/n) p² − (2p̂ + z²/n) p + p̂² = 0. Solve that quadratic independently.
    z = 1.959963984540054
    for k, n in [(8, 10), (0, 20), (20, 20), (37, 96), (1, 3)]:
        ph = k / n
        roots = sorted(np.roots([1 + z * z / n, -(2 * ph + z * z / n), ph * ph]).real)
        lo, hi = adherence.wilson_interval(k, n)
        assert (lo, hi) == pytest.approx(roots, abs=1e-12)
    # A textbook value (Newcombe 1998, Table I: 81/263 -> 0.2553 to 0.3662).
    lo, hi = adherence.wilson_interval(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    # Endpoints in closed form: k = 0 -> [0, z²/(n + z²)].
    assert adherence.wilson_interval(0, 20)[1] == pytest.approx(z * z / (20 + z * z))


def test_aggregate_counts_per_split_and_attribute():
    t = {"colour": "red", "shape": "circle"}
    recs = [
        {"target": t, "predicted": {"colour": "red", "shape": "circle"}, "held_out": False},
        {"target": t, "predicted": {"colour": "red", "shape": "square"}, "held_out": False},
        {"target": t, "predicted": {"colour": "blue", "shape": None}, "held_out": True},
    ]
    s = adherence.aggregate(recs)
    assert list(s) == ["seen", "held_out"]
    assert s["seen"]["all"]["correct"] == 1 and s["seen"]["all"]["n"] == 2
    assert s["seen"]["attributes"]["colour"]["accuracy"] == 1.0
    assert s["seen"]["attributes"]["shape"]["accuracy"] == 0.5
    assert s["held_out"]["all"]["accuracy"] == 0.0
    assert s["seen"]["all"]["low"] == pytest.approx(adherence.wilson_interval(1, 2)[0])
    table = adherence.markdown_table(s)
    assert "| shape | 0.500 [" in table and "held-out combinations" in table


def _render_generator(wrong=False):
    """A fake model: draws the caption's ground truth (or a wrong colour and position)."""
    swap_colour = dict(zip(shapes.COLOURS, list(shapes.COLOURS)[1:] + list(shapes.COLOURS)[:1]))
    flip = {"top left": "bottom right", "bottom right": "top left", "top right": "bottom left",
            "bottom left": "top right"}
    calls = []

    def generate(captions, seeds):
        calls.append(len(captions))
        out = []
        for c, s in zip(captions, seeds):
            a = shapes.parse_caption(c)
            if wrong:
                a = dict(a, colour=swap_colour[a["colour"]], position=flip[a["position"]])
            out.append(shapes.render(a, 32, random.Random(s)))
        return out

    return generate, calls


def test_benchmark_on_ground_truth_images_scores_one(tmp_path):
    generate, calls = _render_generator()
    result = evaluate.evaluate_shapes(generate, tmp_path, n=2, seed=5, batch_size=64)
    scores = result["scores"]
    assert scores["seen"]["all"]["n"] == 2 * 88 and scores["held_out"]["all"]["n"] == 2 * 8
    assert scores["seen"]["all"]["accuracy"] == 1.0 and scores["held_out"]["all"]["accuracy"] == 1.0
    assert calls == [64, 64, 64]  # 192 images in batches
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["scores"] == json.loads(json.dumps(scores))
    assert {r["seed"] for r in saved["records"]} == {5, 6}
    assert "**all attributes**" in (tmp_path / "eval.md").read_text()
    grid = Image.open(tmp_path / "eval_grid.png")
    assert grid.size[0] == 12 * (96 + 8)


def test_benchmark_on_wrong_images_scores_zero():
    generate, _ = _render_generator(wrong=True)
    scores = evaluate.evaluate_shapes(generate, None, n=1)["scores"]
    for split in ("seen", "held_out"):
        s = scores[split]
        assert s["all"]["accuracy"] == 0.0
        assert s["attributes"]["colour"]["accuracy"] == 0.0 and s["attributes"]["position"]["accuracy"] == 0.0
        assert s["attributes"]["shape"]["accuracy"] == 1.0 and s["attributes"]["background"]["accuracy"] == 1.0
        assert s["all"]["high"] == pytest.approx(1.96 ** 2 / (s["all"]["n"] + 1.96 ** 2), rel=1e-3)


def test_prompts_cover_the_caption_space():
    prompts = evaluate.shapes_prompts()
    assert len(prompts) == len(shapes.all_combinations()) == 96
    assert sum(p.held_out for p in prompts) == len(shapes.HELD_OUT)
    assert all(shapes.parse_caption(p.caption) == p.target for p in prompts)


def test_caption_grid_marks_held_out():
    img = shapes.render(shapes.all_combinations()[0], 32)
    grid = evaluate.caption_grid([img, img], ["seen one", "held one"], [False, True], cols=2, cell=32)
    a = np.asarray(grid)
    w = 32 + 8
    assert tuple(a[1, 1]) == (255, 255, 255)  # unmarked cell: white frame
    assert tuple(a[1, w + 1]) == (220, 0, 0)  # marked cell: red frame


def test_fid_wiring_on_fake_generator(tmp_path):
    # The Inception network itself is tested in test_fid.py; here a cheap stand-in extractor (the
    # mean colour of each 4x4 cell, 48-d) keeps scipy's sqrtm fast while exercising the wiring.
    ref = tmp_path / "ref"
    ref.mkdir()
    combos = shapes.all_combinations()
    for i in range(12):
        shapes.render(combos[i * 7], 32, random.Random(i)).save(ref / f"{i:02d}.png")
        (ref / f"{i:02d}.txt").write_text(shapes.caption(combos[i * 7]))
    extractor = lambda x: torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)  # noqa: E731
    generate, _ = _render_generator()
    same = evaluate.evaluate_fid(generate, ref, extractor, batch_size=5, kid_subsets=3, seed=0)
    assert same["n_generated"] == same["n_reference"] == 12
    assert abs(same["fid"]) < 1e-4  # sqrtm of a rank-11 product is inexact; seeds 0..11 reproduce the reference renders (jitter rng = index)
    wrong, _ = _render_generator(wrong=True)
    diff = evaluate.evaluate_fid(wrong, ref, extractor, batch_size=5, kid_subsets=3)
    assert diff["fid"] > 1.0
    # Identical sets of all 12 rows: every subset is a permutation, so the unbiased MMD² is exactly
    # 2·(mean off-diagonal k − mean k) over the reference features.
    f = extractor(evaluate.inception_input([Image.open(ref / f"{i:02d}.png") for i in range(12)])).double().numpy()
    k = (f @ f.T / f.shape[1] + 1) ** 3
    expected = 2 * ((k.sum() - np.trace(k)) / (12 * 11) - k.sum() / 144)
    assert same["kid"] == pytest.approx(expected, rel=1e-9) and same["kid_std"] == pytest.approx(0, abs=1e-9)


def test_reference_folder_is_read_like_training_data(tmp_path, capsys):
    """data.sources.scan reads --reference: every extension it knows (.tif too), captions as in training data,
    unusable files skipped and counted on stderr; images decoded as the cache decodes them (RGBA on white)."""
    ref = tmp_path / "ref"
    (ref / "sub").mkdir(parents=True)
    img = shapes.render(shapes.all_combinations()[0], 32)
    img.save(ref / "a.png")
    (ref / "a.txt").write_text("a caption")
    img.putalpha(255)
    img.save(ref / "sub" / "b.tif")
    (ref / "empty.png").write_bytes(b"")
    items = evaluate.reference_items(ref)
    assert [(it.id, it.caption or "") for it in items] == [("a.png", "a caption"), ("sub/b.tif", "")]
    assert "skipped 1 file(s): 1 zero_bytes" in capsys.readouterr().err
    got = evaluate.reference_image(items[1])
    assert got.mode == "RGB" and np.array_equal(np.asarray(got), np.asarray(img.convert("RGB")))


def test_eval_cli_user_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(inception.ENV_VAR, raising=False)
    ref = tmp_path / "ref"
    ref.mkdir()
    for i in range(2):
        shapes.render(shapes.all_combinations()[i], 32).save(ref / f"{i}.png")
    model = tmp_path / "model"
    model.mkdir()
    assert main(["eval", "--model", str(model), "--fid", "--reference", str(ref)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--inception-weights" in err and inception.ENV_VAR in err
    assert main(["eval", "--model", str(model), "--fid"]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing")]) == 2
    assert "--model" in capsys.readouterr().err
    assert main(["eval", "--model", str(model), "--n", "0"]) == 2
    assert "--n" in capsys.readouterr().err
