"""Where a kernel call runs: Triton on CUDA tensors (or anywhere under TRITON_INTERPRET=1), the
torch fallback otherwise; and whether it is launched with programmatic dependent launch.

The interpreter runs the same Triton programs on CPU tensors with numpy: thousands of times slower
than a GPU, but it is how CI checks the kernels' indexing and masking at odd shapes. Triton reads
TRITON_INTERPRET when a kernel is decorated, so it must be set before fastazr.kernels is imported.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def multiprocessors(tensor: torch.Tensor, interpreted: int) -> int:
    """Streaming multiprocessors of `tensor`'s GPU; elsewhere (the interpreter) `interpreted`, the
    count its small grids are sized for."""
    return _device_multiprocessors(tensor.device.index or 0) if tensor.is_cuda else interpreted


@functools.lru_cache(maxsize=None)
def _device_multiprocessors(device_index: int) -> int:
    # cached: a property query costs microseconds, and launchers ask once a call
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def use_triton(tensor: torch.Tensor) -> bool:
    """True where the Triton kernels can run on ``tensor``: a CUDA device, or the interpreter."""
    return tensor.is_cuda or interpreting()


# Programmatic dependent launch (Hopper and newer): a kernel launched with it may start while the
# one before it in the stream drains, and waits in await_previous() before touching memory. On the
# decode path that hides a launch's latency behind the previous kernel's tail: H100, same tokens,
# SmolLM2-135M at 64 sequences 54.9K -> 58.0K tokens/s, at 256 142K -> 147K, qwen2.5-1.5b
# uniform 51.9K -> 52.6K. FASTAZR_PDL=0 launches every kernel plainly (for A/B runs).
PDL = os.environ.get("FASTAZR_PDL", "1") != "0"
_PDL_DEVICES: dict[int, bool] = {}


def pdl(tensor: torch.Tensor) -> bool:
    """Whether a kernel on `tensor` is launched with programmatic dependent launch: on CUDA
    devices from Hopper (sm_90) on, unless FASTAZR_PDL=0; never under the interpreter."""
    if not tensor.is_cuda or not PDL or interpreting():
        return False
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if index not in _PDL_DEVICES:
        # ROCm reports its own architecture numbers here, and has no griddepcontrol
        _PDL_DEVICES[index] = torch.version.hip is None and torch.cuda.get_device_capability(index)[0] >= 9
    return _PDL_DEVICES[index]


def pdl_launch(tensor: torch.Tensor) -> dict[str, bool]:
    """The launch arguments of a kernel that starts with await_previous(PDL) and runs on
    `tensor`'s device: its PDL constexpr and Triton's launch_pdl option, always the same value."""
    on = pdl(tensor)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def await_previous(PDL: tl.constexpr):
    """A kernel's first statement, when it is launched with launch_pdl=PDL: wait until the kernel
    before it in the stream has finished and its writes are visible. It returns at once without
    PDL, where the stream already ordered the two."""
    if PDL:
        gdc_wait()
