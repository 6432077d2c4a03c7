"""Exponential moving average of the weights, with warmup.

    θ_ema ← d_n · θ_ema + (1 - d_n) · θ,   d_n = min(decay, (1 + n) / (10 + n))

n counts EMA updates so far; the warmup term (as in diffusers' EMAModel `use_ema_warmup=False`
branch and TensorFlow's ExponentialMovingAverage `num_updates`) lets early weights fade quickly.

n lives on the device and `update(model, ok)` takes the NaN guard's on-device verdict: a skipped
step (ok = False) lerps with weight 0 (the shadow stays bitwise as it was) and does not count, so
the training loop never waits for the device to decide.
"""

from __future__ import annotations

import torch


class EMA:
    def __init__(self, model: torch.nn.Module, decay: float = 0.9999, warmup: bool = True, keys=None):
        self.decay, self.warmup = decay, warmup
        # Shadow copies in fp32 of every parameter and floating buffer, keyed like state_dict().
        self.shadow = {k: v.detach().clone().float() for k, v in _floating_state(model).items()
                       if keys is None or k in keys}  # `keys`: e.g. an adapter's parameters only
        device = next(iter(self.shadow.values())).device if self.shadow else torch.device("cpu")
        self._n = torch.zeros((), dtype=torch.float64, device=device)  # updates so far, on the device

    @property
    def num_updates(self) -> int:
        return int(self._n)  # reads the device: call at checkpoints, not per step

    @num_updates.setter
    def num_updates(self, n: int) -> None:
        self._n.fill_(n)

    def _decay(self) -> torch.Tensor:  # float64 like a python float, so the weight rounds as before
        if not self.warmup:
            return torch.full_like(self._n, self.decay)
        return torch.clamp((1 + self._n) / (10 + self._n), max=self.decay)

    def current_decay(self) -> float:
        return float(self._decay())

    @torch.no_grad()
    def update(self, model: torch.nn.Module, ok: torch.Tensor | None = None) -> None:
        """One EMA step; with `ok` (0-dim bool on the device) False it changes nothing, without a host sync."""
        ok = torch.ones((), dtype=torch.bool, device=self._n.device) if ok is None else ok.to(self._n.device)
        weight = ((1.0 - self._decay()) * ok).float()  # 0 where the step was skipped
        state = _floating_state(model)
        shadow = list(self.shadow.values())
        live = [state[k].detach().float() for k in self.shadow]
        torch._foreach_lerp_(shadow, live, [weight] * len(shadow))  # θ_ema + (1-d)(θ - θ_ema)
        self._n += ok

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
