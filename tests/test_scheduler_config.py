"""scheduler_config.py: every scheduler key that changes sampling is honoured (the trajectory equals the
diffusers scheduler built from the same config: x0 clipping, dynamic thresholding, DPM-Solver++'s last
step, Karras σ, spacing, …) or named in a warning (each NOT_HONOURED key, and unknown keys)."""

import inspect
import math
import warnings

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

from latentforge import samplers as S
from latentforge import scheduler_config as SC
from latentforge.formats.diffusers import schedule_from_diffusers
from latentforge.schedule import NoiseSchedule

SD = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          clip_sample=False)
DIFFUSERS = {"ddpm": DDPMScheduler, "ddim": DDIMScheduler, "dpmpp-2m": DPMSolverMultistepScheduler,
             "euler": EulerDiscreteScheduler}
_W = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) / 2


def model_fn(x, t, **_):
    """A smooth stand-in for a UNet; its x0 leaves [-1, 1] at high noise, so clipping acts."""
    tt = t.float().reshape(-1, 1, 1, 1) / 1000
    return torch.tanh(torch.einsum("oc,bchw->bohw", _W, x)) * (0.6 + 0.4 * torch.cos(9 * tt)) + 0.1 * x


def _diffusers(name, config, steps, z, seed):
    sched = DIFFUSERS[name].from_config(config)
    sched.set_timesteps(steps)
    g, x, xs = torch.Generator().manual_seed(seed), z * sched.init_noise_sigma, []
    takes_generator = "generator" in inspect.signature(sched.step).parameters
    for t in sched.timesteps:
        out = model_fn(sched.scale_model_input(x, t), t.expand(z.shape[0]))
        x = sched.step(out, t, x, **({"generator": g} if takes_generator else {})).prev_sample
        xs.append(x)
    return xs


def _ours(name, config, steps, z, seed):
    opts = SC.SchedulerDefaults.from_config(config).options(name)
    ac = NoiseSchedule.from_config(schedule_from_diffusers(config, "scheduler_config.json")).alphas_cumprod
    plan = S.plan(ac, name, steps, **opts.plan_kwargs())
    vp, xs = S.get_sampler(name).family != "k", []  # diffusers' DDPM/DDIM/DPM keep x_t = x/√(1+σ²)
    S.sample(name, plan.denoiser(model_fn, ac, config.get("prediction_type", "epsilon"), **opts.denoiser_kwargs()),
             plan.start(z), plan.sigmas, callback=lambda d: xs.append(
                 S.SamplingPlan.to_unet_scale(d["x"], d["sigma_next"]) if vp else d["x"]),
             generator=torch.Generator().manual_seed(seed), disable=True, **opts.solver_kwargs(steps))
    return xs


