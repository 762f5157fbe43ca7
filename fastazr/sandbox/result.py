"""Result: what one sandboxed job produced, as the trusted side sees it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Result:
    """One job's outcome.

    status: "ok", "error", "timeout", "memory", "violation" or "output_limit".
    value: on "ok" from call_many, repr() of the entry's return value (a string, never parsed
        here; fastazr.tasks.values parses it safely). None otherwise.
    error: exception type and message, the denied syscall on "violation", or what was exceeded.
    duration_s: wall time from handing the job to the child until its exit was seen.
    stdout / stderr: what the job printed (exec_many; call_many captures them too).
    stages: with SandboxConfig.trace on, {stage: (seconds, minor page faults or None)} in the
        order they ran (fastazr.sandbox.trace.STAGES); None otherwise.
    """

    status: str
    value: str | None = None
    error: str | None = None
    duration_s: float = 0.0
    stdout: str = ""
    stderr: str = ""
    stages: dict | None = field(default=None, compare=False)

    @property
    def ok(self) -> bool:
        return self.status == "ok"
