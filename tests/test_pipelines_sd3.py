"""pipelines_sd3.py: text→image and image→image equal diffusers' StableDiffusion3Pipeline /
StableDiffusion3Img2ImgPipeline on a tiny random SD3 folder made in the test (nothing downloaded), Heun equal to the
pipeline with FlowMatchHeunDiscreteScheduler; our folder writer read back by diffusers; the `sample` CLI; one-line
errors.

Tolerance 1e-3 on images in [0, 1], as for the UNet pipelines: the same float32 functions in other kernel
orders, a few 1e-7 per evaluation, carried through ≤ 7 transformer evaluations and the decoder; the measured
differences (printed) are far below it.
"""

import json

import pytest
import torch
from PIL import Image

import latentforge
from latentforge.cli import main
from latentforge.errors import UserError
from latentforge.formats.sd3 import FlowSchedule, save_sd3_folder
from latentforge.pipelines_sd3 import SD3Pipeline
from latentforge.png import parse_parameters, read_parameters
from test_text_sd3 import T5_LENGTH, T5_WIDTH, write_sd3_text

TOL = 1e-3
SCHEDULERS = {"shift3": dict(shift=3.0),
              "dynamic": dict(use_dynamic_shifting=True, base_image_seq_len=4, max_image_seq_len=64, base_shift=0.5,
                              max_shift=1.15)}


def _diffusers_sd3(root, t5: bool, scheduler: dict):
    """A tiny random StableDiffusion3Pipeline on the text encoders at `root`: 2 joint blocks, a 2-level VAE
    (factor 2) with SD3's shift convention (shift 0.1, scale 1.5)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                        caption_projection_dim=16, pooled_projection_dim=48, pos_embed_max_size=8)
    with torch.no_grad():
        for p in transformer.parameters():  # off the default init so every weight matters
            p.add_(torch.randn_like(p) * 0.05)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, latent_channels=4,
                        shift_factor=0.1, scaling_factor=1.5)
    load = lambda cls, sub: cls.from_pretrained(root / sub)  # noqa: E731
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**scheduler), vae=vae.eval(),
        text_encoder=load(CLIPTextModelWithProjection, "text_encoder"), tokenizer=load(AutoTokenizer, "tokenizer"),
        text_encoder_2=load(CLIPTextModelWithProjection, "text_encoder_2"),
        tokenizer_2=load(AutoTokenizer, "tokenizer_2"),
        text_encoder_3=load(T5EncoderModel, "text_encoder_3") if t5 else None,
        tokenizer_3=load(AutoTokenizer, "tokenizer_3") if t5 else None)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(t5, scheduler) -> (diffusers pipeline, its save_pretrained folder), built once per combination."""
    made = {}

    def get(t5: bool, scheduler: str):
        if (t5, scheduler) not in made:
            tmp = tmp_path_factory.mktemp(f"sd3_{t5}_{scheduler}")
            pipe = _diffusers_sd3(write_sd3_text(tmp / "text", t5), t5, SCHEDULERS[scheduler])
            pipe.save_pretrained(tmp / "model", safe_serialization=True)
            made[t5, scheduler] = pipe, tmp / "model"
        return made[t5, scheduler]

    return get


def _latents(seed=5, size=(4, 8, 6)):
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(seed))  # (1, C, h, w): 12x16 pixels


def _image(W=12, H=16):
    g = torch.Generator().manual_seed(9)
    return Image.fromarray(torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy())


def _diff(got, want, what):
    diff = (got.float() - want.float()).abs().max().item()
    print(f"{what}: max |ours − diffusers| = {diff:.3g}")
    assert got.shape == want.shape and diff <= TOL, f"{what}: {diff:.3g} (shapes {got.shape}, {want.shape})"
    return diff


