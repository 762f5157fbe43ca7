"""Packing variable-length sequences back to back, the Decoder's input layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Packed:
    """Sequences concatenated with no padding; cu_seqlens[i]:cu_seqlens[i + 1] is sequence i."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def pack(sequences: list[list[int]], device: torch.device | str = "cpu") -> Packed:
    """Token id lists -> Packed on `device` (positions restart at 0 for each sequence)."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pack() needs one or more non-empty sequences")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int32)
    cu_seqlens = torch.zeros(len(sequences) + 1, dtype=torch.int32)
    torch.cumsum(lengths, 0, out=cu_seqlens[1:])
    input_ids = torch.tensor([t for s in sequences for t in s], dtype=torch.long)
    starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lengths.long())
    position_ids = torch.arange(len(input_ids)) - starts
    return Packed(input_ids.to(device), position_ids.to(device), cu_seqlens.to(device), int(lengths.max()))
