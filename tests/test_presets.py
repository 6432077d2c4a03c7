"""Presets: tiny is tiny, small works, sd15 has Stable Diffusion 1.5's exact shapes (counted on the meta device)."""

import pytest
import torch

from latentforge.config import PRESETS, preset
from latentforge.errors import UserError
from latentforge.formats.diffusers import unet_to_diffusers, vae_to_diffusers
from latentforge.models import AutoencoderKL, UNet


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_sd15_parameter_counts_on_meta():
    p = preset("sd15")
    with torch.device("meta"):  # allocates nothing
        unet, vae = UNet(p.unet), AutoencoderKL(p.vae)
    assert _count(unet) == 859_520_964  # SD 1.5 UNet (runwayml/stable-diffusion-v1-5 unet/)
    assert _count(vae) == 83_653_863  # SD 1.5 VAE (vae/)
    assert vae.downsample_factor == 8


def test_sdxl_parameter_count_and_config_on_meta():
    """SDXL-base's UNet (stabilityai/stable-diffusion-xl-base-1.0 unet/): 2,567,463,684 parameters, and our
    translated config builds the same tree in diffusers' UNet2DConditionModel."""
    from diffusers import UNet2DConditionModel

    p = preset("sdxl")
    d = unet_to_diffusers(p.unet)
    assert d["down_block_types"] == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2
    assert (d["attention_head_dim"], d["transformer_layers_per_block"]) == ([5, 10, 20], [1, 2, 10])
    assert (d["addition_embed_type"], d["addition_time_embed_dim"], d["projection_class_embeddings_input_dim"],
            d["cross_attention_dim"]) == ("text_time", 256, 2816, 2048)
    with torch.device("meta"):
        theirs, ours = UNet2DConditionModel(**d), UNet(p.unet)
    assert _count(ours) == _count(theirs) == 2_567_463_684
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    assert vae_to_diffusers(p.vae)["scaling_factor"] == 0.13025


def test_sd15_config_is_the_diffusers_sd15_config():
    """The translated config builds the same tree in diffusers: same keys, same shapes (meta device)."""
    from diffusers import AutoencoderKL as DiffusersVAE, UNet2DConditionModel

    p = preset("sd15")
    d = unet_to_diffusers(p.unet)
    # SD 1.5's unet/config.json values (attention_head_dim=8 means 8 heads).
    assert d["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert d["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert (d["attention_head_dim"], d["cross_attention_dim"], d["use_linear_projection"]) == (8, 768, False)
    with torch.device("meta"):
        theirs, ours = UNet2DConditionModel(**d), UNet(p.unet)
        theirs_vae, ours_vae = DiffusersVAE(**vae_to_diffusers(p.vae)), AutoencoderKL(p.vae)
    for a, b in ((theirs, ours), (theirs_vae, ours_vae)):
        assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}


def test_tiny_is_small_and_consistent():
    p = preset("tiny")
    unet, vae = UNet(p.unet), AutoencoderKL(p.vae)
    assert _count(unet) < 1_000_000
    assert _count(vae) < 1_000_000
    assert vae.downsample_factor == 4
    assert p.vae.sample_size // vae.downsample_factor == p.unet.sample_size
    assert p.vae.latent_channels == p.unet.in_channels == p.unet.out_channels


@pytest.mark.parametrize("name", ["tiny", "small", "sdxl-tiny"])
def test_preset_runs_end_to_end(name):
    """image -> latents -> UNet prediction of the latent's shape -> image, at the preset's sizes."""
    p = preset(name)
    unet, vae = UNet(p.unet).eval(), AutoencoderKL(p.vae).eval()
    images = torch.rand(1, 3, p.vae.sample_size, p.vae.sample_size) * 2 - 1
    context = torch.randn(1, 7, p.unet.cross_attention_dim)
    added = {}
    if p.unet.addition_input_dim:  # SDXL: pooled text + 6 size/crop ids
        added = {"text_embeds": torch.randn(1, p.unet.addition_input_dim - 6 * p.unet.addition_time_embed_dim),
                 "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
    with torch.no_grad():
        latents = vae.encode(images)
        assert latents.shape == (1, p.unet.in_channels, p.unet.sample_size, p.unet.sample_size)
        pred = unet(latents, torch.tensor([500]), context, **added)
        assert pred.shape == latents.shape and torch.isfinite(pred).all()
        assert vae.decode(pred).shape == images.shape


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="tiny"):
        preset("huge")
    assert set(PRESETS) >= {"tiny", "small", "sd15", "sdxl", "sdxl-tiny"}


def test_demo_preset_is_the_demo_model_and_trains_with_the_demo_settings():
    """`model=demo` on a user's own data: the demo's UNet and VAE, and the from-scratch settings the demo uses."""
    from latentforge import demo_budgets
    from latentforge.config import VAETrainConfig, load_train_config

    full = demo_budgets.BUDGETS["full"]
    assert full.unet.unet == PRESETS["demo"].unet and full.vae.vae == PRESETS["demo"].vae
    cfg = load_train_config(None, ["model=demo"])
    assert cfg.unet == PRESETS["demo"].unet
    for key in ("lr", "warmup_steps", "min_snr_gamma", "ema_decay"):
        assert getattr(cfg, key) == getattr(full.unet, key), key
    assert load_train_config(None, ["model=demo"], cls=VAETrainConfig).vae == PRESETS["demo"].vae