@pytest.mark.parametrize("t5,scheduler", [(True, "shift3"), (False, "shift3"), (True, "dynamic"), (False, "dynamic")])
def test_text2img_equals_diffusers(folders, t5, scheduler):
    pipe, folder = folders(t5, scheduler)
    ours = latentforge.load(folder, device="cpu", t5_length=T5_LENGTH)
    assert isinstance(ours, SD3Pipeline) and ours.schedule.use_dynamic_shifting == (scheduler == "dynamic")
    x = _latents()
    kw = dict(negative_prompt="lower", latents=x)
    want = pipe("a red circle", guidance_scale=4.0, num_inference_steps=3, height=16, width=12, output_type="pt",
                max_sequence_length=T5_LENGTH, **kw).images
    got = ours.text2img("a red circle", cfg=4.0, steps=3, size=(12, 16), output="pt", **kw)
    _diff(got, want, f"text2img t5={t5} {scheduler}")
    latents = ours.text2img("a red circle", cfg=4.0, steps=3, size=(12, 16), output="latent", **kw)
    assert latents.shape == x.shape and not torch.allclose(latents, x)  # sampled, not passed through


def test_seeds_and_no_guidance_equal_diffusers(folders):
    pipe, folder = folders(True, "shift3")
    ours = latentforge.load(folder, device="cpu", t5_length=T5_LENGTH)
    gens = [torch.Generator().manual_seed(7 + i) for i in range(2)]  # our image i draws from seed + i
    want = pipe("a red circle", guidance_scale=1.0, num_inference_steps=2, num_images_per_prompt=2, generator=gens,
                output_type="pt", max_sequence_length=T5_LENGTH).images
    _diff(ours.text2img("a red circle", cfg=1.0, steps=2, seed=7, n=2, output="pt"), want, "text2img seeds, cfg 1")


def test_heun_equals_diffusers_heun_scheduler(folders):
    from diffusers import FlowMatchHeunDiscreteScheduler, StableDiffusion3Pipeline

    pipe, folder = folders(True, "shift3")
    heun = StableDiffusion3Pipeline(**{**pipe.components,
                                       "scheduler": FlowMatchHeunDiscreteScheduler.from_config(pipe.scheduler.config)})
    ours = latentforge.load(folder, device="cpu", t5_length=T5_LENGTH)
    kw = dict(negative_prompt="wider", latents=_latents(6))
    want = heun("a red circle", guidance_scale=3.0, num_inference_steps=3, height=16, width=12, output_type="pt",
                max_sequence_length=T5_LENGTH, **kw).images
    got = ours.text2img("a red circle", cfg=3.0, steps=3, size=(12, 16), sampler="heun", output="pt", **kw)
    _diff(got, want, "heun")


@pytest.mark.parametrize("t5,scheduler,strength", [(True, "shift3", 0.6), (False, "dynamic", 0.75)])
def test_img2img_equals_diffusers(folders, t5, scheduler, strength):
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe, folder = folders(t5, scheduler)
    i2i = StableDiffusion3Img2ImgPipeline(**pipe.components)
    ours = latentforge.load(folder, device="cpu", t5_length=T5_LENGTH)
    want = i2i("a red circle", image=_image(), strength=strength, num_inference_steps=4, guidance_scale=4.0,
               negative_prompt="lower", height=16, width=12, generator=[torch.Generator().manual_seed(3)],
               output_type="pt", max_sequence_length=T5_LENGTH).images
    got = ours.img2img(_image(), "a red circle", strength=strength, steps=4, cfg=4.0, negative_prompt="lower", seed=3,
                       output="pt")
    _diff(got, want, f"img2img t5={t5} {scheduler} strength {strength}")


def test_our_folder_loads_in_diffusers(folders, tmp_path):
    """save_sd3_folder writes what StableDiffusion3Pipeline.from_pretrained reads, and the same model."""
    from diffusers import StableDiffusion3Pipeline

    _, folder = folders(True, "dynamic")
    ours = latentforge.load(folder, device="cpu", t5_length=T5_LENGTH)
    save_sd3_folder(tmp_path / "ours", ours.transformer, ours.vae, ours.text_encoder, ours.schedule)
    back = StableDiffusion3Pipeline.from_pretrained(tmp_path / "ours")
    assert back.scheduler.config.use_dynamic_shifting and back.scheduler.config.max_image_seq_len == 64
    kw = dict(negative_prompt="lower", latents=_latents())
    want = back("a red circle", guidance_scale=4.0, num_inference_steps=2, height=16, width=12, output_type="pt",
                max_sequence_length=T5_LENGTH, **kw).images
    got = ours.text2img("a red circle", cfg=4.0, steps=2, size=(12, 16), output="pt", **kw)
    _diff(got, want, "our folder in diffusers")
    again = SD3Pipeline.from_pretrained(tmp_path / "ours", device="cpu", t5_length=T5_LENGTH)
    assert again.schedule == ours.schedule


