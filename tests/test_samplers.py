"""samplers.py: each sampler against the matching diffusers scheduler (same model function, same noise),
and a closed-form check on Gaussian data whose ideal denoiser is known exactly."""

import inspect

import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler)

from latentforge import samplers as S
from latentforge.config import ScheduleConfig
from latentforge.errors import UserError
from latentforge.schedule import NoiseSchedule, convert

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
DIFFUSERS = {
    "ddpm": DDPMScheduler, "ddim": DDIMScheduler, "euler": EulerDiscreteScheduler,
    "euler-a": EulerAncestralDiscreteScheduler, "heun": HeunDiscreteScheduler,
    "dpmpp-2m": DPMSolverMultistepScheduler,
}

_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2


def model_fn(x, t, **_):
    """A smooth stand-in for a UNet whose output depends on x and (strongly) on t."""
    tt = t.float().reshape(-1, 1, 1, 1) / 1000
    h = torch.einsum("oc,bchw->bohw", _W, x)  # (B, C, H, W)
    return torch.tanh(h) * (0.6 + 0.4 * torch.cos(9 * tt)) + 0.1 * x


def _diffusers_run(name, pred, steps, z, seed, eta=0.0, karras=False, final_sigma="zero", zsnr=False, **cfg):
    kw = dict(SD, prediction_type=pred, **cfg)
    params = inspect.signature(DIFFUSERS[name].__init__).parameters
    if zsnr:
        kw["rescale_betas_zero_snr"] = True
    if "clip_sample" in params:
        kw["clip_sample"] = False
    if karras:
        kw["use_karras_sigmas"] = True
    if name == "ddim":
        kw["set_alpha_to_one"] = final_sigma == "zero"
    elif "final_sigmas_type" in params:
        kw["final_sigmas_type"] = final_sigma
    sched = DIFFUSERS[name](**kw)
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = z * sched.init_noise_sigma
    xs = []
    step_kw = inspect.signature(sched.step).parameters
    for t in sched.timesteps:
        inp = sched.scale_model_input(x, t)
        out = model_fn(inp, t.expand(z.shape[0]))
        extra = {"generator": g} if "generator" in step_kw else {}
        if name == "ddim":
            extra["eta"] = eta
        x = sched.step(out, t, x, **extra).prev_sample
        xs.append(x)
    timesteps = sched.timesteps
    if name == "heun":  # diffusers interleaves the two Heun stages; keep the completed steps
        xs, timesteps = xs[1::2] + [xs[-1]], timesteps[::2]
    return xs, timesteps


def _ours_run(name, pred, steps, z, seed, eta=0.0, karras=False, final_sigma="zero", zsnr=False,
              timestep_spacing="linspace", steps_offset=0):
    sched = NoiseSchedule.from_config(ScheduleConfig(prediction_type=pred, rescale_betas_zero_snr=zsnr))
    plan = S.plan(sched.alphas_cumprod, name, steps, spacing=timestep_spacing, steps_offset=steps_offset,
                  karras=karras, final_sigma=final_sigma)
    xs = []
    vp = S.get_sampler(name).family != "k"  # diffusers' DDPM/DDIM/DPM keep x_t = x/√(1+σ²)

    def keep(d):
        xs.append(S.SamplingPlan.to_unet_scale(d["x"], d["sigma_next"]) if vp else d["x"])

    S.sample(name, plan.denoiser(model_fn, sched.alphas_cumprod, pred), plan.start(z), plan.sigmas,
             callback=keep, generator=torch.Generator().manual_seed(seed), eta=eta, disable=True)
    return xs, plan.timesteps


CASES = [
    ("ddpm", dict(timestep_spacing="leading", steps_offset=1)),
    ("ddpm", dict(timestep_spacing="linspace")),
    ("ddpm", dict(timestep_spacing="trailing")),
    ("ddim", dict(timestep_spacing="leading", steps_offset=1, final_sigma="sigma_min")),
    ("ddim", dict(timestep_spacing="trailing", eta=0.7)),
    ("ddim", dict(timestep_spacing="leading", eta=1.0)),
    ("euler", dict(timestep_spacing="linspace")),
    ("euler", dict(timestep_spacing="leading", steps_offset=1)),
    ("euler", dict(timestep_spacing="trailing")),
    ("euler", dict(timestep_spacing="linspace", karras=True)),
    ("euler-a", dict(timestep_spacing="linspace")),
    ("euler-a", dict(timestep_spacing="leading", steps_offset=1)),
    ("euler-a", dict(timestep_spacing="trailing")),
    ("heun", dict(timestep_spacing="linspace")),
    ("heun", dict(timestep_spacing="leading", steps_offset=1)),
    ("heun", dict(timestep_spacing="trailing", karras=True)),
    ("dpmpp-2m", dict(timestep_spacing="linspace")),
    ("dpmpp-2m", dict(timestep_spacing="leading", steps_offset=1)),
    ("dpmpp-2m", dict(timestep_spacing="trailing")),
    ("dpmpp-2m", dict(timestep_spacing="linspace", karras=True)),
]


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name,opts", CASES, ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in CASES])
def test_trajectory_matches_diffusers(name, opts, pred):
    steps = 10  # divides 1000, so diffusers' DDIM "trailing" is self-consistent
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    ref, ref_t = _diffusers_run(name, pred, steps, z, seed=7, **opts)
    ours, our_t = _ours_run(name, pred, steps, z, seed=7, **opts)
    torch.testing.assert_close(our_t.double(), ref_t.double(), atol=1e-3, rtol=0)
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0, msg=lambda m: f"step {i}: {m}")


