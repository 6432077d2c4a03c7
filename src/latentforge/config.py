"""Configuration as plain data: frozen dataclasses, named presets, and the choices and ranges of each setting.

Each concept owns one dataclass. Presets are plain values: `tiny` (tests, < 1 M parameters),
`small` (trainable on a 2-core CPU), `sd15` (Stable Diffusion 1.5 shapes), `sdxl` (SDXL-base shapes),
`sdxl-tiny` (SDXL-shaped, tiny), `demo` (the demo's model).

A setting with a fixed set of values declares it once, as field metadata (`choice(default, CHOICES)`) naming
one of the constants below; a numeric setting with a range, `ranged(default, low, high)`. The loader
(config_loading.py: TOML, key=value overrides, coercion, hashing) checks against them, the modules that implement
the choices import the same constants, and tests/test_choices.py fails on a second literal copy. This module
imports no torch and nothing of latentforge but errors.py: everything else may import it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional, Tuple, Union

from .errors import UserError

IntOrTuple = Union[int, Tuple[int, ...]]

# ------------------------------------------------------------------ the choices of each string setting, once
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # what the UNet predicts (diffusers' names; schedule.py)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "cosine")  # cosine = squaredcos_cap_v2 (schedule.py)
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # name -> torch dtype name
# train's precision=: bf16 = a bf16 compute copy with fp32 masters (train/precision.py); bf16-autocast = torch.autocast
# over the fp32 weights (the choice where it measures faster: bench/gpu_check.sh has both arms)
TRAIN_PRECISIONS = {**PRECISIONS, "bf16-autocast": "bfloat16"}
OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")  # train/optimizers.py
ADAPTERS = ("none", "lora", "loha", "lokr")  # none = train the weights; the rest: adapters/layers.py KINDS
LORA_TARGETS = ("attention", "attention+ff", "all")  # which layers get adapters (adapters/inject.py)
LR_SCHEDULES = ("cosine", "constant")  # both after a linear warmup (train/setup.py)
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")  # train/step.py
CONDITIONINGS = ("auto", "text", "class", "none")  # auto = from the cache
DEVICES = ("auto", "cpu", "cuda")
RECON_LOSSES = ("l1", "l2")  # train/vae.py
BUCKET_LEFTOVERS = ("carry", "drop")  # train/data.py BucketStream
SAMPLER_NAMES = ("ddpm", "ddim", "euler", "euler-a", "heun", "dpmpp-2m")  # samplers.SAMPLERS implements each
SPACINGS = ("leading", "trailing", "linspace")  # a sampling plan's timestep spacing (samplers.py)
LABELS = ("auto", "folders", "none")  # where class labels come from (data/sources.py scan)


def choice(default: str, choices):
    """A string field (dataclasses.field) whose value is one of `choices` (one of the constants above)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def ranged(default, low, high=None):
    """A numeric field (dataclasses.field) allowed in [low, high] (inclusive; None = unbounded above)."""
    return field(default=default, metadata={"range": (low, high)})


def field_choices(cls, name: str) -> Optional[tuple]:
    """The allowed values of field `name` of dataclass `cls`, or None."""
    return _metadata(cls, name).get("choices")


def field_range(cls, name: str) -> Tuple:
    """(low, high) of field `name` of dataclass `cls`; (None, None) if it has none."""
    return _metadata(cls, name).get("range", (None, None))


