"""Run untrusted, model-written Python fast and safely: warm zygotes fork one hardened child per
job (seccomp-BPF, Landlock, rlimits, no privileges), results come back as repr strings only.

This package imports neither torch nor numpy: its zygote processes must stay small."""

from .config import STATUSES, SandboxConfig
from .pool import Sandbox, SandboxError
from .result import Result

__all__ = ["Sandbox", "SandboxConfig", "SandboxError", "Result", "STATUSES"]
