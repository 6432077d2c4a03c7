"""Configuration as plain data: frozen dataclasses, named presets, TOML loading, key=value overrides.

Each concept owns one dataclass. Presets are plain values: `tiny` (tests, < 1 M parameters),
`small` (trainable on a 2-core CPU), `sd15` (Stable Diffusion 1.5 shapes), `sdxl` (SDXL-base shapes),
`sdxl-tiny` (SDXL-shaped, tiny).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

IntOrTuple = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class UNetConfig:
    """SD 1.x/2.x-family UNet. One entry per resolution level in `channels` / `attention`."""

    in_channels: int = 4
    out_channels: int = 4
    channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_level: int = 2
    attention: Tuple[bool, ...] = (True, True, True, False)  # per level: transformer blocks or not
    num_heads: Optional[IntOrTuple] = 8  # heads per level (int or per level); SD 1.x style
    head_dim: Optional[IntOrTuple] = None  # alternatively channels per head (SD 2.x style); wins if set
    transformer_layers: IntOrTuple = 1  # transformer blocks per attention (int or per level; mid = last level's)
    cross_attention_dim: Optional[int] = 768  # None -> no cross-attention (unconditional / class-only)
    use_linear_projection: bool = False  # Linear (SD 2.x) or 1x1 conv (SD 1.x) proj_in/proj_out
    upcast_attention: bool = False  # compute attention in float32 under half precision (SD 2.1)
    num_class_embeds: Optional[int] = None
    norm_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    mid_attention: bool = True  # needs cross_attention_dim (diffusers has no self-attention-only mid block)
    sample_size: int = 64  # latent side, recorded for the diffusers config
    # SDXL micro-conditioning (diffusers' addition_embed_type="text_time"): each size/crop number gets a
    # sinusoidal embedding of this width; they are concatenated with the pooled text embedding, projected
    # to the timestep-embedding width and added to it. None = off.
    addition_time_embed_dim: Optional[int] = None
    addition_input_dim: Optional[int] = None  # pooled text width + number of time ids × addition_time_embed_dim
    # Training only (not part of the architecture): parameter-name patterns (fnmatch) that are not
    # trained, applied in order; "!pattern" trains again. ["*", "!*attn*"] = train only attention.
    freeze: Tuple[str, ...] = ()


@dataclass(frozen=True)
class VAEConfig:
    """KL autoencoder. Downsamples by 2**(len(channels)-1) per side."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_level: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None  # latents = (z - shift_factor) * scaling_factor (SD3/Flux style)
    sample_size: int = 512
    mid_attention: bool = True
    use_quant_conv: bool = True  # 1x1 convs around the latent (SD 1.x/2.x/XL: True; SD3/Flux: False)
    use_post_quant_conv: bool = True


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward noising process q(x_t | x_0). Mirrors diffusers' DDPMScheduler config keys."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2 (alias: cosine)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False
    prediction_type: str = "epsilon"  # epsilon | v_prediction | sample


@dataclass(frozen=True)
class ModelPreset:
    unet: UNetConfig
    vae: VAEConfig
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)


