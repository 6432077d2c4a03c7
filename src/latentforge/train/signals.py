"""SIGTERM / SIGINT / SIGHUP: ask the loop to checkpoint at the next step boundary, then exit.

SIGHUP is what a process gets when its terminal goes away (an ssh connection drops, the window is closed): by
default it dies on the spot. Here it stops like SIGTERM, and since every later write to that terminal would fail
(EIO) and end the run before its checkpoint, stdout and stderr are pointed at /dev/null first when they were it.

In one process a second signal while the first is pending raises KeyboardInterrupt (the user insists). Under DDP
it does not: there a repeat is the launcher's copy of the same stop (torchrun forwards the signal it gets to every
rank, which a scheduler signalling every process has already reached), and the launcher escalates on its own
(torchrun: SIGKILL after --shutdown-timeout, 30 s by default).
"""

from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    """Context manager: `.requested` turns True on SIGTERM/SIGINT; handlers restored on exit. `insist`: a second
    signal raises KeyboardInterrupt (one process; False under DDP, see above)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: the terminal (an ssh session) went away

    def __init__(self, insist: bool = True):
        self.signum = None  # the first signal's number, None until one arrives
        self.insist = insist
        self._previous = {}
        self._terminal = []  # stdout/stderr descriptors that are a terminal (for SIGHUP)

    def _handle(self, signum, frame):
        if self.requested:
            if self.insist:
                raise KeyboardInterrupt
            return  # the first signal's stop stands
        self.signum = signum
        if signum == signal.SIGHUP:
            detach_terminal(self._terminal)

    def __enter__(self):
        self._terminal = [fd for fd in (1, 2) if os.isatty(fd)]  # asked now: a hung-up terminal may not answer
        if threading.current_thread() is threading.main_thread():  # signals only go to the main thread
            for s in self.SIGNALS:
                if s == signal.SIGHUP and signal.getsignal(s) == signal.SIG_IGN:
                    continue  # `nohup latentforge train …`: the user asked for hang-ups to be ignored
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


def detach_terminal(fds) -> None:
    """Point the descriptors `fds` (those of stdout/stderr that were a terminal) at /dev/null."""
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(null, fd)
    finally:
        os.close(null)
