"""`--lora FILE[:SCALE]` on sample/img2img, and `latentforge merge`: the CLI draws what with_lora draws; a
merged folder samples like the un-merged adapter (within 1e-4); bad input is one line."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.formats import lora as F
from latentforge.pipelines import Pipeline
from test_lora_files import _adapt
from test_pipelines import _folder
from tolerance import assert_same_function, sampling_evaluations


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-cli")
    folder = _folder(tmp, "m")
    comps = _adapt(Pipeline.from_pretrained(folder, device="cpu"), unet_targets="attention+ff")
    return folder, F.save_kohya(tmp / "style.safetensors", comps)


def _digest(folder):
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_sample_with_lora_flag_equals_with_lora(setup, tmp_path):
    folder, file = setup
    assert main(["sample", "--model", str(folder), "--prompt", "lower", "--lora", f"{file}:0.5", "--steps", "3",
                 "--size", "32x32", "--seed", "4", "--out", str(tmp_path), "--device", "cpu"]) == 0
    got = np.asarray(Image.open(tmp_path / "00000-4.png"))
    pipe = Pipeline.from_pretrained(folder, device="cpu").with_lora(file, 0.5)
    expect = np.asarray(pipe.text2img("lower", steps=3, size=(32, 32), seed=4)[0])
    base = np.asarray(Pipeline.from_pretrained(folder, device="cpu").text2img("lower", steps=3, size=(32, 32),
                                                                             seed=4)[0])
    assert np.array_equal(got, expect) and not np.array_equal(got, base)
    from latentforge.png import parse_parameters, read_parameters

    assert parse_parameters(read_parameters(tmp_path / "00000-4.png"))["LoRA"] == "style:0.5"


def test_merge_writes_a_plain_model_that_samples_like_the_adapter(setup, tmp_path):
    folder, file = setup
    before = _digest(folder)
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--lora", f"{file}:0.7", "--out", str(out)]) == 0
    assert _digest(folder) == before  # the base folder is untouched
    kw = dict(prompt="lower newer", steps=4, size=(32, 32), seed=2, output="pt")
    merged = latentforge.load(out, device="cpu")
    assert not any("lora" in k for k in merged.unet.state_dict())
    adapted = Pipeline.from_pretrained(folder, device="cpu").with_lora(file, 0.7)
    assert_same_function(merged.text2img(**kw), adapted.text2img(**kw), merged.unet, positions=8 * 8,
                         evaluations=sampling_evaluations(4, 5.0))  # merged vs base + adapter: another order


def test_bad_lora_input_is_one_line(setup, tmp_path, capsys):
    folder, file = setup
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["merge", "--model", str(folder), "--lora", str(file), "--out", str(tmp_path / "taken")]) == 2
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert main(["sample", "--model", str(folder), "--lora", str(tmp_path / "nope.safetensors:0.5"),
                 "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "--out" in lines[0] and "not empty" in lines[0]
    assert "--lora" in lines[1] and "nope.safetensors:0.5: no such file" in lines[1]
