"""Rectified flow (flow.py, flow_sampling.py): the σ densities by their closed-form moments, the shifts, loss
weights and training σ against diffusers, the loss on a Gaussian toy whose ideal velocity is known in closed form,
and the Euler/Heun samplers step for step against diffusers' flow-matching schedulers."""

import math

import pytest
import torch
from scipy import integrate

from latentforge import flow
from latentforge.flow_sampling import flow_sigmas, sample_flow_euler, sample_flow_heun, start_at

N = 400_000  # Monte-Carlo draws: the standard error of a mean of values in [0, 1] is below 0.5/√N ≈ 8e-4


def _draws(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)


def _moments(transform):
    """E[f(u)] and E[f(u)²] for u ~ U[0, 1], by quadrature of the transform (the closed form of the density's
    moments: E[g(X)] = ∫ g(f(u)) du)."""
    return [integrate.quad(lambda u: transform(u) ** k, 0, 1, limit=200)[0] for k in (1, 2)]


CASES = {
    "uniform": (dict(), lambda u: u),
    "mode": (dict(mode_scale=1.29), lambda u: 1 - u - 1.29 * (math.cos(math.pi * u / 2) ** 2 - 1 + u)),
    "cosmap": (dict(), lambda u: 1 - 1 / (math.tan(math.pi * u / 2) + 1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_densities_have_their_closed_form_moments(name):
    kw, f = CASES[name]
    u, z = _draws()
    t = flow.density(name, u, z, **kw)
    m1, m2 = _moments(f)
    se = 5 * t.std().item() / math.sqrt(N)  # 5 standard errors
    assert abs(t.mean().item() - m1) < se and abs((t**2).mean().item() - m2) < 2 * se
    assert 0 <= t.min() and t.max() <= 1


def test_logit_normal_moments():
    """sigmoid(m + s·z): E by quadrature over the normal density; m = 0 is symmetric about 1/2."""
    u, z = _draws(1)
    for m, s in ((0.0, 1.0), (0.5, 0.8)):
        t = flow.density("logit_normal", u, z, logit_mean=m, logit_std=s)
        phi = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        want = integrate.quad(lambda x: phi(x) / (1 + math.exp(-(m + s * x))), -12, 12)[0]
        assert abs(t.mean().item() - want) < 5 * t.std().item() / math.sqrt(N)
    assert abs(integrate.quad(lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi) / (1 + math.exp(-x)), -12, 12)[0]
               - 0.5) < 1e-12


def test_static_and_resolution_shift_equal_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigma = torch.linspace(0.001, 1, 50, dtype=torch.float64)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    assert torch.equal(flow.shift(torch.arange(1000, 0, -1) / 1000.0, 3.0), ref.sigmas)
    mu = flow.resolution_mu(1024)
    dyn = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    # float64, the same formula in another order of operations: a few units of float64 roundoff
    torch.testing.assert_close(flow.time_shift(sigma, mu), torch.as_tensor(dyn.time_shift(mu, 1.0, sigma.numpy())),
                               atol=0, rtol=8 * torch.finfo(torch.float64).eps)
    # with μ = log s, the resolution-dependent shift is the static one
    torch.testing.assert_close(flow.time_shift(sigma, math.log(3.0)), flow.shift(sigma, 3.0), atol=1e-15, rtol=0)
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for tokens in (256, 1024, 4096, 6000):
        assert flow.resolution_mu(tokens) == pytest.approx(calculate_shift(tokens), abs=1e-15)


def test_loss_weights_and_training_sigmas_equal_diffusers():
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    sigma = torch.linspace(0.01, 1, 40)
    for name in ("sigma_sqrt", "cosmap"):
        torch.testing.assert_close(flow.loss_weight(name, sigma), compute_loss_weighting_for_sd3(name, sigma))
    assert torch.equal(flow.loss_weight("none", sigma), torch.ones(40))
    # train_dreambooth_lora_sd3.py: u from the density, indices = (u·T).long(), σ = scheduler.sigmas[indices]
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    u = compute_density_for_timestep_sampling("logit_normal", 64, logit_mean=0.0, logit_std=1.0,
                                              generator=torch.Generator().manual_seed(0))
    want = sched.sigmas[(u * 1000).long()]
    assert torch.equal(flow.training_sigmas(u, 1000, 3.0), want)
    z = torch.normal(0.0, 1.0, (64,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(flow.density("logit_normal", torch.zeros(64), z), torch.sigmoid(z))


def test_the_ideal_velocity_of_a_gaussian_minimises_the_loss():
    """x0 ~ N(μ, s²) in 1-D: x_σ ~ N((1−σ)μ, (1−σ)²s² + σ²) and E[ε − x0 | x_σ] = −μ + c·(x_σ − (1−σ)μ) with
    c = (σ − (1−σ)s²) / ((1−σ)²s² + σ²). Its loss is the irreducible Var(ε − x0 | x_σ) = 1 + s² − c²·Var(x_σ);
    any other velocity (here c ± 0.1, or μ off by 0.1) does worse."""
    mu, s = 1.5, 0.5
    g = torch.Generator().manual_seed(4)
    x0 = mu + s * torch.randn(N, generator=g, dtype=torch.float64)
    eps = torch.randn(N, generator=g, dtype=torch.float64)
    for sig in (0.1, 0.5, 0.9):
        sigma = torch.full((N,), sig, dtype=torch.float64)
        x = flow.noised(x0, eps, sigma)
        var = (1 - sig) ** 2 * s * s + sig * sig
        c = (sig - (1 - sig) * s * s) / var

        def loss(cc, m=mu):
            return (-m + cc * (x - (1 - sig) * m) - flow.velocity(x0, eps)).square().mean().item()

        irreducible = 1 + s * s - c * c * var
        assert abs(loss(c) - irreducible) < 0.01 * irreducible  # Monte-Carlo error well under 1 %
        assert loss(c) < min(loss(c + 0.1), loss(c - 0.1), loss(c, mu + 0.1))


def test_euler_and_heun_carry_noise_to_the_gaussian_data():
    """With the ideal velocity, the flow ODE maps N(0, 1) to N(μ, s²): Heun at 20 steps within 1 % of the mean and
    variance, Euler at 1000 steps within 1 % (first order: at 200 steps its variance was 1.4 % off)."""
    mu, s = 1.5, 0.5

    def ideal(x, sigma):
        sig = sigma.to(torch.float64)
        var = (1 - sig) ** 2 * s * s + sig * sig
        return -mu + (sig - (1 - sig) * s * s) / var * (x - (1 - sig) * mu)

    noise = torch.randn(100_000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    for sampler, steps in ((sample_flow_heun, 20), (sample_flow_euler, 1000)):
        sigmas = torch.cat([torch.linspace(1, 1e-4, steps, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
        out = sampler(ideal, noise.clone(), sigmas, disable=True)
        assert abs(out.mean().item() - mu) < 0.01 * mu and abs(out.var().item() - s * s) < 0.01 * s * s, sampler


@pytest.mark.parametrize("kw", [dict(shift=3.0), dict(shift=1.0), dict(mu=0.9)])
def test_euler_sigmas_and_steps_equal_flow_match_euler_discrete_scheduler(kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    dynamic = "mu" in kw
    sched = FlowMatchEulerDiscreteScheduler(shift=kw.get("shift", 1.0), use_dynamic_shifting=dynamic)
    sched.set_timesteps(7, mu=kw.get("mu"))
    ours = flow_sigmas(7, shift=kw.get("shift", 1.0), mu=kw.get("mu"))
    assert torch.equal(ours, sched.sigmas)
    w = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def velocity(x, sigma):  # a smooth made-up field that depends on σ (the "model")
        return torch.tanh(x * w) + sigma.view(-1, 1, 1, 1)

    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ref = x0.clone()
    for t in sched.timesteps:
        ref = sched.step(velocity(ref, (t / 1000).expand(2)), t, ref).prev_sample
    assert torch.equal(sample_flow_euler(velocity, x0, ours, disable=True), ref)


def test_heun_equals_flow_match_heun_discrete_scheduler():
    from diffusers import FlowMatchHeunDiscreteScheduler

    sched = FlowMatchHeunDiscreteScheduler(shift=3.0)
    sched.set_timesteps(5)
    w = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(2))

    def velocity(x, sigma):
        return torch.tanh(x * w) + sigma.view(-1, 1, 1, 1)

    x0 = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    ref = x0.clone()
    for t in sched.timesteps:
        ref = sched.step(velocity(ref, (t / 1000).expand(2)), t, ref).prev_sample
    sigmas = flow_sigmas(5, shift=3.0)
    got = sample_flow_heun(velocity, x0, sigmas, disable=True)
    # diffusers forms each derivative as (x − (x − v·σ))/σ: the subtraction's rounding, u·|x|, divided by σ (first
    # stage) or σ_next (second), times the step dt; summed over the steps, 4 roundings each
    u, scale = torch.finfo(torch.float32).eps / 2, max(ref.abs().max().item(), x0.abs().max().item())
    bound = sum(4 * u * scale * abs(b - a) * (1 / a + (1 / b if b > 0 else 0)) for a, b in zip(sigmas.tolist(),
                                                                                               sigmas[1:].tolist()))
    assert (got - ref).abs().max().item() <= bound


def test_image_to_image_takes_the_tail_of_the_grid():
    sigmas = flow_sigmas(10, shift=3.0)
    assert torch.equal(start_at(sigmas, 10, 0.6), sigmas[4:]) and len(start_at(sigmas, 10, 1.0)) == 11
    # diffusers' SD3/Flux img2img get_timesteps: t_start = int(max(steps − steps·strength, 0)), steps·strength not
    # rounded first: 4 steps at 0.6 start at index int(1.6) = 1 (3 steps run); 10 at 0.05 still run 1
    assert torch.equal(start_at(flow_sigmas(4), 4, 0.6), flow_sigmas(4)[1:])
    assert len(start_at(sigmas, 10, 0.05)) == 2
    with pytest.raises(ValueError, match="strength 0"):
        start_at(sigmas, 10, 0.0)
    x0, eps = torch.ones(1, 2), torch.zeros(1, 2)
    assert torch.equal(flow.noised(x0, eps, torch.tensor([0.25])), torch.full((1, 2), 0.75))


def test_validation_grid_and_bad_names():
    assert torch.equal(flow.validation_sigmas(4), torch.tensor([0.125, 0.375, 0.625, 0.875]))
    with pytest.raises(ValueError, match="unknown density"):
        flow.density("beta", torch.zeros(1), torch.zeros(1))
    with pytest.raises(ValueError, match="unknown loss weighting"):
        flow.loss_weight("snr", torch.ones(1))
