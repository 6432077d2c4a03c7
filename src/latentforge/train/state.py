"""What a training run holds between optimizer steps, and the one optimizer step.

    TrainState = parts      the trained modules, in a fixed order: the UNet (or its adapter), optionally a
                            text encoder, ... — each with its EMA (or none)
               + optimizer  one AdamW over every part's trainable parameters (one param group per part)
               + guard      NaN/inf guard (nan_guard.NanGuard)
               + scaler     fp16 gradient scaler (None for fp32 / bf16)
               + step       optimizer steps done

    state.backward(loss, accum)            micro-batch: gradients of loss / accum accumulate
    state.optimizer_step(loss, samples)    unscale -> clip -> guard -> AdamW -> EMA -> scaler update -> zero grad
                                           (the guard's verdict stays on the device: no host read per step)
    state.flush() -> (loss, grad_norm)     read the verdicts back (log steps, checkpoints, the end)
    state.state_dict() -> (tensors by checkpoint file stem, JSON-able rest);  state.load_state_dict(tensors, rest)

A part's trainable parameters are the ones with `requires_grad`; an adapter part (`adapter=True`) saves and
averages only those (the frozen base is rebuilt from its own source, never written into the checkpoint),
a full part its whole `state_dict()` (parameters and floating buffers).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .checkpoint import flatten_optimizer, unflatten_optimizer
from .ema import EMA
from .nan_guard import NanGuard, finite_on_device, masked_step


@dataclass
class Part:
    """One trained module. Its checkpoint files: `<name>.safetensors` and `<name>_ema.safetensors`;
    the first part of a TrainState (the UNet, the VAE) writes `model.safetensors` and `ema.safetensors`."""

    name: str
    module: nn.Module
    ema: Optional[EMA] = None
    adapter: bool = False  # only the parameters that require grad are trained, saved and averaged

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def trainable_keys(self) -> Optional[set[str]]:
        """Keys of the saved weights: None = the whole state_dict (a full part)."""
        if not self.adapter:
            return None
        return {k for k, p in self.module.named_parameters() if p.requires_grad}

    def weights(self) -> dict[str, torch.Tensor]:
        sd = self.module.state_dict()
        keys = self.trainable_keys()
        return sd if keys is None else {k: v for k, v in sd.items() if k in keys}

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        keys = self.trainable_keys()
        if keys is None:
            self.module.load_state_dict(weights)
            return
        if set(weights) != keys:
            raise KeyError(f"{self.name}: adapter keys do not match the model: {sorted(set(weights) ^ keys)[:3]}")
        self.module.load_state_dict(weights, strict=False)


def make_part(name: str, module: nn.Module, ema_decay: Optional[float] = None, ema_warmup: bool = True,
              adapter: bool = False) -> Part:
    """A Part with an EMA of its saved weights (`ema_decay=None`: no EMA)."""
    part = Part(name, module, adapter=adapter)
    if ema_decay is not None:
        part.ema = EMA(module, ema_decay, ema_warmup, keys=part.trainable_keys())
    return part


@dataclass
class TrainState:
    parts: list[Part]
    optimizer: torch.optim.Optimizer
    guard: NanGuard
    scaler: Optional[torch.amp.GradScaler] = None
    grad_clip: float = 0.0  # max global gradient norm; <= 0: no clipping (the norm is still measured)
    step: int = 0
    gather: Callable = lambda samples: [samples]  # every rank's samples (distributed.gather_json under DDP)
    _params: list = field(default_factory=list, repr=False)

    def __post_init__(self):
        self._params = [p for part in self.parts for p in part.trainable()]

    @property
    def part(self) -> Part:
        """The first part (the UNet or its adapter)."""
        return self.parts[0]

    def set_lr(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def backward(self, loss: torch.Tensor, accum: int = 1) -> None:
        """Accumulate the gradient of one micro-batch (its loss averaged over `accum` micro-batches)."""
        (self.scaler.scale(loss / accum) if self.scaler else loss / accum).backward()

    def optimizer_step(self, loss: torch.Tensor, samples: list[dict]) -> torch.Tensor:
        """Clip, then AdamW + EMA unless the loss (0-dim, all-reduced) or the gradient norm is non-finite.
        The verdict is decided on the device (nan_guard.py): a non-finite step leaves weights, optimizer state
        and EMA bitwise unchanged, and the guard records it with this rank's `samples` ([{"id", "t"}]) for
        `flush`. Returns the gradient norm before clipping (0-dim tensor, on the device)."""
        opt, scaler = self.optimizer, self.scaler
        if scaler:
            scaler.unscale_(opt)
        limit = self.grad_clip if self.grad_clip > 0 else math.inf
        gnorm = torch.nn.utils.clip_grad_norm_(self._params, limit)
        ok = finite_on_device(loss, gnorm)
        if scaler:  # fp16: an overflow is the scaler's to skip (fused AdamW takes its found_inf on device)
            scaler.step(opt)
            scaler.update()
            ok = torch.isfinite(loss)
        else:
            masked_step(opt, ok)
        for part in self.parts:
            if part.ema is not None:
                part.ema.update(part.module, ok)
        self.guard.record(self.step, ok, loss, gnorm, samples)
        opt.zero_grad(set_to_none=True)
        self.step += 1
        return gnorm

    def flush(self) -> tuple[float, float]:
        """Read the guard's pending verdicts back (a collective under DDP: every rank calls it at the same
        steps). Returns the last step's (loss, grad_norm) as floats (nan, nan when nothing was pending)."""
        return self.guard.flush(self.gather)

    def state_dict(self) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
        """(tensors by file stem, JSON-able meta). `flush()` first: pending guard verdicts are refused."""
        flat_opt, opt_meta = flatten_optimizer(self.optimizer)
        tensors, ema_updates = {"optimizer": flat_opt}, {}
        for part, (model_stem, ema_stem) in zip(self.parts, self._stems()):
            tensors[model_stem] = part.weights()
            if part.ema is not None:
                tensors[ema_stem] = part.ema.shadow
                ema_updates[part.name] = part.ema.num_updates
        meta = {"step": self.step, "optimizer": opt_meta, "ema_updates": ema_updates,
                "nan_guard": self.guard.state_dict(), "scaler": self.scaler.state_dict() if self.scaler else None}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, dict[str, torch.Tensor]], meta: dict) -> None:
        for part, (model_stem, ema_stem) in zip(self.parts, self._stems()):
            part.load_weights(tensors[model_stem])
            if part.ema is not None:
                part.ema.load_state_dict({"shadow": tensors[ema_stem], "num_updates": meta["ema_updates"][part.name]})
        unflatten_optimizer(self.optimizer, tensors["optimizer"], meta["optimizer"])
        self.guard.load_state_dict(meta["nan_guard"])
        if self.scaler and meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step = int(meta["step"])

    def _stems(self) -> list[tuple[str, str]]:
        return [("model", "ema") if i == 0 else (p.name, f"{p.name}_ema") for i, p in enumerate(self.parts)]
