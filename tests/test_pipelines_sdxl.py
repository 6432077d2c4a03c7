"""SDXL through pipelines.py: diffusers' StableDiffusionXLPipeline / StableDiffusionXLImg2ImgPipeline on the
same tiny random folder give the same images (two text encoders, pooled text, size/crop micro-conditioning,
the VAE's own scaling factor); our saved folder loads in diffusers' SDXL pipeline."""

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from latentforge.errors import UserError
from latentforge.formats import save_model_folder
from latentforge.pipelines import Pipeline
from sdxl_kit import write_diffusers_sdxl

SIZE = dict(height=16, width=24)  # not square: (height, width) must land in the right time ids


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_diffusers_sdxl(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def ours(folder):
    return Pipeline.from_pretrained(folder, device="cpu")


def _diffusers(folder, cls="StableDiffusionXLPipeline"):
    import diffusers

    pipe = getattr(diffusers, cls).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(seed=5, n=2):
    return torch.randn(n, 4, SIZE["height"] // 2, SIZE["width"] // 2, generator=torch.Generator().manual_seed(seed))


def test_folder_is_recognised_as_sdxl(ours, folder):
    from latentforge.text import DualTextEncoder

    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert isinstance(ours.text_encoder, DualTextEncoder)
    assert ours.vae.config.scaling_factor == 0.13025  # read from vae/config.json
    assert ours.unet.config.addition_input_dim == 24 + 6 * 8


MICRO = [
    (2, dict()),  # defaults: original = target = output size, crop (0, 0); no negative prompt -> zeroed null
    (2, dict(negative_prompt="wider", original_size=(64, 40), crops_coords_top_left=(8, 4), target_size=(32, 48))),
    # Negative sizes at batch 1 only: diffusers 0.42.1 builds add_time_ids as cat([neg, pos]).repeat(B, 1), which
    # for B > 1 pairs the rows [neg, pos, neg, pos] with the embeddings [neg, neg, pos, pos]; we pair them per image.
    (1, dict(negative_prompt="wider", original_size=(64, 40), crops_coords_top_left=(8, 4), target_size=(32, 48),
             negative_original_size=(16, 16), negative_target_size=(24, 24), negative_crops_coords_top_left=(2, 0))),
]


@pytest.mark.parametrize("n, micro", MICRO, ids=["defaults", "sizes", "negative_sizes"])
def test_text2img_equals_diffusers_sdxl(folder, ours, n, micro):
    ref_pipe = _diffusers(folder)
    latents = _latents(n=n)
    theirs = dict(micro, **({"negative_prompt": [micro["negative_prompt"]] * n} if "negative_prompt" in micro else {}))
    ref = ref_pipe(["lower newer"] * n, latents=latents, num_inference_steps=5, guidance_scale=5.0,
                   output_type="pt", **SIZE, **theirs).images
    got = ours.text2img("lower newer", sampler="euler", steps=5, cfg=5.0, n=n, size=(SIZE["width"], SIZE["height"]),
                        latents=latents, output="pt", **micro)
    assert got.shape == ref.shape == (n, 3, 16, 24) and ref.std() > 0.02
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_micro_conditioning_changes_the_image(ours):
    kw = dict(sampler="euler", steps=3, size=(24, 16), latents=_latents(n=1), output="pt")
    a = ours.text2img("lower", **kw)
    b = ours.text2img("lower", original_size=(512, 512), crops_coords_top_left=(64, 0), **kw)
    assert (a - b).abs().max() > 1e-3


def test_img2img_equals_diffusers_sdxl(folder, ours, monkeypatch):
    """Both encode the image to the posterior mean (diffusers samples it: patched to "argmax"); the noise of
    image i comes from a generator seeded with seed + i in both."""
    import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as img2img_module

    monkeypatch.setattr(img2img_module, "retrieve_latents",
                        functools.partial(img2img_module.retrieve_latents, sample_mode="argmax"))
    ref_pipe = _diffusers(folder, "StableDiffusionXLImg2ImgPipeline")
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    ref = ref_pipe(["lower newer"] * 2, image=image, strength=0.6, num_inference_steps=5, guidance_scale=4.0,
                   negative_prompt=["wider"] * 2, output_type="pt",
                   generator=[torch.Generator().manual_seed(s) for s in (3, 4)]).images
    got = ours.img2img(image, "lower newer", strength=0.6, negative_prompt="wider", sampler="euler", steps=5, cfg=4.0,
                       seed=3, n=2, output="pt")
    assert got.shape == ref.shape == (2, 3, 16, 24)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_our_saved_folder_loads_in_diffusers_sdxl(folder, ours, tmp_path):
    from latentforge.formats.diffusers import load_schedule

    saved = save_model_folder(tmp_path / "ours", ours.unet, ours.vae, load_schedule(folder), ours.text_encoder)
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert {p.name for p in saved.iterdir()} >= {"text_encoder_2", "tokenizer_2", "unet", "vae", "scheduler"}
    import diffusers

    ref_pipe = _diffusers(saved)
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    latents = _latents(n=1)
    ref = ref_pipe("lower", latents=latents, num_inference_steps=4, guidance_scale=3.0, output_type="pt",
                   **SIZE).images
    again = Pipeline.from_pretrained(saved, device="cpu")
    got = again.text2img("lower", sampler="euler", steps=4, cfg=3.0, size=(24, 16), latents=latents, output="pt")
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_inpaint_keeps_the_unmasked_latents(ours):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8))
    mask = np.zeros((16, 24), dtype=np.uint8)
    mask[:, 12:] = 255  # repaint the right half
    out = ours.inpaint(image, Image.fromarray(mask), "lower", steps=3, sampler="euler", output="latent")
    from latentforge.data.images import to_tensor

    x0 = ours.vae.encode(to_tensor([image]))
    torch.testing.assert_close(out[..., :6], x0[..., :6], atol=1e-6, rtol=0)
    assert (out[..., 6:] - x0[..., 6:]).abs().max() > 1e-2


