"""Static checks of a model-written program before anything runs it.

These judge task quality, not safety (the sandbox is the safety): an Absolute Zero program
must be deterministic and self-contained, so modules that reach the system, the clock or
randomness are rejected, and so are calls that read input or evaluate text."""

from __future__ import annotations

import ast
from dataclasses import dataclass

BANNED_MODULES = frozenset({
    "os", "sys", "subprocess", "socket", "ctypes", "random", "time", "datetime", "threading",
    "multiprocessing", "pathlib", "shutil", "signal", "io", "importlib", "builtins", "gc",
    "inspect", "pickle", "marshal", "shelve", "tempfile", "glob", "fcntl", "resource", "mmap",
    "select", "selectors", "asyncio", "concurrent", "_thread", "posix", "nt", "pty", "tty",
    "termios", "pwd", "grp", "platform", "sysconfig", "site", "code", "codeop", "runpy",
    "pkgutil", "zipimport", "atexit", "faulthandler", "tracemalloc", "trace", "pdb", "ssl",
    "http", "urllib", "ftplib", "smtplib", "poplib", "imaplib", "telnetlib", "xmlrpc",
    "webbrowser", "sqlite3", "dbm", "uuid", "secrets", "hmac", "logging", "getpass", "zoneinfo",
    "locale", "fileinput", "filecmp", "zipfile", "tarfile", "gzip", "bz2", "lzma",
    "configparser", "email", "mailbox", "wave", "sched", "weakref", "unittest", "doctest",
    "timeit", "cProfile", "profile", "numpy", "torch",
})
BANNED_CALLS = frozenset({"input", "open", "eval", "exec", "compile", "__import__", "breakpoint",
                          "globals", "locals", "vars", "exit", "quit", "help", "memoryview"})
# Attribute names that reach interpreter internals (frames, globals, the class graph).
BANNED_ATTRIBUTES = frozenset({"__globals__", "__builtins__", "__subclasses__", "__code__",
                               "__closure__", "__mro__", "__bases__", "__getattribute__",
                               "__reduce__", "__reduce_ex__", "f_globals", "f_locals", "f_back",
                               "gi_frame", "cr_frame", "tb_frame"})


@dataclass(frozen=True)
class ProgramCheck:
    ok: bool
    reason: str = ""


def check_program(source: str, entry: str = "f", max_chars: int = 20_000) -> ProgramCheck:
    """Whether source parses, defines `entry` at top level, and avoids the banned imports,
    calls and attributes above. `reason` names the first problem found."""
    if not isinstance(source, str) or not source.strip():
        return ProgramCheck(False, "empty program")
    if len(source) > max_chars:
        return ProgramCheck(False, f"program of {len(source)} chars exceeds {max_chars}")
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        return ProgramCheck(False, f"does not parse: {type(exc).__name__}: {getattr(exc, 'msg', exc)}")
    defined = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    if entry not in defined:
        return ProgramCheck(False, f"no top-level definition of {entry!r}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED_MODULES:
                    return ProgramCheck(False, f"imports banned module {alias.name!r}")
        elif isinstance(node, ast.ImportFrom):
            if node.level or (node.module or "").split(".")[0] in BANNED_MODULES:
                return ProgramCheck(False, f"imports banned module {node.module!r}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in BANNED_CALLS:
            return ProgramCheck(False, f"calls banned function {node.func.id}()")
        elif isinstance(node, ast.Attribute) and node.attr in BANNED_ATTRIBUTES:
            return ProgramCheck(False, f"uses banned attribute {node.attr}")
        elif isinstance(node, ast.Name) and node.id in ("__builtins__", "__import__"):
            return ProgramCheck(False, f"uses {node.id}")
    return ProgramCheck(True)
