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
backward.

The master is the truth the model is refreshed from: weights written into the model by anything
else (a checkpoint loaded after the update was built) would be overwritten by the next step, so
`in_sync()` detects such writes and `load_from_model()` adopts them. `state_dict()` /
`load_state_dict()` save and restore everything an exact resume needs, offloaded or resident."""

from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from .config import UpdateConfig


def build_adamw(config: UpdateConfig, decayed: list[torch.Tensor], rest: list[torch.Tensor],
                moments: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.optim.AdamW:
    """torch's AdamW (fused on CUDA) over two groups of flat fp32 tensors, only the first with weight
    decay; `moments` gives each tensor's (exp_avg, exp_avg_sq), in the order decayed + rest.
    Adam's state is made now rather than lazily at the first step (the layout torch's lazy init
    makes, which the first step then finds and uses as is): offloading and state_dict always see
    the same tensors, and load_state_dict can write into them before any step."""
    cuda = (decayed + rest)[0].device.type == "cuda"
    optimizer = torch.optim.AdamW(
        [dict(params=decayed, weight_decay=config.weight_decay), dict(params=rest, weight_decay=0.0)],
        lr=config.lr, betas=config.betas, eps=config.eps, fused=cuda, foreach=False if cuda else None)
    for p, (exp_avg, exp_avg_sq) in zip(decayed + rest, moments):
        optimizer.state[p] = dict(step=torch.zeros((), dtype=torch.float32, device=p.device if cuda else "cpu"),
                                  exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    return optimizer


class MasterOptimizer:
    def __init__(self, model: nn.Module, config: UpdateConfig):
        self.config = config
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        # matrices first, then norms and biases: two contiguous slices, two param groups (only
        # the matrices decay)
        named.sort(key=lambda item: item[1].dim() < 2)
        self.names = [n for n, _ in named]
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
        self.optimizer = build_adamw(config, [groups[0]], [groups[1]],
                                     [(torch.zeros_like(g), torch.zeros_like(g)) for g in groups])
        self._start_tracking()

    def _start_tracking(self) -> None:
        """The counters and the memory phases' bookkeeping, once the buffers exist."""
        self._host: dict[int, torch.Tensor] = {}
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._onloaded: torch.cuda.Event | None = None
        self._away: list[torch.Tensor] = []
        self.offloaded = False
        """The gradients (and, if offloaded with state, the master and moments) are not on the device."""
        self.steps = 0
        """Steps taken (the lr schedule's argument)."""
        self.skipped = 0
        """Steps skipped for a non-finite gradient norm or loss."""
        self._mark_written()

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [flat[a:b].view_as(p) for p, a, b in zip(self.params, self.offsets, self.offsets[1:])]

    # the model's weights against the master

    def _mark_written(self) -> None:
        # Every in-place write bumps a tensor's version counter (load_state_dict and copy_ too);
        # remembering it after our own writes shows any other writer at no device cost.
        self._written = [(p._version, p.data_ptr()) for p in self.params]

    def in_sync(self) -> bool:
        """False when the model's parameters were written (or replaced) by something other than
        this optimizer since its last write: the next step would overwrite those weights with the
        master, so call load_from_model() (train from them) or load_state_dict() first."""
        return self._written == [(p._version, p.data_ptr()) for p in self.params]

    @torch.no_grad()
    def load_from_model(self) -> None:
        """Copy the model's current parameters into the fp32 master (wherever it is: resident, or
        in host memory while offloaded), keeping Adam's moments and step count. For weights loaded
        into the model after this optimizer was built; to resume a run, use load_state_dict."""
        self.wait_onloaded()
        master = self._resident(self.master)
        for p, view in zip(self.params, self._views(master)):
            view.copy_(p)
        self._mark_written()

    @torch.no_grad()
    def _write_model(self) -> None:
        """The master into the model's parameters, in place (rounded to their dtype)."""
        for p, view in zip(self.params, self._views(self._resident(self.master))):
            p.copy_(view)
        self._mark_written()

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

    def learning_rate(self) -> float:
        """This step's lr: UpdateConfig.lr, times UpdateConfig.lr_schedule(steps taken) if set.
        Read at every step, so changing the config between updates takes effect."""
        lr, schedule = self.config.lr, self.config.lr_schedule
        if schedule is None:
            return lr
        factor = schedule(self.steps)
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (math.isfinite(factor)
                                                                                  and factor >= 0):
            raise ValueError(f"UpdateConfig.lr_schedule({self.steps}) returned {factor!r}: it must return a "
                             f"finite number >= 0 (the multiplier of UpdateConfig.lr)")
        return lr * factor

    @torch.no_grad()
    def step(self, loss_finite: torch.Tensor | None = None) -> torch.Tensor:
        """Clip, AdamW, zero the gradients, refresh the model's parameters; returns the gradient
        norm before clipping. A non-finite norm (a NaN or inf anywhere in the gradients), or
        `loss_finite` (a bool tensor) False, skips the step: the weights and Adam's state stay as
        they were, and `skipped` counts it."""
        self.check_onloaded()
        self.wait_onloaded()
        grad = self._reduced()
        try:
            lr = self.learning_rate()
        except Exception:
            grad.zero_()  # the failed step's gradients must not leak into the next one
            raise
        norm, finite = self._norm(grad, loss_finite)
        # one host read per optimizer step (~1 s of work each): cheaper than a corrupted model
        if not bool(finite):
            grad.zero_()
            self.skipped += 1
            return norm
        if self.config.max_grad_norm is not None:
            grad.mul_(torch.clamp(self.config.max_grad_norm / (norm + 1e-6), max=1.0))
        # the config is read at every step, so that changing it between updates takes effect
        for group, decay in zip(self.optimizer.param_groups, (self.config.weight_decay, 0.0)):
            group.update(lr=lr, betas=tuple(self.config.betas), eps=self.config.eps, weight_decay=decay)
        self.optimizer.step()
        grad.zero_()
        self._write_model()
        self.steps += 1
        return norm

    def _reduced(self) -> torch.Tensor:
        """The gradient the step applies: the whole flat buffer (a data-parallel optimizer's is its
        shard of the sum over ranks)."""
        return self.grad

    def _norm(self, grad: torch.Tensor, loss_finite: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The gradient's global norm, and whether the step may go ahead (a finite norm and loss)."""
        norm = grad.norm()
        return norm, torch.isfinite(norm) if loss_finite is None else torch.isfinite(norm) & loss_finite

    # saving and resuming

    def _layout(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(p.shape)) for name, p in zip(self.names, self.params)]

    def _check_layout(self, saved: list) -> None:
        """A ValueError unless `saved` (a state_dict's layout) names this model's parameters and shapes."""
        layout, mine = [(name, tuple(shape)) for name, shape in saved], self._layout()
        if layout != mine:
            diff = next((f"{a[0]} {a[1]} there, {b[0]} {b[1]} here" for a, b in zip(layout, mine) if a != b),
                        f"{len(layout)} parameters there, {len(mine)} here")
            raise ValueError(f"{type(self).__name__}.load_state_dict: the state is of a model with other parameters "
                             f"({diff}): resume on the model shape it was saved from")

    def _resident(self, t: torch.Tensor) -> torch.Tensor:
        """Where t's values are now: its host copy while offloaded, else t itself."""
        return self._host[id(t)] if any(t is away for away in self._away) else t

    def _adam(self) -> list[dict]:
        return [self.optimizer.state[group["params"][0]] for group in self.optimizer.param_groups]

    @torch.no_grad()
    def state_dict(self, copy: bool = True) -> dict:
        """Everything an exact resume needs, as CPU tensors and numbers: the fp32 master, Adam's
        two moments and step count of each parameter group, the step counters and the parameter
        layout (checked by load_state_dict). Works resident or offloaded (read from host memory).
        copy=False gives the live tensors instead (on the device when resident): no second copy
        of 12 bytes a parameter, valid until the next step changes them (checkpoints write them
        to disk while the engine generates)."""
        self.wait_onloaded()

        def saved(t: torch.Tensor) -> torch.Tensor:
            return self._resident(t).detach().to("cpu", copy=True) if copy else self._resident(t).detach()

        adam = self._adam()
        return dict(layout=self._layout(), master=saved(self.master),
                    exp_avg=[saved(s["exp_avg"]) for s in adam], exp_avg_sq=[saved(s["exp_avg_sq"]) for s in adam],
                    adam_step=[float(s["step"]) for s in adam], steps=self.steps, skipped=self.skipped)

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore a state_dict() of an optimizer over a model of the same parameters (names and
        shapes, else ValueError) and write its master into the model's parameters. Works resident
        or offloaded (then the host copies are written and the next onload brings them back)."""
        self._check_layout(state["layout"])
        self.wait_onloaded()
        self._resident(self.master).copy_(state["master"])
        for s, exp_avg, exp_avg_sq, step in zip(self._adam(), state["exp_avg"], state["exp_avg_sq"],
                                                state["adam_step"]):
            self._resident(s["exp_avg"]).copy_(exp_avg)
            self._resident(s["exp_avg_sq"]).copy_(exp_avg_sq)
            s["step"].fill_(step)
        self.steps, self.skipped = state["steps"], state["skipped"]
        self._write_model()

    # memory phases

    def _state_tensors(self) -> list[torch.Tensor]:
        """What must survive generation: the master and the Adam moments."""
        tensors = [self.master]
        for state in self.optimizer.state.values():
            tensors += [t for key, t in state.items() if key != "step" and t.numel() > 1]
        return tensors

    def _gradients(self) -> list[torch.Tensor]:
        """What holds gradients, zero between steps: freed while generating."""
        return [self.grad]

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
        for t in tensors + self._gradients():
            t.untyped_storage().resize_(0)
        self._away = tensors
        self.offloaded = True

    def onload(self) -> None:
        """Zeroed gradients back, and start copying the state back if it left (the next step
        waits for it)."""
        if not self.offloaded:
            return
        tensors, self._away = self._away, []
        for t in tensors + self._gradients():
            t.untyped_storage().resize_(t.numel() * t.element_size())
        for t in self._gradients():
            t.zero_()
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
