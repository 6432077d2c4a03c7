"""What a model's `scheduler_config.json` asks of sampling: honoured, or named once in a warning.

A diffusers model folder (or an imported single file) carries one scheduler config. Our samplers are
pure functions (samplers.py); this module reads the keys of that config that change sampling and turns
them into the samplers' options, the way diffusers' `SchedulerClass.from_config(config)` would:

    honoured   timestep_spacing (absent: the default of the config's _class_name), steps_offset, set_alpha_to_one (DDIM), final_sigmas_type,
               use_karras_sigmas (the default for --karras), clip_sample + clip_sample_range,
               thresholding + dynamic_thresholding_ratio + sample_max_value (x0 processing in
               samplers.Denoiser, for every sampler), lower_order_final + euler_at_final (dpmpp-2m);
               num_train_timesteps, beta_*, rescale_betas_zero_snr, prediction_type via ScheduleConfig
               (formats/diffusers.py; trained_betas is refused there)
    warned     every key in `NOT_HONOURED` whose value differs from what latentforge does, and any key
               this module does not know: one warning per key and value, naming both and what we do
    inert      `INERT`: names, versions, and keys of schedulers we do not run (PNDM's skip_prk_steps)

One deliberate difference: an absent `clip_sample` is off (diffusers' DDIM/DDPM default it to on,
which is wrong for latents; every SD config sets it false explicitly).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, Optional, Tuple

# key -> (the values that equal what latentforge does, what latentforge does instead)
NOT_HONOURED: Dict[str, Tuple[tuple, str]] = {
    "algorithm_type": (("dpmsolver++",), "dpmpp-2m is DPM-Solver++ (data prediction, multistep)"),
    "solver_order": ((2,), "dpmpp-2m is second order"),
    "solver_type": (("midpoint",), "dpmpp-2m uses the midpoint form"),
    "use_exponential_sigmas": ((False,), "σ follow the timestep spacing (or --karras)"),
    "use_beta_sigmas": ((False,), "σ follow the timestep spacing (or --karras)"),
    "use_lu_lambdas": ((False,), "σ follow the timestep spacing (or --karras)"),
    "use_flow_sigmas": ((False,), "latentforge samples diffusion (not flow-matching) models"),
    "use_dynamic_shifting": ((False,), "no timestep shifting"),
    "flow_shift": ((1.0,), "no timestep shifting"),
    "shift_terminal": ((None,), "no timestep shifting"),
    "time_shift_type": (("exponential",), "no timestep shifting"),
    "variance_type": ((None, "fixed_small"), "the fixed posterior variance (DDPM's fixed_small)"),
    "lambda_min_clipped": ((-math.inf,), "λ is not clipped"),
    "interpolation_type": (("linear",), "σ between timesteps is interpolated linearly"),
    "timestep_type": (("discrete",), "discrete timesteps"),
    "sigma_min": ((None,), "the smallest σ of the training schedule"),
    "sigma_max": ((None,), "the largest σ of the training schedule"),
    "predict_x0": ((True,), "UniPC is not implemented; use --sampler dpmpp-2m"),
    "solver_p": ((None,), "UniPC is not implemented; use --sampler dpmpp-2m"),
    "disable_corrector": (([],), "UniPC is not implemented; use --sampler dpmpp-2m"),
}
HONOURED = ("timestep_spacing", "steps_offset", "set_alpha_to_one", "final_sigmas_type", "use_karras_sigmas",
            "clip_sample", "clip_sample_range", "thresholding", "dynamic_thresholding_ratio", "sample_max_value",
            "lower_order_final", "euler_at_final", "num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
            "trained_betas", "rescale_betas_zero_snr", "prediction_type")
INERT = ("_class_name", "_diffusers_version", "_use_default_values", "skip_prk_steps")

# diffusers' per-class default `timestep_spacing`, for configs without the key: a loaded diffusers scheduler
# fills in its own class default, which `from_config` then carries over. No class named: "leading".
LEADING_CLASSES = ("DDPMScheduler", "DDIMScheduler", "PNDMScheduler")

_warned: set = set()


@dataclass(frozen=True)
class SamplingOptions:
    """The samplers' options a scheduler config implies (see the module docstring)."""

    spacing: str = "leading"
    steps_offset: int = 0
    final_sigma: str = "zero"
    karras: bool = False
    clip_sample: Optional[float] = None  # x0 ∈ [-r, r]
    thresholding: Optional[Tuple[float, float]] = None  # (ratio, max value)
    lower_order_final: bool = True
    euler_at_final: bool = False

    def plan_kwargs(self) -> Dict[str, Any]:
        return dict(spacing=self.spacing, steps_offset=self.steps_offset, final_sigma=self.final_sigma,
                    karras=self.karras)

    def denoiser_kwargs(self) -> Dict[str, Any]:
        return dict(clip_sample=self.clip_sample, thresholding=self.thresholding)

    def solver_kwargs(self, steps: int) -> Dict[str, Any]:
        return dict(lower_order_final=self.lower_order_final, euler_at_final=self.euler_at_final, total_steps=steps)