PRESETS = {
    # Tests: < 1 M parameters, 4x VAE downsampling, runs in milliseconds.
    "tiny": ModelPreset(
        unet=UNetConfig(
            channels=(32, 64), layers_per_level=1, attention=(False, True), num_heads=2,
            cross_attention_dim=32, norm_groups=8, sample_size=8,
        ),
        vae=VAEConfig(channels=(16, 32, 32), layers_per_level=1, norm_groups=8, sample_size=32),
    ),
    # Sized for training on a 2-core CPU (shapes demo, benchmarks).
    "small": ModelPreset(
        unet=UNetConfig(
            channels=(64, 128, 256), layers_per_level=2, attention=(True, True, False), num_heads=4,
            cross_attention_dim=384, norm_groups=32, sample_size=16,
        ),
        vae=VAEConfig(channels=(32, 64, 128), layers_per_level=1, norm_groups=32, sample_size=64),
    ),
    # Stable Diffusion 1.5 shapes: UNet 859,520,964 parameters, VAE 83,653,863.
    "sd15": ModelPreset(unet=UNetConfig(), vae=VAEConfig()),
    # SDXL-base shapes (Podell et al. 2023, "SDXL", §2.1): no attention on the first level, transformer depth
    # 1/2/10 per level, 64-channel heads, context 768 + 1280 = 2048 from two text encoders, micro-conditioning
    # on 6 size/crop numbers (256 each) + the 1280-wide pooled text embedding. UNet 2,567,463,684 parameters.
    "sdxl": ModelPreset(
        unet=UNetConfig(
            channels=(320, 640, 1280), attention=(False, True, True), num_heads=None, head_dim=64,
            transformer_layers=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True, sample_size=128,
            addition_time_embed_dim=256, addition_input_dim=1280 + 6 * 256,
        ),
        vae=VAEConfig(scaling_factor=0.13025, sample_size=1024),
    ),
    # SDXL-shaped and trainable on a 2-core CPU: per-level depth, attention-free first level, micro-conditioning;
    # context 64 = two 32-wide text encoders, pooled width 32.
    "sdxl-tiny": ModelPreset(
        unet=UNetConfig(
            channels=(32, 64), layers_per_level=1, attention=(False, True), num_heads=None, head_dim=16,
            transformer_layers=(1, 2), cross_attention_dim=64, use_linear_projection=True, norm_groups=8,
            sample_size=8, addition_time_embed_dim=8, addition_input_dim=32 + 6 * 8,
        ),
        vae=VAEConfig(channels=(16, 32, 32), layers_per_level=1, norm_groups=8, sample_size=32, scaling_factor=0.13025),
    ),
    # The `latentforge demo` model (shapes data, 32 px, CPU): cross-attention only at the 4x4 level (+ the
    # middle block) — cheaper than at 8x8 as well, and in the demo's runs it learned colour and position
    # faster. `model=demo` trains the same model on your own data.
    "demo": ModelPreset(
        unet=UNetConfig(
            channels=(64, 128), layers_per_level=1, attention=(False, True), num_heads=4,
            cross_attention_dim=384, norm_groups=16, sample_size=8,
        ),
        vae=VAEConfig(channels=(16, 32, 32), layers_per_level=1, norm_groups=8, latent_channels=4,
                      mid_attention=False, sample_size=32),
    ),
}