def test_sample_cli_writes_png_with_parameters(folders, tmp_path, capsys):
    _, folder = folders(False, "shift3")
    rc = main(["sample", "--model", str(folder), "--prompt", "a red circle", "--negative", "lower", "--steps", "2",
               "--cfg", "3", "--seed", "4", "--width", "12", "--height", "16", "--device", "cpu", "--out",
               str(tmp_path / "out")])
    assert rc == 0
    png = tmp_path / "out" / "00000-4.png"
    params = parse_parameters(read_parameters(png))
    assert Image.open(png).size == (12, 16)
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "lower"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"], params["Shift"]) \
        == ("2", "Euler", "3", "4", "12x16", "3")


def test_img2img_cli_and_no_inpaint(folders, tmp_path, capsys):
    _, folder = folders(False, "shift3")
    _image().save(tmp_path / "in.png")
    common = ["--model", str(folder), "--image", str(tmp_path / "in.png"), "--steps", "4", "--cfg", "3", "--device",
              "cpu"]
    assert main(["img2img", *common, "--strength", "0.5", "--out", str(tmp_path / "out")]) == 0
    params = parse_parameters(read_parameters(tmp_path / "out" / "00000-0.png"))
    assert (params["Denoising strength"], params["Size"], params["Sampler"]) == ("0.5", "12x16", "Euler")
    Image.new("L", (12, 16), 255).save(tmp_path / "mask.png")
    rc = main(["inpaint", *common, "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "paint")])
    err = capsys.readouterr().err
    assert rc != 0 and "SD3Pipeline has no inpaint" in err and len(err.strip().splitlines()) == 1


def test_bad_input_is_one_line(folders, tmp_path, capsys):
    _, folder = folders(False, "shift3")
    pipe = latentforge.load(folder, device="cpu", t5_length=T5_LENGTH)
    for call, flag in [(lambda: pipe.img2img(_image(), "x", strength=0.0), "--strength"),
                       (lambda: pipe.img2img(_image(), "x", strength=1.5), "--strength"),
                       (lambda: pipe.text2img("x", steps=0), "--steps"),
                       (lambda: pipe.text2img("x", size=(14, 16)), "--size: 14x16 .* multiples of 4"),
                       (lambda: pipe.text2img("x", sampler="dpmpp-2m"), "--sampler dpmpp-2m"),
                       (lambda: pipe.text2img("x", karras=True), "--karras"),
                       (lambda: pipe.with_lora(tmp_path / "x.safetensors"), "--lora")]:
        with pytest.raises(UserError, match=flag):
            call()
    rc = main(["sample", "--model", str(folder), "--steps", "2", "--width", "14", "--height", "16", "--device", "cpu",
               "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc != 0 and err.startswith("error: --width/--height: 14x16") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())


def test_unet_paths_name_an_sd3_folder(folders):
    from latentforge.pipelines import Pipeline

    _, folder = folders(False, "shift3")
    with pytest.raises(UserError, match=r"a transformer model \(StableDiffusion3Pipeline\), not a UNet one"):
        Pipeline.from_pretrained(folder)


def test_unsupported_scheduler_setting_is_one_line(folders, tmp_path):
    import shutil

    _, folder = folders(False, "shift3")
    copy = shutil.copytree(folder, tmp_path / "m")
    path = copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "use_karras_sigmas": True}))
    with pytest.raises(UserError, match=r"scheduler_config.json: use_karras_sigmas=True is not supported"):
        latentforge.load(copy, device="cpu")
    assert FlowSchedule.from_config({"shift": 3.0, "use_karras_sigmas": False}, "x").shift == 3.0
