"""pipelines.py: diffusers' StableDiffusionPipeline on the same folder gives the same image; img2img and
inpainting semantics; unconditional and class-conditional models; bad input."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import latentforge
from latentforge import samplers
from latentforge.config import ScheduleConfig, UNetConfig, VAEConfig
from latentforge.errors import UserError
from latentforge.formats import save_model_folder
from latentforge.models import AutoencoderKL, UNet
from latentforge.data.images import to_tensor
from latentforge.pipelines import Pipeline
from latentforge.text import TextEncoder
from tolerance import assert_same_function, sampling_evaluations

VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "a", "c", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
         "a</w>", "e</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>",
         "<|endoftext|>"]
UNET = UNetConfig(channels=(16, 32), layers_per_level=1, attention=(False, True), num_heads=2,
                  cross_attention_dim=32, norm_groups=8, sample_size=8)
VAE = VAEConfig(channels=(8, 8, 16), layers_per_level=1, norm_groups=4, sample_size=32)  # 4x down


def _clip(tmp):
    """A tiny random CLIP text model + BPE tokenizer, as SD uses (nothing downloaded)."""
    d = tmp / "clip"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(VOCAB)}))
    (d / "merges.txt").write_text("#version: 0.2\nl o\nlo w</w>\ne r</w>\n")
    CLIPTokenizer(str(d / "vocab.json"), str(d / "merges.txt"), unk_token="<unk>", pad_token="<|endoftext|>",
                  model_max_length=77).save_pretrained(d)
    torch.manual_seed(0)
    cfg = CLIPTextConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=25, eos_token_id=26,
                         pad_token_id=26)
    CLIPTextModel(cfg).save_pretrained(d)
    return TextEncoder.from_pretrained(str(d), max_length=12)


def _randomize(module, seed):
    """Random weights everywhere (fresh init leaves e.g. zero conv_out): an honest oracle comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


def _folder(tmp, name, prediction_type="epsilon", unet_cfg=UNET, text=True):
    unet = _randomize(UNet(unet_cfg), 1)
    vae = _randomize(AutoencoderKL(VAE), 2)
    enc = _clip(tmp) if text else None
    return save_model_folder(tmp / name, unet, vae, ScheduleConfig(prediction_type=prediction_type),
                             text_encoder=enc)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return _folder(tmp_path_factory.mktemp("m"), "text-model")


@pytest.fixture(scope="module")
def pipe(text_model):
    return latentforge.load(text_model, device="cpu")


def _image(size=(32, 32), seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


# ----------------------------------------------------------------------------- interop with diffusers

INTEROP = [("dpmpp-2m", "DPMSolverMultistepScheduler", "epsilon", 0.0),
           ("euler-a", "EulerAncestralDiscreteScheduler", "v_prediction", 0.0),
           ("ddim", "DDIMScheduler", "v_prediction", 0.7)]


@pytest.mark.parametrize("sampler,scheduler,pred,rescale", INTEROP)
def test_same_image_as_diffusers_stable_diffusion_pipeline(tmp_path, sampler, scheduler, pred, rescale):
    import diffusers

    folder = _folder(tmp_path, "m", prediction_type=pred)
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False, feature_extractor=None)
    ref_pipe.scheduler = getattr(diffusers, scheduler).from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    kw = dict(negative_prompt=["wider"] * 2, guidance_scale=5.0, num_inference_steps=6, height=32, width=32)
    ref = ref_pipe(["lower newer"] * 2, latents=latents, output_type="pt", guidance_rescale=rescale,
                   generator=[torch.Generator().manual_seed(s) for s in (3, 4)], **kw).images
    got = ours.text2img("lower newer", negative_prompt="wider", sampler=sampler, steps=6, cfg=5.0, seed=3, n=2,
                        size=(32, 32), latents=latents, guidance_rescale=rescale, output="pt")
    assert got.shape == ref.shape == (2, 3, 32, 32)
    assert ref.std() > 0.05  # a real image, not a constant
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)


def test_model_folder_scheduler_defaults_reach_the_sampler(tmp_path):
    """A folder's scheduler_config.json (read by formats.load_scheduler_defaults) sets the sampler's spacing and
    Karras σ, as diffusers' `from_config` does: the same image as diffusers' pipeline with that scheduler."""
    import diffusers

    from latentforge.formats.diffusers import load_scheduler_defaults

    folder = _folder(tmp_path, "m")
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()), timestep_spacing="trailing", use_karras_sigmas=True)))
    defaults = load_scheduler_defaults(folder)
    assert (defaults.spacing, defaults.karras) == ("trailing", True) and defaults.config["use_karras_sigmas"] is True
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False, feature_extractor=None)
    ref_pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    ref = ref_pipe("lower newer", latents=latents, output_type="pt", guidance_scale=4.0, num_inference_steps=4,
                   height=32, width=32).images
    ours = Pipeline.from_pretrained(folder, device="cpu")
    got = ours.text2img("lower newer", sampler="euler", steps=4, cfg=4.0, latents=latents, output="pt", progress=False)
    torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
    plain = ours.text2img("lower newer", sampler="euler", steps=4, cfg=4.0, latents=latents, output="pt",
                          karras=False, spacing="leading", progress=False)
    assert (plain - got).abs().max() > 1e-3  # the folder's settings made the difference