def preset(name: str) -> ModelPreset:
    from .errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def replace(cfg, **changes):
    """dataclasses.replace, re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------
# Training configs. Resolution order: preset named by `model` -> TOML file -> key=value overrides.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRAConfig:
    """The adapter a run trains with `adapter=lora|loha|lokr` on top of `--init` (see adapters/)."""

    rank: int = 16
    alpha: float = 16.0  # the update is scaled by alpha / rank (Hu et al. 2021 §4.1)
    targets: str = "attention"  # attention | attention+ff | all (adapters/inject.py)
    text_encoder: bool = False  # also put adapters on the text encoder's attention (and MLP for attention+ff/all)
    dropout: float = 0.0  # on the adapter's input, as PEFT's lora_dropout
    dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024); adapter=lora only
    merge: bool = False  # also write model/ with the adapter merged in (same as train --merge)


@dataclass(frozen=True)
class TrainConfig:
    """UNet training. `unet` and `schedule` start from the preset named by `model`."""

    model: str = "small"  # preset: tiny | small | sd15 (then unet.* / schedule.* override it)
    unet: UNetConfig = PRESETS["small"].unet
    schedule: ScheduleConfig = PRESETS["small"].schedule
    seed: int = 0
    batch_size: int = 16  # global batch per optimizer micro-step, summed over ranks
    grad_accum: int = 1  # micro-steps per optimizer step
    max_steps: int = 2000  # optimizer steps
    lr: float = 1e-4
    lr_schedule: str = "cosine"  # cosine | constant (both after a linear warmup)
    warmup_steps: int = 100
    min_lr: float = 0.0  # cosine floor
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n))
    timestep_sampling: str = "uniform"  # uniform | logit_normal
    logit_mean: float = 0.0
    logit_std: float = 1.0
    min_snr_gamma: float = 0.0  # 0 disables min-SNR-γ weighting (Hang et al. 2023 use 5)
    offset_noise: float = 0.0  # 0 disables offset noise (Guttenberg 2023 use 0.1)
    caption_dropout: float = 0.1  # probability of the null context / null class (for CFG)
    conditioning: str = "auto"  # auto (from the cache) | text | class | none
    precision: str = "fp32"  # fp32 | bf16 (CPU: bf16 copy + fp32 masters; CUDA: autocast) | fp16 (CUDA, grad scaler)
    gradient_checkpointing: bool = False
    device: str = "auto"  # auto | cpu | cuda
    # --- fine-tuning ---
    init: str = ""  # a pretrained model (diffusers folder or single .safetensors) to start from; same as --init
    train_text_encoder: bool = False  # also fine-tune the text encoder (the exported model carries it)
    adapter: str = "none"  # none (train the weights) | lora | loha | lokr (train a small adapter; needs --init)
    lora: LoRAConfig = LoRAConfig()
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | prodigy (prodigyopt; use lr=1) | adafactor
    # --- held-out validation (Design: "Validation is measurement") ---
    val_fraction: float = -1.0  # share of images held out; negative = auto: 0.05 with >= 100 images, else 0
    val_every: int = 100  # steps between validation-loss evaluations (and at the last step)
    val_timesteps: int = 4  # each held-out image is noised at this many fixed timesteps spread over [0, T)
    # --- bookkeeping (does not change the math) ---
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500  # 0 disables validation grids
    sample_prompts: Tuple[str, ...] = ()  # empty = captions of the data (held-out split first); see train/samples.py
    sample_count: int = 4  # cells of the validation grid when the prompts come from the data
    sample_steps: int = 20
    sample_guidance: float = 4.0
    sample_seed: int = 1234
    log_every: int = 10
    nan_max_consecutive: int = 5  # stop after this many non-finite steps in a row
    # --- data (only used with `train --data`, to build or reuse the latent cache) ---
    vae_path: str = ""  # VAE folder (a diffusers `vae/` or a model folder with one); same as --vae
    text_encoder: str = "default"  # the one the cache was built with; same as --text-encoder
    image_size: int = 0  # pixels; 0 = the VAE's sample_size
    buckets: bool = False  # aspect-ratio buckets at the area image_size² (see data/buckets.py)
    bucket_step: int = 0  # bucket sides are multiples of this; 0 = the VAE factor x 8
    # --- bucketed caches: a bucket's last images that do not fill a batch ---
    bucket_leftovers: str = "carry"  # carry (into the next epoch) | drop (reported)


@dataclass(frozen=True)
class VAETrainConfig:
    """AutoencoderKL training: reconstruction (L1|L2) + β·KL, optional patch discriminator."""

    model: str = "small"  # preset whose `vae` is the starting point (then vae.* overrides it)
    vae: VAEConfig = PRESETS["small"].vae
    seed: int = 0
    image_size: int = 64
    batch_size: int = 8
    max_steps: int = 2000
    lr: float = 2e-4
    lr_schedule: str = "cosine"
    warmup_steps: int = 50
    min_lr: float = 0.0
    weight_decay: float = 0.0
    # Adam's defaults: the GAN-style (0.5, 0.9) of LDM's autoencoder runs decoded red as yellow on the
    # shapes data without the discriminator (seen in the demo's tuning); set them with discriminator=true.
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    recon_loss: str = "l1"  # l1 | l2
    kl_weight: float = 1e-6
    discriminator: bool = False
    disc_start: int = 500  # step after which the adversarial term is switched on
    disc_weight: float = 0.1
    disc_channels: int = 32
    disc_layers: int = 3
    holdout: int = 8  # images held out for the PSNR report
    device: str = "auto"
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    sample_every: int = 500
    log_every: int = 10


# Defaults that depend on the situation, applied below the TOML file and key=value overrides (an explicit
# setting always wins). `--print-config` shows each with its reason.
SITUATION_DEFAULTS = {
    "scratch-small": (
        {"lr": 1e-3, "warmup_steps": 100, "min_snr_gamma": 5.0, "ema_decay": 0.999},
        "from scratch on a small preset: the settings the demo measured to learn fastest (demo.py: "
        "lr 1e-3, warmup 100, min-SNR-5, EMA 0.999 -> all attributes right on 100 % of seen prompts)"),
    "finetune": (
        {"lr": 1e-5, "lr_schedule": "constant", "warmup_steps": 0},
        "fine-tuning a pretrained model (--init): diffusers' train_text_to_image.py recipe "
        "(learning_rate 1e-5, constant schedule, no warmup)"),
    "adapter": (
        {"lr": 1e-4, "lr_schedule": "constant", "warmup_steps": 0},
        "training an adapter on a pretrained model (--init, adapter=): diffusers' train_text_to_image_lora.py "
        "recipe (learning_rate 1e-4, constant schedule, no warmup)"),
}
SMALL_PRESETS = ("tiny", "small", "demo")  # presets small enough to train from scratch on one machine


def situation_notes(cfg, init: bool = False) -> dict:
    """{key: where its value comes from} for the situational defaults `cfg` holds (for --print-config)."""
    chosen = situation(cfg.model, init, getattr(cfg, "adapter", "none") != "none")
    if chosen is None:
        return {}
    values, reason = SITUATION_DEFAULTS[chosen]
    notes = {k: f"default for this situation ({chosen}, see the top)" for k, v in values.items() if getattr(cfg, k) == v}
    return {"": f"situation {chosen}: {reason}", **notes} if notes else {}


def situation(model: str, init: bool, adapter: bool = False) -> Optional[str]:
    """Which entry of SITUATION_DEFAULTS applies: --init runs fine-tune (or train an adapter); small presets
    from scratch."""
    if init:
        return "adapter" if adapter else "finetune"
    return "scratch-small" if model in SMALL_PRESETS else None


# Keys that do not change what the run computes: they may differ on --resume. Everything else
# (including keys added later) is part of the config hash.
NON_MATH_KEYS = frozenset({
    "checkpoint_every", "keep_checkpoints", "sample_every", "sample_prompts", "sample_count", "sample_steps",
    "sample_guidance", "sample_seed", "log_every", "nan_max_consecutive", "device",
    "gradient_checkpointing", "vae_path", "text_encoder", "image_size", "holdout",
    "buckets", "bucket_step", "init", "val_every", "merge",
})
_CHOICES = {
    "lr_schedule": ("cosine", "constant"), "timestep_sampling": ("uniform", "logit_normal"),
    "conditioning": ("auto", "text", "class", "none"), "precision": ("fp32", "bf16", "fp16"),
    "device": ("auto", "cpu", "cuda"), "adapter": ("none", "lora", "loha", "lokr"),
    "lora.targets": ("attention", "attention+ff", "all"),
    "optimizer": ("adamw", "adamw8bit", "prodigy", "adafactor"), "recon_loss": ("l1", "l2"), "bucket_leftovers": ("carry", "drop"),
    "schedule.prediction_type": ("epsilon", "v_prediction", "sample"),
    "schedule.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine"),
}


# Allowed ranges (inclusive) of numeric settings; a value outside is refused naming the key.
_RANGES = {
    "batch_size": (1, None), "grad_accum": (1, None), "max_steps": (1, None), "lr": (0.0, None),
    "warmup_steps": (0, None), "min_lr": (0.0, None), "weight_decay": (0.0, None), "adam_beta1": (0.0, 1.0),
    "adam_beta2": (0.0, 1.0), "adam_eps": (0.0, None), "grad_clip": (0.0, None), "ema_decay": (0.0, 1.0),
    "logit_std": (0.0, None), "min_snr_gamma": (0.0, None), "offset_noise": (0.0, None),
    "caption_dropout": (0.0, 1.0), "checkpoint_every": (1, None), "keep_checkpoints": (0, None),
    "sample_every": (0, None), "sample_count": (1, 64), "sample_steps": (1, None), "sample_guidance": (0.0, None), "log_every": (1, None),
    "nan_max_consecutive": (0, None), "image_size": (0, None), "kl_weight": (0.0, None), "disc_start": (0, None),
    "disc_weight": (0.0, None), "disc_channels": (1, None), "disc_layers": (1, None), "holdout": (0, None),
    "bucket_step": (0, None), "lora.rank": (1, None), "lora.alpha": (0.0, None), "lora.dropout": (0.0, 0.99), "val_fraction": (-1.0, 0.5), "val_every": (1, None), "val_timesteps": (1, None),
}


def load_train_config(path=None, overrides=(), cls=None, base=None, init: bool = False):
    """Resolve a training config: defaults <- `base` <- TOML file <- `key=value` overrides.

    `cls` is TrainConfig (default) or VAETrainConfig; for TrainConfig, SITUATION_DEFAULTS (from-scratch on a
    small preset, or fine-tuning with `init`) sit between the defaults and the file. Unknown keys and wrong types raise a
    `UserError` naming the key and where it came from.
    """
    from .errors import UserError

    cls = cls or TrainConfig
    raw = _raw_settings(path, overrides)  # flat "section.key" -> (value, source)

    cfg = base if base is not None else cls()
    name, src = raw.pop("model", (cfg.model, "default"))
    if not isinstance(name, str) or name not in PRESETS:
        raise UserError(f"{src}: model={name!r} is not a preset — choose one of {', '.join(PRESETS)}")
    if cls is TrainConfig and (base is None or init):
        chosen = situation(name, init, raw.get("adapter", ("none",))[0] != "none")
        for key, value in (SITUATION_DEFAULTS[chosen][0] if chosen else {}).items():
            raw.setdefault(key, (value, f"default for this situation ({chosen})"))
    sections = [f.name for f in dataclasses.fields(cls) if dataclasses.is_dataclass(getattr(cfg, f.name))]
    if name != cfg.model:  # a new preset replaces the model sections wholesale
        cfg = dataclasses.replace(cfg, model=name, **{k: getattr(PRESETS[name], k) for k in sections
                                                      if hasattr(PRESETS[name], k)})

    top, nested = {}, {}
    valid = list(_keys(cfg))
    for key, (value, src) in raw.items():
        section, _, sub = key.partition(".")
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3)
            hint = (f"did you mean {' or '.join(near)}?" if near
                    else f"`latentforge {_cmd(cls)} --print-config` lists every key")
            raise UserError(f"{src}: unknown key {key!r} — {hint}")
        name_ = sub or key
        fields = _field_types(type(getattr(cfg, section) if sub else cfg))
        value = _coerce(value, fields[name_], key, src)
        if key in _CHOICES and value not in _CHOICES[key]:
            raise UserError(f"{src}: {key}={value!r} — choose one of {', '.join(_CHOICES[key])}")
        low, high = _RANGES.get(key, (None, None))
        if isinstance(value, float) and not math.isfinite(value):  # nan passes every comparison
            raise UserError(f"{src}: {key}={value!r} is not a finite number — give a real value")
        if (low is not None and value < low) or (high is not None and value > high):
            want = f"at least {low}" if high is None else f"between {low} and {high}"
            raise UserError(f"{src}: {key}={value!r} is out of range — use a value {want}")
        (nested.setdefault(section, {}) if sub else top)[name_] = value
    for section, changes in nested.items():
        top[section] = dataclasses.replace(getattr(cfg, section), **changes)
    return dataclasses.replace(cfg, **top)


def _raw_settings(path, overrides) -> dict:
    """Flat {"section.key": (value, where it came from)}: the TOML file, then the key=value overrides."""
    from .errors import UserError

    raw: dict = {}
    if path is not None:
        import tomllib

        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise UserError(f"--config {path}: file not found — pass an existing TOML file")
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"--config {path}: not valid TOML ({e}) — fix the file")
        for key, value in _flatten(data):
            raw[key] = (value, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override {item!r}: expected key=value (e.g. lr=3e-4) — fix the argument")
        key, text = item.split("=", 1)
        raw[key.strip()] = (_parse_value(text.strip()), f"override {item!r}")
    return raw


def config_to_dict(cfg) -> dict:
    """Nested plain dict (tuples -> lists, None -> "none") ready for TOML or JSON."""
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = config_to_dict(v) if dataclasses.is_dataclass(v) else _plain(v)
    return out


def to_toml(cfg, notes: Optional[dict] = None) -> str:
    """The full resolved config as TOML (re-runnable with `--config`); `notes` = {key: comment} are written
    as `# comment` lines above their keys."""
    d = config_to_dict(cfg)
    notes = notes or {}
    lines = [f"# {notes['']}"] if "" in notes else []
    for k, v in d.items():
        if not isinstance(v, dict):
            lines += [f"# {notes[k]}"] if k in notes else []
            lines.append(f"{k} = {_toml_value(v)}")
    for k, v in d.items():
        if isinstance(v, dict):
            lines += ["", f"[{k}]"] + [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(lines) + "\n"


def math_dict(cfg) -> dict:
    """The flat `key -> value` of every setting that changes what training computes."""
    flat = dict(_flatten(config_to_dict(cfg)))
    if flat.get("lr_schedule") == "constant":
        flat.pop("max_steps", None)  # a constant-LR run may be extended on resume
    return {k: v for k, v in flat.items() if k.split(".")[-1] not in NON_MATH_KEYS}


def config_hash(cfg) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(math_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def _cmd(cls) -> str:
    return "train-vae" if cls is VAETrainConfig else "train"


def _keys(cfg):
    for f in dataclasses.fields(cfg):
        sub = getattr(cfg, f.name)
        if dataclasses.is_dataclass(sub):
            yield from (f"{f.name}.{g.name}" for g in dataclasses.fields(sub))
        else:
            yield f.name


def _flatten(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _field_types(cls):
    import typing

    return typing.get_type_hints(cls)


def _parse_value(text: str):
    """A TOML value (1e-4, true, [32, 64], "x"); anything else is a bare string."""
    import tomllib

    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(value, tp, key, src):
    """Check `value` against the dataclass field type `tp`; convert lists to tuples."""
    import typing

    from .errors import UserError

    def fail():
        raise UserError(f"{src}: {key}={value!r} is not {_type_name(tp)} — fix the value")

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if type(None) in args and value in ("none", "None"):
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, src)
            except UserError:
                pass
        fail()
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            fail()
        return tuple(_coerce(v, args[0], key, src) for v in value)
    if tp is bool:
        return value if isinstance(value, bool) else fail()
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else fail()
    if tp is float:
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else fail()
    if tp is str:
        return value if isinstance(value, str) else fail()
    fail()


def _type_name(tp) -> str:
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, Tuple):
        return "a list of " + {int: "integers", float: "numbers", bool: "true/false", str: "strings"}[args[0]]
    if origin is Union:
        return " or ".join(_type_name(a) for a in args if a is not type(None)) + (
            " or none" if type(None) in args else "")
    return {"int": "an integer", "float": "a number", "bool": "true/false", "str": "a string"}.get(
        tp.__name__, tp.__name__)


def _plain(v):
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return "none" if v is None else v


def _toml_value(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(v)  # a TOML basic string is a JSON string for our values
