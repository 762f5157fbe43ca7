"""Where a kernel call runs: Triton on CUDA tensors (or anywhere under TRITON_INTERPRET=1), the
torch fallback otherwise.

The interpreter runs the same Triton programs on CPU tensors with numpy: thousands of times slower
than a GPU, but it is how CI checks the kernels' indexing and masking at odd shapes. Triton reads
TRITON_INTERPRET when a kernel is decorated, so it must be set before fastazr.kernels is imported.
"""
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """True where the Triton kernels can run on ``tensor``: a CUDA device, or the interpreter."""
    return tensor.is_cuda or interpreting()
