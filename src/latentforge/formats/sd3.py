"""The diffusers folder of an SD3/SD3.5 model (what StableDiffusion3Pipeline.from_pretrained reads and writes):

    model_index.json            _class_name StableDiffusion3Pipeline
    transformer/                SD3Transformer2DModel (models/mmdit.py)
    vae/                        AutoencoderKL with shift_factor (models/vae.py)
    text_encoder{,_2}/ tokenizer{,_2}/   CLIP-L, CLIP-G (with projection)
    text_encoder_3/ tokenizer_3/         T5, optional (text_sd3.py)
    scheduler/scheduler_config.json      FlowMatchEulerDiscreteScheduler: shift, dynamic shifting

The scheduler settings we honour are `FlowSchedule`'s fields; a config asking for σ spacings we do not implement
(Karras, exponential, beta, a terminal shift, inverted or stochastic sampling) is refused in one line.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from .. import flow
from ..errors import UserError
from ..flow_sampling import flow_sigmas
from .diffusers import (DIFFUSERS_VERSION, MODEL_INDEX_NAME, SCHEDULER_CONFIG_NAME, _read_json, _write_json,
                        load_component, save_component)

PIPELINE_CLASS = "StableDiffusion3Pipeline"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"
# scheduler keys that would change the σ grid in ways flow_sampling.py does not: (key, the value that is harmless)
_UNHONOURED = (("use_karras_sigmas", False), ("use_exponential_sigmas", False), ("use_beta_sigmas", False),
               ("shift_terminal", None), ("invert_sigmas", False), ("stochastic_sampling", False))


@dataclass(frozen=True)
class FlowSchedule:
    """FlowMatchEulerDiscreteScheduler's grid settings (its defaults); `sigmas(steps, tokens)` is its σ grid."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"

    @classmethod
    def from_config(cls, d: Dict[str, Any], path) -> "FlowSchedule":
        for key, harmless in _UNHONOURED:
            if d.get(key) not in (None, harmless):
                raise UserError(f"{path}: {key}={d[key]!r} is not supported for flow models — remove it "
                                "(latentforge samples the shifted linear σ grid)")
        if d.get("time_shift_type", "exponential") not in ("exponential", "linear"):
            raise UserError(f"{path}: time_shift_type={d['time_shift_type']!r} — use exponential or linear")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})

    def to_config(self) -> Dict[str, Any]:
        return {"_class_name": SCHEDULER_CLASS, "_diffusers_version": DIFFUSERS_VERSION, **dataclasses.asdict(self)}

    def mu(self, tokens: int) -> Optional[float]:
        """The resolution-dependent shift's μ for an image of `tokens` patches (None: the static shift)."""
        if not self.use_dynamic_shifting:
            return None
        return flow.resolution_mu(tokens, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                                  self.max_shift)

    def sigmas(self, steps: int, tokens: int) -> torch.Tensor:
        """steps + 1 values from 1 to 0, as the scheduler's set_timesteps (with the pipeline's μ)."""
        return flow_sigmas(steps, self.num_train_timesteps, self.shift, self.mu(tokens), kind=self.time_shift_type)


def is_sd3_folder(folder) -> bool:
    """A folder whose model_index.json names StableDiffusion3Pipeline (or its img2img twin)."""
    path = Path(folder) / MODEL_INDEX_NAME
    return path.is_file() and str(_read_json(path).get("_class_name", "")).startswith(PIPELINE_CLASS)


def load_sd3_folder(folder) -> Dict[str, Any]:
    """-> dict(transformer, vae, schedule (FlowSchedule)); the text encoders are text_sd3.SD3TextEncoder's to read."""
    folder = Path(folder)
    for part in ("transformer", "vae"):
        if not (folder / part).is_dir():
            raise UserError(f"{folder / part}: no such folder — an SD3 model folder needs transformer/ and vae/; "
                            "re-save it")
    path = folder / "scheduler" / SCHEDULER_CONFIG_NAME
    config = _read_json(path) if path.is_file() else {}
    if config.get("_class_name", SCHEDULER_CLASS) not in (SCHEDULER_CLASS, "FlowMatchHeunDiscreteScheduler"):
        raise UserError(f"{path}: a {config['_class_name']}, not a flow-matching scheduler — an SD3 model's "
                        f"scheduler is {SCHEDULER_CLASS}")
    return {"transformer": load_component("transformer", folder / "transformer"),
            "vae": load_component("vae", folder / "vae"), "schedule": FlowSchedule.from_config(config, path)}


def save_sd3_folder(folder, transformer, vae, text_encoder, schedule: FlowSchedule = FlowSchedule()) -> Path:
    """Write an SD3 model in diffusers' layout (StableDiffusion3Pipeline.from_pretrained loads it). -> the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_component(transformer, folder / "transformer")
    save_component(vae, folder / "vae")
    (folder / "scheduler").mkdir(exist_ok=True)
    _write_json(folder / "scheduler" / SCHEDULER_CONFIG_NAME, schedule.to_config())
    text_encoder.save_pretrained(str(folder))
    index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", SCHEDULER_CLASS], **text_encoder.model_index_entries(),
             "image_encoder": [None, None], "feature_extractor": [None, None]}
    _write_json(folder / MODEL_INDEX_NAME, index)
    return folder
