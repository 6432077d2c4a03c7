"""AutoencoderKL: equal to diffusers' AutoencoderKL on shared random weights; the latent convention."""

import math
from pathlib import Path

import pytest
import torch

from diffusers import AutoencoderKL as DiffusersVAE
from latentforge.config import VAEConfig
from latentforge.models import AutoencoderKL
from latentforge.models.vae import DiagonalGaussian
from tolerance import assert_same_function

DIFFUSERS_CONFIGS = {
    # SD-style: quant convs, mid attention, SD's scaling factor, no shift.
    "sd_like": dict(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                    scaling_factor=0.18215),
    # SD3/Flux-style: no quant convs, a shift factor, no mid attention, 2 resnets per level, 3 latent channels.
    "shifted_no_quant": dict(block_out_channels=(8, 16), layers_per_block=2, norm_num_groups=8, latent_channels=3,
                             down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                             scaling_factor=0.7, shift_factor=0.1, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False),
    # SD3's latent format, tiny channels: 16 latent channels, SD3's shift and scale (its vae/config.json),
    # no quant convs, mid attention as SD3's VAE has it. latents = (z − 0.0609) · 1.5305.
    "sd3_like": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=16,
                     down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                     scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
}


def _random_diffusers(cfg: dict) -> DiffusersVAE:
    model = DiffusersVAE(**cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _check_equal(ours: AutoencoderKL, theirs: DiffusersVAE, cfg: dict) -> None:
    """Encoder: one network evaluation (width/depth from its weights); decoder: the encoder's error passed on plus
    its own evaluation, so two (tolerance.assert_same_function)."""
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    scale, shift = cfg["scaling_factor"], cfg.get("shift_factor") or 0.0
    same = lambda got, want, n=1, what="": assert_same_function(got, want, ours, positions=2 * 16 * 16,  # noqa: E731
                                                                evaluations=n, what=what)
    with torch.no_grad():
        dist = theirs.encode(images).latent_dist
        posterior = ours.encode_posterior(images)
        for name in ("mean", "logvar"):
            same(getattr(posterior, name), getattr(dist, name), what=name)
        # std = exp(logvar / 2) and the KL sum over C·h·w elements: the mean's and logvar's error, scaled
        same(posterior.std, dist.std, what="std")
        same(posterior.kl(), dist.kl(), what="kl")
        # encode() returns latents already scaled (and shifted), as the pipelines expect them.
        latents = ours.encode(images)
        same(latents, (dist.mode() - shift) * scale, what="latents")
        same(ours.decode(latents), theirs.decode(dist.mode()).sample, 2, "decode")
        # Sampling: the same generator gives the same draw.
        sampled = ours.encode(images, sample=True, generator=torch.Generator().manual_seed(3))
        expected = dist.sample(generator=torch.Generator().manual_seed(3))
        same(sampled, (expected - shift) * scale, what="sampled")
        # forward() for VAE training: the reconstruction in pixel space and the posterior.
        recon, post = ours(images, sample=False)
        same(recon, theirs(images, sample_posterior=False).sample, 2, "reconstruction")
        assert isinstance(post, DiagonalGaussian)


@pytest.mark.parametrize("name", sorted(DIFFUSERS_CONFIGS))
def test_diffusers_to_ours_and_back(name, tmp_path):
    cfg = DIFFUSERS_CONFIGS[name]
    theirs = _random_diffusers(cfg)
    theirs.save_pretrained(tmp_path / "theirs")
    ours = AutoencoderKL.from_pretrained(tmp_path / "theirs").eval()
    assert ours.downsample_factor == 2 ** (len(cfg["block_out_channels"]) - 1)
    _check_equal(ours, theirs, cfg)

    ours.save_pretrained(tmp_path / "ours")
    back = DiffusersVAE.from_pretrained(tmp_path / "ours").eval()
    assert back.config.scaling_factor == cfg["scaling_factor"]
    assert back.config.shift_factor == cfg.get("shift_factor")
    _check_equal(ours, back, cfg)


def test_latent_shape_and_scale_roundtrip():
    vae = AutoencoderKL(VAEConfig(channels=(8, 16, 16), layers_per_level=1, norm_groups=4, scaling_factor=0.5,
                                  shift_factor=0.25)).eval()
    images = torch.rand(1, 3, 32, 24) * 2 - 1
    with torch.no_grad():
        latents = vae.encode(images)
        assert latents.shape == (1, 4, 8, 6)
        z = vae.encode_posterior(images).mode()
        torch.testing.assert_close(latents, (z - 0.25) * 0.5)
        torch.testing.assert_close(vae.decode(latents), vae.decode_raw(z))


def test_kl_closed_form():
    """KL(N(μ, σ²) ‖ N(0, 1)) = ½(μ² + σ² − 1 − log σ²) per element, summed over (C, h, w)."""
    mean = torch.full((2, 1, 2, 2), 0.5)
    logvar = torch.full((2, 1, 2, 2), math.log(4.0))
    post = DiagonalGaussian(torch.cat([mean, logvar], dim=1))
    per_element = 0.5 * (0.25 + 4.0 - 1.0 - math.log(4.0))
    torch.testing.assert_close(post.kl(), torch.full((2,), 4 * per_element))
    assert torch.equal(post.mode(), mean)
    zero = DiagonalGaussian(torch.zeros(1, 2, 3, 3))
    torch.testing.assert_close(zero.kl(), torch.zeros(1))


def test_gradient_checkpointing_gives_the_same_gradients():
    vae = AutoencoderKL(VAEConfig(channels=(8, 16), layers_per_level=1, norm_groups=4))
    images = torch.rand(2, 3, 8, 8) * 2 - 1

    def grads():
        vae.zero_grad(set_to_none=True)
        recon, post = vae(images, generator=torch.Generator().manual_seed(0))
        ((recon - images).square().mean() + 1e-3 * post.kl().mean()).backward()
        return {k: p.grad.clone() for k, p in vae.named_parameters()}

    plain = grads()
    vae.enable_gradient_checkpointing(True)
    checkpointed = grads()
    for k in plain:  # the same ops on the same shapes, recomputed: bit for bit
        assert torch.equal(checkpointed[k], plain[k]), k


def test_calibrated_scale_gives_unit_variance_latents():
    """calibrate_latent_scale picks 1/std of the posterior modes: the scaled latents then have std 1."""
    from latentforge.config import preset
    from latentforge.models import AutoencoderKL

    vae = AutoencoderKL(preset("tiny").vae).eval()
    images = torch.rand(6, 3, 32, 32) * 2 - 1
    scale = vae.calibrate_latent_scale(images, batch=4)
    with torch.no_grad():
        latents = vae.encode(images)  # mode, scaled
    assert vae.config.shift_factor is None
    assert abs(latents.std().item() - 1.0) < 1e-4
    assert scale == vae.config.scaling_factor
