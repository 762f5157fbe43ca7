"""Progress bars for a step's phases: generation (tokens) and sandbox batches (jobs).

    with progress_bar("propose", unit="tok", mode=config.run.progress) as bar:
        backend.generate(requests, progress=bar.update)

A bar is tqdm on stderr when shown, else a NullBar with the same update/close, so callers
never branch. 'auto' shows bars only when stdout is a terminal: under nohup, a scheduler or
`| tee`, tqdm's carriage-return redraws would fill the log with one line per refresh."""

from __future__ import annotations

import sys

from tqdm import tqdm

from .config import PROGRESS

# Seconds between redraws: an update in between costs ~0.2 us (a counter add and a clock read),
# a redraw ~17 us (measured on the dev VM), so even the engine's per-step calls cost nothing
# measurable.
REFRESH_S = 0.5


class NullBar:
    """What progress_bar returns when bars are off: every method does nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc) -> None:
        pass


def shown(mode: str) -> bool:
    """Whether `mode` ('auto', 'on' or 'off', RunConfig.progress) shows bars in this process."""
    if mode not in PROGRESS:
        raise ValueError(f"progress mode must be one of {PROGRESS}, got {mode!r}")
    if mode == "auto":
        isatty = getattr(sys.stdout, "isatty", None)  # stdout may be None (pythonw) or a stand-in
        return bool(isatty and isatty())
    return mode == "on"


def progress_bar(description: str, total: int | None = None, unit: str = "it", mode: str = "auto"):
    """A bar counting `unit`s towards `total` (None: unknown, the bar shows the count and rate),
    or a NullBar when `mode` shows none. Bars go to stderr and vanish when closed (leave=False):
    the step's console line, printed after them, is what stays on screen."""
    if not shown(mode):
        return NullBar()
    return tqdm(total=total, desc=description, unit=unit, unit_scale=True, leave=False, file=sys.stderr,
                dynamic_ncols=True, mininterval=REFRESH_S)
