"""The diffusers folder layout, our native model format.

    model/
      model_index.json                      which component lives where (StableDiffusionPipeline)
      unet/config.json                      UNet2DConditionModel config
      unet/diffusion_pytorch_model.safetensors
      vae/config.json, vae/diffusion_pytorch_model.safetensors   AutoencoderKL
      transformer/config.json, …            SD3Transformer2DModel (SD3/SD3.5; our MMDiT), in place of unet/
      scheduler/scheduler_config.json      DDPMScheduler config (the training noise schedule)
      text_encoder/, tokenizer/             optional; written by latentforge.text
      text_encoder_2/, tokenizer_2/         SDXL's second encoder (model_index names StableDiffusionXLPipeline)

Our configs describe the networks simply (per-level `attention: bool`, heads or head_dim); this
module translates them to and from diffusers' block-type strings. Our state_dict keys *are*
diffusers' keys, so weights need no renaming — only a strict key/shape check. Weights are only
ever read and written as safetensors. Anything we cannot represent is a `UserError` naming the file
and the key.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from ..config import BETA_SCHEDULES, PREDICTION_TYPES, MMDiTConfig, ScheduleConfig, UNetConfig, VAEConfig
from ..errors import UserError
from ..io import atomic_path, write_json
from ..models import AutoencoderKL, MMDiT, UNet
from ..scheduler_config import SchedulerDefaults
from .identify import describe

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_INDEX_NAME = "model_index.json"
DIFFUSERS_VERSION = "0.42.1"  # the version whose layout we write and test against

_DOWN = {"cross": "CrossAttnDownBlock2D", "self": "AttnDownBlock2D", None: "DownBlock2D"}
_UP = {"cross": "CrossAttnUpBlock2D", "self": "AttnUpBlock2D", None: "UpBlock2D"}
_MID = {True: "UNetMidBlock2DCrossAttn", False: "UNetMidBlock2D"}

# diffusers UNet2DConditionModel options we do not implement, with the only value we accept.
_UNET_FIXED = {
    "center_input_sample": False, "only_cross_attention": False, "downsample_padding": 1,
    "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
    "class_embed_type": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
}
_VAE_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_SCHEDULES = tuple(s for s in BETA_SCHEDULES if s != "cosine")  # diffusers' names (our "cosine" is an alias)


# --------------------------------------------------------------------------- small helpers


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: file not found — the model folder is incomplete; re-save it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}) — fix or re-save the file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object at the top level — fix or re-save the file")
    return data


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    write_json(path, data, indent=2, sort_keys=True)


def _unsupported(path: Path, key: str, value, hint: str = "") -> UserError:
    return UserError(f"{path}: unsupported {key}={json.dumps(value)}" + (f" — {hint}" if hint else
                     " — latentforge reads SD 1.x/2.x-style models only"))


def _uniform(path: Path, d: Dict[str, Any], key: str, default):
    """An int option that diffusers also allows per level: we need one value for all levels."""
    value = d.get(key, default)
    if isinstance(value, (list, tuple)):
        if len(set(map(json.dumps, value))) != 1:
            raise _unsupported(path, key, value, "per-level values are not supported; use one value")
        value = value[0]
    return value


def _component_dir(folder, sub: str) -> Path:
    """`folder` itself if it holds config.json, else `folder/sub`, else a UserError naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "no such folder" if not folder.exists() else describe(folder)
        raise UserError(f"{folder}: {what} — pass a model folder (with {MODEL_INDEX_NAME}) or its {sub}/ folder")
    for candidate in (folder, folder / sub):
        if (candidate / CONFIG_NAME).is_file():
            if "_class_name" not in _read_json(candidate / CONFIG_NAME):  # e.g. a transformers text encoder
                raise UserError(f"{candidate}: is {describe(candidate)}, not a {sub} — pass a model folder (with "
                                f"{MODEL_INDEX_NAME}) or its {sub}/ folder")
            return candidate
    raise UserError(f"{folder}: is {describe(folder)}, not a model folder (no {CONFIG_NAME} and no {sub}/{CONFIG_NAME}) "
                    "— pass a folder written by save_pretrained or a diffusers model folder")


