import importlib.util
import os
import sys
from pathlib import Path

import pytest


def _unshadow_kernels() -> None:
    """Take the repository root off sys.path where fastazr is importable without it (installed).
    `python -m pytest` puts the working directory first, and there this repository's kernels/
    folder (installed as fastazr.kernels) shadows the PyPI package `kernels`, which transformers
    5.25 imports at startup (and SGLang depends on): ImportError: cannot import name
    'CUDAProperties' from 'kernels'."""
    root = Path(__file__).resolve().parent.parent
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != root]
    importlib.invalidate_caches()
    if len(sys.path) != len(saved) and importlib.util.find_spec("fastazr") is None:
        sys.path[:] = saved  # a checkout run with PYTHONPATH=. needs the root


_unshadow_kernels()


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


# Without a GPU the Triton kernels run in Triton's interpreter. Triton reads this when a kernel is
# decorated, so it is set here, before any test module imports fastazr.kernels.
if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if _cuda_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: run through the device tool")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def exact_fp32_matmul():
    """fp32 references computed in fp32, not TF32 (3 significant digits fewer) on a GPU."""
    import torch
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous
