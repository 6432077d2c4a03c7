"""NaN/inf guard: a non-finite loss or gradient norm skips the optimizer step.

The weights and the EMA stay untouched, the skip is counted, the batch's sample ids and timesteps
go to `forensics/step-N.json`, and `max_consecutive` skips in a row stop the run with a message.
(diffusers #2875: a single NaN step silently turns every later sample black.)

The decision is made on the device, without a host synchronisation per step:

    ok = isfinite(loss) & isfinite(‖g‖)            a 0-dim bool tensor, never read by the host here
    AdamW: found_inf = 1 - ok                        the fused kernel skips (as for GradScaler's overflow)
    EMA:   weight (1 - d)·ok, n += ok                a skipped step lerps by 0

`record` keeps each step's verdict on the device; `flush` (at log steps, checkpoints and the end)
reads them back in one transfer and then writes the forensics and counts exactly as if each step
had been checked as it happened — same step numbers, same ids, same divergence stop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from .. import io
from ..errors import UserError


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


def finite_on_device(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: loss and gradient norm are both finite (no host sync)."""
    return torch.isfinite(loss) & torch.isfinite(grad_norm)


def masked_step(opt: torch.optim.Optimizer, ok: torch.Tensor) -> None:
    """`opt.step()` where `ok` is True; where False, weights and optimizer state stay bitwise unchanged.

    Fused Adam/AdamW take `found_inf` on the device (their kernel returns early and the step count
    is restored); any other optimizer falls back to a host read of `ok` (one sync per step)."""
    group = opt.param_groups[0]
    if group.get("fused"):
        opt.found_inf = (~ok).float()
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif bool(ok):
        opt.step()


class NanGuard:
    def __init__(self, run_dir, max_consecutive: int = 5, write: bool = True):
        self.dir = Path(run_dir) / "forensics"
        self.max_consecutive, self.write = max_consecutive, write
        self.skipped, self.consecutive = 0, 0
        self.pending: list = []  # (step, ok, loss, grad_norm, samples), verdicts still on the device

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def ok(self) -> None:
        self.consecutive = 0

    def record(self, step: int, ok: torch.Tensor, loss: torch.Tensor, grad_norm: torch.Tensor,
               samples: list[dict]) -> None:
        """Remember one step's on-device verdict; `samples` ([{"id", "t"}...]) are this rank's."""
        self.pending.append((step, ok, loss.detach(), grad_norm.detach(), samples))

    def flush(self, gather=lambda samples: [samples]) -> tuple[float, float]:
        """Read the pending verdicts back (one transfer) and account for them in step order.

        `gather(samples)` returns every rank's samples (a collective: all ranks call it for the same
        skipped steps, which they agree on because loss and gradient norm are all-reduced).
        Returns (loss, grad_norm) of the last pending step, or (nan, nan) if none was pending."""
        if not self.pending:
            return math.nan, math.nan
        pending, self.pending = self.pending, []
        rows = torch.stack([torch.stack([ok.double(), loss.double(), g.double()]) for _, ok, loss, g, _ in pending])
        values = rows.cpu().tolist()  # the one host read since the last flush (float32 -> float64 is exact)
        for (step, *_, samples), (ok, loss, grad_norm) in zip(pending, values):
            if ok:
                self.ok()
            else:
                self.skip(step, sum(gather(samples), []), loss, grad_norm)
        return values[-1][1], values[-1][2]

    def skip(self, step: int, samples: list[dict], loss: float, grad_norm: float) -> None:
        """Record a skipped step. `samples`: [{"id", "t"}...] of the whole (global) batch."""
        self.skipped += 1
        self.consecutive += 1
        if self.write:
            self.dir.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "loss": repr(loss), "grad_norm": repr(grad_norm), "samples": samples}
            io.write_text(self.dir / f"step-{step}.json", json.dumps(record, indent=1))
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training: {self.consecutive} non-finite steps in a row (last at step {step}, loss {loss}, "
                f"grad norm {grad_norm}); batches in {self.dir} — lower lr, use precision=fp32, "
                "or check those samples")

    def state_dict(self) -> dict:
        if self.pending:
            raise RuntimeError("NanGuard.state_dict: flush() the pending verdicts first")
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
        self.pending = []

