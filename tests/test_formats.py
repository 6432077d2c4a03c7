"""The diffusers folder layout: whole-model round trip, diffusers loading it, and one-line errors for bad input."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentforge.config import ScheduleConfig, UNetConfig, VAEConfig
from latentforge.errors import UserError
from latentforge.formats import load_model_folder, save_model_folder
from latentforge.formats.diffusers import load_schedule, save_schedule
from latentforge.models import AutoencoderKL, UNet
from latentforge.schedule import NoiseSchedule

UNET = UNetConfig(channels=(8, 16), layers_per_level=1, attention=(True, False), num_heads=2, cross_attention_dim=8,
                  norm_groups=4, sample_size=8)
VAE = VAEConfig(channels=(8, 16), layers_per_level=1, norm_groups=4, sample_size=16)


@pytest.fixture
def model_dir(tmp_path):
    folder = tmp_path / "model"
    save_model_folder(folder, UNet(UNET), AutoencoderKL(VAE), ScheduleConfig(prediction_type="v_prediction"))
    return folder


def _one_line_error(fn, *needles) -> str:
    with pytest.raises(UserError) as e:
        fn()
    message = str(e.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message


# --------------------------------------------------------------------------- round trips


def test_model_folder_roundtrip(model_dir):
    torch.manual_seed(1)
    unet, vae = UNet(UNET).eval(), AutoencoderKL(VAE).eval()
    save_model_folder(model_dir, unet, vae, ScheduleConfig(beta_schedule="cosine", rescale_betas_zero_snr=True))
    loaded = load_model_folder(model_dir)
    assert loaded["text_encoder_dir"] is None
    assert loaded["model_index"]["_class_name"] == "StableDiffusionPipeline"
    assert loaded["schedule_config"] == ScheduleConfig(beta_schedule="squaredcos_cap_v2", rescale_betas_zero_snr=True)
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 999]), torch.randn(2, 3, 8)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded["unet"].eval()(x, t, ctx), unet(x, t, ctx))
        assert torch.equal(loaded["vae"].eval().encode(images), vae.encode(images))
    # from_pretrained takes the component folder or the model root.
    assert torch.equal(UNet.from_pretrained(model_dir).conv_in.weight, unet.conv_in.weight)
    assert torch.equal(AutoencoderKL.from_pretrained(model_dir / "vae").decoder.conv_out.weight,
                       vae.decoder.conv_out.weight)


def test_diffusers_loads_the_folder_component_wise(model_dir):
    from diffusers import AutoencoderKL as DiffusersVAE, DDPMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    vae = DiffusersVAE.from_pretrained(model_dir, subfolder="vae")
    scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
    ours = load_model_folder(model_dir)
    assert unet.state_dict().keys() == ours["unet"].state_dict().keys()
    assert vae.config.scaling_factor == VAE.scaling_factor
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.clip_sample is False  # latents are unbounded


def test_vae_force_upcast_round_trips_and_defaults_to_diffusers_true(tmp_path):
    """diffusers' `force_upcast` (SDXL's VAE: true; fp16-fixed VAEs: false) is read, written and read back; a
    config.json without it means true (diffusers' default). The cache fingerprint ignores it (same latents)."""
    from dataclasses import replace

    from diffusers import AutoencoderKL as DiffusersVAE

    from latentforge.data.cache import module_fingerprint

    vae = AutoencoderKL(replace(VAE, force_upcast=False))
    vae.save_pretrained(tmp_path / "vae")
    assert json.loads((tmp_path / "vae" / "config.json").read_text())["force_upcast"] is False
    assert DiffusersVAE.from_pretrained(tmp_path / "vae").config.force_upcast is False
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.force_upcast is False
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    del config["force_upcast"]
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    assert AutoencoderKL.from_pretrained(tmp_path / "vae").config.force_upcast is True
    assert module_fingerprint(vae, vae.config) == module_fingerprint(vae, replace(vae.config, force_upcast=True))


@pytest.mark.parametrize("cfg", [
    ScheduleConfig(),
    ScheduleConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="sample"),
    ScheduleConfig(beta_schedule="cosine", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
])
def test_scheduler_config_means_the_same_to_diffusers(cfg, tmp_path):
    from diffusers import DDPMScheduler

    save_schedule(cfg, tmp_path / "scheduler")
    theirs = DDPMScheduler.from_pretrained(tmp_path / "scheduler")
    ours = NoiseSchedule.from_config(load_schedule(tmp_path / "scheduler"))
    torch.testing.assert_close(ours.alphas_cumprod, theirs.alphas_cumprod, atol=1e-6, rtol=0)
    assert theirs.config.prediction_type == cfg.prediction_type


def test_stable_diffusion_pipeline_loads_a_folder_with_a_text_encoder(tmp_path):
    from diffusers import StableDiffusionPipeline
    from latentforge.text import TextEncoder

    text = TextEncoder.from_pretrained("default", max_length=16)
    unet = UNet(UNetConfig(channels=(8, 16), layers_per_level=1, attention=(True, False), num_heads=2,
                           cross_attention_dim=text.dim, norm_groups=4, sample_size=8))
    folder = save_model_folder(tmp_path / "m", unet, AutoencoderKL(VAE), ScheduleConfig(), text_encoder=text)
    assert load_model_folder(folder)["text_encoder_dir"] == folder / "text_encoder"
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    assert type(pipe.text_encoder).__name__ == json.loads((folder / "model_index.json").read_text())["text_encoder"][1]
    assert pipe.unet.config.cross_attention_dim == text.dim


# --------------------------------------------------------------------------- bad input


def test_not_a_model_folder(tmp_path):
    (tmp_path / "photos").mkdir()
    _one_line_error(lambda: load_model_folder(tmp_path / "photos"), tmp_path / "photos", "model_index.json")
    _one_line_error(lambda: UNet.from_pretrained(tmp_path / "photos"), tmp_path / "photos", "config.json")
    _one_line_error(lambda: AutoencoderKL.from_pretrained(tmp_path / "nope"), tmp_path / "nope", "no such folder")


def test_wrong_component_folder(model_dir):
    _one_line_error(lambda: UNet.from_pretrained(model_dir / "vae"), model_dir / "vae" / "config.json", "_class_name")


@pytest.mark.parametrize("key, value", [
    ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"]),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("class_embed_type", "timestep"),
    ("resnet_time_scale_shift", "scale_shift"),
    ("layers_per_block", [1, 2]),
    ("addition_embed_type", "text_image"),
    ("transformer_layers_per_block", [[1, 2], [1, 1]]),
    ("reverse_transformer_layers_per_block", [3, 1]),
])
def test_unsupported_unet_config(model_dir, key, value):
    path = model_dir / "unet" / "config.json"
    config = json.loads(path.read_text())
    config[key] = value
    path.write_text(json.dumps(config))
    _one_line_error(lambda: load_model_folder(model_dir), path, key)


def test_unsupported_vae_config_and_scheduler(model_dir):
    path = model_dir / "vae" / "config.json"
    config = json.loads(path.read_text())
    config["down_block_types"][0] = "AttnDownEncoderBlock2D"
    path.write_text(json.dumps(config))
    _one_line_error(lambda: AutoencoderKL.from_pretrained(model_dir), path, "down_block_types")
    sched = model_dir / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({"beta_schedule": "sigmoid"}))
    _one_line_error(lambda: load_schedule(model_dir), sched, "beta_schedule")


