"""Single-file Stable Diffusion checkpoints (A1111 / ComfyUI / CompVis layout) ⇄ our models.

    sf = load_single_file("v1-5.safetensors", tokenizer="path/to/clip/tokenizer")
    sf.unet, sf.vae, sf.text_model, sf.schedule_config, sf.family      # family: "sd1" | "sd2"
    save_single_file("out.safetensors", unet, vae, text_model, schedule_config, dtype=torch.float16)

What the file is comes from its keys (the `FAMILIES` table; an unsupported family is refused in one
line naming what it appears to be). The architecture comes from the tensor shapes (`infer_*_config`);
what shapes cannot tell follows the original configs every SD tool assumes (v1-inference.yaml,
v2-inference-v.yaml): 8 heads per level for SD 1.x, 64 channels per head for SD 2.x, GroupNorm with
32 groups, text heads of 64 channels, the scaled-linear 0.00085–0.012 noise schedule over 1000 steps.

The prediction type, decided as diffusers' single-file loader does: SD 1.x is ε-prediction; SD 2.x
is v-prediction (the 768-px models) unless the checkpoint's `global_step` is 875000 (SD 2.0-base,
512 px) — pass `prediction_type="epsilon"` for the other 512-px SD 2.x-base files. A `v_pred` key
(ComfyUI's marker, which our export writes for v-prediction models) means v-prediction, and a
`ztsnr` key or an `alphas_cumprod` buffer ending at 0 means zero terminal SNR.

Weights are data: `.safetensors` is read directly; a legacy `.ckpt` only through
`torch.load(weights_only=True)`, so a file that needs pickle code execution is refused.
The key maps are data in ldm_keys.py; here are only the reshapes and the checks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..config import ScheduleConfig, UNetConfig, VAEConfig, replace
from ..errors import UserError
from ..io import atomic_path
from ..models import AutoencoderKL, UNet
from ..schedule import PREDICTION_TYPES, NoiseSchedule
from ..scheduler_config import SchedulerDefaults
from ..text import TextEncoder, check_tokenizer
from . import ldm_keys as K
from .diffusers import schedule_to_diffusers

# sdxl_file builds on this module (it imports it at load time), so this module imports sdxl_file inside the
# functions that hand over to it.

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
SD_SCHEDULE = ScheduleConfig(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                             beta_end=0.012)
V_PRED_KEY, ZTSNR_KEY = "v_pred", "ztsnr"  # ComfyUI's markers (empty tensors)
OPENCLIP_UNUSED_BLOCK = 23  # ViT-H's 24th block: SD 2.x reads the penultimate layer (diffusers drops it too)


# --------------------------------------------------------------------------- what a file is


@dataclass(frozen=True)
class Family:
    """A checkpoint family: how to recognise it from its keys, and whether we can load it."""

    name: str
    title: str  # what the refusal says it appears to be
    detect: Callable[[List[str]], bool]
    text_layout: Optional[str] = None  # "clip" | "openclip": the text encoder's key layout
    supported: bool = False
    hint: str = "not supported yet"


def _has(prefix: str) -> Callable[[List[str]], bool]:
    return lambda keys: any(k.startswith(prefix) for k in keys)


def _contains(*parts: str) -> Callable[[List[str]], bool]:
    return lambda keys: any(p in k for k in keys for p in parts)


def _both(*prefixes: str) -> Callable[[List[str]], bool]:
    return lambda keys: all(any(k.startswith(p) for k in keys) for p in prefixes)


# In detection order: the first family whose test passes names the file. Add a family by adding a row
# (and, for a supported one, its loader in `LOADERS`).
FAMILIES: List[Family] = [
    Family("lora", "a LoRA/LyCORIS adapter, not a full model", _contains("lora_", ".lora.", "lora_A", "hada_", "lokr_"),
           hint="load a full checkpoint; adapters are not read yet"),
    Family("sdxl", "Stable Diffusion XL", _both(K.UNET_PREFIX, K.VAE_PREFIX, K.SDXL_CLIP_PREFIX, K.SDXL_OPENCLIP_PREFIX),
           "sdxl", True),
    Family("sdxl-other", "an SDXL-family model with another text-encoder layout, e.g. the refiner "
           "(conditioner.embedders.*)", _has("conditioner.embedders."),
           hint="only SDXL-base's two-encoder layout is supported; use an SDXL base or SD 1.x/2.x checkpoint"),
    Family("sd3", "Stable Diffusion 3 (joint_blocks.*)", _contains("joint_blocks."),
           hint="SD3 is not supported; use an SD 1.x or 2.x checkpoint"),
    Family("flux", "a Flux model (double_blocks.*)", _contains("double_blocks."),
           hint="Flux is not supported; use an SD 1.x or 2.x checkpoint"),
    Family("sd2", "Stable Diffusion 2.x", _both(K.UNET_PREFIX, K.VAE_PREFIX, K.OPENCLIP_PREFIX), "openclip", True),
    Family("sd1", "Stable Diffusion 1.x", _both(K.UNET_PREFIX, K.VAE_PREFIX, K.CLIP_PREFIX), "clip", True),
    Family("unet-only", "a UNet without its VAE and text encoder (model.diffusion_model.* only)", _has(K.UNET_PREFIX),
           hint="use a full checkpoint (UNet + VAE + text encoder)"),
    Family("vae", "a VAE-only file (encoder.*/decoder.*)",
           lambda keys: any(k.startswith(("encoder.", "decoder.", K.VAE_PREFIX)) for k in keys),
           hint="use a full checkpoint; a separate VAE is not read from a single file yet"),
    Family("diffusers", "diffusers-layout weights (down_blocks.*)", _contains("down_blocks.", "text_model."),
           hint="pass the diffusers model folder instead of one of its weight files"),
]


def identify(path, keys: List[str]) -> Family:
    """The supported family of a checkpoint with these keys, or a one-line UserError saying what it appears to be."""
    for family in FAMILIES:
        if family.detect(keys):
            if family.supported:
                return family
            raise UserError(f"{path}: appears to be {family.title} — {family.hint}")
    raise UserError(f"{path}: not a Stable Diffusion checkpoint ({len(keys)} tensors, no model.diffusion_model.* "
                    "keys) — pass an SD 1.x/2.x single file or a model folder")


# --------------------------------------------------------------------------- reading the file


def read_checkpoint(path) -> Dict[str, Any]:
    """All tensors of a .safetensors or legacy .ckpt file (a nested `state_dict` is unwrapped)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file — pass a .safetensors checkpoint or a model folder")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".ckpt", ".pt", ".pth"):
        return _read_ckpt(path)
    raise UserError(f"{path}: unknown checkpoint type {path.suffix!r} — pass a .safetensors (or legacy .ckpt) file")


