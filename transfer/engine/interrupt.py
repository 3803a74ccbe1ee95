"""Stopping a run on Ctrl-C or SIGTERM without losing work.

`StopSignal` turns the first SIGINT or SIGTERM into a flag that the training loop checks after each
step: the step finishes, last.pt is written, and the loop raises `Interrupted`, which the CLI prints
as one line with the resume command and turns into exit code 128 + signal (130 for SIGINT, 143 for
SIGTERM). A second signal stops at once (KeyboardInterrupt); the previous checkpoint stays intact
because checkpoints are only ever renamed into place.

`Interrupted` derives from KeyboardInterrupt, not Exception, so no `except Exception` on the way
(image decoding, weight loading) can swallow it. DataLoader workers forked inside the block inherit
the handler and ignore the signal (a terminal's Ctrl-C reaches the whole process group): the main
process decides when to stop, and shuts them down. Under torchrun the launcher passes a Ctrl-C on to the
processes that already had it from the terminal: a second signal within RELAYED_WITHIN seconds counts once;
the processes agree to stop at the same step (engine/loop.py), and only rank 0 writes last.pt.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from transfer.distributed import is_main, launched

SIGNALS = (signal.SIGINT, signal.SIGTERM)
RELAYED_WITHIN = 3.0  # seconds: a second signal this soon, under torchrun, is the launcher relaying the first


class Interrupted(KeyboardInterrupt):
    """A run stopped on request after saving; `code` is the process exit code."""

    def __init__(self, message: str, code: int = 130) -> None:
        super().__init__(message)
        self.code = code


class StopSignal:
    """Context manager: `requested` turns true on the first SIGINT/SIGTERM; the second one raises."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.since = 0.0
        self._previous: dict[int, object] = {}
        self._pid = os.getpid()

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signal.signal works only there
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info) -> bool:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        return False

    def _handle(self, signum: int, frame) -> None:
        if os.getpid() != self._pid:  # a forked DataLoader worker
            return
        if self.signum is not None and launched() and time.monotonic() - self.since < RELAYED_WITHIN:
            return  # torchrun passing on the Ctrl-C this process already had from the terminal
        if self.signum is not None:
            raise Interrupted(f"stopped at once by a second {signal.Signals(signum).name}; the previous "
                              "checkpoint is intact", 128 + signum)
        self.signum, self.since = signum, time.monotonic()
        if is_main():
            print(f"\n{signal.Signals(signum).name}: finishing this step, then writing last.pt "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)


def ignore_stop_signals() -> None:
    """For a process that is already ending on its own (another process of its run died): finish the exit."""
    if threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
