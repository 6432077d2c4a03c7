"""SIGTERM / SIGINT: ask the loop to checkpoint at the next step boundary, then exit.

A second signal while the first is pending raises KeyboardInterrupt (the user insists).
"""

from __future__ import annotations

import signal
import threading


class StopRequest:
    """Context manager: `.requested` turns True on SIGTERM/SIGINT; handlers restored on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.requested = False
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum

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
    def name(self) -> str:
        return self.name_of(self.signum)

    @staticmethod
    def name_of(signum: int | None) -> str:
        """The name of signal number `signum` (e.g. "SIGTERM"); "" for none (None or 0)."""
        return signal.Signals(signum).name if signum else ""