def test_a_misspelt_option_is_a_type_error_at_the_call(pipe):
    """Raised by the public method itself, before any work (not by a helper deep inside the generation)."""
    img = _image()
    cases = [(lambda: pipe.text2img("x", stpes=2), r"text2img\(\) got an unexpected keyword argument 'stpes'"),
             (lambda: pipe.img2img(img, "x", sampeler="euler"), r"img2img\(\) got an unexpected keyword"),
             (lambda: pipe.inpaint(img, img, "x", guidance=2.0), r"inpaint\(\) got an unexpected keyword"),
             (lambda: pipe.text2img("x", "wider"), r"text2img\(\) takes from 1 to 2 positional")]  # options: keywords
    for call, message in cases:
        with pytest.raises(TypeError, match=message):
            call()


# ----------------------------------------------------------------------------- semantics

def test_same_seed_same_png_bytes_and_parameters(pipe, tmp_path):
    from latentforge.png import parse_parameters, read_parameters, save_png

    a = pipe.text2img("lower", negative_prompt="wider", steps=3, seed=11, n=2, size=(32, 24))
    b = pipe.text2img("lower", negative_prompt="wider", steps=3, seed=11, n=2, size=(32, 24))
    paths = [save_png(im, tmp_path / f"{k}.png", im.info["parameters"]) for k, im in (("a", a[1]), ("b", b[1]))]
    assert paths[0].read_bytes() == paths[1].read_bytes()
    assert a[0].size == (32, 24)
    p = parse_parameters(read_parameters(paths[0]))
    assert p["prompt"] == "lower" and p["negative_prompt"] == "wider"
    assert (p["Steps"], p["Sampler"], p["CFG scale"], p["Seed"], p["Size"]) == ("3", "DPM++ 2M", "5", "12", "32x24")
    # image i of a batch is the batch-of-one image with seed + i
    single = pipe.text2img("lower", negative_prompt="wider", steps=3, seed=12, n=1, size=(32, 24), output="pt")
    batch = pipe.text2img("lower", negative_prompt="wider", steps=3, seed=11, n=2, size=(32, 24), output="pt")
    assert_same_function(batch[1:], single, pipe.unet, positions=2 * 8 * 6, evaluations=sampling_evaluations(3, 5.0))
    assert not torch.allclose(batch[0], batch[1])


def test_img2img_at_full_strength_is_text2img(pipe):
    img = _image()
    a = pipe.img2img(img, "lower", strength=1.0, steps=4, seed=2, sampler="euler-a", output="latent")
    b = pipe.text2img("lower", steps=4, seed=2, sampler="euler-a", size=img.size, output="latent")
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_img2img_starts_part_way_down(text_model):
    # A UNet predicting ε = 0 has D(x, σ) = x: every step keeps x, so the result is the start itself,
    # x0 + σ_start·noise with σ_start the σ of step ⌊steps·(1 - strength)⌋.
    p = latentforge.load(text_model, device="cpu")
    torch.nn.init.zeros_(p.unet.conv_out.weight)
    torch.nn.init.zeros_(p.unet.conv_out.bias)
    img = _image(seed=1)
    out = p.img2img(img, "lower", strength=0.5, steps=10, seed=4, sampler="euler", output="latent")
    x0 = p.vae.encode(to_tensor([img]))
    plan = samplers.plan(p.schedule.alphas_cumprod, "euler", 10, spacing="leading", steps_offset=1)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(out, x0 + plan.sigmas[5] * noise, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sampler", ["dpmpp-2m", "heun", "ddpm"])
def test_inpaint_keeps_unmasked_latents(pipe, sampler):
    img = _image(seed=3)
    mask = np.zeros((32, 32), dtype=np.uint8)
    mask[8:24, 4:20] = 255  # repaint this box
    out = pipe.inpaint(img, Image.fromarray(mask), "lower", steps=5, seed=1, sampler=sampler, output="latent")
    x0 = pipe.vae.encode(to_tensor([img]))
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 1:5] = False  # the box on the 4x latent grid
    assert torch.equal(out[0][:, keep], x0[0][:, keep])
    assert (out[0][:, ~keep] - x0[0][:, ~keep]).abs().mean() > 0.1  # the box was regenerated
    assert len(pipe.inpaint(img, Image.fromarray(mask), "lower", steps=2, n=2)) == 2