def _read_safetensors(path: Path) -> Dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        size = path.stat().st_size
        raise UserError(f"{path}: truncated or not a safetensors file ({size} bytes; {str(e).splitlines()[0]}) — "
                        "download or copy it again") from None


def _read_ckpt(path: Path) -> Dict[str, Any]:
    import pickle
    import zipfile

    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: needs pickle code execution to load ({str(e).splitlines()[0][:120]}) — refused; "
                        "convert it to .safetensors with a tool you trust") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise UserError(f"{path}: truncated or not a PyTorch checkpoint ({str(e).splitlines()[0][:120]}) — "
                        "download or copy it again") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a dict of tensors — pass an SD checkpoint")
    step = data.get("global_step")
    while isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    data = {k: v for k, v in data.items() if isinstance(v, torch.Tensor)}
    if step is not None and "global_step" not in data:
        data["global_step"] = torch.tensor(int(step))
    return data


# --------------------------------------------------------------------------- architecture from shapes


def _sub(state: Dict[str, Any], prefix: str) -> Dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _indices(keys, prefix: str) -> List[int]:
    """Sorted distinct N of keys `prefix + N + '.…'`."""
    out = set()
    for k in keys:
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                out.add(int(head))
    return sorted(out)


def infer_unet_config(unet: Dict[str, Any], family: str, v_prediction: bool, path,
                      pooled_dim: Optional[int] = None) -> UNetConfig:
    """UNetConfig from the LDM UNet's shapes (keys without `model.diffusion_model.`). SDXL (sgm's
    sd_xl_base.yaml): depth per level, 64-channel heads, `label_emb.0` = the micro-conditioning MLP on
    `pooled_dim` + 6 size/crop numbers."""
    try:
        blocks = _indices(unet, "input_blocks.")
        downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in unet]
        layers = (downs[0] - 1) if downs else len(blocks) - 1
        levels = len(blocks) // (layers + 1)
        firsts = [1 + b * (layers + 1) for b in range(levels)]
        channels = tuple(int(unet[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0]) for i in firsts)
        attention = tuple(f"input_blocks.{i}.1.proj_in.weight" in unet for i in firsts)
        per_level = [len(_indices(unet, f"input_blocks.{i}.1.transformer_blocks.")) if a else 0
                     for i, a in zip(firsts, attention)]
        depths = {d for d in per_level if d}
        to_k = next(v for k, v in unet.items() if k.endswith("attn2.to_k.weight"))
        proj = next(v for k, v in unet.items() if k.endswith(".1.proj_in.weight"))
        conv_in, conv_out = unet["input_blocks.0.0.weight"], unet["out.2.weight"]
    except (KeyError, StopIteration, ZeroDivisionError, IndexError) as e:
        raise UserError(f"{path}: the UNet (model.diffusion_model.*) is incomplete or not SD-shaped (missing {e}) — "
                        "the file may be damaged; download it again") from None
    if int(conv_in.shape[1]) != 4:
        raise UserError(f"{path}: appears to be an inpainting or other special model (UNet takes "
                        f"{int(conv_in.shape[1])} input channels, not 4) — not supported yet")
    if family == "sdxl":
        from .sdxl_file import sdxl_unet_config

        return sdxl_unet_config(unet, channels, layers, attention, per_level, int(to_k.shape[1]), pooled_dim, path)
    if len(depths) != 1:
        raise UserError(f"{path}: transformer depth differs per level ({sorted(depths)}) — that is an SDXL-style "
                        "UNet without SDXL's text encoders, not supported")
    sd2 = family == "sd2"
    return UNetConfig(
        in_channels=int(conv_in.shape[1]), out_channels=int(conv_out.shape[0]), channels=channels,
        layers_per_level=layers, attention=attention,
        num_heads=None if sd2 else 8, head_dim=64 if sd2 else None,  # v2-inference.yaml / v1-inference.yaml
        transformer_layers=depths.pop(), cross_attention_dim=int(to_k.shape[1]),
        use_linear_projection=proj.ndim == 2, norm_groups=32, mid_attention="middle_block.1.proj_in.weight" in unet,
        sample_size=96 if (sd2 and v_prediction) else 64,  # 768 px (SD 2.x-v) or 512 px, / 8
    )


