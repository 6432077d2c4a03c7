"""train/samples.py + report verdict + situational defaults: the validation grid shows the user's own
captions (deterministically, held-out first), class names for class folders, labelled cells with the
source image beside them; from-scratch and --init defaults differ and an explicit setting wins."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latentforge.cli import main
from latentforge.config import SITUATION_DEFAULTS, TrainConfig, load_train_config, situation_notes, to_toml
from latentforge.train.report import progress_verdict
from latentforge.train.samples import choose_previews

CAPTIONS = [f"caption number {i}" for i in range(12)]


def _cfg(**kw):
    base = dict(sample_prompts=(), sample_count=4, sample_seed=1234, conditioning="text",
                unet=SimpleNamespace(num_class_embeds=None))
    return SimpleNamespace(**{**base, **kw})


def _dataset(captions=CAPTIONS, labels=None, classes=None):
    entries = [{"id": f"img{i:02d}.png", "caption": c, "label": None if labels is None else labels[i]}
               for i, c in enumerate(captions)]
    entries += [{"id": "img00.png#flip", "caption": captions[0], "label": None}]  # flips never become cells
    return SimpleNamespace(entries=entries, classes=classes)


def test_text_previews_are_distinct_captions_of_the_data_and_deterministic():
    cells = choose_previews(_cfg(), _dataset())
    assert len(cells) == 4 and len({c.prompt for c in cells}) == 4
    assert all(c.prompt in CAPTIONS and c.label == c.prompt for c in cells)
    assert all(_dataset().entries[c.source]["caption"] == c.prompt for c in cells)  # the image it came from
    assert choose_previews(_cfg(), _dataset()) == cells  # same every time (a resume recomputes the same)
    shuffled = _dataset()
    shuffled.entries.reverse()  # the choice depends on (seed, id), not on where an entry sits in the cache
    assert [c.prompt for c in choose_previews(_cfg(), shuffled)] == [c.prompt for c in cells]
    assert [c.prompt for c in choose_previews(_cfg(sample_seed=7), _dataset())] != [c.prompt for c in cells]


def test_held_out_captions_come_first_and_are_marked():
    held = ["img03.png", "img07.png"]
    cells = choose_previews(_cfg(), _dataset(), held_out=held)
    assert sorted(c.prompt for c in cells) == ["caption number 3", "caption number 7"]
    assert all(c.held_out for c in cells)


def test_duplicate_captions_give_one_cell_each():
    cells = choose_previews(_cfg(sample_count=8), _dataset(["a cat", "a dog", "a cat", "a dog", "a cat"]))
    assert sorted(c.prompt for c in cells) == ["a cat", "a dog"]


def test_explicit_sample_prompts_override_the_data():
    cells = choose_previews(_cfg(sample_prompts=("x one", "x two")), _dataset())
    assert [c.prompt for c in cells] == ["x one", "x two"] and all(c.source is None for c in cells)


def test_class_previews_are_the_class_names_with_an_image_of_each():
    data = _dataset([None] * 6, labels=[0, 1, 2, 0, 1, 2], classes=["cat", "dog", "owl"])
    cells = choose_previews(_cfg(conditioning="class", unet=SimpleNamespace(num_class_embeds=4)), data)
    assert [c.label for c in cells] == ["cat", "dog", "owl"] and [c.class_label for c in cells] == [0, 1, 2]
    assert [data.entries[c.source]["label"] for c in cells] == [0, 1, 2]


def test_unconditional_previews_are_seeds():
    cells = choose_previews(_cfg(conditioning="none", sample_count=3), _dataset())
    assert [c.label for c in cells] == ["seed 1234", "seed 1235", "seed 1236"] and all(c.prompt is None for c in cells)


# ---- situational defaults -------------------------------------------------------------------


def test_scratch_and_init_defaults_differ_as_documented_and_explicit_wins():
    scratch = load_train_config(None, ["model=tiny"])
    init = load_train_config(None, ["model=tiny"], init=True)
    plain = load_train_config(None, ["model=sd15"])
    for key, value in SITUATION_DEFAULTS["scratch-small"][0].items():
        assert getattr(scratch, key) == value
    for key, value in SITUATION_DEFAULTS["finetune"][0].items():
        assert getattr(init, key) == value
    assert scratch.lr == 1e-3 and init.lr == 1e-5 and plain.lr == TrainConfig().lr  # sd15 from scratch: as SD
    assert load_train_config(None, ["model=tiny", "lr=3e-4"]).lr == 3e-4
    assert load_train_config(None, ["model=tiny", "lr=3e-4"], init=True).lr == 3e-4


def test_print_config_names_where_a_situational_default_comes_from():
    text = to_toml(load_train_config(None, ["model=small"]), situation_notes(load_train_config(None, ["model=small"])))
    assert "demo measured" in text.splitlines()[0]
    lines = text.splitlines()
    assert "situation" in lines[lines.index("lr = 0.001") - 1]
    overridden = load_train_config(None, ["model=small", "lr=2e-4"])
    lines = to_toml(overridden, situation_notes(overridden)).splitlines()
    assert "situation" not in lines[lines.index("lr = 0.0002") - 1]


def test_resume_reads_the_runs_own_config_not_new_defaults(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text(to_toml(load_train_config(None, ["model=tiny", "lr=2e-4"])))
    assert load_train_config(path, []).lr == 2e-4


# ---- the report's verdict (closed-form series) ----------------------------------------------


def _rows(loss, val=None):
    rows = [{"step": i + 1, "loss": v} for i, v in enumerate(loss)]
    for step, v in (val or {}).items():
        rows[step - 1]["val_loss"] = v
    return rows


def test_verdict_still_falling_flattened_overfitting_stopped():
    falling = [1.0 / (1 + 0.1 * i) for i in range(100)]
    flat = [0.5] * 100
    assert "more steps would help" in progress_verdict(_rows(falling))
    assert "flattened" in progress_verdict(_rows(flat))
    rising = progress_verdict(_rows(flat, {10: 0.5, 20: 0.4, 30: 0.45, 40: 0.5}))
    assert "overfitting" in rising and "step 20" in rising
    stopped = progress_verdict(_rows(flat, {10: 0.5, 20: 0.4, 30: 0.401, 40: 0.4005, 50: 0.402}))
    assert "stopped improving" in stopped and "step 20" in stopped
    improving = progress_verdict(_rows(flat, {10: 0.5, 20: 0.45, 30: 0.4}))
    assert "still improving" in improving


def test_help_describes_the_product_and_every_command_has_an_example(capsys):
    from latentforge.cli import COMMANDS

    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "Thin by design" not in text and "your own images" in text.lower()
    for name in COMMANDS:
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert f"example:\n  latentforge {name}" in capsys.readouterr().out


# ---- end to end on a tiny non-shapes captioned folder ---------------------------------------


def _pattern_folder(root):
    """Six 32 px images that are not shapes, each with its own caption."""
    root.mkdir()
    captions = {}
    for i, (name, fill) in enumerate([("horizontal stripes", "h"), ("vertical stripes", "v"),
                                      ("a checkerboard", "c"), ("a dark gradient", "g"),
                                      ("a bright cross", "x"), ("two dots", "d")]):
        img = Image.new("RGB", (32, 32), (30 * i, 200 - 20 * i, 90))
        draw = ImageDraw.Draw(img)
        for k in range(0, 32, 8):
            if fill == "h":
                draw.rectangle((0, k, 31, k + 3), fill=(255, 255, 255))
            elif fill == "v":
                draw.rectangle((k, 0, k + 3, 31), fill=(255, 255, 255))
            elif fill == "c":
                draw.rectangle((k, k, k + 7, k + 7), fill=(0, 0, 0))
        if fill == "x":
            draw.line((0, 16, 31, 16), fill=(255, 255, 0), width=3)
            draw.line((16, 0, 16, 31), fill=(255, 255, 0), width=3)
        if fill == "d":
            draw.ellipse((4, 4, 10, 10), fill=(0, 0, 0))
            draw.ellipse((20, 20, 26, 26), fill=(0, 0, 0))
        if fill == "g":
            img = Image.fromarray(np.tile(np.linspace(0, 120, 32, dtype=np.uint8)[None, :, None], (32, 1, 3)))
        img.save(root / f"p{i}.png")
        (root / f"p{i}.txt").write_text(name)
        captions[f"p{i}.png"] = name
    return captions


def test_grid_of_a_run_on_a_non_shapes_folder_shows_its_captions(tmp_path, capfd):
    from latentforge.config import PRESETS
    from latentforge.models import AutoencoderKL

    captions = _pattern_folder(tmp_path / "patterns")
    AutoencoderKL(PRESETS["tiny"].vae).save_pretrained(tmp_path / "vae")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tmp_path / "patterns"), "--vae", str(tmp_path / "vae"), "--out", str(run),
                 "model=tiny", "batch_size=2", "max_steps=2", "sample_every=2", "sample_steps=2",
                 "checkpoint_every=2", "log_every=1", "val_every=1", "val_fraction=0.5", "sample_count=3"]) == 0
    assert "val=" in capfd.readouterr().err  # the progress bar shows the held-out loss once there is one
    grid = Image.open(run / "samples" / "step-2.png")
    cells = json.loads(grid.info["latentforge:cells"])
    assert 1 <= len(cells) <= 3
    for c in cells:
        assert c["prompt"] == captions[c["source_id"]]  # each cell: a caption of this folder, and its image
        assert c["held_out"]  # with a held-out split, the prompts come from it
    # each cell is labelled: its label strip holds dark text pixels below the image
    strip = np.asarray(grid.convert("L"))[96 + 8:, : 96 + 8]
    assert (strip < 100).sum() > 20
    assert "Verdict" in (run / "report.md").read_text()


def test_a_non_square_image_is_letterboxed_in_its_cell_not_squashed():
    """The grid's cells (train/samples.py's validation grid, via evaluate.caption_grid) keep each image's aspect:
    a 3:1 and a 1:3 image fill their cell's width (height), the rest is padding; a square one fills the cell."""
    from latentforge.evaluate import caption_grid

    images = [Image.new("RGB", (60, 20), (10, 120, 200)), Image.new("RGB", (14, 42), (200, 30, 30)),
              Image.new("RGB", (32, 32), (20, 160, 20))]
    cell, pad = 96, 4
    grid = np.asarray(caption_grid(images, ["wide", "tall", "square"], cols=3, cell=cell, mark_label="HELD OUT"))
    for k, img in enumerate(images):
        x = k * (cell + 2 * pad) + pad
        region = grid[pad:pad + cell, x:x + cell]
        ys, xs = np.nonzero((region == np.asarray(img)[0, 0]).all(-1))
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        assert max(w, h) == cell and len(ys) == w * h, (k, w, h)  # one solid rectangle, the longer side = the cell
        assert abs(w - h * img.width / img.height) <= 1 and abs(h - w * img.height / img.width) <= 1, (k, w, h)