def test_unconditional_and_class_conditional_models(tmp_path):
    uncond = latentforge.load(_folder(tmp_path, "u", unet_cfg=UNetConfig(
        channels=(16, 32), layers_per_level=1, attention=(False, True), num_heads=2, cross_attention_dim=None,
        norm_groups=8, sample_size=8, mid_attention=False), text=False), device="cpu")
    a = uncond.text2img(steps=3, seed=0, cfg=1.0)
    assert a[0].size == (32, 32) and "Sampler: DPM++ 2M" in a[0].info["parameters"]
    with pytest.raises(UserError, match="--prompt"):
        uncond.text2img("a red circle", steps=2)
    classy = latentforge.load(_folder(tmp_path, "c", unet_cfg=UNetConfig(
        channels=(16, 32), layers_per_level=1, attention=(False, False), num_heads=2, cross_attention_dim=None,
        norm_groups=8, sample_size=8, num_class_embeds=4, mid_attention=False), text=False), device="cpu")
    one = classy.text2img(class_label=1, steps=3, seed=0, cfg=3.0, output="pt")
    two = classy.text2img(class_label=2, steps=3, seed=0, cfg=3.0, output="pt")
    assert not torch.allclose(one, two)
    with pytest.raises(UserError, match="--class"):
        classy.text2img(steps=2)
    with pytest.raises(UserError, match="--class"):
        classy.text2img(class_label=7, steps=2)


def test_bad_input_is_one_line_user_error(pipe, tmp_path):
    img = _image()
    cases = [
        (lambda: pipe.text2img("x", sampler="plms"), "--sampler"),
        (lambda: pipe.text2img("x", steps=0), "--steps"),
        (lambda: pipe.text2img("x", size=(30, 32)), "--size"),
        (lambda: pipe.img2img(img, "x", strength=0.0), "--strength"),
        (lambda: pipe.img2img(img, "x", strength=1.5), "--strength"),
        (lambda: pipe.img2img(img, "x", width=30), "--width/--height"),
        (lambda: pipe.text2img("x", width=30, height=32), "valid sizes are multiples of 4"),
        (lambda: pipe.text2img("x", size=(32, 32), width=32), "--size"),
        (lambda: pipe.img2img(tmp_path / "missing.png", "x"), "--image"),
        (lambda: pipe.inpaint(img, _image((32, 16)), "x"), "--mask"),
        (lambda: pipe.text2img("x", latents=torch.zeros(1, 4, 4, 4)), "latents"),
        (lambda: latentforge.load(tmp_path / "no-model"), "no-model"),
    ]
    for fn, needle in cases:
        with pytest.raises(UserError) as e:
            fn()
        assert needle in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- any width x height

def test_non_square_text2img_equals_diffusers(tmp_path):
    import diffusers

    folder = _folder(tmp_path, "m")
    ref_pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                 requires_safety_checker=False, feature_extractor=None)
    ref_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config)
    ref_pipe.set_progress_bar_config(disable=True)
    ours = Pipeline.from_pretrained(folder, device="cpu")
    for width, height in ((48, 24), (16, 40)):
        latents = torch.randn(1, 4, height // 4, width // 4, generator=torch.Generator().manual_seed(width))
        ref = ref_pipe(["lower newer"], negative_prompt=["wider"], guidance_scale=5.0, num_inference_steps=5,
                       height=height, width=width, latents=latents, output_type="pt").images
        got = ours.text2img("lower newer", negative_prompt="wider", sampler="dpmpp-2m", steps=5, cfg=5.0,
                            width=width, height=height, latents=latents, output="pt")
        assert got.shape == ref.shape == (1, 3, height, width) and ref.std() > 0.05
        torch.testing.assert_close(got, ref, atol=1e-3, rtol=0)
    assert ours.text2img("lower", steps=2, width=40)[0].size == (40, 32)  # the other side: the model's


def test_img2img_and_inpaint_round_the_input_down_to_the_vae_grid(pipe):
    odd = _image((38, 27), seed=5)
    a = pipe.img2img(odd, "lower", strength=0.5, steps=4, seed=1, output="latent")
    b = pipe.img2img(odd.resize((36, 24), Image.Resampling.LANCZOS), "lower", strength=0.5, steps=4, seed=1,
                     output="latent")
    assert a.shape == (1, 4, 6, 9) and torch.equal(a, b)
    wide = pipe.img2img(_image(), "lower", strength=0.5, steps=2, width=48, height=16)  # resized to the request
    assert wide[0].size == (48, 16) and "Size: 48x16" in wide[0].info["parameters"]
    mask = Image.new("L", (38, 27), 0)
    out = pipe.inpaint(odd, mask, "lower", steps=3, seed=1, output="latent")  # nothing masked: the image itself
    with torch.no_grad():
        x0 = pipe.vae.encode(to_tensor([odd.resize((36, 24), Image.Resampling.LANCZOS)]))
    assert out.shape == (1, 4, 6, 9) and torch.equal(out, x0)
    assert pipe.inpaint(odd, mask, "lower", steps=2, width=24, height=40)[0].size == (24, 40)


# ----------------------------------------------------------------------------- an input image far larger than the output

def _decoded_sizes(monkeypatch) -> list:
    """The (width, height) of every image file decoded from now on (PIL's ImageFile.load with tiles left to decode)."""
    from PIL import ImageFile

    sizes, load = [], ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (self.tile and sizes.append(self.size)) or load(self))
    return sizes