def infer_vae_config(vae: Dict[str, Any], path, scaling_factor: float = 0.18215) -> VAEConfig:
    """VAEConfig from the LDM autoencoder's shapes (keys without `first_stage_model.`)."""
    try:
        levels = _indices(vae, "encoder.down.")
        channels = tuple(int(vae[f"encoder.down.{i}.block.0.conv2.weight"].shape[0]) for i in levels)
        layers = len(_indices(vae, "encoder.down.0.block."))
        z = int(vae["encoder.conv_out.weight"].shape[0]) // 2  # mean and log-variance
        cin, cout = int(vae["encoder.conv_in.weight"].shape[1]), int(vae["decoder.conv_out.weight"].shape[0])
    except (KeyError, IndexError) as e:
        raise UserError(f"{path}: the VAE (first_stage_model.*) is incomplete (missing {e}) — the file may be damaged; "
                        "download it again") from None
    return VAEConfig(in_channels=cin, out_channels=cout, latent_channels=z, channels=channels, layers_per_level=layers,
                     norm_groups=32, scaling_factor=scaling_factor, sample_size=512,
                     mid_attention="encoder.mid.attn_1.q.weight" in vae,
                     use_quant_conv="quant_conv.weight" in vae, use_post_quant_conv="post_quant_conv.weight" in vae)