@pytest.mark.parametrize("name,atol", [("euler", 1e-4), ("dpmpp-2m", 1e-4), ("ddim", 1e-3)])
def test_zero_terminal_snr_trailing_matches_diffusers(name, atol):
    # σ_max is infinite here; we clamp ᾱ_T to 2⁻²⁴ (σ ≈ 4096) as diffusers' Euler and DPM-Solver do. Its
    # DDIM keeps ᾱ_T = 0 exactly, which the σ formulation cannot, hence the looser (measured 2e-4) bound.
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    ref, _ = _diffusers_run(name, "v_prediction", 8, z, 0, zsnr=True, timestep_spacing="trailing")
    ours, _ = _ours_run(name, "v_prediction", 8, z, 0, zsnr=True, timestep_spacing="trailing")
    for a, b in zip(ours, ref):  # Euler's x is at σ ≈ 4096 scale at first: compare relative to that
        torch.testing.assert_close(a, b, atol=atol * max(1.0, b.abs().max().item()), rtol=0)


@pytest.mark.parametrize("name,eta", [("ddpm", None), ("ddim", 0.7), ("ddim", 0.0), ("euler-a", None)])
def test_stochastic_steps_draw_through_the_noise_sampler(name, eta):
    """Every fresh-noise draw is one call noise_sampler(σ, σ_next) (k-diffusion's shape), for each step whose
    σ_next > 0; the default sampler from a seeded generator is the `generator=` run, bit for bit."""
    sched = NoiseSchedule.from_config(ScheduleConfig())
    plan = S.plan(sched.alphas_cumprod, name, 6, spacing="trailing")
    den = plan.denoiser(model_fn, sched.alphas_cumprod, "epsilon")
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    x = plan.start(z)
    seeded = S.sample(name, den, x, plan.sigmas, generator=torch.Generator().manual_seed(5), eta=eta, disable=True)
    default = S.default_noise_sampler(x, torch.Generator().manual_seed(5))
    same = S.sample(name, den, x, plan.sigmas, noise_sampler=default, eta=eta, disable=True)
    assert torch.equal(seeded, same)
    calls = []

    def zeros(sigma, sigma_next):
        calls.append((float(sigma), float(sigma_next)))
        return torch.zeros_like(x)

    quiet = S.sample(name, den, x, plan.sigmas, noise_sampler=zeros, eta=eta, disable=True)
    s = plan.sigmas.tolist()
    assert calls == ([] if eta == 0.0 else [(a, b) for a, b in zip(s[:-1], s[1:]) if b > 0])
    assert torch.equal(quiet, seeded) == (eta == 0.0)  # the drawn noise is what made the difference


def test_img2img_plan_is_the_tail_of_the_schedule():
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod
    p = S.plan(ac, "euler", 20, spacing="leading", steps_offset=1)
    first = S.start_index(20, 0.6)
    assert first == 8  # diffusers' get_timesteps: 20 - int(20 · 0.6)
    tail = p.start_at(first)
    assert torch.equal(tail.sigmas, p.sigmas[8:]) and tail.init_sigma == pytest.approx(float(p.sigmas[8]))
    assert S.start_index(20, 1.0) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(UserError, match="--strength"):
            S.start_index(20, bad)
    with pytest.raises(UserError, match="--strength"):
        S.start_index(3, 0.2)  # int(0.6) = 0 steps to run


def test_bad_names_and_steps():
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod
    with pytest.raises(UserError, match="--sampler"):
        S.plan(ac, "plms", 10)
    with pytest.raises(UserError, match="--steps"):
        S.plan(ac, "euler", 0)
    with pytest.raises(UserError, match="--spacing"):
        S.plan(ac, "euler", 10, spacing="uniform")


# ----------------------------------------------------------------------------- closed form: Gaussian data

MU, SD_DATA = torch.tensor([1.0, -2.0]), 0.5


def ideal_denoiser(x, sigma):
    """E[x0 | x0 + σε] for x0 ~ N(μ, s²I): μ + s²/(s²+σ²)·(x - μ)."""
    s = sigma.reshape(-1, 1)
    return MU + SD_DATA**2 / (SD_DATA**2 + s**2) * (x - MU)


