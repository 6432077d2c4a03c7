"""One training step and its per-sample randomness, against diffusers' training recipe as the oracle
(DDPMScheduler.add_noise / get_velocity, training_utils.compute_snr and the min-SNR weighting of
diffusers' examples/text_to_image/train_text_to_image.py), plus closed-form checks of the draws."""

import math

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from latentforge.config import load_train_config
from latentforge.models import UNet
from latentforge.schedule import NoiseSchedule
from latentforge.train.step import Batch, apply_dropout, draw, train_step


def _cfg(*overrides):
    return load_train_config(None, ["model=tiny", *overrides])


@pytest.mark.parametrize("prediction_type, gamma", [("epsilon", 0.0), ("epsilon", 5.0), ("v_prediction", 5.0),
                                                    ("v_prediction", 0.0), ("sample", 0.0)])
def test_loss_equals_the_diffusers_training_recipe(prediction_type, gamma):
    cfg = _cfg(f"schedule.prediction_type={prediction_type}")
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                          prediction_type=prediction_type)
    ac = NoiseSchedule.from_config(cfg.schedule).alphas_cumprod
    unet = UNet(cfg.unet)
    x0, ctx = torch.randn(6, 4, 8, 8), torch.randn(6, 5, 32)
    d = draw(cfg, list(range(6)), (4, 8, 8), 1000)
    loss = train_step(unet, Batch(x0, ctx), d, ac, prediction_type, gamma)

    noisy = sched.add_noise(x0, d.noise, d.t)  # the oracle, as in train_text_to_image.py
    target = {"epsilon": d.noise, "v_prediction": sched.get_velocity(x0, d.noise, d.t), "sample": x0}[prediction_type]
    pred = unet(noisy, d.t, ctx)
    if gamma == 0:
        expected = torch.nn.functional.mse_loss(pred, target)
    else:
        snr = compute_snr(sched, d.t)
        w = torch.stack([snr, gamma * torch.ones_like(d.t)], dim=1).min(dim=1)[0]
        w = w / snr if prediction_type == "epsilon" else w / (snr + 1)
        expected = ((pred - target) ** 2).mean(dim=(1, 2, 3)).mul(w).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_draws_depend_only_on_seed_and_position():
    cfg = _cfg()
    a = draw(cfg, [3, 4, 5], (4, 8, 8), 1000)
    b = draw(cfg, [5, 9, 4], (4, 8, 8), 1000)  # same samples in another batch / order
    assert torch.equal(a.noise[2], b.noise[0]) and torch.equal(a.t[1], b.t[2])
    c = draw(_cfg("seed=1"), [3], (4, 8, 8), 1000)
    assert not torch.equal(a.noise[0], c.noise[0])


def test_timestep_distributions():
    n = 4000
    uni = draw(_cfg("caption_dropout=0.1"), list(range(n)), (1, 1, 1), 1000)
    assert uni.t.min() >= 0 and uni.t.max() <= 999
    assert abs(uni.t.float().mean().item() - 499.5) < 15  # U{0..999}: mean 499.5, sd 288.7, se 4.6
    assert abs(uni.t.float().std().item() - 288.7) < 10
    assert abs(uni.drop.float().mean().item() - 0.1) < 0.015  # caption dropout rate (se 0.0047)
    ln = draw(_cfg("timestep_sampling=logit_normal"), list(range(n)), (1, 1, 1), 1000)
    # t = floor(1000·sigmoid(u)), u ~ N(0, 1): median 500, P(t < 269) = P(u < logit(0.269)) = Φ(-1.0) = 0.159
    assert abs(ln.t.float().median().item() - 500) < 20
    assert abs((ln.t < 269).float().mean().item() - 0.159) < 0.02


def test_offset_noise_adds_a_per_channel_constant():
    n, shape = 2000, (4, 8, 8)
    plain = draw(_cfg(), list(range(n)), shape, 1000).noise.mean(dim=(2, 3))  # (n, C)
    offset = draw(_cfg("offset_noise=0.5"), list(range(n)), shape, 1000).noise.mean(dim=(2, 3))
    # Var(channel mean) = 1/64 without offset, 1/64 + 0.5² with it
    assert abs(plain.var().item() - 1 / 64) < 0.003
    assert abs(offset.var().item() - (1 / 64 + 0.25)) < 0.03


def test_caption_dropout_swaps_in_the_null_condition():
    ctx, mask = torch.randn(3, 5, 8), torch.tensor([[1, 1, 0, 0, 0]] * 3, dtype=torch.bool)
    null_ctx, null_mask = torch.full((5, 8), 7.0), torch.ones(5, dtype=torch.bool)
    drop = torch.tensor([False, True, False])
    out = apply_dropout(Batch(torch.zeros(3, 4, 2, 2), ctx, mask), drop, null_ctx, null_mask)
    assert torch.equal(out.context[1], null_ctx) and torch.equal(out.mask[1], null_mask)
    assert torch.equal(out.context[0], ctx[0]) and torch.equal(out.context[2], ctx[2])
    labels = apply_dropout(Batch(torch.zeros(3, 4, 2, 2), label=torch.tensor([0, 1, 2])), drop, null_label=3).label
    assert labels.tolist() == [0, 3, 2]


def test_gradient_clipping_bounds_the_update():
    from latentforge.train.setup import make_optimizer

    cfg = _cfg()
    x0, ctx = torch.randn(4, 4, 8, 8), torch.randn(4, 5, 32)
    d = draw(cfg, list(range(4)), (4, 8, 8), 1000)
    moved = {}
    for clip in (0.0, 1e-7):
        torch.manual_seed(0)
        unet = UNet(cfg.unet)
        before = [p.detach().clone() for p in unet.parameters()]
        opt = make_optimizer(unet, cfg, torch.device("cpu"))
        train_step(unet, Batch(x0, ctx), d, NoiseSchedule.from_config(cfg.schedule).alphas_cumprod).backward()
        norm = torch.nn.utils.clip_grad_norm_(unet.parameters(), clip if clip else math.inf)
        if clip:
            assert norm > 1e-3 and math.isclose(torch.cat([p.grad.flatten() for p in unet.parameters()]).norm().item(),
                                                clip, rel_tol=1e-3)
        opt.step()
        moved[clip] = torch.cat([(p - b).abs().flatten() for p, b in zip(unet.parameters(), before)]).mean().item()
    # Adam's first step is ±lr (+ weight decay) where |g| >> eps; a gradient clipped below eps moves much less
    assert moved[0.0] == pytest.approx(cfg.lr, rel=0.1) and moved[1e-7] < 0.1 * moved[0.0]
