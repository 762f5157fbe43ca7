"""The trainer's weights in the form SGLang's update_weights_from_tensor loads: Hugging Face tensor
names (save_hf's table, fastazr.model.weights.hf_layout: q/k/v and gate/up as the row ranges of
the Decoder's fused parameters) packed, in checkpoint order, into flat byte buckets of about
SGLangConfig.bucket_bytes. One bucket is one call: SGLang's flattened_bucket format (a uint8
tensor and, per tensor, its name, shape, dtype and byte range) sends a bucket as one CUDA IPC
handle instead of one per tensor."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastazr.model import Decoder
from fastazr.model.weights import hf_layout

ALIGN = 16
"""Byte alignment of each tensor in a bucket: SGLang views each range as its dtype, which needs
an offset that is a multiple of the element size; 16 covers every dtype and vectorized copies."""


@dataclass(frozen=True)
class Entry:
    name: str
    tensor: torch.Tensor
    """A view of the trainer's parameter (detached): read when the bucket is packed, never written."""
    start: int
    """Byte offset in the bucket."""

    @property
    def end(self) -> int:
        return self.start + self.tensor.numel() * self.tensor.element_size()


@dataclass
class Bucket:
    entries: list[Entry]
    nbytes: int


def plan_buckets(model: Decoder, bucket_bytes: int) -> list[Bucket]:
    """Every HF tensor of the model, in checkpoint order, packed greedily into buckets of at most
    bucket_bytes (a larger tensor alone in its own). Planned per push from the parameters as they
    are: the views read the current tensors whatever replaced them since the last push."""
    buckets: list[Bucket] = []
    entries: list[Entry] = []
    size = 0
    for name, slot in hf_layout(model.config).items():
        tensor = slot.view(model).detach()
        nbytes = tensor.numel() * tensor.element_size()
        if entries and size + nbytes > bucket_bytes:
            buckets.append(Bucket(entries, size))
            entries, size = [], 0
        entries.append(Entry(name, tensor, size))
        size = -(-(size + nbytes) // ALIGN) * ALIGN
    if entries:
        buckets.append(Bucket(entries, size))
    return buckets


def pack(bucket: Bucket, staging: torch.Tensor) -> torch.Tensor:
    """The bucket's bytes: its tensors copied into staging[:bucket.nbytes] (uint8), returned."""
    if staging.dtype != torch.uint8 or staging.numel() < bucket.nbytes:
        raise ValueError(f"the staging buffer must be uint8 of at least {bucket.nbytes} bytes, got "
                         f"{staging.dtype} of {staging.numel()}")
    flat = staging[:bucket.nbytes]
    for e in bucket.entries:
        flat[e.start:e.end].view(e.tensor.dtype).view(e.tensor.shape).copy_(e.tensor)
    return flat
