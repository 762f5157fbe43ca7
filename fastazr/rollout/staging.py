"""Host buffers for each step's small copies: metadata and sampling parameters up, sampled tokens
and logprobs down.

The engine keeps one step in flight while it prepares the next (engine.py), so a copy must never
wait for the GPU: from pageable memory a host-to-device copy is synchronous. The buffers are
pinned, allocated once and used in turn, one per step in flight; a step's buffer is reused two
steps later, after the event recorded behind that step's last copy. Reuse is guarded by that
event here rather than left to the caching host allocator's bookkeeping, and costs no allocation
a step."""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 16


class Staging:
    def __init__(self, device: torch.device, slots: int = 2):
        self.device = device
        self.pinned = device.type == "cuda"
        self._buffers = [torch.empty(0, dtype=torch.uint8) for _ in range(slots)]
        self._events: list[torch.cuda.Event | None] = [None] * slots
        self._slot, self._used = 0, 0

    def begin_step(self) -> None:
        """Move to the next buffer, once the GPU is done with what its last step copied."""
        self._slot = (self._slot + 1) % len(self._buffers)
        event = self._events[self._slot]
        if event is not None:
            event.synchronize()
        self._used = 0

    def end_step(self) -> torch.cuda.Event | None:
        """Call after the step's last copy is queued (the device-to-host ones included); the
        event passes when they are done (None on CPU, where they already are)."""
        if not self.pinned:
            return None
        event = self._events[self._slot] = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def host(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """numel elements of this step's buffer."""
        start = -(-self._used // _ALIGN) * _ALIGN
        end = start + numel * dtype.itemsize
        buffer = self._buffers[self._slot]
        if end > buffer.numel():
            # Earlier views of this step keep the old buffer alive; torch's caching host allocator
            # holds it until the copies queued from it have run.
            buffer = torch.empty(max(2 * buffer.numel(), end, 1 << 16), dtype=torch.uint8, pin_memory=self.pinned)
            self._buffers[self._slot], start, end = buffer, 0, numel * dtype.itemsize
        self._used = end
        return buffer[start:end].view(dtype)

    def upload(self, values: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """values on the device: a new tensor, or the leading elements of `out`."""
        dtype = torch.from_numpy(values[:0]).dtype
        staged = self.host(values.size, dtype)
        staged.numpy()[:] = values.reshape(-1)
        staged = staged.view(values.shape)
        if out is None:
            out = torch.empty(values.shape, dtype=dtype, device=self.device)
        out.view(-1)[:values.size].copy_(staged.view(-1), non_blocking=True)
        return out

    def download(self, values: torch.Tensor) -> torch.Tensor:
        """A host copy of a device tensor, complete once end_step()'s event has passed."""
        if not values.is_cuda:
            return values
        staged = self.host(values.numel(), values.dtype).view(values.shape)
        staged.copy_(values, non_blocking=True)
        return staged
