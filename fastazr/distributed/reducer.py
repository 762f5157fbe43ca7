"""Gradients of a data-parallel run: one flat fp32 buffer in buckets, each bucket reduce-scattered
over the ranks while the backward is still computing the next one.

The layout (BucketLayout) walks the parameters in reverse, the order in which the backward
produces their gradients (the last layers and the lm_head first, the embedding last), cutting a
bucket every `bucket_elements`; inside a bucket the matrices come first and the vectors (norms,
biases: no weight decay) after them. Each bucket is padded with zeros to a multiple of
ALIGN x G elements, so it splits into G equal chunks: chunk r of every bucket is rank r's shard,
the elements whose fp32 master and AdamW moments rank r alone keeps (ZeRO-1, zero.py).

The reducer (GradientReducer) adds each parameter's gradient into its place in the buffer as
soon as the backward has produced it (a post-accumulate-grad hook), and drops it: the model's own
gradients live one parameter at a time. In the last backward of a mini-batch (`arm()`), a bucket
whose gradients are all in starts its reduce-scatter at once, asynchronously, and the rest of the
backward overlaps it. Buckets start in bucket order on every rank, whatever order their
gradients complete in (as in torch's DDP): collectives must be issued in the same order on every
rank. A rank without a micro-batch in this mini-batch, or a parameter that got no gradient,
starts its buckets in finish(), with zeros.

Cost on the wire: each step reduce-scatters 4 bytes a parameter and (zero.py) all-gathers the
model's 2 bytes (bf16), each times (G - 1) / G; an all-reduce of the fp32 gradients alone would
move 8."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist

# torch 2.13 renamed the flat-tensor collectives (the old names warn there); torch 2.11, the GPU
# node's, has only the old ones
reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

ALIGN = 64
"""Elements each chunk is a multiple of: 256-byte aligned fp32 chunks, as NCCL's fastest paths want."""


@dataclass(frozen=True)
class Bucket:
    start: int
    """Offset of the bucket in the flat buffer."""
    size: int
    """Elements, padding included: a multiple of ALIGN x the world size."""
    decayed: int
    """The first `decayed` elements are matrices' (AdamW's weight decay applies to them)."""
    params: tuple[int, ...]
    """Indices of its parameters, in the order they are laid out."""
    shard_start: int
    """Offset of this bucket's chunk in a rank's shard (the same on every rank)."""
    chunk: int
    """size / G: the elements of this bucket that each rank keeps."""


class BucketLayout:
    def __init__(self, params: list[torch.Tensor], world_size: int, bucket_elements: int):
        self.world_size = world_size
        self.starts = [0] * len(params)
        """Each parameter's offset in the flat buffer."""
        self.buckets: list[Bucket] = []
        self.bucket_of = [0] * len(params)
        groups: list[list[int]] = []
        filled = bucket_elements
        for i in reversed(range(len(params))):
            if filled + params[i].numel() > bucket_elements and filled:
                groups.append([])
                filled = 0
            groups[-1].append(i)
            filled += params[i].numel()
        start = shard = 0
        quantum = ALIGN * world_size
        for members in groups:
            members.sort(key=lambda i: params[i].dim() < 2)  # matrices first (a stable sort: backward order)
            offset = start
            for i in members:
                self.starts[i], self.bucket_of[i] = offset, len(self.buckets)
                offset += params[i].numel()
            size = -(-(offset - start) // quantum) * quantum
            decayed = sum(params[i].numel() for i in members if params[i].dim() >= 2)
            self.buckets.append(Bucket(start, size, decayed, tuple(members), shard, size // world_size))
            start += size
            shard += size // world_size
        self.total = start
        """Elements of the flat buffer (each bucket padded)."""
        self.shard_size = shard
        """Elements of one rank's shard: total / G."""

    def describe(self) -> dict:
        """What a checkpoint of a shard must match to be loaded into this layout."""
        return {"world_size": self.world_size, "buckets": [[b.size, len(b.params)] for b in self.buckets]}

    def decay_ranges(self, rank: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Rank's shard as (start, stop) ranges in shard coordinates: those whose elements decay,
        then the others (vectors and padding)."""
        decayed, rest = [], []
        for b in self.buckets:
            lo, hi = rank * b.chunk, (rank + 1) * b.chunk  # bucket coordinates
            cut = min(max(b.decayed, lo), hi)
            for (a, z), out in (((lo, cut), decayed), ((cut, hi), rest)):
                if z > a:
                    out.append((b.shard_start + a - lo, b.shard_start + z - lo))
        return decayed, rest


class GradientReducer:
    def __init__(self, layout: BucketLayout, params: list[torch.Tensor], grad: torch.Tensor,
                 shard_grad: torch.Tensor):
        """grad: the flat buffer (layout.total fp32); shard_grad: where this rank's reduced chunks
        go (layout.shard_size fp32). Both may be resized between steps (offloading): only their
        storage changes, the views taken here stay valid."""
        self.layout, self.grad, self.shard_grad = layout, grad, shard_grad
        self.views = [grad[s:s + p.numel()].view_as(p) for p, s in zip(params, layout.starts)]
        self._armed = False
        self._pending = [len(b.params) for b in layout.buckets]
        self._launched = 0
        self._works: list[dist.Work] = []
        self.overlapped = 0
        """Buckets of the last step whose reduce-scatter started during the backward (the rest
        started after it: a rank without micro-batches, or gradients that never came)."""
        for i, p in enumerate(params):
            p.register_post_accumulate_grad_hook(partial(self._gradient, i))

    def arm(self) -> None:
        """The next backward is the mini-batch's last: reduce buckets as they complete."""
        self._armed = True

    @torch.no_grad()
    def _gradient(self, i: int, p: torch.Tensor) -> None:
        self.views[i].add_(p.grad)
        p.grad = None
        if self._armed:
            self._pending[self.layout.bucket_of[i]] -= 1
            while self._launched < len(self._pending) and self._pending[self._launched] == 0:
                self._launch()

    def _launch(self) -> None:
        b = self.layout.buckets[self._launched]
        self._works.append(reduce_scatter_flat(self.shard_grad[b.shard_start:b.shard_start + b.chunk],
                                                      self.grad[b.start:b.start + b.size], async_op=True))
        self._launched += 1

    def finish(self) -> None:
        """Start the buckets not started yet (in order) and wait for all: shard_grad then holds
        this rank's chunks of the gradient summed over every rank."""
        self.overlapped = self._launched
        while self._launched < len(self._pending):
            self._launch()
        for work in self._works:
            work.wait()
        self._works, self._launched, self._armed = [], 0, False
        self._pending = [len(b.params) for b in self.layout.buckets]