def _metadata(cls, name: str) -> dict:
    return next((f.metadata for f in dataclasses.fields(cls) if f.name == name), {})


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

    def level_heads(self) -> Tuple[int, ...]:
        """Attention heads per level: from `head_dim` (channels per head, wins if set) or `num_heads`.

        Checked where attention is used (the levels with `attention`, and the last level for the mid block).
        """
        n, ch = len(self.channels), self.channels
        used = list(self.attention[:-1]) + [self.attention[-1] or self.mid_attention]
        if self.head_dim is not None:
            dims = _per_level(self.head_dim, n, "head_dim")
            bad = [(c, f"head_dim {d}") for c, d, u in zip(ch, dims, used) if u and (d < 1 or c % d)]
            heads = tuple(max(c // d, 1) for c, d in zip(ch, dims))
        else:
            heads = _per_level(self.num_heads, n, "num_heads")
            bad = [(c, f"{h} heads") for c, h, u in zip(ch, heads, used) if u and (h < 1 or c % h)]
        if bad:
            raise ValueError(f"UNetConfig: {bad[0][0]} channels do not split into {bad[0][1]}")
        return heads

    def level_depths(self) -> Tuple[int, ...]:
        """Transformer blocks per attention, per level (SDXL: 1, 2, 10); the mid block uses the last level's."""
        depths = _per_level(self.transformer_layers, len(self.channels), "transformer_layers")
        if any(d < 1 for d in depths):
            raise ValueError(f"UNetConfig.transformer_layers: {list(depths)} — every level needs at least 1")
        return depths


def _per_level(value, n: int, name: str) -> Tuple[int, ...]:
    """An int (the same on every level) or one entry per level."""
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,) * n
    if len(values) != n:
        raise ValueError(f"UNetConfig.{name}: {len(values)} entries for {n} levels")
    return values


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
    force_upcast: bool = True  # diffusers' key: under half-precision inference the VAE still runs in float32


@dataclass(frozen=True)
class MMDiTConfig:
    """SD3/SD3.5 multimodal diffusion transformer (models/mmdit.py; Esser et al. 2024, §4). Width = heads × head_dim;
    the text context is projected to the same width (diffusers' `caption_projection_dim` must equal it)."""

    in_channels: int = 16
    out_channels: int = 16
    patch_size: int = 2
    num_layers: int = 24  # joint blocks; the last one updates only the image stream ("context pre-only")
    num_heads: int = 24
    head_dim: int = 64
    context_dim: int = 4096  # width of the text tokens fed in (diffusers' joint_attention_dim: CLIP-L+G | T5)
    pooled_dim: int = 2048  # width of the pooled text vector (CLIP-L + CLIP-G pooled outputs)
    sample_size: int = 128  # latent side at training; sets the position grid's spacing (sample_size / patch_size)
    pos_embed_max_size: int = 192  # side of the position-embedding table in patches; inputs take its centre crop
    dual_attention_layers: Tuple[int, ...] = ()  # SD3.5 (MMDiT-X): blocks with a second, image-only attention
    qk_norm: bool = False  # SD3.5: RMSNorm of each head's queries and keys (diffusers' qk_norm="rms_norm")

    @property
    def width(self) -> int:
        return self.num_heads * self.head_dim


# The released transformers' shapes (their diffusers `transformer/config.json`), for counting and from-config use.
MMDIT_PRESETS = {
    "sd3-medium": MMDiTConfig(),
    "sd3.5-large": MMDiTConfig(num_layers=38, num_heads=38, qk_norm=True),
}


@dataclass(frozen=True)
class ScheduleConfig:
    """The forward noising process q(x_t | x_0). Mirrors diffusers' DDPMScheduler config keys."""

    num_train_timesteps: int = 1000
    beta_schedule: str = choice("scaled_linear", BETA_SCHEDULES)
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = False
    prediction_type: str = choice("epsilon", PREDICTION_TYPES)


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
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def replace(cfg, **changes):
    """dataclasses.replace, re-exported so callers need not import dataclasses."""
    return dataclasses.replace(cfg, **changes)


# ---------------------------------------------------------------------------------------------
# Training configs. Resolution order (config_loading.load_train_config): preset named by `model` ->
# situational defaults -> TOML file -> key=value overrides.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoRAConfig:
    """The adapter a run trains with `adapter=` (any of ADAPTERS but none) on top of `--init` (see adapters/)."""

    rank: int = ranged(16, 1)
    alpha: float = ranged(16.0, 0.0)  # the update is scaled by alpha / rank (Hu et al. 2021 §4.1)
    targets: str = choice("attention", LORA_TARGETS)  # see adapters/inject.py's docstring
    text_encoder: bool = False  # also put adapters on the text encoder's attention (and MLP for attention+ff/all)
    dropout: float = ranged(0.0, 0.0, 0.99)  # on the adapter's input, as PEFT's lora_dropout
    dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024); adapter=lora only
    merge: bool = False  # also write model/ with the adapter merged in (same as train --merge)


