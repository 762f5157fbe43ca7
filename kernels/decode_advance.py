"""The rollout engine's decode metadata moved one pass on, on the device, in one launch.

A decode round runs up to EngineConfig.decode_steps forward passes with no host round trip
between them (fastazr/rollout/runner.py); before each pass after the first, every row that has
not reached its last position moves one token on: the token just sampled becomes its input, its
position and context length grow by one, and its new cache slot is looked up in its block table.
A row at its last position stays and writes to the scratch slot. In torch that is ~13 small
launches a pass (decode_advance_reference.py): 13 x ~2 us of GPU time, 3% of a SmolLM2 pass of
64 rows on the H100, and more of the host's. Here it is one program.

The metadata buffer is int32 [6 * rows + table capacity]: ids, positions, cache slots, context
lengths, block-table starts and last positions (`rows` entries each), then every row's block ids
back to back. Rows past `bucket` are not touched."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.decode_advance_reference import META_ROWS, advance_decode_reference
from fastazr.kernels.runtime import await_previous, pdl_launch, use_triton

__all__ = ["advance_decode"]


@triton.jit(do_not_specialize=["n_sampled", "bucket"])
def _advance_kernel(meta_ptr, sampled_ptr, n_sampled, rows, block_size, scratch_slot, bucket, BLOCK: tl.constexpr,
                    PDL: tl.constexpr):
    await_previous(PDL)
    r = tl.arange(0, BLOCK)
    live = r < bucket
    token = tl.load(sampled_ptr + r, mask=r < n_sampled)
    tl.store(meta_ptr + r, token.to(tl.int32), mask=r < n_sampled)
    position = tl.load(meta_ptr + rows + r, mask=live)
    moving = position < tl.load(meta_ptr + 5 * rows + r, mask=live)
    position += moving.to(tl.int32)
    start = tl.load(meta_ptr + 4 * rows + r, mask=live)
    block = tl.load(meta_ptr + 6 * rows + start + position // block_size, mask=live & moving)
    slot = tl.where(moving, block * block_size + position % block_size, scratch_slot)
    context = tl.load(meta_ptr + 3 * rows + r, mask=live) + moving.to(tl.int32)
    tl.store(meta_ptr + rows + r, position, mask=live)
    tl.store(meta_ptr + 2 * rows + r, slot, mask=live)
    tl.store(meta_ptr + 3 * rows + r, context, mask=live)


def advance_decode(meta: torch.Tensor, rows: int, bucket: int, sampled: torch.Tensor, block_size: int,
                   scratch_slot: int) -> None:
    """Move rows 0 .. bucket - 1 of the metadata buffer `meta` (int32, contiguous; layout in the
    module docstring) one pass on, in place: ids[:len(sampled)] = sampled (int64 tokens), and
    each row below its last position advances its position, cache slot and context length."""
    if meta.dtype != torch.int32 or not meta.is_contiguous() or meta.numel() < META_ROWS * rows:
        raise ValueError(f"meta must be a contiguous int32 buffer of at least {META_ROWS} x {rows} entries: got "
                         f"{meta.dtype}, {meta.numel()} entries, contiguous={meta.is_contiguous()}")
    if sampled.dtype != torch.int64 or sampled.dim() != 1 or not sampled.is_contiguous() or sampled.device != meta.device:
        raise ValueError(f"sampled must be a contiguous 1-D int64 tensor on {meta.device}: got {sampled.dtype} "
                         f"{tuple(sampled.shape)} on {sampled.device}, contiguous={sampled.is_contiguous()}")
    if not 0 < bucket <= rows or sampled.numel() > bucket or block_size < 1:
        raise ValueError(f"bucket {bucket} must be in 1..{rows}, with at most that many sampled tokens (got "
                         f"{sampled.numel()}), and block_size ({block_size}) positive")
    if not use_triton(meta):
        advance_decode_reference(meta, rows, bucket, sampled, block_size, scratch_slot)
        return
    _advance_kernel[(1,)](meta, sampled, sampled.numel(), rows, block_size, scratch_slot, bucket,
                          BLOCK=triton.next_power_of_2(bucket), num_warps=4,
                          **pdl_launch(meta))
