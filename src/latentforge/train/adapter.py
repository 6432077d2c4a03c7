"""Training an adapter instead of the weights: `train --init MODEL adapter=lora|loha|lokr lora.rank=…`.

    check(cfg)                         one-line errors for settings that cannot work together
    attach(cfg, unet) -> keys          adapters on the targets (ΔW = 0), the base frozen; the trained keys
    attach_text(cfg, text_encoder)     lora.text_encoder=true: adapters on the text model's q/k/v/out_proj
                                       (+ fc1/fc2 for attention+ff | all), the text model frozen
    write_outputs(run, cfg, parts, step, resolution)
        lora/pytorch_lora_weights.safetensors   diffusers' format (LoRA/DoRA): pipe.load_lora_weights(lora/)
                                                (unet.… and, with the text encoder, text_encoder.… keys)
        lora/<run name>.safetensors             kohya/A1111/ComfyUI format (lora_unet_…, lora_te_…) with ss_* metadata
    merged(module, ema)                a plain copy with the (EMA) adapter folded in, for model/ (--merge)

The base weights come from `--init` (the UNet) and from the cache's text encoder on every start, resumed or
not; a checkpoint holds only the adapters, their EMA and their optimizer state. The adapters' random
down-projections are drawn from (seed, "adapter") and (seed, "adapter", "text_encoder"), so every rank and
every run starts from the same adapters.
"""

from __future__ import annotations

import copy
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from ..adapters import adapters, inject, merge, remove
from ..config import LoRAConfig
from ..errors import UserError
from ..formats import lora as fmt
from .step import mix


def enabled(cfg) -> bool:
    return getattr(cfg, "adapter", "none") != "none"


def check(cfg) -> None:
    if not enabled(cfg):
        if getattr(cfg, "lora", LoRAConfig()) != LoRAConfig():
            changed = next(k for k, v in vars(cfg.lora).items() if v != getattr(LoRAConfig(), k))
            raise UserError(f"lora.{changed}: an adapter setting without adapter= — add adapter=lora (or loha, lokr), "
                            "or drop the lora.* keys")
        return
    if not cfg.init:
        raise UserError(f"adapter={cfg.adapter}: an adapter trains on top of a pretrained model — pass --init MODEL "
                        "(a diffusers model folder)")
    if getattr(cfg.unet, "freeze", ()):
        raise UserError(f"unet.freeze: with adapter={cfg.adapter} the whole base model is frozen already — "
                        "drop unet.freeze (choose the adapted layers with lora.targets)")
    if cfg.lora.dora and cfg.adapter != "lora":
        raise UserError(f"lora.dora=true: DoRA is a LoRA option — use adapter=lora with it, not adapter={cfg.adapter}")
    if cfg.train_text_encoder:  # lora/ holds adapters only: a fully trained text encoder would not be in it
        raise UserError("lora.text_encoder=true: train_text_encoder=true trains the whole text encoder already — "
                        "use one of the two" if cfg.lora.text_encoder else
                        f"train_text_encoder=true: with adapter={cfg.adapter} the lora/ files hold adapters only, so "
                        "the trained text encoder would be lost — use lora.text_encoder=true (an adapter on it)")
    if cfg.lora.text_encoder and cfg.lora.dora:
        raise UserError("lora.text_encoder=true: DoRA on the text encoder is not read by diffusers' "
                        "load_lora_weights — set lora.dora=false, or lora.text_encoder=false")


def adapts_text(cfg) -> bool:
    """An adapter run with lora.text_encoder=true."""
    return enabled(cfg) and cfg.lora.text_encoder


def attach(cfg, unet: torch.nn.Module) -> set:
    """Put the run's adapters on `unet`; returns the state_dict keys of the trained tensors."""
    c = cfg.lora
    inject(unet, cfg.adapter, c.rank, c.alpha, c.targets, c.dora, c.dropout, seed=mix(cfg.seed, "adapter"))
    return {k for k, p in unet.named_parameters() if p.requires_grad}


def attach_text(cfg, text_encoder) -> torch.nn.Module:
    """Adapters on the text model (`text_encoder.model`, in eval mode: its own dropout stays off); returns it."""
    c, model = cfg.lora, text_encoder.model.eval()
    inject(model, cfg.adapter, c.rank, c.alpha, c.targets, False, c.dropout,
           seed=mix(cfg.seed, "adapter", "text_encoder"), text=True)
    return model


@contextmanager
def ema_weights(unet: torch.nn.Module, ema):
    """The EMA's tensors in `unet` for the duration (only the adapter's: a small copy), then the live ones."""
    if ema is None:
        yield unet
        return
    state = unet.state_dict()
    live = {k: state[k].detach().clone() for k in ema.shadow}
    with torch.no_grad():
        for k, v in ema.shadow.items():
            state[k].copy_(v.to(state[k].dtype))
    try:
        yield unet
    finally:
        with torch.no_grad():
            for k, v in live.items():
                state[k].copy_(v)


def write_outputs(run: Path, cfg, parts, step: int, resolution: int) -> Path:
    """run/lora/: the (EMA) adapters of `parts` (train.state.Part: the UNet's, then the text encoder's with
    lora.text_encoder=true) in diffusers' format (LoRA/DoRA) and in kohya's format."""
    out = Path(run) / "lora"
    out.mkdir(parents=True, exist_ok=True)
    components = dict(zip(("unet", "text_encoder"), (p.module for p in parts)))
    meta = fmt.kohya_metadata(str(cfg.init), cfg.adapter, cfg.lora.rank, cfg.lora.alpha, step,
                              resolution, dora=cfg.lora.dora, text_encoder="text_encoder" in components)
    with ExitStack() as stack:
        for p in parts:
            stack.enter_context(ema_weights(p.module, p.ema))
        if cfg.adapter == "lora":
            fmt.save_diffusers(out, components, {"ss_steps": str(step), "ss_sd_model_name": str(cfg.init)})
        fmt.save_kohya(out / f"{Path(run).resolve().name}.safetensors", components, meta)
    return out


def merged(module: torch.nn.Module, ema) -> torch.nn.Module:
    """A plain copy of `module` (the UNet, the text model) with its (EMA) adapter merged into the weights."""
    with ema_weights(module, ema):
        plain = copy.deepcopy(module)
    merge(plain)
    remove(plain)
    return plain.eval().requires_grad_(False)


def merged_outputs(parts, text_encoder):
    """(UNet, text encoder) for model/ with `--merge`: the EMA adapters folded in (the text encoder as given
    when only the UNet was adapted)."""
    if len(parts) > 1:
        text_encoder = copy.copy(text_encoder)
        text_encoder.model = merged(parts[1].module, parts[1].ema)
    return merged(parts[0].module, parts[0].ema), text_encoder


def summary(cfg, modules, written: bool) -> str:
    """The report.md line: what was trained (`modules`: the UNet, then the text model) and where the files are."""
    layers = [a for m in modules for _, a in adapters(m)]
    n = sum(p.numel() for a in layers for k, p in a.named_parameters() if not k.startswith("base."))
    c = cfg.lora
    kind = "DoRA" if c.dora else cfg.adapter
    on = c.targets + (" + text encoder" if len(modules) > 1 else "")
    where = "lora/ (diffusers + kohya formats, EMA weights)" if written else "lora/ not written (run unfinished)"
    return f"{kind} rank {c.rank}, alpha {c.alpha:g} on {on}: {len(layers)} layers, {n:,} trained parameters; {where}"