def infer_text_config(text: Dict[str, Any], layout: str, path):
    """transformers CLIPTextConfig from our-layout text keys (`text_model.*`, + `text_projection.weight` for SDXL's
    second encoder)."""
    from transformers import CLIPTextConfig

    p = "text_model."
    try:
        vocab, hidden = text[p + "embeddings.token_embedding.weight"].shape
        positions = int(text[p + "embeddings.position_embedding.weight"].shape[0])
        inner = int(text[p + "encoder.layers.0.mlp.fc1.weight"].shape[0])
    except KeyError as e:
        raise UserError(f"{path}: the text encoder (cond_stage_model.*) is incomplete (missing {e}) — the file may be "
                        "damaged; download it again") from None
    layers = len(_indices(text, p + "encoder.layers."))
    return CLIPTextConfig(
        vocab_size=int(vocab), hidden_size=int(hidden), intermediate_size=inner, num_hidden_layers=layers,
        num_attention_heads=max(int(hidden) // 64, 1), max_position_embeddings=positions,
        hidden_act="gelu" if layout == "openclip" else "quick_gelu",  # OpenCLIP ViT-H / OpenAI CLIP ViT-L
        bos_token_id=int(vocab) - 2, eos_token_id=int(vocab) - 1, pad_token_id=1,
        projection_dim=int(text["text_projection.weight"].shape[0]) if "text_projection.weight" in text
        else 1024 if layout == "openclip" else 768,
    )


# --------------------------------------------------------------------------- reshapes that are not renames

_VAE_ATTN_WEIGHTS = tuple(f"mid_block.attentions.0.{n}.weight" for n in ("to_q", "to_k", "to_v", "to_out.0"))


def _vae_attention_to_linear(state: Dict[str, Any]) -> Dict[str, Any]:
    """The LDM VAE's attention uses 1×1 convs (out, in, 1, 1); ours Linear (out, in)."""
    return {k: (v.flatten(1) if k.endswith(_VAE_ATTN_WEIGHTS) and v.ndim > 2 else v) for k, v in state.items()}


def _vae_attention_to_conv(state: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v[:, :, None, None] if k.endswith(_VAE_ATTN_WEIGHTS) and v.ndim == 2 else v) for k, v in state.items()}


def _split_qkv(state: Dict[str, Any]) -> Dict[str, Any]:
    """OpenCLIP's fused `attn.in_proj_{weight,bias}` (3·D, …) -> attn.{q,k,v}_proj.* (D, …) each."""
    out = {}
    for k, v in state.items():
        head, _, kind = k.rpartition(".in_proj_")
        if _ and head.endswith(".attn") and kind in ("weight", "bias"):
            for name, part in zip("qkv", v.chunk(3, dim=0)):
                out[f"{head}.{name}_proj.{kind}"] = part
        else:
            out[k] = v
    return out


def _fuse_qkv(state: Dict[str, Any]) -> Dict[str, Any]:
    out = {}
    for k, v in state.items():
        head, _, tail = k.rpartition(".attn.q_proj.")
        if _:
            out[f"{head}.attn.in_proj_{tail}"] = torch.cat([v, state[f"{head}.attn.k_proj.{tail}"],
                                                            state[f"{head}.attn.v_proj.{tail}"]])
        elif ".attn.k_proj." not in k and ".attn.v_proj." not in k:
            out[k] = v
    return out


# --------------------------------------------------------------------------- file -> our state dicts

# Keys a single file may hold that are not weights of the three networks (LDM's DDPM buffers, EMA
# copies, transformers' position_ids, OpenCLIP's contrastive head): never read as weights.
IGNORED_PREFIXES = ("model_ema.", "betas", "alphas_cumprod", "sqrt_", "log_one_minus", "posterior_", "logvar",
                    "lvlb_weights", "global_step", V_PRED_KEY, ZTSNR_KEY, "cond_stage_model.model.text_projection",
                    "cond_stage_model.model.logit_scale", f"{K.OPENCLIP_PREFIX}transformer.resblocks.{OPENCLIP_UNUSED_BLOCK}.",
                    f"{K.SDXL_OPENCLIP_PREFIX}logit_scale")
IGNORED_SUFFIXES = ("position_ids",)


def _component(state: Dict[str, Any], rules: K.KeyMap, prefix: str, path) -> Dict[str, Any]:
    """The keys under `prefix`, renamed to ours; a key no rule covers is named in a UserError."""
    theirs = {k: v for k, v in state.items() if k.startswith(prefix) and not k.startswith(IGNORED_PREFIXES)
              and not k.endswith(IGNORED_SUFFIXES)}
    ours, unmapped = K.map_state(theirs, rules, forward=False)
    if unmapped:
        raise UserError(f"{path}: unexpected key {unmapped[0]!r} ({len(unmapped)} unexpected) — not a standard "
                        "SD 1.x/2.x layout")
    return ours