def test_micro_conditioning_options_on_a_plain_model_are_user_errors(tmp_path):
    from latentforge.config import ScheduleConfig, UNetConfig, VAEConfig
    from latentforge.models import AutoencoderKL, UNet
    from latentforge.schedule import NoiseSchedule

    unet = UNet(UNetConfig(channels=(8,), layers_per_level=1, attention=(False,), cross_attention_dim=None,
                           mid_attention=False, norm_groups=4, sample_size=4))
    vae = AutoencoderKL(VAEConfig(channels=(8, 8), norm_groups=4, layers_per_level=1))
    pipe = Pipeline(unet, vae, NoiseSchedule.from_config(ScheduleConfig()))
    for option in (dict(original_size=(64, 64)), dict(crops_coords_top_left=(8, 0)),
                   dict(negative_crops_coords_top_left=(0, 8)), dict(negative_target_size=(64, 64))):
        with pytest.raises(UserError, match="only SDXL"):
            pipe.text2img(steps=1, **option)
    assert pipe.text2img(steps=1, crops_coords_top_left=(0, 0), output="pt").shape[0] == 1  # the default is no refusal


def test_cli_sample_recognises_sdxl_and_takes_the_size_flags(folder, ours, tmp_path, capsys):
    from latentforge.cli import main

    args = ["sample", "--model", str(folder), "--prompt", "lower", "--steps", "2", "--sampler", "euler",
            "--size", "24x16", "--original-size", "40x64", "--crop", "8,4", "--target-size", "48x32"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    got = np.asarray(Image.open(next((tmp_path / "a").glob("*.png"))))
    want = ours.text2img("lower", steps=2, sampler="euler", size=(24, 16), original_size=(64, 40),
                         crops_coords_top_left=(8, 4), target_size=(32, 48))[0]
    assert np.array_equal(got, np.asarray(want))  # WxH flags -> (height, width) keywords
    assert main(args[:-6] + ["--crop", "8", "--out", str(tmp_path / "b")]) == 2
    assert "--crop 8: expected TOP,LEFT" in capsys.readouterr().err


def test_sdxl_png_records_the_micro_conditioning_and_reproduces_from_it(folder, ours, tmp_path):
    """The PNG's `parameters` chunk names the sizes and crop the image was conditioned on (sizes WxH as the
    flags take them, defaults included); sampling again with the recorded values gives the same pixels."""
    from latentforge.cli import main
    from latentforge.png import parse_parameters, read_parameters

    base = ["sample", "--model", str(folder), "--prompt", "lower", "--steps", "2", "--sampler", "euler",
            "--size", "24x16"]
    flags = ["--original-size", "40x64", "--crop", "8,4", "--target-size", "48x32",
             "--negative-original-size", "24x24", "--negative-target-size", "16x16"]
    assert main(base + flags + ["--out", str(tmp_path / "a")]) == 0
    png = next((tmp_path / "a").glob("*.png"))
    got = parse_parameters(read_parameters(png))
    assert (got["Original size"], got["Crop top left"], got["Target size"]) == ("40x64", "8 4", "48x32")
    assert (got["Negative original size"], got["Negative crop top left"], got["Negative target size"]) == (
        "24x24", "0 0", "16x16")
    again = ["--original-size", got["Original size"], "--crop", got["Crop top left"].replace(" ", ","),
             "--target-size", got["Target size"], "--negative-original-size", got["Negative original size"],
             "--negative-target-size", got["Negative target size"]]
    assert main(base + again + ["--out", str(tmp_path / "b")]) == 0
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(next((tmp_path / "b").glob("*.png")))))
    default = parse_parameters(ours.text2img("lower", steps=1, size=(24, 16))[0].info["parameters"])
    assert (default["Original size"], default["Crop top left"], default["Target size"]) == ("24x16", "0 0", "24x16")
    assert "Negative original size" not in default