@dataclass(frozen=True)
class SchedulerDefaults:
    """A model's scheduler config as sampling reads it: the honoured keys, typed, and `config`, the keys as
    written (what diffusers' `Scheduler.from_config` and `unhonoured` read). `formats` builds it from a model
    folder or a single file; `options` gives one sampler's options."""

    config: Mapping[str, Any] = field(default_factory=dict)
    spacing: str = "leading"  # timestep_spacing, or the default of the config's _class_name
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM's last step: to σ = 0, or stop at σ_min
    final_sigmas_type: str = "zero"  # the same for the other schedulers
    karras: bool = False  # use_karras_sigmas
    clip_sample: Optional[float] = None  # x0 ∈ [-r, r]
    thresholding: Optional[Tuple[float, float]] = None  # (ratio, max value)
    lower_order_final: bool = True
    euler_at_final: bool = False

    @classmethod
    def from_config(cls, config: Optional[Mapping[str, Any]] = None) -> "SchedulerDefaults":
        c = dict(config or {})
        clip = float(c.get("clip_sample_range", 1.0)) if c.get("clip_sample", False) else None
        threshold = None
        if c.get("thresholding", False):
            threshold = (float(c.get("dynamic_thresholding_ratio", 0.995)), float(c.get("sample_max_value", 1.0)))
        return cls(config=MappingProxyType(c), spacing=c.get("timestep_spacing", _default_spacing(c)),
                   steps_offset=int(c.get("steps_offset", 0)), set_alpha_to_one=bool(c.get("set_alpha_to_one", True)),
                   final_sigmas_type=c.get("final_sigmas_type", "zero"), karras=bool(c.get("use_karras_sigmas", False)),
                   clip_sample=clip, thresholding=threshold, lower_order_final=bool(c.get("lower_order_final", True)),
                   euler_at_final=bool(c.get("euler_at_final", False)))

    def options(self, sampler: str, spacing: Optional[str] = None, karras: Optional[bool] = None) -> SamplingOptions:
        """Options for `sampler`; `spacing` / `karras` (flags) override the config's."""
        if sampler == "ddim":  # diffusers' DDIMScheduler names its last step differently
            final = "zero" if self.set_alpha_to_one else "sigma_min"
        else:
            final = self.final_sigmas_type
        return SamplingOptions(
            spacing=spacing or self.spacing, steps_offset=self.steps_offset, final_sigma=final,
            karras=self.karras if karras is None else bool(karras), clip_sample=self.clip_sample,
            thresholding=self.thresholding, lower_order_final=self.lower_order_final,
            euler_at_final=self.euler_at_final)


def _default_spacing(config: Mapping[str, Any]) -> str:
    name = config.get("_class_name")
    return "leading" if name is None or name in LEADING_CLASSES else "linspace"


def unhonoured(config: Mapping[str, Any]) -> List[Tuple[str, str]]:
    """(key, message) for every key whose value latentforge does not honour."""
    out = []
    for key, value in sorted((config or {}).items()):
        if key in HONOURED or key in INERT:
            continue
        if key in NOT_HONOURED:
            ok, instead = NOT_HONOURED[key]
            if value not in ok and not (isinstance(value, float) and math.isinf(value) and -math.inf in ok):
                out.append((key, f"{key}={value!r} is not honoured — {instead}"))
        else:
            out.append((key, f"{key}={value!r} is not a scheduler setting latentforge knows — ignored"))
    return out


def warn_unhonoured(config: Mapping[str, Any], where: str = "scheduler_config.json") -> List[str]:
    """Warn once per process for each (key, value) `unhonoured` finds; -> the messages of this call."""
    messages = []
    for key, message in unhonoured(config):
        tag = (key, repr(config[key]))
        if tag not in _warned:
            _warned.add(tag)
            messages.append(f"{where}: {message}")
            warnings.warn(messages[-1], UserWarning, stacklevel=3)
    return messages