def _load_into(model: torch.nn.Module, ours: Dict[str, Any], rules: K.KeyMap, path, meta: bool,
               rule_prefix: str = "") -> None:
    """Strict: every key present, none extra, every shape equal; the file's key names in the message."""
    expected = model.state_dict()
    theirs = lambda k: K.to_theirs(rule_prefix + k, rules) or k  # noqa: E731
    missing = [k for k in expected if k not in ours]
    if missing:
        raise UserError(f"{path}: missing key {theirs(missing[0])!r} ({len(missing)} missing) — the file is incomplete "
                        "or not a standard SD 1.x/2.x checkpoint")
    extra = [k for k in ours if k not in expected]
    if extra:
        raise UserError(f"{path}: unexpected key {theirs(extra[0])!r} ({len(extra)} unexpected) — the architecture "
                        "inferred from the shapes does not fit it; not a standard SD 1.x/2.x checkpoint")
    for k, v in expected.items():
        if tuple(ours[k].shape) != tuple(v.shape):
            raise UserError(f"{path}: key {theirs(k)!r} has shape {list(ours[k].shape)}, expected {list(v.shape)} "
                            "for the architecture inferred from the file — not a standard SD 1.x/2.x checkpoint")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in ours.items()}
    model.load_state_dict(state, strict=True, assign=meta)


def _build(cls, cfg, path):
    try:
        with torch.device("meta"):  # no random init: _load_into assigns the file's tensors
            return cls(cfg)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


def _unet_from(state, family: Family, v_prediction: bool, path, pooled_dim: Optional[int] = None):
    cfg = infer_unet_config(_sub(state, K.UNET_PREFIX), family.name, v_prediction, path, pooled_dim)
    rules = K.unet_rules(len(cfg.channels), cfg.layers_per_level, cfg.attention)
    model = _build(UNet, cfg, path)
    _load_into(model, _component(state, rules, K.UNET_PREFIX, path), rules, path, meta=True)
    return model


def _vae_from(state, path, scaling_factor: float = 0.18215):
    cfg = infer_vae_config(_sub(state, K.VAE_PREFIX), path, scaling_factor)
    rules = K.vae_rules(len(cfg.channels), cfg.layers_per_level)
    model = _build(AutoencoderKL, cfg, path)
    _load_into(model, _vae_attention_to_linear(_component(state, rules, K.VAE_PREFIX, path)), rules, path, meta=True)
    return model


def _text_from(state, family: Family, path):
    from transformers import CLIPTextModel

    if family.text_layout == "openclip":
        blocks = [i for i in _indices(state, K.OPENCLIP_PREFIX + "transformer.resblocks.") if i != OPENCLIP_UNUSED_BLOCK]
        rules = K.openclip_rules(len(blocks))
        ours = _component(_split_qkv(state), rules, K.OPENCLIP_PREFIX, path)
    else:
        rules = K.clip_rules()
        ours = _component(_with_text_model_level(state), rules, K.CLIP_PREFIX, path)
    model = CLIPTextModel(infer_text_config(ours, family.text_layout, path))
    prefix = "" if _text_prefixed(model) else TEXT_MODEL  # transformers ≥ 5 has no `text_model.` level
    ours = {k[len(prefix):]: v for k, v in ours.items()}
    _load_into(model, ours, rules, path, meta=False, rule_prefix=prefix)
    return model.eval()


TEXT_MODEL = "text_model."  # transformers 4's CLIPTextModel key level, which the single-file layout keeps


def _with_text_model_level(state: Dict[str, Any]) -> Dict[str, Any]:
    """Early SD 1.x files were saved by transformers < 4.12, without the `text_model.` level: add it."""
    old = K.CLIP_PREFIX
    return {(old + TEXT_MODEL + k[len(old):] if k.startswith(old) and not k.startswith(old + TEXT_MODEL) else k): v
            for k, v in state.items()}


def _text_prefixed(model) -> bool:
    return any(k.startswith(TEXT_MODEL) for k in model.state_dict())


def _text_state(model) -> Dict[str, Any]:
    """The text model's weights with `text_model.` keys, whichever transformers version built it."""
    prefix = "" if _text_prefixed(model) else TEXT_MODEL
    return {prefix + k: v for k, v in model.state_dict().items() if not k.endswith("position_ids")}


# --------------------------------------------------------------------------- the noise schedule


