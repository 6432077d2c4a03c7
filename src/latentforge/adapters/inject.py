"""Put adapters on a model's layers, find them, merge / un-merge them, take them off.

    layers = inject(unet, "lora", rank=16, alpha=16, targets="attention")   # {path: LoRA}
    params = adapter_parameters(unet)       # the only trainable tensors; the base is frozen
    merge(unet); ...; unmerge(unet)          # base weights restored bit for bit
    remove(unet)                             # the plain model again

Targets (module-name suffixes, diffusers' names, which our UNet shares):
- `attention`     to_q, to_k, to_v, to_out.0 of every attention (diffusers' train_text_to_image_lora.py)
- `attention+ff`  + the feed-forward (ff.net.0.proj, ff.net.2) and proj_in/proj_out: the whole
                  transformer block, kohya's default LoRA network
- `all`           + every Linear/Conv2d of the resnet blocks (conv1, conv2, time_emb_proj, conv_shortcut):
                  kohya's LoCon / LyCORIS "full"
The text encoder (CLIP-style) has q_proj/k_proj/v_proj/out_proj, and fc1/fc2 for attention+ff / all.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from ..errors import UserError
from .dropout import KeyedDropout
from .layers import KINDS, Adapter, LoRA, plain_layer

_ATTN = ("to_q", "to_k", "to_v", "to_out.0")
_FF = ("ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
_RESNET = ("conv1", "conv2", "time_emb_proj", "conv_shortcut")
UNET_TARGETS = {"attention": _ATTN, "attention+ff": _ATTN + _FF, "all": _ATTN + _FF + _RESNET}
_TEXT_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
TEXT_TARGETS = {"attention": _TEXT_ATTN, "attention+ff": _TEXT_ATTN + ("fc1", "fc2"),
                "all": _TEXT_ATTN + ("fc1", "fc2")}


def target_paths(model: nn.Module, targets: str, text: bool = False) -> List[str]:
    """Paths of the Linear/Conv2d modules that `targets` names, in module order."""
    table = TEXT_TARGETS if text else UNET_TARGETS
    if targets not in table:
        raise UserError(f"lora.targets={targets}: unknown target — use one of {' | '.join(table)}")
    suffixes = table[targets]
    paths = [name for name, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Conv2d)) and any(name == s or name.endswith("." + s) for s in suffixes)]
    if not paths:
        raise UserError(f"lora.targets={targets}: this model has no such layers — choose another target set")
    return paths


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def inject(model: nn.Module, kind: str, rank: int, alpha: float, targets: str = "attention", dora: bool = False,
           dropout: float = 0.0, seed: int = 0, text: bool = False) -> Dict[str, Adapter]:
    """Wrap every target layer in a fresh adapter (ΔW = 0) and freeze the whole model but the adapters.

    The down-projections are drawn from a generator seeded with `seed`, layer after layer in module
    order, so the same call gives the same adapter on every rank and on every run."""
    if kind not in KINDS:
        raise UserError(f"adapter={kind}: unknown adapter — use one of {' | '.join(KINDS)}")
    if dora and kind != "lora":
        raise UserError(f"lora.dora=true: DoRA is a LoRA option — use adapter=lora with it, not adapter={kind}")
    model.requires_grad_(False)
    gen = torch.Generator().manual_seed(seed)
    made = {}
    for path in target_paths(model, targets, text):
        base = model.get_submodule(path)
        try:
            extra = {"dora": dora} if kind == "lora" else {}
            made[path] = KINDS[kind](base, rank, alpha, dropout, generator=gen, **extra)
        except ValueError as e:  # rank too large for this layer
            raise UserError(f"lora.rank={rank}: layer {path} {tuple(plain_layer(base).weight.shape)}: {e}") from None
        if isinstance(made[path].dropout, KeyedDropout):
            made[path].dropout.name = path  # the layer's part of its dropout masks' seed
        _set(model, path, made[path])
    return made


def attach(model: nn.Module, path: str, adapter_factory) -> Adapter:
    """Stack one adapter (built by `adapter_factory(base)`) on the layer at `path`; returns it."""
    adapter = adapter_factory(model.get_submodule(path))
    _set(model, path, adapter)
    return adapter


def adapters(model: nn.Module) -> Iterator[Tuple[str, Adapter]]:
    """(path, adapter) for the outermost adapter of every adapted layer."""
    for name, m in model.named_modules():
        if isinstance(m, Adapter) and not name.endswith(".base"):
            yield name, m


def adapter_parameters(model: nn.Module) -> List[nn.Parameter]:
    return [p for _, a in adapters(model) for p in _own_parameters(a)]


def _own_parameters(a: Adapter) -> List[nn.Parameter]:
    return [p for n, p in a.named_parameters() if not n.startswith("base.")]


def adapter_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """`<layer path>.<adapter key>` -> tensor for the outermost adapters (kohya suffixes, diffusers paths)."""
    out = {}
    for path, a in adapters(model):
        for k, v in a.state_dict().items():
            if not k.startswith("base."):
                out[f"{path}.{k}"] = v
    return out


@torch.no_grad()
def merge(model: nn.Module) -> int:
    """Fold every adapter stack into its base weight (keeping the original for `unmerge`). Returns the count."""
    n = 0
    for _, a in adapters(model):
        if a.merged:
            continue
        layer = a.layer
        layer._lf_unmerged = layer.weight.detach().clone()
        layer.weight.copy_(a._chain_weight(layer.weight))
        _set_merged(a, True)
        n += 1
    return n


@torch.no_grad()
def unmerge(model: nn.Module) -> None:
    """Put back the exact base weights that `merge` replaced."""
    for _, a in adapters(model):
        if a.merged:
            layer = a.layer
            layer.weight.copy_(layer._lf_unmerged)
            del layer._lf_unmerged
            _set_merged(a, False)


def _set_merged(a: nn.Module, flag: bool) -> None:
    while isinstance(a, Adapter):
        a.merged = flag
        a = a.base


def remove(model: nn.Module) -> nn.Module:
    """Take every adapter off (merged ones leave their merged weights behind)."""
    for path, a in list(adapters(model)):
        layer = a.layer
        if hasattr(layer, "_lf_unmerged"):
            del layer._lf_unmerged
        _set(model, path, layer)
    return model


def set_multiplier(model: nn.Module, multiplier: float, only: Optional[List[Adapter]] = None) -> None:
    for _, a in adapters(model):
        while isinstance(a, Adapter):
            if only is None or any(a is o for o in only):
                a.multiplier = float(multiplier)
            a = a.base


__all__ = ["UNET_TARGETS", "TEXT_TARGETS", "target_paths", "inject", "attach", "adapters", "adapter_parameters",
           "adapter_state_dict", "merge", "unmerge", "remove", "set_multiplier", "LoRA"]
