"""Training an adapter instead of the weights: `train --init MODEL adapter=lora|loha|lokr lora.rank=…`.

    check(cfg)                         one-line errors for settings that cannot work together
    attach(cfg, unet) -> keys          adapters on the targets (ΔW = 0), the base frozen; the trained keys
    write_outputs(run, cfg, unet, ema, step, resolution)
        lora/pytorch_lora_weights.safetensors   diffusers' format (LoRA/DoRA): pipe.load_lora_weights(lora/)
        lora/<run name>.safetensors             kohya/A1111/ComfyUI format with ss_* metadata (all kinds)
    merged_unet(unet, ema)             a plain UNet with the (EMA) adapter folded in, for model/ (--merge)

The base weights come from `--init` on every start, resumed or not; a checkpoint holds only the adapter,
its EMA and its optimizer state. The adapter's random down-projections are drawn from (seed, "adapter"),
so every rank and every run starts from the same adapter.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import torch

from ..adapters import adapters, inject, merge, remove
from ..config import LoRAConfig
from ..errors import UserError


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
    if cfg.lora.text_encoder:
        raise UserError("lora.text_encoder=true: this loop trains on cached text embeddings, so the text encoder "
                        "cannot be adapted yet — leave lora.text_encoder=false")
    if cfg.lora.dora and cfg.adapter != "lora":
        raise UserError(f"lora.dora=true: DoRA is a LoRA option — use adapter=lora with it, not adapter={cfg.adapter}")


def attach(cfg, unet: torch.nn.Module) -> set:
    """Put the run's adapters on `unet`; returns the state_dict keys of the trained tensors."""
    from .step import mix

    c = cfg.lora
    inject(unet, cfg.adapter, c.rank, c.alpha, c.targets, c.dora, c.dropout, seed=mix(cfg.seed, "adapter"))
    return {k for k, p in unet.named_parameters() if p.requires_grad}


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


def write_outputs(run: Path, cfg, unet: torch.nn.Module, ema, step: int, resolution: int) -> Path:
    """run/lora/: the (EMA) adapter in diffusers' format (LoRA/DoRA) and in kohya's format."""
    from ..formats import lora as fmt

    out = Path(run) / "lora"
    out.mkdir(parents=True, exist_ok=True)
    meta = fmt.kohya_metadata(str(cfg.init), cfg.adapter, cfg.lora.rank, cfg.lora.alpha, step,
                              resolution, dora=cfg.lora.dora)
    with ema_weights(unet, ema):
        components = {"unet": unet}
        if cfg.adapter == "lora":
            fmt.save_diffusers(out, components, {"ss_steps": str(step), "ss_sd_model_name": str(cfg.init)})
        fmt.save_kohya(out / f"{Path(run).resolve().name}.safetensors", components, meta)
    return out


def merged_unet(unet: torch.nn.Module, ema) -> torch.nn.Module:
    """A plain copy of `unet` with its (EMA) adapter merged into the weights (`--merge`)."""
    with ema_weights(unet, ema):
        plain = copy.deepcopy(unet)
    merge(plain)
    remove(plain)
    return plain.eval().requires_grad_(False)


def summary(cfg, unet: torch.nn.Module, written: bool) -> str:
    """The report.md line: what was trained and where the files are."""
    n = sum(p.numel() for _, a in adapters(unet) for k, p in a.named_parameters() if not k.startswith("base."))
    c = cfg.lora
    kind = "DoRA" if c.dora else cfg.adapter
    where = "lora/ (diffusers + kohya formats, EMA weights)" if written else "lora/ not written (run unfinished)"
    return (f"{kind} rank {c.rank}, alpha {c.alpha:g} on {c.targets}: {len(list(adapters(unet)))} layers, "
            f"{n:,} trained parameters; {where}")
