"""Run untrusted, model-written Python fast and safely: warm zygotes fork one hardened child per
job (seccomp-BPF, Landlock, rlimits, no privileges), results come back as repr strings only.

This package imports neither torch nor numpy, and its names load lazily: a zygote imports
fastazr.sandbox.zygote, and every module it pulls in (subprocess, socket, tempfile... for the
pool) would grow the process each fork copies (~1.5 MiB and 40 mappings more)."""

from importlib import import_module

_EXPORTS = {"Sandbox": "pool", "SandboxError": "pool", "SandboxConfig": "config", "STATUSES": "config",
            "Result": "result"}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fastazr.sandbox' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