@dataclass(frozen=True)
class TrainConfig:
    """UNet training. `unet` and `schedule` start from the preset named by `model`."""

    model: str = "small"  # a name in PRESETS (then unet.* / schedule.* override it)
    unet: UNetConfig = PRESETS["small"].unet
    schedule: ScheduleConfig = PRESETS["small"].schedule
    seed: int = 0
    batch_size: int = ranged(16, 1)  # global batch per optimizer micro-step, summed over ranks
    grad_accum: int = ranged(1, 1)  # micro-steps per optimizer step
    max_steps: int = ranged(2000, 1)  # optimizer steps
    lr: float = ranged(1e-4, 0.0)
    lr_schedule: str = choice("cosine", LR_SCHEDULES)
    warmup_steps: int = ranged(100, 0)
    min_lr: float = ranged(0.0, 0.0)  # cosine floor
    weight_decay: float = ranged(0.01, 0.0)
    adam_beta1: float = ranged(0.9, 0.0, 1.0)
    adam_beta2: float = ranged(0.999, 0.0, 1.0)
    adam_eps: float = ranged(1e-8, 0.0)
    grad_clip: float = ranged(1.0, 0.0)  # max global grad norm; 0 disables clipping
    ema_decay: float = ranged(0.9999, 0.0, 1.0)
    ema_warmup: bool = True  # decay_n = min(ema_decay, (1 + n) / (10 + n))
    timestep_sampling: str = choice("uniform", TIMESTEP_SAMPLINGS)
    logit_mean: float = 0.0
    logit_std: float = ranged(1.0, 0.0)
    min_snr_gamma: float = ranged(0.0, 0.0)  # 0 disables min-SNR-γ weighting (Hang et al. 2023 use 5)
    offset_noise: float = ranged(0.0, 0.0)  # 0 disables offset noise (Guttenberg 2023 use 0.1)
    caption_dropout: float = ranged(0.1, 0.0, 1.0)  # probability of the null context / null class (for CFG)
    conditioning: str = choice("auto", CONDITIONINGS)
    # fp32; bf16 (bf16 compute copy + fp32 masters); bf16-autocast (torch.autocast); fp16 (CUDA, grad scaler)
    precision: str = choice("fp32", TRAIN_PRECISIONS)
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the UNet (train/compile.py): the first step takes minutes
    device: str = choice("auto", DEVICES)
    # --- fine-tuning ---
    init: str = ""  # a pretrained model (diffusers folder or single .safetensors) to start from; same as --init
    train_text_encoder: bool = False  # also fine-tune the text encoder (the exported model carries it)
    adapter: str = choice("none", ADAPTERS)  # train a small adapter instead of the weights; needs --init
    lora: LoRAConfig = LoRAConfig()
    optimizer: str = choice("adamw", OPTIMIZERS)  # adamw8bit: bitsandbytes; prodigy: prodigyopt, use lr=1
    # --- held-out validation (Design: "Validation is measurement") ---
    val_fraction: float = ranged(-1.0, -1.0, 0.5)  # share held out; negative = auto: 0.05 with >= 100 images, else 0
    val_every: int = ranged(100, 1)  # steps between validation-loss evaluations (and at the last step)
    val_timesteps: int = ranged(4, 1)  # each held-out image is noised at this many fixed timesteps spread over [0, T)
    # --- bookkeeping (does not change the math) ---
    checkpoint_every: int = ranged(500, 1)
    keep_checkpoints: int = ranged(2, 0)
    sample_every: int = ranged(500, 0)  # 0 disables validation grids
    sample_prompts: Tuple[str, ...] = ()  # empty = captions of the data (held-out split first); see train/samples.py
    sample_count: int = ranged(4, 1, 64)  # cells of the validation grid when the prompts come from the data
    sample_steps: int = ranged(20, 1)
    sample_guidance: float = ranged(4.0, 0.0)
    sample_seed: int = 1234
    log_every: int = ranged(10, 1)
    nan_max_consecutive: int = ranged(5, 0)  # stop after this many non-finite steps in a row
    # --- data (only used with `train --data`, to build or reuse the latent cache) ---
    vae_path: str = ""  # VAE folder (a diffusers `vae/` or a model folder with one); same as --vae
    text_encoder: str = "default"  # the one the cache was built with; same as --text-encoder
    image_size: int = ranged(0, 0)  # pixels; 0 = the VAE's sample_size
    buckets: bool = False  # aspect-ratio buckets at the area image_size² (see data/buckets.py)
    bucket_step: int = ranged(0, 0)  # bucket sides are multiples of this; 0 = the VAE factor x 8
    # --- bucketed caches: a bucket's last images that do not fill a batch ---
    bucket_leftovers: str = choice("carry", BUCKET_LEFTOVERS)  # carry (into the next epoch) | drop (reported)