def test_an_output_size_taken_from_a_huge_image_is_refused_before_decoding(pipe, tmp_path, monkeypatch):
    """Without --width and --height the output has the image's size: over the limit that is one line naming the
    flag, the file, its size and what to pass, before a pixel is decoded (a 100-megapixel PNG went on to encode
    at full size: 21.6 GB of memory). A 32x32 file stands for it (the limit set to 1,023 pixels)."""
    import latentforge.pipelines as pipelines

    monkeypatch.setattr(pipelines, "MAX_PIXELS", 32 * 32 - 1)
    big, mask = tmp_path / "big.png", tmp_path / "mask.png"
    _image((32, 32)).save(big)
    Image.new("L", (32, 32), 255).save(mask)
    decoded = _decoded_sizes(monkeypatch)
    for call in (lambda: pipe.img2img(big, "lower", steps=2), lambda: pipe.img2img(big, "lower", steps=2, width=32),
                 lambda: pipe.inpaint(big, mask, "lower", steps=2, height=32)):
        with pytest.raises(UserError) as e:
            call()
        assert str(e.value) == (
            f"--image {big}: 32x32 would make a 32x32 output (the image's own size where --width/--height are not "
            "given), over the limit of 1,023 pixels — pass --width and --height (the model's size is 32x32) or "
            "resize the image")
    assert decoded == []
    # with both sides given the image is only an input: reduced to the output, and the output is what was asked
    assert pipe.img2img(big, "lower", steps=2, width=16, height=16)[0].size == (16, 16)
    assert pipe.inpaint(big, mask, "lower", steps=2, width=16, height=24)[0].size == (16, 24)


def _photo(size=(512, 384)) -> Image.Image:
    """A smooth gradient with a disc: a stand-in for a photograph."""
    y, x = np.mgrid[0:size[1], 0:size[0]]
    img = Image.fromarray(np.stack([x / 2, y / 1.5, (x + y) / 3.5], -1).astype(np.uint8))
    ImageDraw.Draw(img).ellipse((100, 80, 300, 300), fill=(200, 30, 30))
    return img


@pytest.mark.parametrize("fmt, decoded_at", [("JPEG", (128, 96)), ("PNG", (512, 384))])
def test_a_large_input_is_decoded_reduced_towards_the_output(pipe, tmp_path, monkeypatch, capsys, fmt, decoded_at):
    """A 512x384 file used at 32x32 (16x smaller): a JPEG decodes at 1/4 scale (128x96, PIL's `draft`), then both
    shrink by whole factors while ≥ 3x the output before the LANCZOS resize (PIL's `reducing_gap=3`). Measured
    against a full decode + LANCZOS on this image: at most 2 levels of 255 apart, 0.2 on average (the bound below
    leaves room for JPEG decoders). Over PIL's decompression-bomb limit it says one warning line (no Python warning)."""
    import warnings

    from latentforge.data.images import fit_image, open_image

    path = tmp_path / f"photo.{fmt.lower()}"
    _photo().save(path, fmt, quality=95)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 512 * 384 - 1)
    decoded = _decoded_sizes(monkeypatch)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with open_image(path) as im:
            got = np.asarray(fit_image(im, (32, 32), f"--image {path}"), dtype=int)
    assert decoded == [decoded_at] and not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]
    assert capsys.readouterr().err == (f"warning: --image {path}: 512x384 = 196,608 pixels is over PIL's "
                                       "decompression-bomb limit of 196,607 — it is read (slow) and used at 32x32; "
                                       "resize the file if that is not what you want\n")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10 ** 9)
    with Image.open(path) as full:
        ref = np.asarray(full.resize((32, 32), Image.Resampling.LANCZOS), dtype=int)
    assert np.abs(got - ref).max() <= 3 and np.abs(got - ref).mean() < 0.4
    # the pipeline reads it the same way: the image it encodes is fit_image's
    out = pipe.img2img(path, "lower", strength=0.5, steps=2, seed=1, width=32, height=32, output="latent")
    same = pipe.img2img(Image.fromarray(got.astype(np.uint8)), "lower", strength=0.5, steps=2, seed=1, output="latent")
    assert torch.equal(out, same)
