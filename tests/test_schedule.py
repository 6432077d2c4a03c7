"""schedule.py against diffusers' DDPMScheduler (the oracle), plus closed-form identities."""

import pytest
import torch
from diffusers import DDPMScheduler

from latentforge import schedule as S
from latentforge.config import ScheduleConfig
from latentforge.errors import UserError

SCHEDULES = [
    ("linear", 0.0001, 0.02),
    ("scaled_linear", 0.00085, 0.012),
    ("squaredcos_cap_v2", 0.0001, 0.02),
]


def _both(name, start, end, zsnr, prediction_type="epsilon"):
    cfg = ScheduleConfig(beta_schedule=name, beta_start=start, beta_end=end,
                         rescale_betas_zero_snr=zsnr, prediction_type=prediction_type)
    ours = S.NoiseSchedule.from_config(cfg)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_schedule=name, beta_start=start, beta_end=end,
                        rescale_betas_zero_snr=zsnr, prediction_type=prediction_type)
    return ours, ref


@pytest.mark.parametrize("zsnr", [False, True])
@pytest.mark.parametrize("name,start,end", SCHEDULES)
def test_matches_diffusers_ddpm(name, start, end, zsnr):
    ours, ref = _both(name, start, end, zsnr)
    assert ours.alphas_cumprod.dtype == torch.float32
    torch.testing.assert_close(ours.betas, ref.betas, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=1e-6, rtol=0)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 3, 3, generator=g)
    noise = torch.randn(6, 4, 3, 3, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    torch.testing.assert_close(S.add_noise(x0, noise, t, ours.alphas_cumprod),
                               ref.add_noise(x0, noise, t), atol=1e-6, rtol=0)
    torch.testing.assert_close(S.velocity(x0, noise, t, ours.alphas_cumprod),
                               ref.get_velocity(x0, noise, t), atol=1e-6, rtol=0)
    if zsnr:  # Lin et al. 2023: the last step is pure noise, the first is untouched
        assert ours.alphas_cumprod[-1].item() == 0.0
        assert torch.allclose(ours.alphas_cumprod[0], _both(name, start, end, False)[0].alphas_cumprod[0])


def test_cosine_is_alias_and_cosine_closed_form():
    a = S.make_betas("cosine", 1000)
    b = S.make_betas("squaredcos_cap_v2", 1000)
    assert torch.equal(a, b)
    # ᾱ_t = f(t)/f(0) with f(u) = cos²((u/T + s)/(1+s) · π/2), wherever β is not capped
    T, s = 1000, 0.008
    u = torch.arange(1, T + 1, dtype=torch.float64)
    f = torch.cos((u / T + s) / (1 + s) * torch.pi / 2) ** 2
    f0 = torch.cos(torch.tensor(s / (1 + s) * torch.pi / 2, dtype=torch.float64)) ** 2
    ac = S.alphas_cumprod(a).double()
    torch.testing.assert_close(ac[:900], (f / f0)[:900], atol=1e-5, rtol=0)


@pytest.mark.parametrize("src", S.PREDICTION_TYPES)
@pytest.mark.parametrize("dst", S.PREDICTION_TYPES)
def test_convert_round_trips_and_matches_targets(src, dst):
    ac = S.NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g)
    t = torch.tensor([0, 10, 400, 800, 999])
    x_t = S.add_noise(x0, noise, t, ac)
    pred = S.target(src, x0, noise, t, ac)
    out = S.convert(pred, x_t, t, ac, src, dst)
    torch.testing.assert_close(out, S.target(dst, x0, noise, t, ac), atol=2e-4, rtol=1e-4)
    back = S.convert(out, x_t, t, ac, dst, src)
    torch.testing.assert_close(back, pred, atol=2e-4, rtol=1e-4)


def test_v_identities_closed_form():
    # α = 0.6, σ = 0.8 (ᾱ = 0.36): v = α ε - σ x0, x0 = α x_t - σ v
    ac = torch.tensor([0.36])
    x0, eps = torch.tensor([[1.0]]), torch.tensor([[2.0]])
    t = torch.tensor([0])
    assert torch.allclose(S.add_noise(x0, eps, t, ac), torch.tensor([[0.6 + 1.6]]))
    assert torch.allclose(S.velocity(x0, eps, t, ac), torch.tensor([[1.2 - 0.8]]))
    assert torch.allclose(S.convert(torch.tensor([[0.4]]), torch.tensor([[2.2]]), t, ac, "v_prediction", "sample"),
                          x0)


def test_snr_and_min_snr_weights_closed_form():
    ac = torch.tensor([0.8, 0.5, 0.2, 0.0])  # SNR = 4, 1, 0.25, 0
    t = torch.arange(4)
    torch.testing.assert_close(S.snr(t, ac), torch.tensor([4.0, 1.0, 0.25, 0.0]))
    gamma = 2.0
    torch.testing.assert_close(S.min_snr_weight(t, ac, gamma, "sample"), torch.tensor([2.0, 1.0, 0.25, 0.0]))
    torch.testing.assert_close(S.min_snr_weight(t, ac, gamma, "epsilon"), torch.tensor([0.5, 1.0, 1.0, 1.0]))
    torch.testing.assert_close(S.min_snr_weight(t, ac, gamma, "v_prediction"),
                               torch.tensor([2 / 5, 1 / 2, 0.25 / 1.25, 0.0]))


def test_bad_names_are_user_errors():
    with pytest.raises(UserError, match="beta_schedule"):
        S.NoiseSchedule.from_config(ScheduleConfig(beta_schedule="quadratic"))
    with pytest.raises(UserError, match="prediction_type"):
        S.NoiseSchedule.from_config(ScheduleConfig(prediction_type="eps"))