def _gaussian_run(name, steps, karras, n=4000, seed=11):
    """Start from the exact marginal N(μ, (s²+σ_max²)I) (standardised, so a deterministic sampler adds no
    sampling error) and return (output, the variance an exact solver reaches)."""
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod
    p = S.plan(ac, name, steps, spacing="linspace", karras=karras)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=g)
    z = (z - z.mean(0)) / z.std(0)
    x = MU + (SD_DATA**2 + float(p.sigmas[0]) ** 2) ** 0.5 * z
    out = S.sample(name, ideal_denoiser, x, p.sigmas, generator=g, disable=True)
    # every sampler's last step to σ = 0 returns D(x, σ_last) = E[x0 | x]: exact solvers end with variance
    # s²·s²/(s²+σ_last²), not s² (the posterior variance is dropped); σ_last = 0.03 here, a 0.3 % effect
    s_last = float(p.sigmas[-2])
    return out, SD_DATA**4 / (SD_DATA**2 + s_last**2)


@pytest.mark.parametrize("karras", [False, True])
@pytest.mark.parametrize("name", list(S.SAMPLERS))
def test_gaussian_data_gives_right_mean_and_variance(name, karras):
    info = S.get_sampler(name)
    # first-order samplers converge as 1/steps; ancestral ones lose O(Δσ²) variance per step, so give them
    # DDPM's own 1000 steps
    steps = 50 if name in ("heun", "dpmpp-2m") else 1000 if info.stochastic else 200
    out, var = _gaussian_run(name, steps, karras)
    mean_tol, var_tol = (0.03, 0.06) if info.stochastic else (1e-3, 0.03)  # stochastic: SE ≈ 0.008, 2.2 %
    torch.testing.assert_close(out.mean(0), MU, atol=mean_tol, rtol=0)
    torch.testing.assert_close(out.var(0), torch.full((2,), var), atol=var_tol * var, rtol=0)
    if not info.stochastic:  # and the error shrinks with more steps (it is discretisation, not bias)
        coarse, _ = _gaussian_run(name, steps // 4, karras)
        assert (out.var(0) - var).abs().max() < (coarse.var(0) - var).abs().max()


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_denoiser_turns_an_ideal_unet_into_the_ideal_denoiser(pred):
    ac = NoiseSchedule.from_config(ScheduleConfig()).alphas_cumprod

    def ideal_unet(x_t, t):  # the Bayes-optimal prediction of type `pred` at integer t, in x_t coordinates
        t = t.round().long()
        a = ac[t].reshape(-1, 1)
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        x0 = MU + alpha * SD_DATA**2 / (a * SD_DATA**2 + sigma**2) * (x_t - alpha * MU)
        return convert(x0, x_t, t, ac, "sample", pred)

    den = S.Denoiser(ideal_unet, ac, pred)
    t = torch.tensor([0, 5, 100, 500, 999])
    sig = S.sigma_table(ac)[t]
    x = MU + torch.randn(5, 2) * (sig.reshape(-1, 1) ** 2 + SD_DATA**2).sqrt()
    torch.testing.assert_close(den.sigma_to_t(sig), t.float())
    torch.testing.assert_close(den(x, sig), ideal_denoiser(x, sig), atol=1e-4, rtol=1e-4)
    # and the whole chain through the UNet-style model reaches the data distribution
    p = S.plan(ac, "dpmpp-2m", 25, spacing="leading", steps_offset=1)
    z = torch.randn(4000, 2, generator=torch.Generator().manual_seed(5))
    z = (z - z.mean(0)) / z.std(0)
    x = MU + (SD_DATA**2 + p.sigmas[0] ** 2).sqrt() * z  # the exact marginal at σ_max
    out = S.sample_dpmpp_2m(p.denoiser(ideal_unet, ac, pred), x, p.sigmas, disable=True)
    var = SD_DATA**4 / (SD_DATA**2 + p.sigmas[-2] ** 2)  # see _gaussian_run
    torch.testing.assert_close(out.mean(0), MU, atol=1e-3, rtol=0)
    torch.testing.assert_close(out.var(0), var.expand(2), atol=0.03 * var, rtol=0)


def test_sigma_table_matches_kdiffusion_definition():
    """σ_t = √((1-ᾱ_t)/ᾱ_t) and back: diffusers' Euler scheduler stores the same σ table (reversed, then 0)."""
    from diffusers import EulerDiscreteScheduler

    sched = NoiseSchedule.from_config(ScheduleConfig())
    sig = S.sigma_table(sched.alphas_cumprod)
    assert torch.all(sig[1:] > sig[:-1])
    torch.testing.assert_close(S.sigma_to_alpha_cumprod(sig), sched.alphas_cumprod, atol=1e-6, rtol=0)
    ref = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    torch.testing.assert_close(sig, ref.sigmas[:-1].flip(0).float(), atol=1e-6, rtol=1e-6)

