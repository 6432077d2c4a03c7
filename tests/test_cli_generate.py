"""`latentforge sample | img2img | inpaint` end to end on a tiny random model, and their one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from latentforge.cli import main
from latentforge.config import ScheduleConfig, UNetConfig, VAEConfig
from latentforge.formats import save_model_folder
from latentforge.models import AutoencoderKL, UNet
from latentforge.png import parse_parameters, read_parameters
from latentforge.text import TextEncoder

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "c", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
         "a</w>", "e</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>",
         "<|endoftext|>"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    d = tmp / "clip"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (d / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), unk_token="<unk>", pad_token="<|endoftext|>",
                  model_max_length=77).save_pretrained(d)
    CLIPTextModel(CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                 num_attention_heads=4, max_position_embeddings=77, bos_token_id=25,
                                 eos_token_id=26, pad_token_id=26)).save_pretrained(d)
    unet = UNet(UNetConfig(channels=(16, 32), layers_per_level=1, attention=(False, True), num_heads=2,
                           cross_attention_dim=32, norm_groups=8, sample_size=8))
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # a fresh UNet predicts exactly 0
    vae = AutoencoderKL(VAEConfig(channels=(8, 8, 16), layers_per_level=1, norm_groups=4, sample_size=32))
    folder = save_model_folder(tmp / "model", unet, vae, ScheduleConfig(),
                               text_encoder=TextEncoder.from_pretrained(str(d), max_length=8))
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp / "in.png")
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[:16] = 255
    Image.fromarray(mask).save(tmp / "mask.png")
    Image.fromarray(mask[:, :16]).save(tmp / "mask-small.png")
    Image.fromarray(rng.integers(0, 256, (30, 32, 3), dtype=np.uint8)).save(tmp / "odd.png")
    return tmp


def _run(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr()


def test_sample_console_script_writes_pngs_with_parameters(model, tmp_path, capsys):
    exe = Path(sys.executable).with_name("latentforge")
    # "low newer" is 7 tokens: it fits max_length 8, so the PNG records it whole
    argv = ["sample", "--model", str(model / "model"), "--prompt", "low newer", "--negative", "wider",
            "--sampler", "euler-a", "--steps", "3", "--cfg", "4.5", "--seed", "7", "--n", "2", "--size", "32x16",
            "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([str(exe), *argv, "--out", str(tmp_path / "a")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert _run([*argv, "--out", str(tmp_path / "b")], capsys)[0] == 0  # again, in this process
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["00000-7.png", "00001-8.png"]
    for name in files:  # same seed and settings -> identical bytes
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    p = parse_parameters(read_parameters(tmp_path / "a" / "00001-8.png"))
    assert p["prompt"] == "low newer" and p["negative_prompt"] == "wider"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"], p["Model"]) == \
        ("3", "Euler a", "4.5", "8", "32x16", "model")
    assert Image.open(tmp_path / "a" / "00000-7.png").size == (32, 16)


def test_an_unhonoured_scheduler_key_is_one_warning_line(model, tmp_path):
    import shutil

    folder = shutil.copytree(model / "model", tmp_path / "model")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), solver_order=3)))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([str(Path(sys.executable).with_name("latentforge")), "sample", "--model", str(folder),
                        "--prompt", "low", "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = [s for s in r.stderr.splitlines() if "solver_order" in s]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and "solver_order=3" in lines[0], r.stderr
    assert "UserWarning" not in r.stderr and "warnings.warn" not in r.stderr, r.stderr


def test_img2img_and_inpaint_commands(model, tmp_path, capsys):
    base = ["--model", str(model / "model"), "--prompt", "lower", "--steps", "4", "--device", "cpu"]
    code, _ = _run(["img2img", *base, "--image", str(model / "in.png"), "--strength", "0.5", "--out",
                    str(tmp_path / "i")], capsys)
    assert code == 0
    p = parse_parameters(read_parameters(tmp_path / "i" / "00000-0.png"))
    assert p["Denoising strength"] == "0.5" and p["Sampler"] == "DPM++ 2M"
    code, _ = _run(["inpaint", *base, "--image", str(model / "in.png"), "--mask", str(model / "mask.png"),
                    "--sampler", "ddim", "--karras", "--spacing", "trailing", "--out", str(tmp_path / "p")], capsys)
    assert code == 0
    assert Image.open(tmp_path / "p" / "00000-0.png").size == (32, 32)
    assert parse_parameters(read_parameters(tmp_path / "p" / "00000-0.png"))["Sampler"] == "DDIM Karras"


def test_width_and_height_flags(model, tmp_path, capsys):
    base = ["--model", str(model / "model"), "--prompt", "lower", "--steps", "2", "--device", "cpu"]
    assert _run(["sample", *base, "--width", "24", "--height", "40", "--out", str(tmp_path / "s")], capsys)[0] == 0
    assert Image.open(tmp_path / "s" / "00000-0.png").size == (24, 40)
    # img2img: a 32x30 input gives 32x28 (rounded down to the VAE grid); --width/--height resize it
    with pytest.warns(UserWarning, match="the output is 32x28"):
        assert _run(["img2img", *base, "--image", str(model / "odd.png"), "--out", str(tmp_path / "i")], capsys)[0] == 0
    assert Image.open(tmp_path / "i" / "00000-0.png").size == (32, 28)
    assert _run(["inpaint", *base, "--image", str(model / "in.png"), "--mask", str(model / "mask.png"),
                 "--width", "40", "--height", "16", "--out", str(tmp_path / "p")], capsys)[0] == 0
    assert Image.open(tmp_path / "p" / "00000-0.png").size == (40, 16)


def test_an_output_size_changed_from_the_image_is_one_warning_line(model, tmp_path, capsys):
    """A 32x30 image gives a 32x28 output (the VAE grid is 4): img2img and inpaint say so (the console script in
    one `warning:` line); an image on the grid, or a size given with --width/--height, gives no warning."""
    import warnings

    base = ["--model", str(model / "model"), "--prompt", "lower", "--steps", "2", "--device", "cpu"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run([str(Path(sys.executable).with_name("latentforge")), "img2img", *base, "--image",
                        str(model / "odd.png"), "--out", str(tmp_path / "cli")], capture_output=True, text=True,
                       env=env, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 0 and len(lines) == 1 and lines[0].startswith("warning: --image"), r.stderr
    assert "32x30" in lines[0] and "32x28" in lines[0] and "--width/--height" in lines[0], r.stderr
    Image.fromarray(np.full((30, 32), 255, dtype=np.uint8)).save(tmp_path / "odd-mask.png")
    for mode, extra in (("img2img", []), ("inpaint", ["--mask", str(tmp_path / "odd-mask.png")])):
        with pytest.warns(UserWarning, match="32x30 .* the output is 32x28"):
            assert _run([mode, *base, "--image", str(model / "odd.png"), *extra, "--out", str(tmp_path / mode)],
                        capsys)[0] == 0
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            assert _run([mode, *base, "--image", str(model / "odd.png"), *extra, "--width", "32", "--height", "28",
                         "--out", str(tmp_path / f"{mode}-sized")], capsys)[0] == 0
            assert _run([mode, *base, "--image", str(model / "in.png"), *(["--mask", str(model / "mask.png")]
                        if extra else []), "--out", str(tmp_path / f"{mode}-grid")], capsys)[0] == 0


@pytest.mark.parametrize("extra,needle", [
    (["sample", "--sampler", "plms"], "--sampler"),
    (["sample", "--steps", "0"], "--steps"),
    (["sample", "--size", "33x32"], "--size"),
    (["sample", "--size", "big"], "--size"),
    (["sample", "--spacing", "uniform"], "--spacing"),
    (["img2img", "--image", "{m}/in.png", "--strength", "0"], "--strength"),
    (["img2img", "--image", "{m}/in.png", "--strength", "1.5"], "--strength"),
    (["img2img", "--image", "{m}/odd.png", "--width", "30"], "--width"),
    (["sample", "--height", "-8"], "--height"),
    (["sample", "--width", "20", "--height", "18"], "multiples of 4"),
    (["img2img", "--image", "{m}/nothing.png"], "--image"),
    (["inpaint", "--image", "{m}/in.png", "--mask", "{m}/mask-small.png"], "--mask"),
])
def test_bad_input_is_one_line_and_exit_2(model, tmp_path, capsys, extra, needle):
    argv = [a.replace("{m}", str(model)) for a in extra]
    code, io = _run([argv[0], "--model", str(model / "model"), "--prompt", "lower", "--steps", "2",
                     "--out", str(tmp_path), "--device", "cpu", *argv[1:]], capsys)
    assert code == 2
    assert io.err.startswith("error: ") and io.err.count("\n") == 1 and needle in io.err, io.err


def test_missing_model_is_one_line(tmp_path, capsys):
    code, io = _run(["sample", "--model", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path)], capsys)
    assert code == 2 and io.err.startswith("error: ") and io.err.count("\n") == 1 and "nope" in io.err