def _check_class(path: Path, d: Dict[str, Any], expected: str) -> None:
    name = d.get("_class_name", expected)
    if name != expected:
        raise UserError(f"{path}: _class_name is {name!r}, expected {expected!r} — is this the right folder?")


# --------------------------------------------------------------------------- UNet config


def unet_to_diffusers(cfg: UNetConfig) -> Dict[str, Any]:
    """Our UNetConfig -> diffusers UNet2DConditionModel config.json contents."""
    cross = cfg.cross_attention_dim is not None
    depths = cfg.level_depths()
    kinds = [("cross" if cross else "self") if a else None for a in cfg.attention]
    heads = cfg.level_heads()
    # diffusers' `attention_head_dim` is the number of heads for transformer (CrossAttn) blocks, a
    # historical misnomer, but the channels per head for the self-attention-only Attn blocks.
    per_level = [h if cross else c // h for c, h in zip(cfg.channels, heads)]
    return {
        "_class_name": "UNet2DConditionModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": cfg.sample_size,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "flip_sin_to_cos": cfg.flip_sin_to_cos,
        "freq_shift": cfg.freq_shift,
        "down_block_types": [_DOWN[k] for k in kinds],
        "mid_block_type": _MID[cfg.mid_attention],
        "up_block_types": [_UP[k] for k in reversed(kinds)],
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.layers_per_level,
        "transformer_layers_per_block": list(depths) if len(set(depths)) > 1 else depths[0],
        "reverse_transformer_layers_per_block": None,  # the up path mirrors the down path
        "attention_head_dim": per_level[0] if len(set(per_level)) == 1 else per_level,
        # diffusers needs an int here even without cross-attention blocks; it is unused then.
        "cross_attention_dim": cfg.cross_attention_dim if cross else cfg.channels[-1],
        "use_linear_projection": cfg.use_linear_projection,
        "upcast_attention": cfg.upcast_attention,
        "num_class_embeds": cfg.num_class_embeds,
        "norm_num_groups": cfg.norm_groups,
        "norm_eps": cfg.norm_eps,
        # SDXL micro-conditioning; projection_class_embeddings_input_dim = pooled + K·addition_time_embed_dim.
        "addition_embed_type": "text_time" if cfg.addition_time_embed_dim else None,
        "addition_time_embed_dim": cfg.addition_time_embed_dim,
        "projection_class_embeddings_input_dim": cfg.addition_input_dim,
        **_UNET_FIXED,
    }


def unet_from_diffusers(d: Dict[str, Any], path: Path) -> UNetConfig:
    """diffusers UNet2DConditionModel config -> our UNetConfig; UserError for what we do not support."""
    _check_class(path, d, "UNet2DConditionModel")
    for key, ok in _UNET_FIXED.items():
        value = d.get(key, ok)
        if value != ok and not (key == "mid_block_only_cross_attention" and value is False):
            raise _unsupported(path, key, value)
    kinds, mid_attention = _block_kinds(path, d)
    cross = "cross" in kinds or mid_attention

    channels = tuple(d.get("block_out_channels", (320, 640, 1280, 1280)))
    if len(channels) != len(kinds):
        raise _unsupported(path, "block_out_channels", list(channels), "one entry per down block")
    raw = d.get("attention_head_dim", 8)
    raw = list(raw) if isinstance(raw, (list, tuple)) else [raw] * len(channels)
    if len(raw) != len(channels) or not all(isinstance(v, int) and v > 0 for v in raw):
        raise _unsupported(path, "attention_head_dim", d.get("attention_head_dim"), "one positive int per level")
    heads = tuple(v if cross else max(c // v, 1) for c, v in zip(channels, raw))
    norm_groups = d.get("norm_num_groups", 32)
    if norm_groups is None:
        raise _unsupported(path, "norm_num_groups", None, "GroupNorm groups must be set")
    return UNetConfig(
        in_channels=d.get("in_channels", 4),
        out_channels=d.get("out_channels", 4),
        channels=channels,
        layers_per_level=_uniform(path, d, "layers_per_block", 2),
        attention=tuple(k is not None for k in kinds),
        num_heads=heads[0] if len(set(heads)) == 1 else heads,
        head_dim=None,
        transformer_layers=_transformer_layers(path, d, len(channels)),
        cross_attention_dim=_uniform(path, d, "cross_attention_dim", 1280) if cross else None,
        use_linear_projection=bool(d.get("use_linear_projection", False)),
        upcast_attention=bool(d.get("upcast_attention", False)),
        num_class_embeds=d.get("num_class_embeds"),
        norm_groups=norm_groups,
        norm_eps=d.get("norm_eps", 1e-5),
        flip_sin_to_cos=bool(d.get("flip_sin_to_cos", True)),
        freq_shift=d.get("freq_shift", 0),
        mid_attention=mid_attention,
        sample_size=_sample_size(d.get("sample_size"), 64),
        **_addition_embedding(path, d),
    )


def _block_kinds(path: Path, d: Dict[str, Any]) -> tuple:
    """(per-level kind: "cross" | "self" | None, mid block with attention?) from the block-type strings."""
    down = d.get("down_block_types", [_DOWN["cross"]] * 3 + [_DOWN[None]])
    up = d.get("up_block_types", [_UP[None]] + [_UP["cross"]] * 3)
    by_name = {v: k for k, v in _DOWN.items()}
    kinds = []
    for name in down:
        if name not in by_name:
            raise _unsupported(path, "down_block_types", down, f"{name!r} is not one of {', '.join(_DOWN.values())}")
        kinds.append(by_name[name])
    if list(up) != [_UP[k] for k in reversed(kinds)]:
        raise _unsupported(path, "up_block_types", up, "up blocks must mirror down_block_types "
                           f"({', '.join(_UP[k] for k in reversed(kinds))})")
    if "cross" in kinds and "self" in kinds:
        raise _unsupported(path, "down_block_types", down, "cannot mix CrossAttn and Attn blocks")
    mid = d.get("mid_block_type", _MID[True])
    if mid not in _MID.values():
        raise _unsupported(path, "mid_block_type", mid, f"use {_MID[True]!r} or {_MID[False]!r}")
    mid_attention = mid == _MID[True]
    if "self" in kinds and mid_attention:
        raise _unsupported(path, "mid_block_type", mid, "a cross-attention mid block needs CrossAttn levels")
    return kinds, mid_attention


def _transformer_layers(path: Path, d: Dict[str, Any], n: int):
    """`transformer_layers_per_block`: one int, or one int per level (SDXL: [1, 2, 10]). The up path must
    mirror it (diffusers' default for `reverse_transformer_layers_per_block`: None)."""
    value = d.get("transformer_layers_per_block", 1)
    if isinstance(value, (list, tuple)):
        if len(value) != n or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise _unsupported(path, "transformer_layers_per_block", value, f"one positive int per level ({n})")
        value = tuple(value) if len(set(value)) > 1 else value[0]
    elif not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _unsupported(path, "transformer_layers_per_block", value, "a positive int or one per level")
    reverse = d.get("reverse_transformer_layers_per_block")
    mirrored = list(reversed(value)) if isinstance(value, tuple) else [value] * n
    if reverse is not None:  # per up block: an int, or one int per layer
        given = [set(r) if isinstance(r, (list, tuple)) else {r} for r in reverse]
        if len(given) != n or any(g != {m} for g, m in zip(given, mirrored)):
            raise _unsupported(path, "reverse_transformer_layers_per_block", reverse,
                               "the up path must mirror transformer_layers_per_block")
    return value


def _addition_embedding(path: Path, d: Dict[str, Any]) -> Dict[str, Any]:
    """`addition_embed_type`: none, or SDXL's "text_time" with its two widths."""
    kind = d.get("addition_embed_type")
    if kind is None:
        return {}
    if kind != "text_time":
        raise _unsupported(path, "addition_embed_type", kind, 'only "text_time" (SDXL) is supported')
    dims = {k: d.get(k) for k in ("addition_time_embed_dim", "projection_class_embeddings_input_dim")}
    for k, v in dims.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise _unsupported(path, k, v, 'addition_embed_type "text_time" needs a positive int')
    return {"addition_time_embed_dim": dims["addition_time_embed_dim"],
            "addition_input_dim": dims["projection_class_embeddings_input_dim"]}


def _sample_size(value, default: int) -> int:
    if isinstance(value, (list, tuple)):
        return int(value[0])
    return int(value) if value is not None else default


# --------------------------------------------------------------------------- VAE config


def vae_to_diffusers(cfg: VAEConfig) -> Dict[str, Any]:
    n = len(cfg.channels)
    return {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n,
        "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": list(cfg.channels),
        "layers_per_block": cfg.layers_per_level,
        "act_fn": "silu",
        "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups,
        "sample_size": cfg.sample_size,
        "scaling_factor": cfg.scaling_factor,
        "shift_factor": cfg.shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": cfg.force_upcast,
        "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv,
        "mid_block_add_attention": cfg.mid_attention,
    }


def vae_from_diffusers(d: Dict[str, Any], path: Path) -> VAEConfig:
    _check_class(path, d, "AutoencoderKL")
    for key, ok in _VAE_FIXED.items():
        if d.get(key, ok) != ok:
            raise _unsupported(path, key, d[key])
    channels = tuple(d.get("block_out_channels", (64,)))
    for key, name in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = d.get(key, [name])
        if list(types) != [name] * len(channels):
            raise _unsupported(path, key, types, f"expected {len(channels)} × {name!r}")
    return VAEConfig(
        in_channels=d.get("in_channels", 3),
        out_channels=d.get("out_channels", 3),
        latent_channels=d.get("latent_channels", 4),
        channels=channels,
        layers_per_level=d.get("layers_per_block", 1),
        norm_groups=d.get("norm_num_groups", 32),
        scaling_factor=float(d.get("scaling_factor", 0.18215)),
        shift_factor=d.get("shift_factor"),
        sample_size=_sample_size(d.get("sample_size"), 32),
        mid_attention=bool(d.get("mid_block_add_attention", True)),
        use_quant_conv=bool(d.get("use_quant_conv", True)),
        use_post_quant_conv=bool(d.get("use_post_quant_conv", True)),
        force_upcast=bool(d.get("force_upcast", True)),  # diffusers' default
    )


# --------------------------------------------------------------------------- SD3 transformer config

# diffusers' SD3Transformer2DModel keys -> our MMDiTConfig fields (qk_norm and caption_projection_dim aside)
_MMDIT_KEYS = {"sample_size": "sample_size", "patch_size": "patch_size", "in_channels": "in_channels",
               "num_layers": "num_layers", "attention_head_dim": "head_dim", "num_attention_heads": "num_heads",
               "joint_attention_dim": "context_dim", "pooled_projection_dim": "pooled_dim",
               "out_channels": "out_channels", "pos_embed_max_size": "pos_embed_max_size"}
_MMDIT_DEFAULTS = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "num_layers": 18, "attention_head_dim": 64,
                   "num_attention_heads": 18, "joint_attention_dim": 4096, "pooled_projection_dim": 2048,
                   "out_channels": 16, "pos_embed_max_size": 96}  # SD3Transformer2DModel's, for absent keys
_QK_NORMS = {None: False, "rms_norm": True}


def mmdit_to_diffusers(cfg: MMDiTConfig) -> Dict[str, Any]:
    """Our MMDiTConfig -> diffusers SD3Transformer2DModel config.json contents."""
    return {"_class_name": "SD3Transformer2DModel", "_diffusers_version": DIFFUSERS_VERSION,
            **{key: getattr(cfg, name) for key, name in _MMDIT_KEYS.items()},
            "caption_projection_dim": cfg.width, "dual_attention_layers": list(cfg.dual_attention_layers),
            "qk_norm": "rms_norm" if cfg.qk_norm else None}


def mmdit_from_diffusers(d: Dict[str, Any], path: Path) -> MMDiTConfig:
    """diffusers SD3Transformer2DModel config -> our MMDiTConfig; UserError for what we do not support."""
    _check_class(path, d, "SD3Transformer2DModel")
    if "pos_embed_max_size" in d and d["pos_embed_max_size"] is None:  # diffusers' uncropped, unstored table
        raise _unsupported(path, "pos_embed_max_size", None, "SD3 models crop a stored table; set its side")
    values = {key: d.get(key, _MMDIT_DEFAULTS[key]) for key in _MMDIT_KEYS}
    if values["out_channels"] is None:  # diffusers: out_channels=None means in_channels
        values["out_channels"] = values["in_channels"]
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _unsupported(path, key, value, "a positive int")
    width = values["num_attention_heads"] * values["attention_head_dim"]
    if d.get("caption_projection_dim", 1152) != width:
        raise _unsupported(path, "caption_projection_dim", d.get("caption_projection_dim", 1152),
                           f"the joint attention needs it equal to heads × head dim ({width})")
    if d.get("qk_norm") not in _QK_NORMS:
        raise _unsupported(path, "qk_norm", d.get("qk_norm"), 'use null or "rms_norm" (SD3.5)')
    dual = d.get("dual_attention_layers") or ()
    if not all(isinstance(i, int) and 0 <= i < values["num_layers"] for i in dual):
        raise _unsupported(path, "dual_attention_layers", dual, "block indices below num_layers")
    return MMDiTConfig(**{name: values[key] for key, name in _MMDIT_KEYS.items()},
                       dual_attention_layers=tuple(dual), qk_norm=_QK_NORMS[d.get("qk_norm")])


# --------------------------------------------------------------------------- scheduler config


def schedule_to_diffusers(cfg: ScheduleConfig) -> Dict[str, Any]:
    """Our ScheduleConfig -> DDPMScheduler `scheduler_config.json` contents."""
    beta_schedule = "squaredcos_cap_v2" if cfg.beta_schedule == "cosine" else cfg.beta_schedule
    return {
        "_class_name": "DDPMScheduler",
        "_diffusers_version": DIFFUSERS_VERSION,
        "num_train_timesteps": cfg.num_train_timesteps,
        "beta_start": cfg.beta_start,
        "beta_end": cfg.beta_end,
        "beta_schedule": beta_schedule,
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": False,  # latents are not bounded to [-1, 1]
        "prediction_type": cfg.prediction_type,
        "thresholding": False,
        "rescale_betas_zero_snr": cfg.rescale_betas_zero_snr,
        # Zero terminal SNR must start sampling at t = T-1 (Lin et al. 2024, §3.3): "trailing".
        "timestep_spacing": "trailing" if cfg.rescale_betas_zero_snr else "leading",
        "steps_offset": 0 if cfg.rescale_betas_zero_snr else 1,
    }


def schedule_from_diffusers(d: Dict[str, Any], path: Path) -> ScheduleConfig:
    if d.get("trained_betas") is not None:
        raise _unsupported(path, "trained_betas", "[...]", "use a named beta_schedule")
    beta_schedule = d.get("beta_schedule", "linear")
    if beta_schedule not in _SCHEDULES:
        raise _unsupported(path, "beta_schedule", beta_schedule, f"use one of {', '.join(_SCHEDULES)}")
    prediction = d.get("prediction_type", "epsilon")
    if prediction not in PREDICTION_TYPES:
        raise _unsupported(path, "prediction_type", prediction, f"use one of {', '.join(PREDICTION_TYPES)}")
    return ScheduleConfig(
        num_train_timesteps=int(d.get("num_train_timesteps", 1000)),
        beta_schedule=beta_schedule,
        beta_start=float(d.get("beta_start", 0.0001)),
        beta_end=float(d.get("beta_end", 0.02)),
        rescale_betas_zero_snr=bool(d.get("rescale_betas_zero_snr", False)),
        prediction_type=prediction,
    )


# --------------------------------------------------------------------------- weights


def _weights_file(folder: Path) -> Path:
    """The weights to read: the safetensors file, a sharded index, or the fp16 variant, in that order."""
    for name in (WEIGHTS_NAME, WEIGHTS_NAME + ".index.json", "diffusion_pytorch_model.fp16.safetensors"):
        if (folder / name).is_file():
            return folder / name
    if (folder / "diffusion_pytorch_model.bin").is_file():
        raise UserError(f"{folder / 'diffusion_pytorch_model.bin'}: pickle weights are never loaded — convert them to "
                        f"{WEIGHTS_NAME} (safetensors)")
    raise UserError(f"{folder / WEIGHTS_NAME}: file not found — the model folder is incomplete; re-save it")


def _read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e}) — re-save the model") from None