def infer_schedule(state: Dict[str, Any], family: Family, prediction_type: Optional[str], path) -> ScheduleConfig:
    """SD's training schedule; prediction type and zero terminal SNR as the module docstring says."""
    zsnr = ZTSNR_KEY in state
    ac = state.get("alphas_cumprod")
    if ac is not None:
        zsnr = zsnr or float(ac.reshape(-1)[-1]) < 1e-6
        ref = NoiseSchedule.from_config(replace(SD_SCHEDULE, rescale_betas_zero_snr=zsnr)).alphas_cumprod
        if tuple(ac.shape) != tuple(ref.shape) or not torch.allclose(ac.float(), ref, atol=1e-3, rtol=0):
            raise UserError(f"{path}: alphas_cumprod is not SD's scaled-linear 0.00085–0.012 schedule over 1000 steps "
                            "— this noise schedule is not supported")
    if prediction_type is None:
        step = state.get("global_step")
        if V_PRED_KEY in state:
            prediction_type = "v_prediction"
        elif family.name == "sd2":  # diffusers' rule: only SD 2.0-base (global_step 875000) is ε-prediction
            prediction_type = "epsilon" if step is not None and int(step) == 875000 else "v_prediction"
        else:
            prediction_type = "epsilon"
    if prediction_type not in PREDICTION_TYPES:
        raise UserError(f"--prediction-type: unknown {prediction_type!r} — use one of {', '.join(PREDICTION_TYPES)}")
    return replace(SD_SCHEDULE, prediction_type=prediction_type, rescale_betas_zero_snr=zsnr)


# --------------------------------------------------------------------------- the public API

# How a single file is sampled, beyond schedule_to_diffusers' keys (timestep_spacing, steps_offset, clip_sample,
# thresholding): the defaults diffusers' `from_single_file` gives SD files — the final DDIM step goes to ᾱ_0, not
# to 1 (`set_alpha_to_one=False`, SD's PNDM/DDIM configs) — and the multistep/Euler settings written out, so
# that no scheduler class's own default decides them.
FILE_SAMPLING = {"set_alpha_to_one": False, "final_sigmas_type": "zero", "use_karras_sigmas": False,
                 "lower_order_final": True, "euler_at_final": False}


@dataclass
class SingleFile:
    """What `load_single_file` returns: the three networks (float32, eval mode), the schedule, the family."""

    path: Path
    family: str  # "sd1" | "sd2" | "sdxl" (see FAMILIES)
    unet: Any  # models.unet.UNet
    vae: Any  # models.vae.AutoencoderKL
    text_model: Any  # transformers.CLIPTextModel
    tokenizer: Any  # a transformers CLIP tokenizer, or None when none was given
    schedule_config: ScheduleConfig
    text_model_2: Any = None  # SDXL: transformers.CLIPTextModelWithProjection
    tokenizer_2: Any = None  # SDXL: its tokenizer

    @property
    def scheduler_config(self) -> Dict[str, Any]:
        """The file's `scheduler_config.json`: its schedule and how latentforge samples it, every sampling key
        written out (`FILE_SAMPLING`), so that any diffusers scheduler class built `from_config` samples the file
        as latentforge does (export --diffusers writes it)."""
        return dict(schedule_to_diffusers(self.schedule_config), **FILE_SAMPLING)

    @property
    def scheduler(self) -> SchedulerDefaults:
        """The sampling defaults of `scheduler_config`."""
        return SchedulerDefaults.from_config(self.scheduler_config)

    def text_encoder(self, max_length: Optional[int] = None):
        """The text model + tokenizer as a `text.TextEncoder` (SDXL: a `text.DualTextEncoder`; a UserError if no
        tokenizer was given)."""
        if self.text_model_2 is not None:
            from .sdxl_file import dual_text_encoder

            return dual_text_encoder(self, max_length)
        if self.tokenizer is None:
            raise UserError(f"{self.path}: a single file holds no tokenizer — pass --tokenizer DIR (tokenizer=DIR): "
                            "a CLIP tokenizer folder, e.g. the tokenizer/ of any SD 1.x/2.x diffusers model")
        return TextEncoder(self.text_model, self.tokenizer, max_length, source=str(self.path))


