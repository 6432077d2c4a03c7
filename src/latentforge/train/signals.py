"""SIGTERM / SIGINT: ask the loop to checkpoint at the next step boundary, then exit.

In one process a second signal while the first is pending raises KeyboardInterrupt (the user insists). Under DDP
it does not: there a repeat is the launcher's copy of the same stop (torchrun forwards the signal it gets to every
rank, which a scheduler signalling every process has already reached), and the launcher escalates on its own
(torchrun: SIGKILL after --shutdown-timeout, 30 s by default).
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: `.requested` turns True on SIGTERM/SIGINT; handlers restored on exit. `insist`: a second
    signal raises KeyboardInterrupt (one process; False under DDP, see above)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, insist: bool = True):
        self.signum = None  # the first signal's number, None until one arrives
        self.insist = insist
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            if self.insist:
                raise KeyboardInterrupt
            return  # the first signal's stop stands
        self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signals only go to the main thread
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return self.name_of(self.signum)

    @staticmethod
    def name_of(signum: int | None) -> str:
        """The name of signal number `signum` (e.g. "SIGTERM"); "" for none (None or 0)."""
        return signal.Signals(signum).name if signum else ""