CASES = [  # (sampler, steps, the keys under test)
    ("ddim", 10, dict(clip_sample=True, clip_sample_range=1.5)),
    ("ddim", 10, dict(clip_sample=True, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("ddpm", 10, dict(clip_sample=True, clip_sample_range=0.8)),
    ("ddim", 10, dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)),
    ("ddpm", 10, dict(thresholding=True, sample_max_value=2.0, timestep_spacing="leading", steps_offset=1)),
    ("dpmpp-2m", 10, dict(thresholding=True, dynamic_thresholding_ratio=0.8, sample_max_value=1.2)),
    ("dpmpp-2m", 10, dict(lower_order_final=False, final_sigmas_type="sigma_min")),  # 2nd-order last step
    ("dpmpp-2m", 16, dict(lower_order_final=True, final_sigmas_type="sigma_min")),  # ≥ 15 steps: 2nd order too
    ("dpmpp-2m", 16, dict(euler_at_final=True, final_sigmas_type="sigma_min")),
    ("dpmpp-2m", 10, dict(lower_order_final=False)),  # ends at σ = 0: first order regardless
    ("dpmpp-2m", 10, dict(use_karras_sigmas=True, timestep_spacing="linspace")),
    ("euler", 10, dict(use_karras_sigmas=True, timestep_spacing="leading", steps_offset=1)),
    ("euler", 8, dict(rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type="v_prediction")),
    ("ddim", 10, dict(set_alpha_to_one=False, steps_offset=1, beta_schedule="linear", beta_start=0.0001,
                      beta_end=0.02)),
]


@pytest.mark.parametrize("name,steps,keys", CASES, ids=[f"{n}-{'-'.join(k)}" for n, _, k in CASES])
def test_honoured_keys_match_diffusers(name, steps, keys):
    config = dict(SD, _class_name=DIFFUSERS[name].__name__, **keys)
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    ref, ours = _diffusers(name, config, steps, z, 7), _ours(name, config, steps, z, 7)
    assert len(ours) == len(ref) == steps
    for i, (a, b) in enumerate(zip(ours, ref)):  # zero-SNR Euler starts at σ ≈ 4096: relative bound
        torch.testing.assert_close(a, b, atol=1e-4 * max(1.0, b.abs().max().item()), rtol=0,
                                   msg=lambda m: f"step {i}: {m}")


def test_the_keys_change_the_trajectory():
    """The keys above are not no-ops here: without them the trajectory differs (so the equality means something)."""
    z = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    for name, steps, keys in CASES[:9]:
        plain, keyed = _ours(name, SD, steps, z, 7)[-1], _ours(name, dict(SD, **keys), steps, z, 7)[-1]
        assert (plain - keyed).abs().max() > 1e-3, (name, keys)


def test_dynamic_threshold_closed_form():
    x0 = torch.tensor([[[[0.5, -3.0, 2.0, 0.1]]]])  # |x0| 90 % quantile: 2.7 (linear interpolation)
    out = S.dynamic_threshold(x0, ratio=0.9, max_value=2.5)  # s = clamp(2.7, 1, 2.5) = 2.5
    torch.testing.assert_close(out, torch.tensor([[[[0.2, -1.0, 0.8, 0.04]]]]))
    assert torch.equal(S.dynamic_threshold(x0 / 10, 0.9, 2.5), x0 / 10)  # s clamps up to 1: unchanged


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(SC, "_warned", set())


_NON_DEFAULT = {"algorithm_type": "sde-dpmsolver++", "solver_order": 3, "solver_type": "heun",
                "use_exponential_sigmas": True, "use_beta_sigmas": True, "use_lu_lambdas": True,
                "use_flow_sigmas": True, "use_dynamic_shifting": True, "flow_shift": 3.0, "shift_terminal": 0.1,
                "time_shift_type": "linear", "variance_type": "learned_range", "lambda_min_clipped": -5.1,
                "interpolation_type": "log_linear", "timestep_type": "continuous", "sigma_min": 0.03,
                "sigma_max": 14.6, "predict_x0": False, "solver_p": "x", "disable_corrector": [0]}


@pytest.mark.parametrize("key", sorted(SC.NOT_HONOURED))
def test_each_unhonoured_key_is_named_once(fresh_warnings, key):
    config = dict(SD, **{key: _NON_DEFAULT[key]})
    with pytest.warns(UserWarning) as record:
        SC.warn_unhonoured(config, "m/scheduler")
    assert len(record) == 1 and key in str(record[0].message) and "m/scheduler" in str(record[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SC.warn_unhonoured(config, "m/scheduler") == []  # once per process


def test_defaults_honoured_and_inert_keys_are_silent_unknown_keys_are_named(fresh_warnings):
    defaults = {k: ok[0] for k, (ok, _) in SC.NOT_HONOURED.items()}
    config = dict(SD, **defaults, _class_name="PNDMScheduler", skip_prk_steps=True, thresholding=True,
                  lower_order_final=False, use_karras_sigmas=True)
    assert SC.unhonoured(config) == []
    assert [k for k, _ in SC.unhonoured(dict(config, my_new_knob=1))] == ["my_new_knob"]


def test_pipeline_warns_when_a_model_is_loaded(fresh_warnings, tmp_path):
    from latentforge.config import ScheduleConfig, UNetConfig, VAEConfig
    from latentforge.models import AutoencoderKL, UNet
    from latentforge.pipelines import Pipeline

    unet = UNet(UNetConfig(channels=(8, 16), layers_per_level=1, attention=(False, False), cross_attention_dim=None,
                           mid_attention=False, norm_groups=4, sample_size=4))
    vae = AutoencoderKL(VAEConfig(channels=(8, 8), layers_per_level=1, norm_groups=4, sample_size=8))
    with pytest.warns(UserWarning, match="solver_order=3"):
        Pipeline(unet, vae, NoiseSchedule.from_config(ScheduleConfig()),
                 scheduler=SC.SchedulerDefaults.from_config({"solver_order": 3}), name="m")
