"""NaN/inf guard: a non-finite loss or gradient norm skips the optimizer step.

The weights and the EMA stay untouched, the skip is counted, the batch's sample ids and timesteps
go to `forensics/step-N.json`, and `max_consecutive` skips in a row stop the run with a message.
(diffusers #2875: a single NaN step silently turns every later sample black.)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import UserError


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row."""


class NanGuard:
    def __init__(self, run_dir, max_consecutive: int = 5, write: bool = True):
        self.dir = Path(run_dir) / "forensics"
        self.max_consecutive, self.write = max_consecutive, write
        self.skipped, self.consecutive = 0, 0

    @staticmethod
    def finite(loss: float, grad_norm: float) -> bool:
        return math.isfinite(loss) and math.isfinite(grad_norm)

    def ok(self) -> None:
        self.consecutive = 0

    def skip(self, step: int, samples: list[dict], loss: float, grad_norm: float) -> None:
        """Record a skipped step. `samples`: [{"id", "t"}...] of the whole (global) batch."""
        self.skipped += 1
        self.consecutive += 1
        if self.write:
            self.dir.mkdir(parents=True, exist_ok=True)
            record = {"step": step, "loss": repr(loss), "grad_norm": repr(grad_norm), "samples": samples}
            (self.dir / f"step-{step}.json").write_text(json.dumps(record, indent=1))
        if self.max_consecutive > 0 and self.consecutive >= self.max_consecutive:
            raise TrainingDiverged(
                f"training: {self.consecutive} non-finite steps in a row (last at step {step}, loss {loss}, "
                f"grad norm {grad_norm}); batches in {self.dir} — lower lr, use precision=fp32, "
                "or check those samples")

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.consecutive = int(state["skipped"]), int(state["consecutive"])
