"""Reliability, second round: broken model folders and text that does not fit.

1. A model folder without `tokenizer/` (or with a tokenizer that is not one) must be refused: transformers
   would build a 5-token tokenizer from the encoder's config.json and every prompt would give one image.
   Every component model_index.json names must be there and of the named type.
8. A folder of another kind given as `--vae` (a transformers text encoder, a latent cache …) is named for
   what it is, not "file not found".
9. A prompt longer than the text encoder's max_length: one warning naming the dropped tokens, and the PNG
   records the whole prompt (and how many tokens the encoder dropped), so the image can be made again from it.
"""

import json
import shutil
import time

import pytest

from rel_kit import clear_error, record, run_cli, text_model_folder


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return text_model_folder(tmp_path_factory.mktemp("textmodel") / "model")


def sample(model, out, *extra):
    return ["sample", "--model", model, "--steps", "1", "--cfg", "1", "--out", out, *extra]


def broken_copy(text_model, tmp_path, how: str):
    m = tmp_path / "model"
    shutil.copytree(text_model, m)
    if how == "no tokenizer/":
        shutil.rmtree(m / "tokenizer")
    elif how == "tokenizer/ without vocabulary":  # tokenizer_config.json alone
        for name in ("tokenizer.json", "vocab.txt"):
            (m / "tokenizer" / name).unlink(missing_ok=True)
    elif how == "tokenizer/ with a 5-token vocabulary":  # what transformers builds when the files are missing
        (m / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        (m / "tokenizer" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
    elif how == "text_encoder/ not the named type":
        index = json.loads((m / "model_index.json").read_text())
        index["text_encoder"] = ["transformers", "CLIPTextModel"]
        (m / "model_index.json").write_text(json.dumps(index))
    elif how == "named component missing":
        index = json.loads((m / "model_index.json").read_text())
        index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
        (m / "model_index.json").write_text(json.dumps(index))
    return m


CASES = [("no tokenizer/", "tokenizer"), ("tokenizer/ without vocabulary", "tokenizer"),
         ("tokenizer/ with a 5-token vocabulary", "5 tokens"), ("text_encoder/ not the named type", "CLIPTextModel"),
         ("named component missing", "safety_checker")]


@pytest.mark.parametrize("how, names", CASES)
def test_a_broken_model_folder_is_refused_with_one_line(text_model, tmp_path, capsys, how, names):
    m = broken_copy(text_model, tmp_path, how)
    t = time.perf_counter()
    code, lines = run_cli(sample(m, tmp_path / "out", "--prompt", "a red circle"), capsys)
    verdict = clear_error(code, lines, names)
    record(f"model_folder_{how.replace(' ', '_').replace('/', '')}", case=how, exit=code, verdict=verdict,
           stderr=" / ".join(lines), images_written=len(list((tmp_path / "out").glob("*.png"))),
           seconds=round(time.perf_counter() - t, 2))
    assert verdict == "ok", (code, lines)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.png"))


def test_the_intact_folder_gives_different_images_for_different_prompts(text_model, tmp_path, capsys):
    """The control: the same folder with its tokenizer does tell prompts apart (what the broken one cannot)."""
    from PIL import Image
    import numpy as np

    pixels = []
    for i, prompt in enumerate(["a red circle", "a blue square at the bottom right"]):
        code, lines = run_cli(sample(text_model, tmp_path / str(i), "--prompt", prompt), capsys)
        assert code == 0, lines
        pixels.append(np.asarray(Image.open(next((tmp_path / str(i)).glob("*.png")))).astype(int))
    diff = float(np.abs(pixels[0] - pixels[1]).mean())
    record("model_folder_control", mean_abs_pixel_difference_between_two_prompts=round(diff, 3))
    assert diff > 0


def test_a_folder_of_another_kind_as_vae_is_named(world, text_model, tmp_path, capsys):
    from latentforge.text import default_model_path

    kinds = {"a transformers text encoder": (default_model_path(), "transformers"),
             "a model's text_encoder/": (text_model / "text_encoder", "transformers"),
             "a latent cache": (world["cache"], "latent cache"),
             "a folder of images": (world["data"] / "reds", "image")}
    rows = {}
    for kind, (folder, names) in kinds.items():
        code, lines = run_cli(world.train_argv(tmp_path / kind.replace(" ", "_"), "max_steps=1") + ["--vae", folder],
                              capsys)
        rows[kind] = {"exit": code, "verdict": clear_error(code, lines, names), "stderr": " / ".join(lines)}
    record("model_folder_wrong_kind_as_vae", **rows)
    assert all(r["verdict"] == "ok" for r in rows.values()), rows


def test_a_prompt_longer_than_max_length_warns_once_and_the_png_records_it_whole(text_model, tmp_path, capsys):
    from latentforge.png import parse_parameters, read_parameters

    words = "a red circle at the top left on a white background"  # 11 tokens + [CLS] [SEP]
    prompt = " ".join([words] * 3)  # 35 tokens: 19 past max_length 16
    code, lines = run_cli(sample(text_model, tmp_path / "o", "--prompt", prompt, "--n", "1"), capsys)
    assert code == 0, lines
    warnings = [l for l in lines if l.startswith("warning: ")]
    png = next((tmp_path / "o").glob("*.png"))
    params = parse_parameters(read_parameters(png))
    again = run_cli(sample(text_model, tmp_path / "again", "--prompt", params["prompt"], "--n", "1"), capsys)[0]
    same = png.read_bytes() == next((tmp_path / "again").glob("*.png")).read_bytes()
    record("long_prompt", prompt_words=len(prompt.split()), max_length=16, warnings=warnings,
           recorded_prompt_words=len(params["prompt"].split()), dropped_setting=params.get("Prompt tokens dropped"),
           remade_from_its_own_parameters_bytewise=same)
    assert len(warnings) == 1 and "19 token(s)" in warnings[0], lines
    assert params["prompt"] == prompt and params["Prompt tokens dropped"] == "19"
    assert again == 0 and same  # made again from its own metadata: the same PNG, byte for byte