@dataclass(frozen=True)
class VAETrainConfig:
    """AutoencoderKL training: reconstruction (L1|L2) + β·KL, optional patch discriminator."""

    model: str = "small"  # preset whose `vae` is the starting point (then vae.* overrides it)
    vae: VAEConfig = PRESETS["small"].vae
    seed: int = 0
    image_size: int = ranged(64, 0)
    batch_size: int = ranged(8, 1)
    max_steps: int = ranged(2000, 1)
    lr: float = ranged(2e-4, 0.0)
    lr_schedule: str = choice("cosine", LR_SCHEDULES)
    warmup_steps: int = ranged(50, 0)
    min_lr: float = ranged(0.0, 0.0)
    weight_decay: float = ranged(0.0, 0.0)
    # Adam's defaults: the GAN-style (0.5, 0.9) of LDM's autoencoder runs decoded red as yellow on the
    # shapes data without the discriminator (seen in the demo's tuning); set them with discriminator=true.
    adam_beta1: float = ranged(0.9, 0.0, 1.0)
    adam_beta2: float = ranged(0.999, 0.0, 1.0)
    adam_eps: float = ranged(1e-8, 0.0)
    grad_clip: float = ranged(1.0, 0.0)
    recon_loss: str = choice("l1", RECON_LOSSES)
    kl_weight: float = ranged(1e-6, 0.0)
    discriminator: bool = False
    disc_start: int = ranged(500, 0)  # step after which the adversarial term is switched on
    disc_weight: float = ranged(0.1, 0.0)
    disc_channels: int = ranged(32, 1)
    disc_layers: int = ranged(3, 1)
    holdout: int = ranged(8, 0)  # images held out for the PSNR report
    device: str = choice("auto", DEVICES)
    checkpoint_every: int = ranged(500, 1)
    keep_checkpoints: int = ranged(2, 0)
    sample_every: int = ranged(500, 0)
    log_every: int = ranged(10, 1)


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


# The loading machinery lives in config_loading.py; `from latentforge.config import load_train_config` (and the
# other names below) keeps working through this module-level __getattr__ (PEP 562; no import cycle: config_loading
# imports this module, not the other way round).
_LOADING = ("load_train_config", "config_to_dict", "to_toml", "math_dict", "config_hash", "NON_MATH_KEYS")


def __getattr__(name: str):
    if name in _LOADING:
        from . import config_loading

        return getattr(config_loading, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
