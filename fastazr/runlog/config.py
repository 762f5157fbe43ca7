"""RunConfig: what a run keeps and shows besides its metrics: checkpoints, TensorBoard, progress bars."""

from __future__ import annotations

import math
from dataclasses import dataclass

PROGRESS = ("auto", "on", "off")


@dataclass
class RunConfig:
    checkpoint_every: int = 50
    """Write a checkpoint every this many steps (0: only at the end of the run and on
    SIGINT/SIGTERM)."""

    checkpoint_keep: int = 2
    """Newest complete checkpoints kept; older ones are deleted once a newer one is on disk."""

    tensorboard: bool = True
    """Write every metric, and a few tasks and answers per step, to OUT/tb for TensorBoard."""

    board_samples: int = 3
    """Proposed tasks and solver answers per task type shown as text in TensorBoard each step."""

    eval_every: int = 0
    """Evaluate every this many steps (0: never): HumanEval and code reasoning on a fixed subset,
    greedy, both prompt formats, logged as eval/... metrics of that step."""

    eval_limit: int = 20
    """HumanEval problems (and the reasoning tasks built from them) each evaluation uses."""

    eval_max_tokens: int = 512
    """Longest response of an evaluation."""

    max_minutes: float = 0.0
    """Wall-time budget of the run in minutes, counted from its start (0: none), for a scheduler's
    time limit or a fixed-time experiment: a step starts only if the longest step so far still
    fits, then a checkpoint is written and the run ends (exit 0); --resume continues it with a new
    budget. The first step and that final checkpoint are not budgeted: leave them a margin."""

    progress: str = "auto"
    """Progress bars for generation and sandbox phases: 'on', 'off', or 'auto' (on when
    stdout is a terminal, so logs stay readable)."""

    def __post_init__(self) -> None:
        for name, minimum in (("checkpoint_every", 0), ("checkpoint_keep", 1), ("board_samples", 0), ("eval_every", 0),
                              ("eval_limit", 1), ("eval_max_tokens", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"--run.{name.replace('_', '-')} must be an integer >= {minimum}, got {value!r}")
        if (isinstance(self.max_minutes, bool) or not isinstance(self.max_minutes, (int, float))
                or not math.isfinite(self.max_minutes) or self.max_minutes < 0):
            raise ValueError(f"--run.max-minutes must be a finite number >= 0 (0: no limit), got {self.max_minutes!r}")
        if not isinstance(self.tensorboard, bool):
            raise ValueError(f"--run.tensorboard takes true or false, got {self.tensorboard!r}")
        if self.progress not in PROGRESS:
            raise ValueError(f"--run.progress must be one of {PROGRESS}, got {self.progress!r}")
