"""Host → device without the host waiting: pinned memory, non-blocking copies, the next micro-batch prefetched.

On CUDA a copy from pageable host memory makes the host wait for the GPU; a copy from pinned (page-locked)
memory with `non_blocking=True` is queued on the stream and returns at once. So the loop prepares micro-batch
k+1 on the host (read, collate, draw t and ε, caption dropout) right after it has queued micro-batch k's
forward and backward, i.e. while the GPU runs them, and queues k+1's copies behind k's kernels (same stream:
no event or second stream is needed, and a pinned buffer is not reused before its copy has run — torch's
caching host allocator records the copy's stream).

The draws are still made on the CPU from (seed, stream position) (step.draw), so prefetching changes no
number: a prefetched micro-batch is the one that would have been made next. On CPU nothing is pinned and the
"copy" is the identity, bitwise the loop as before.

What still synchronises with the host on CUDA (by design, not between log steps): the log step (`state.flush`
reads the loss, gradient norm and NaN-guard verdicts), validation, checkpoints, sample grids, the stop-signal
poll under DDP (every min(log_every, 10) steps), and precision=fp16 (GradScaler reads its found-inf flag).
`LATENTFORGE_SYNC_DEBUG=error` (or `warn`) makes any other synchronisation in the steps between them an error
(torch.cuda.set_sync_debug_mode); bench/gpu_check.sh runs the CLI so.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Hashable, Optional, Tuple

import torch

SYNC_DEBUG_ENV = "LATENTFORGE_SYNC_DEBUG"


def pin(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory()


class Transfer:
    """Moves tensors to `device`: a host tensor through `pin_fn` (default: pinned memory when the device is CUDA,
    none on CPU), then a non-blocking copy (`.to` of a tensor already there returns it). Non-tensors pass through.
    Tests inject `pin_fn` to run the CUDA path's code on CPU."""

    def __init__(self, device: torch.device, pin_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
        self.device = torch.device(device)
        self.pin_fn = pin_fn if pin_fn is not None else (pin if self.device.type == "cuda" else None)

    def __call__(self, x):
        if not torch.is_tensor(x):
            return x
        if self.pin_fn is not None and x.device.type == "cpu":
            x = self.pin_fn(x)
        return x.to(self.device, non_blocking=True)


class Prefetcher:
    """`make(key)` builds a host item, `move(item)` queues its copy to the device. `get(key)` returns key's moved
    item — the prefetched one when `prefetch(key)` was called last, else made now; `prefetch(key)` makes and
    moves the item of a later key while the device is busy."""

    def __init__(self, make: Callable[[Hashable], object], move: Callable[[object], object]):
        self.make, self.move = make, move
        self._next: Optional[Tuple[Hashable, object]] = None
        self.hits = 0  # items served from a prefetch (tests, reports)

    def get(self, key: Hashable):
        ready, self._next = self._next, None
        if ready is not None and ready[0] == key:
            self.hits += 1
            return ready[1]
        return self.move(self.make(key))

    def prefetch(self, key: Optional[Hashable]) -> None:
        self._next = None if key is None else (key, self.move(self.make(key)))


def next_key(step: int, micro: int, accum: int, max_steps: int) -> Optional[Tuple[int, int]]:
    """The (optimizer step, micro-step) after (step, micro); None after the last one."""
    if micro + 1 < accum:
        return step, micro + 1
    return (step + 1, 0) if step + 1 < max_steps else None


@contextlib.contextmanager
def no_host_sync(device: torch.device):
    """With LATENTFORGE_SYNC_DEBUG=error|warn on CUDA: torch.cuda.set_sync_debug_mode for the duration (the steps
    between log steps), off again after. Otherwise nothing."""
    mode = os.environ.get(SYNC_DEBUG_ENV, "")
    if not mode or device.type != "cuda":
        yield
        return
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