def test_invalid_json(model_dir):
    path = model_dir / "unet" / "config.json"
    path.write_text("{not json")
    _one_line_error(lambda: UNet.from_pretrained(model_dir), path, "JSON")


def _edit_weights(folder, edit):
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    edit(state)
    save_file(state, str(path))
    return path


def test_weights_missing_key(model_dir):
    path = _edit_weights(model_dir / "unet", lambda s: s.pop("mid_block.resnets.0.conv1.weight"))
    _one_line_error(lambda: UNet.from_pretrained(model_dir), path, "missing key", "mid_block.resnets.0.conv1.weight")


def test_weights_unexpected_key(model_dir):
    path = _edit_weights(model_dir / "vae", lambda s: s.update({"encoder.extra.weight": torch.zeros(2)}))
    _one_line_error(lambda: AutoencoderKL.from_pretrained(model_dir), path, "unexpected key", "encoder.extra.weight")


def test_weights_wrong_shape(model_dir):
    path = _edit_weights(model_dir / "unet", lambda s: s.update({"conv_in.weight": torch.zeros(8, 4, 1, 1)}))
    _one_line_error(lambda: UNet.from_pretrained(model_dir), path, "conv_in.weight", "[8, 4, 1, 1]", "[8, 4, 3, 3]")


def test_weights_not_safetensors(model_dir):
    path = model_dir / "unet" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(b"\x00garbage")
    _one_line_error(lambda: UNet.from_pretrained(model_dir), path, "safetensors")
    path.unlink()
    (model_dir / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
    _one_line_error(lambda: UNet.from_pretrained(model_dir), "diffusion_pytorch_model.bin", "pickle")


def test_sharded_and_fp16_variant_weights_load(tmp_path):
    """diffusers writes big models as shards + an index, and fp16 variants; both load, cast to float32."""
    from diffusers import AutoencoderKL as DiffusersVAE

    theirs = DiffusersVAE(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                          down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    ours = AutoencoderKL.from_pretrained(tmp_path / "sharded")
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k

    theirs.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    ours = AutoencoderKL.from_pretrained(tmp_path / "fp16")
    assert ours.dtype == torch.float32
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v.float()), k
    # A key missing from a sharded checkpoint names the index file.
    index = tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    shard = tmp_path / "sharded" / data["weight_map"]["decoder.conv_out.weight"]
    state = load_file(str(shard))
    state.pop("decoder.conv_out.weight")
    save_file(state, str(shard))
    _one_line_error(lambda: AutoencoderKL.from_pretrained(tmp_path / "sharded"), index, "decoder.conv_out.weight")