def load_tokenizer(tokenizer):
    """None, a tokenizer object, or a folder (a tokenizer folder or a model root holding tokenizer/)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    folder = Path(tokenizer)
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"
    if not folder.is_dir():
        raise UserError(f"--tokenizer {tokenizer}: no such folder — pass a CLIP tokenizer folder")
    try:
        loaded = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # transformers raises many kinds; all mean "not a tokenizer folder"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--tokenizer {tokenizer}: cannot load it ({first}) — pass a CLIP tokenizer folder") from None
    check_tokenizer(loaded, str(folder))  # a folder with no vocabulary gives a tokenizer of [UNK]s
    return loaded


def load_single_file(path, tokenizer=None, prediction_type: Optional[str] = None) -> SingleFile:
    """Read an SD 1.x/2.x single-file checkpoint into our UNet and VAE and a transformers CLIPTextModel
    (SDXL: and a CLIPTextModelWithProjection; `tokenizer` is then an SDXL model root, see sdxl_file.py).

    `tokenizer`: a CLIP tokenizer folder (or object) — a single file does not carry one. `prediction_type`
    overrides the rule in the module docstring. Any other family, a damaged file or a pickle that needs
    code execution is a one-line UserError naming the file.
    """
    path = Path(path)
    state = read_checkpoint(path)
    family = identify(path, list(state))
    tok = tokenizer if family.name == "sdxl" else load_tokenizer(tokenizer)  # SDXL reads two (sdxl_file.py)
    single = LOADERS[family.name](path, state, family, tok, prediction_type)
    token_ids_from(single.text_model, single.tokenizer)
    token_ids_from(single.text_model_2, single.tokenizer_2)
    return single


def token_ids_from(model, tokenizer) -> None:
    """The text model's bos/eos ids from its tokenizer (a file holds no tokenizer; infer_text_config's
    vocabulary-end guess holds for CLIP's own vocabulary only). The eos id picks the pooled token."""
    if model is None or tokenizer is None:
        return
    for name in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is None:
            continue
        for module in model.modules():  # the configs (a projection model's text_model has its own) and the
            if getattr(module, "config", None) is not None:  # eos id transformers' CLIP keeps at init
                setattr(module.config, name, int(value))
            if hasattr(module, name) and not isinstance(getattr(module, name), torch.nn.Module):
                setattr(module, name, int(value))


def _load_sd(path: Path, state: Dict[str, Any], family: Family, tokenizer, prediction_type) -> SingleFile:
    """SD 1.x / 2.x: one UNet, one VAE, one CLIP text model."""
    schedule = infer_schedule(state, family, prediction_type, path)
    unet = _unet_from(state, family, schedule.prediction_type == "v_prediction", path)
    return SingleFile(path, family.name, unet.eval(), _vae_from(state, path).eval(), _text_from(state, family, path),
                      tokenizer, schedule)


# family name -> loader(path, state, family, tokenizer, prediction_type) -> SingleFile, for each supported
# row of FAMILIES (a new family adds its row there and its loader here).
def _load_sdxl(*args) -> SingleFile:
    from .sdxl_file import load_sdxl

    return load_sdxl(*args)


LOADERS: Dict[str, Callable[..., SingleFile]] = {"sd1": _load_sd, "sd2": _load_sd, "sdxl": _load_sdxl}


def is_single_file(path) -> bool:
    """A checkpoint file by its name (a missing one too, so that its error names the file, not a folder)."""
    path = Path(path)
    return not path.is_dir() and path.suffix in SUFFIXES


# --------------------------------------------------------------------------- our models -> a single file


def _text_layout(text_model, where: str) -> Tuple[str, Any]:
    """-> ("clip" | "openclip", the CLIPTextModel); UserError for text models SD files cannot hold."""
    model = getattr(text_model, "model", text_model)  # a text.TextEncoder or the transformers model
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "model_type", "") not in ("clip_text_model", "clip"):
        kind = type(model).__name__ if model is not None else "no text encoder"
        raise UserError(f"{where}: the text encoder is {kind} — a single file holds a CLIP text encoder only "
                        "(SD 1.x CLIP ViT-L or SD 2.x OpenCLIP ViT-H)")
    if cfg.hidden_size % 64 or cfg.num_attention_heads != cfg.hidden_size // 64:
        raise UserError(f"{where}: the text encoder has {cfg.num_attention_heads} heads of "
                        f"{cfg.hidden_size // cfg.num_attention_heads} channels — SD tools assume 64-channel heads")
    return ("openclip" if cfg.hidden_act == "gelu" else "clip"), model


