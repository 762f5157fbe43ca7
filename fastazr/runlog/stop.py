"""Stopping a run on SIGINT or SIGTERM without losing it.

The first signal asks the run to stop: a step that has not started its update is abandoned at
the next phase boundary (nothing it did is kept: the checkpoint is of the step before), a step
inside its update finishes; either way a checkpoint is written before the process exits with
128 + the signal's number. A second signal stops at once (the newest periodic checkpoint stays).
A cluster scheduler's SIGTERM grace period then has to cover one phase and one checkpoint write,
not a whole step."""

from __future__ import annotations

import signal
import sys
import threading


class StopRequested(Exception):
    """Raised at a phase boundary after a stop signal."""


class Stopper:
    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Stopper":
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            print(f"\nfastazr: second {signal.Signals(signum).name}: stopping now, without a new checkpoint",
                  file=sys.stderr, flush=True)
            raise SystemExit(128 + signum)
        self.signum = signum
        print(f"\nfastazr: {signal.Signals(signum).name} received: stopping at the next phase boundary and writing "
              "a checkpoint (send it again to stop at once)", file=sys.stderr, flush=True)

    def check(self) -> None:
        if self.signum is not None:
            raise StopRequested(signal.Signals(self.signum).name)

    @property
    def exit_status(self) -> int:
        return 128 + (self.signum or 0)
