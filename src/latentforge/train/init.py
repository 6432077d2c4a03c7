"""Fine-tuning: the pretrained model a run starts from (`latentforge train --init MODEL`).

    init = read_init("sd-model/")             # configs only, no weights read
    cfg = init_base(init)                     # the TrainConfig layer below --config / key=value
    unet = build_unet(cfg)                    # the model's weights (or random ones without --init)

MODEL is a diffusers model folder (model_index.json, unet/, vae/, scheduler/, text_encoder/ + tokenizer/),
or an SD 1.x/2.x single file (.safetensors, or a legacy .ckpt read with weights_only=True), which
`from_single_file` first converts into RUN/init/ (diffusers layout, formats/single_file.py; a single file
holds no tokenizer, so `--tokenizer DIR` names one) — `init` then names that folder.
From it come the UNet architecture and weights, the noise schedule and prediction type, and the
defaults of `vae_path` and `text_encoder` (so `--data` caches with the model's own encoders and the
exported `model/` is a complete Stable Diffusion folder). Explicit settings still win over it, except
the architecture: a `unet.*` override that changes it is refused naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..config import ScheduleConfig, TrainConfig, UNetConfig
from ..errors import UserError
from ..formats import diffusers as fmt
from ..formats.diffusers import MODEL_INDEX_NAME, load_weights, save_model_folder
from ..formats.single_file import load_single_file
from ..models import UNet

# UNetConfig fields the data decides (resolve_for_data) and fields that are training settings, not weights.
_FROM_DATA = {"in_channels", "out_channels", "cross_attention_dim", "num_class_embeds", "mid_attention", "sample_size",
              "addition_input_dim"}
_NOT_ARCHITECTURE = {"freeze", "sample_size"}


@dataclass(frozen=True)
class InitModel:
    source: str  # what the user passed
    unet: UNetConfig
    schedule: ScheduleConfig
    unet_weights: Path  # a diffusers unet/ weights file
    vae: str  # for vae_path
    text_encoder: Optional[str]  # for text_encoder; None: the model has none


def read_init(path: str) -> InitModel:
    """The configs of the pretrained model at `path` (a diffusers model folder)."""
    folder = Path(path)
    if not folder.exists():
        raise UserError(f"--init {path}: no such file or folder — pass a diffusers model folder")
    if not folder.is_dir() or not (folder / fmt.MODEL_INDEX_NAME).is_file():
        raise UserError(f"--init {path}: not a diffusers model folder (no {fmt.MODEL_INDEX_NAME}) — pass the folder "
                        "a diffusers pipeline was saved to (save_pretrained) or a latentforge model/ folder")
    for part in ("unet", "vae", "scheduler"):
        if not (folder / part).is_dir():
            raise UserError(f"--init {folder / part}: no such folder — the model folder is incomplete")
    unet_json = folder / "unet" / fmt.CONFIG_NAME
    unet = fmt.unet_from_diffusers(fmt._read_json(unet_json), unet_json)
    text = folder / "text_encoder"
    return InitModel(source=str(path), unet=unet, schedule=fmt.load_schedule(folder),
                     unet_weights=fmt._weights_file(folder / "unet"), vae=str(folder),
                     text_encoder=str(folder) if text.is_dir() else None)


def from_single_file(path: str, out, tokenizer=None, prediction_type: Optional[str] = None) -> str:
    """Convert the single file `path` into the model folder `out` (written whole, then renamed into place;
    an existing complete folder is reused). Returns the folder."""
    out = Path(out)
    if (out / MODEL_INDEX_NAME).is_file():
        return str(out)
    sf = load_single_file(path, tokenizer=tokenizer, prediction_type=prediction_type)
    text = sf.text_encoder()  # a one-line UserError without a tokenizer
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")  # one per process (torchrun ranks convert at once)
    shutil.rmtree(tmp, ignore_errors=True)
    save_model_folder(tmp, sf.unet, sf.vae, sf.schedule_config, text_encoder=text, scheduler_config=sf.scheduler_config)
    try:
        tmp.replace(out)
    except OSError:  # another rank was first: its folder is the same conversion
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / MODEL_INDEX_NAME).is_file():
            raise
    return str(out)


def init_base(init: InitModel, cfg: TrainConfig = TrainConfig()) -> TrainConfig:
    """`cfg` with the pretrained model's UNet, schedule, VAE and text encoder (the layer below the user's)."""
    return dataclasses.replace(cfg, init=init.source, unet=init.unet, schedule=init.schedule, vae_path=init.vae,
                               text_encoder=init.text_encoder or cfg.text_encoder)


def check_against_init(unet: UNetConfig, init: InitModel) -> None:
    """The resolved UNet config must be the pretrained one; else a UserError naming the first differing key."""
    text_model, text_data = init.unet.cross_attention_dim is not None, unet.cross_attention_dim is not None
    if text_model != text_data:
        raise UserError(f"--init {init.source}: the model is {'' if text_model else 'not '}text-conditional but the "
                        f"data {'has no' if text_model else 'has'} captions — use "
                        f"{'captioned data (image + .txt)' if text_model else 'data without captions'}")
    for f in dataclasses.fields(UNetConfig):
        ours, theirs = getattr(unet, f.name), getattr(init.unet, f.name)
        if f.name in _NOT_ARCHITECTURE or ours == theirs:
            continue
        where = f"{init.source}/unet/config.json"
        if f.name in _FROM_DATA:
            raise UserError(f"--init {init.source}: the data needs unet.{f.name}={_show(ours)} but {where} has "
                            f"{_show(theirs)} — {_DATA_HINT.get(f.name, 'use data that matches the model')}")
        raise UserError(f"unet.{f.name}={_show(ours)}: differs from {where} ({_show(theirs)}) — with --init the "
                        "architecture comes from the model; drop the model=/unet.* setting")


_DATA_HINT = {
    "in_channels": "build the cache with the model's own VAE (leave out --vae)",
    "out_channels": "build the cache with the model's own VAE (leave out --vae)",
    "cross_attention_dim": "cache the captions with the model's own text encoder (leave out --text-encoder)",
    "num_class_embeds": "this model is not class-conditional this way; use captioned data",
    "mid_attention": "the model is text-conditional: use captioned data (image + .txt)",
    "addition_input_dim": "cache the captions with the model's own two text encoders (leave out --text-encoder)",
}


def _show(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)


def build_unet(cfg: TrainConfig, fresh: bool = True):
    """The UNet a run starts with: the `init` model's weights when `fresh` (a run not resumed), else random
    ones drawn from the current torch seed (a resumed run overwrites them from its checkpoint)."""
    if not cfg.init or not fresh:
        return UNet(cfg.unet)
    init = read_init(cfg.init)
    check_against_init(cfg.unet, init)
    with torch.device("meta"):  # no random init: load_weights assigns the stored tensors
        unet = UNet(cfg.unet)
    load_weights(unet, init.unet_weights)
    return unet