def _check_exportable(unet, vae, layout: str, where: str) -> None:
    """The single-file layout carries no architecture: refuse what other tools would read differently."""
    c = unet.config
    want = tuple(ch // 64 for ch in c.channels) if layout == "openclip" else (8,) * len(c.channels)
    problems = [
        (c.cross_attention_dim is None, "the UNet has no cross-attention (SD files are text-conditional)"),
        (not c.mid_attention, "the UNet has no mid-block attention"),
        (c.num_class_embeds is not None, "the UNet is class-conditional"),
        (c.addition_input_dim is not None, "the UNet is micro-conditioned (SDXL) but there is one text encoder"),
        (c.norm_groups != 32 or vae.config.norm_groups != 32, "GroupNorm groups are not 32"),
        (tuple(c.level_heads()) != want and any(c.attention), f"the UNet's heads per level {c.level_heads()} are not the "
         f"{'64-channel heads of SD 2.x' if layout == 'openclip' else '8 heads of SD 1.x'} that SD tools assume"),
        (vae.config.shift_factor is not None, "the VAE has a shift_factor (not an SD 1.x/2.x VAE)"),
    ]
    for bad, why in problems:
        if bad:
            raise UserError(f"{where}: {why} — cannot write it as an SD 1.x/2.x single file; keep the diffusers folder")


def ldm_state(unet, vae, text_model, where: str = "model") -> Dict[str, torch.Tensor]:
    """Our three networks' tensors under the original layout's names and shapes (as they are: no copy, no cast)."""
    c, v = unet.config, vae.config
    parts = [(unet.state_dict(), K.unet_rules(len(c.channels), c.layers_per_level, c.attention), None),
             (_vae_attention_to_conv(vae.state_dict()), K.vae_rules(len(v.channels), v.layers_per_level), None)]
    if hasattr(text_model, "models"):  # SDXL's DualTextEncoder
        from .sdxl_file import sdxl_text_parts

        parts += sdxl_text_parts(unet, vae, text_model, where)
    else:
        layout, text = _text_layout(text_model, where)
        _check_exportable(unet, vae, layout, where)
        tstate = _text_state(text)
        if layout == "openclip":
            parts.append((tstate, K.openclip_rules(text.config.num_hidden_layers), _fuse_qkv))
        else:
            parts.append((tstate, K.clip_rules(), None))
    out: Dict[str, torch.Tensor] = {}
    for state, rules, post in parts:
        mapped, unmapped = K.map_state(state, rules, forward=True)
        if unmapped:
            raise UserError(f"{where}: no single-file name for key {unmapped[0]!r} — cannot write this model as one file")
        out.update(post(mapped) if post else mapped)
    return out


def single_file_state(unet, vae, text_model, schedule_config: ScheduleConfig, dtype=torch.float16,
                      where: str = "model") -> Dict[str, torch.Tensor]:
    """Our three networks -> one state dict in the original layout (the key names A1111 and ComfyUI read)."""
    if schedule_config.prediction_type == "sample":
        raise UserError(f"{where}: x0-prediction (prediction_type=sample) cannot be marked in a single file — keep "
                        "the diffusers folder")
    out = ldm_state(unet, vae, text_model, where)
    out = {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).cpu().contiguous() for k, v in out.items()}
    if schedule_config.prediction_type == "v_prediction":
        out[V_PRED_KEY] = torch.tensor([])
    if schedule_config.rescale_betas_zero_snr:
        out[ZTSNR_KEY] = torch.tensor([])
    return out


def save_single_file(path, unet, vae, text_model, schedule_config: ScheduleConfig, dtype=torch.float16) -> Path:
    """Write `single_file_state(...)` as safetensors (atomically: a temp file, then rename)."""
    from safetensors.torch import save_file

    if schedule_config != _sd_compatible(schedule_config):
        raise UserError(f"{path}: the noise schedule {schedule_config.beta_schedule} {schedule_config.beta_start}–"
                        f"{schedule_config.beta_end} over {schedule_config.num_train_timesteps} steps is not SD's — "
                        "SD tools would sample it wrongly; keep the diffusers folder")
    path = Path(path)
    state = single_file_state(unet, vae, text_model, schedule_config, dtype, where=str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return path


def _sd_compatible(cfg: ScheduleConfig) -> ScheduleConfig:
    return replace(SD_SCHEDULE, prediction_type=cfg.prediction_type, rescale_betas_zero_snr=cfg.rescale_betas_zero_snr)