def _read_state(path: Path):
    """-> (state_dict, {key: file it came from}); a `.index.json` names the shard of every key."""
    if not path.name.endswith(".index.json"):
        state = _read_safetensors(path)
        return state, dict.fromkeys(state, path)
    weight_map = _read_json(path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise UserError(f"{path}: no weight_map object — re-save the model")
    state, source = {}, {}
    for shard in sorted(set(weight_map.values())):
        part = _read_safetensors(path.parent / shard)
        state.update(part)
        source.update(dict.fromkeys(part, path.parent / shard))
    return state, source


def load_weights(model: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Load safetensors weights into `model`, strictly: every key present, none extra, every shape equal.

    The first offending key is named, with its file, in a one-line UserError. A model built on the meta
    device gets the loaded tensors themselves (cast to `dtype`), so a large model is never randomly
    initialised first. `path` is a .safetensors file or a sharded `.safetensors.index.json`.
    """
    state, source = _read_state(path)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = sorted(k for k in state if k not in expected)
    if missing:
        raise UserError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing) — the weights do not match "
                        f"{CONFIG_NAME}; re-save the model")
    if unexpected:
        raise UserError(f"{source[unexpected[0]]}: unexpected key {unexpected[0]!r} ({len(unexpected)} unexpected) — "
                        f"the weights do not match {CONFIG_NAME}; re-save the model")
    for k, v in expected.items():
        if state[k].shape != v.shape:
            raise UserError(f"{source[k]}: key {k!r} has shape {list(state[k].shape)} but {CONFIG_NAME} implies "
                            f"{list(v.shape)} — the weights do not match the config; re-save the model")
    if next(iter(expected.values())).is_meta:
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()},
                              strict=True, assign=True)
    else:
        model.load_state_dict(state, strict=True)


def save_weights(model: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})


# --------------------------------------------------------------------------- components


def _build(cls, cfg, config_path: Path):
    try:
        with torch.device("meta"):  # no random init: load_weights assigns the real tensors
            return cls(cfg)
    except ValueError as e:  # an inconsistent config (e.g. heads that do not divide the channels)
        raise UserError(f"{config_path}: {e}") from None


def load_component(name: str, folder):
    """Our model for component `name` ("unet", "transformer", "vae") from `folder` (or `folder/name`): config.json translated,
    weights checked (`UNet.from_pretrained` / `AutoencoderKL.from_pretrained`)."""
    cls, from_diffusers, _ = _COMPONENTS[name]
    folder = _component_dir(folder, name)
    cfg = from_diffusers(_read_json(folder / CONFIG_NAME), folder / CONFIG_NAME)
    model = _build(cls, cfg, folder / CONFIG_NAME)
    load_weights(model, _weights_file(folder))
    return model


def _save_component(model, config: Dict[str, Any], folder) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / CONFIG_NAME, config)
    save_weights(model, folder / WEIGHTS_NAME)


def save_component(model, folder) -> None:
    """A UNet, MMDiT or VAE as its diffusers component folder (`save_pretrained`)."""
    _save_component(model, _COMPONENTS[model.component][2](model.config), folder)

# component -> (our class, its config from diffusers' config.json, and back)
_COMPONENTS = {"unet": (UNet, unet_from_diffusers, unet_to_diffusers),
               "vae": (AutoencoderKL, vae_from_diffusers, vae_to_diffusers),
               "transformer": (MMDiT, mmdit_from_diffusers, mmdit_to_diffusers)}


def save_schedule(cfg: ScheduleConfig, folder, config: Optional[Dict[str, Any]] = None) -> None:
    """`scheduler_config.json`: `config` (the sampling settings of the model's source, e.g. a single file's)
    or, without it, `schedule_to_diffusers(cfg)`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / SCHEDULER_CONFIG_NAME, dict(config) if config is not None else schedule_to_diffusers(cfg))


def load_schedule(folder) -> ScheduleConfig:
    """ScheduleConfig from `scheduler/scheduler_config.json` (or that folder, or the file itself)."""
    path = Path(folder)
    if path.is_dir():
        path = path / "scheduler" / SCHEDULER_CONFIG_NAME if (path / "scheduler").is_dir() else path / SCHEDULER_CONFIG_NAME
    return schedule_from_diffusers(_read_json(path), path)


def load_scheduler_defaults(folder) -> SchedulerDefaults:
    """The sampling defaults of a model folder's `scheduler/scheduler_config.json` (timestep spacing, Karras σ,
    x0 clipping, …; see scheduler_config.py); a folder without one gets diffusers' defaults."""
    path = Path(folder) / "scheduler" / SCHEDULER_CONFIG_NAME
    return SchedulerDefaults.from_config(_read_json(path) if path.is_file() else {})


# --------------------------------------------------------------------------- whole model folder


def _text_entries(folder: Path, text_encoder) -> Dict[str, list]:
    """model_index.json entries for text_encoder/ and tokenizer/, read from what was written."""
    if hasattr(text_encoder, "model_index_entries"):
        return text_encoder.model_index_entries()
    entries = {"text_encoder": [None, None], "tokenizer": [None, None]}
    te, tok = folder / "text_encoder" / CONFIG_NAME, folder / "tokenizer" / "tokenizer_config.json"
    if te.is_file() and _read_json(te).get("architectures"):
        entries["text_encoder"] = ["transformers", _read_json(te)["architectures"][0]]
    if tok.is_file() and _read_json(tok).get("tokenizer_class"):
        entries["tokenizer"] = ["transformers", _read_json(tok)["tokenizer_class"]]
    return entries


def save_model_folder(folder, unet, vae, schedule_config: ScheduleConfig, text_encoder=None,
                      scheduler_config: Optional[Dict[str, Any]] = None) -> Path:
    """Write a whole model in the diffusers layout (see the module docstring). Returns the folder.
    `scheduler_config`: the scheduler_config.json to write (default: `schedule_to_diffusers(schedule_config)`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_component(unet, folder / "unet")
    save_component(vae, folder / "vae")
    save_schedule(schedule_config, folder / "scheduler", scheduler_config)
    text = {"text_encoder": [None, None], "tokenizer": [None, None]}
    if text_encoder is not None:
        text_encoder.save_pretrained(str(folder))  # writes text_encoder/ + tokenizer/ (+ _2 for SDXL)
        text = _text_entries(folder, text_encoder)
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        **text,
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
    }
    if unet.config.addition_input_dim is not None:  # micro-conditioned: diffusers' SDXL pipeline
        index = _sdxl_index(index, text_encoder)
    _write_json(folder / MODEL_INDEX_NAME, index)
    return folder


def _sdxl_index(index: Dict[str, Any], text_encoder) -> Dict[str, Any]:
    """model_index.json of a StableDiffusionXLPipeline: two text encoders, no safety checker."""
    for key in ("safety_checker", "requires_safety_checker"):
        index.pop(key)
    index.update({"_class_name": "StableDiffusionXLPipeline",
                  "force_zeros_for_empty_prompt": bool(getattr(text_encoder, "force_zeros", True))})
    for key in ("text_encoder_2", "tokenizer_2"):
        index.setdefault(key, [None, None])
    return index


# What a component's own files say its type is: (file, key) — the value must equal model_index.json's class.
_COMPONENT_TYPE = {"unet": (CONFIG_NAME, "_class_name"), "vae": (CONFIG_NAME, "_class_name"),
                   "transformer": (CONFIG_NAME, "_class_name"),
                   "scheduler": (SCHEDULER_CONFIG_NAME, "_class_name"), "text_encoder": (CONFIG_NAME, "architectures"),
                   "tokenizer": ("tokenizer_config.json", "tokenizer_class"),
                   "text_encoder_2": (CONFIG_NAME, "architectures"),
                   "tokenizer_2": ("tokenizer_config.json", "tokenizer_class")}


def _named_type(folder: Path, part: str):
    file, key = _COMPONENT_TYPE[part]
    if not (folder / part / file).is_file():
        raise UserError(f"{folder / part / file}: file not found — {folder / MODEL_INDEX_NAME} names {part}/; "
                        "the model folder is incomplete, re-save it")
    value = _read_json(folder / part / file).get(key)
    return value[0] if isinstance(value, list) and value else value


def check_components(folder: Path, index: Dict[str, Any]) -> None:
    """Every component model_index.json names (a [library, class] pair that is not [null, null]) must be present,
    and for the ones we read, of the named type; the UNet and VAE are required. One line says which is not."""
    if isinstance(index.get("transformer"), list) and "unet" not in index:  # SD3: formats/sd3.py reads it
        raise UserError(f"{folder}: a transformer model ({index.get('_class_name')}), not a UNet one — it loads with "
                        "latentforge.load and `latentforge sample`/`img2img`, not here yet")
    for part in ("unet", "vae"):
        if not isinstance(index.get(part), list) or not (folder / part).is_dir():
            raise UserError(f"{folder / part}: no such folder — {folder / MODEL_INDEX_NAME} lists a model without its "
                            f"{part}; re-save it")
    for part, entry in index.items():
        if part.startswith("_") or not isinstance(entry, list) or len(entry) != 2 or entry[1] is None:
            continue
        if not (folder / part).is_dir():
            raise UserError(f"{folder / part}: no such folder — {folder / MODEL_INDEX_NAME} names {part} "
                            f"({entry[1]}); copy it there or re-save the model")
        if part in _COMPONENT_TYPE:
            found = _named_type(folder, part)
            if found is not None and str(found).removesuffix("Fast") != str(entry[1]).removesuffix("Fast"):
                raise UserError(f"{folder / part}: holds a {found}, but {folder / MODEL_INDEX_NAME} names "
                                f"{entry[1]} — put the right component there or fix model_index.json")


def load_model_folder(folder) -> Dict[str, Any]:
    """-> dict(unet, vae, schedule_config, scheduler (SchedulerDefaults), text_encoder_dir (Path or None),
    model_index)."""
    folder = Path(folder)
    index_path = folder / MODEL_INDEX_NAME
    if not index_path.is_file():
        what = "no such folder" if not folder.is_dir() else f"not a model folder (no {MODEL_INDEX_NAME})"
        raise UserError(f"{folder}: {what} — pass a folder written by latentforge (e.g. runs/x/model) "
                        "or a diffusers Stable Diffusion folder")
    index = _read_json(index_path)
    check_components(folder, index)
    text_dir = folder / "text_encoder"
    return {
        "unet": load_component("unet", folder / "unet"),
        "vae": load_component("vae", folder / "vae"),
        "schedule_config": load_schedule(folder / "scheduler" / SCHEDULER_CONFIG_NAME),
        "scheduler": load_scheduler_defaults(folder),
        "text_encoder_dir": text_dir if text_dir.is_dir() else None,
        "model_index": index,
    }
