"""Exponential moving average of the weights, with warmup.

    θ_ema ← d_n · θ_ema + (1 - d_n) · θ,   d_n = min(decay, (1 + n) / (10 + n))

n counts EMA updates so far; the warmup term (as in diffusers' EMAModel `use_ema_warmup=False`
branch and TensorFlow's ExponentialMovingAverage `num_updates`) lets early weights fade quickly.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True):
        self.decay, self.warmup, self.num_updates = decay, warmup, 0
        # Shadow copies in fp32 of every parameter and floating buffer, keyed like state_dict().
        self.shadow = {k: v.detach().clone().float() for k, v in _floating_state(model).items()}

    def current_decay(self) -> float:
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self.current_decay()
        state = _floating_state(model)
        shadow = list(self.shadow.values())
        live = [state[k].detach().float() for k in self.shadow]
        torch._foreach_lerp_(shadow, live, 1.0 - d)  # θ_ema + (1-d)(θ - θ_ema)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Load the EMA weights into `model` (e.g. a copy used for sampling or saving)."""
        state = model.state_dict()
        for k, v in self.shadow.items():
            state[k].copy_(v.to(state[k].dtype))

    def state_dict(self) -> dict:
        return {"shadow": self.shadow, "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise KeyError(f"EMA keys do not match the model: {sorted(missing)[:3]}")
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
        self.num_updates = int(state["num_updates"])


def _floating_state(model: torch.nn.Module) -> dict:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
