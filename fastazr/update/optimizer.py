"""fp32 master weights, gradients and AdamW state for a model that computes in bf16, in flat
buffers that can leave the GPU while the engine generates.

The model's own parameters stay bf16 (what the engine and the forward read). Each micro-batch's
bf16 gradients are added into one flat fp32 gradient buffer and dropped, so accumulation over
micro-batches happens in fp32. A step clips the flat gradient (one norm, no host sync), runs
torch's AdamW (fused on CUDA) on the flat fp32 master, then copies the master into the bf16
parameters in place: the engine's CUDA graphs and the trainer see the new weights at the same
addresses, and no other copy of the weights exists.

Offloading moves the master and the Adam moments to pinned host buffers (allocated once) on a side
stream and frees their GPU storage by resizing it to 0 bytes: every tensor object, the
optimizer's references included, stays valid. Onloading re-grows the storage and copies back on
the side stream; the step waits for it, so it overlaps the first micro-batches' forward and
backward."""

from __future__ import annotations

import torch
from torch import nn

from .config import UpdateConfig


class MasterOptimizer:
    def __init__(self, model: nn.Module, config: UpdateConfig):
        self.config = config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # matrices first, then norms and biases: two contiguous slices, two param groups (only
        # the matrices decay)
        named.sort(key=lambda item: item[1].dim() < 2)
        self.params = [p for _, p in named]
        device = self.params[0].device
        self.device = device
        sizes = [p.numel() for p in self.params]
        self.offsets = [0]
        for size in sizes:
            self.offsets.append(self.offsets[-1] + size)
        decayed = sum(p.numel() for p in self.params if p.dim() >= 2)
        self.master = torch.empty(self.offsets[-1], dtype=torch.float32, device=device)
        self.grad = torch.zeros_like(self.master)
        with torch.no_grad():
            for p, view in zip(self.params, self._views(self.master)):
                view.copy_(p)
        groups = [self.master[:decayed], self.master[decayed:]]
        for group, grad in zip(groups, (self.grad[:decayed], self.grad[decayed:])):
            group.grad = grad
        cuda = device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            [dict(params=[groups[0]], weight_decay=config.weight_decay), dict(params=[groups[1]], weight_decay=0.0)],
            lr=config.lr, betas=config.betas, eps=config.eps, fused=cuda, foreach=False if cuda else None)
        self._host: dict[int, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(device) if cuda else None
        self._onloaded: torch.cuda.Event | None = None
        self._away: list[torch.Tensor] = []
        self.offloaded = False
        """The gradients (and, if offloaded with state, the master and moments) are not on the device."""
        self.steps = 0
        self.skipped = 0
        """Steps skipped for a non-finite gradient norm."""

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b].view_as(p) for p, a, b in zip(self.params, self.offsets, self.offsets[1:])]

    @property
    def resident_bytes(self) -> int:
        """What offloading would move (the master and both moments, 12 bytes a parameter); the
        gradients are freed in generation either way."""
        return 3 * self.master.numel() * 4

    def check_onloaded(self) -> None:
        if self.offloaded:
            raise RuntimeError("the optimizer state is offloaded (the generation phase): call "
                               "ColocatedMemory.to_training() (or MasterOptimizer.onload()) before training")

    # training

    @torch.no_grad()
    def accumulate(self) -> None:
        """Add the model's gradients (of one micro-batch) into the fp32 buffer and drop them."""
        self.check_onloaded()
        for p, view in zip(self.params, self._views(self.grad)):
            if p.grad is not None:
                view.add_(p.grad)
                p.grad = None

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        """Clip, AdamW, zero the gradients, refresh the model's parameters; returns the gradient
        norm before clipping. A non-finite norm (a NaN or inf anywhere in the gradients) skips
        the step: the weights and Adam's state stay as they were, and `skipped` counts it."""
        self.check_onloaded()
        self.wait_onloaded()
        norm = self.grad.norm()
        # one host read per optimizer step (~1 s of work each): cheaper than a corrupted model
        if not bool(torch.isfinite(norm)):
            self.grad.zero_()
            self.skipped += 1
            return norm
        if self.config.max_grad_norm is not None:
            self.grad.mul_(torch.clamp(self.config.max_grad_norm / (norm + 1e-6), max=1.0))
        self.optimizer.step()
        self.grad.zero_()
        for p, view in zip(self.params, self._views(self.master)):
            p.copy_(view)
        self.steps += 1
        return norm

    # memory phases

    def _state_tensors(self) -> list[torch.Tensor]:
        """What must survive generation: the master and the Adam moments (created by the first step)."""
        tensors = [self.master]
        for state in self.optimizer.state.values():
            tensors += [t for key, t in state.items() if key != "step" and t.numel() > 1]
        return tensors

    def offload(self, state: bool = True) -> None:
        """Free the gradients (zero between steps) and, with `state`, copy the master and Adam
        moments to host memory and free them on the device."""
        if self.offloaded:
            return
        self.wait_onloaded()
        tensors = self._state_tensors() if state else []
        for t in tensors:
            if id(t) not in self._host:
                self._host[id(t)] = torch.empty(t.shape, dtype=t.dtype, pin_memory=self._stream is not None)
        if self._stream is not None and tensors:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for t in tensors:
                    self._host[id(t)].copy_(t, non_blocking=True)
            self._stream.synchronize()
        else:
            for t in tensors:
                self._host[id(t)].copy_(t)
        for t in tensors + [self.grad]:
            t.untyped_storage().resize_(0)
        self._away = tensors
        self.offloaded = True

    def onload(self) -> None:
        """Zeroed gradients back, and start copying the state back if it left (the next step
        waits for it)."""
        if not self.offloaded:
            return
        tensors, self._away = self._away, []
        for t in tensors + [self.grad]:
            t.untyped_storage().resize_(t.numel() * t.element_size())
        self.grad.zero_()
        if self._stream is not None and tensors:
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                for t in tensors:
                    t.copy_(self._host[id(t)], non_blocking=True)
            self._onloaded = torch.cuda.Event()
            self._onloaded.record(self._stream)
        else:
            for t in tensors:
                t.copy_(self._host[id(t)])
        self.offloaded = False

    def wait_onloaded(self) -> None:
        if self._onloaded is not None:
            torch.cuda.current_stream(self.device).wait_event(self._onloaded)
            self._onloaded = None
