import os

import pytest


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
