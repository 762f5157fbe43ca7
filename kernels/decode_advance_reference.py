"""decode_advance.py's step in plain torch: the rollout runner's path on CPU and the kernel's
reference in tests."""

import torch

# rows of the decode metadata buffer before its block tables (decode_advance.py: the layout)
META_ROWS = 6


def advance_decode_reference(meta: torch.Tensor, rows: int, bucket: int, sampled: torch.Tensor, block_size: int,
                             scratch_slot: int) -> None:
    """decode_advance.advance_decode, one torch op at a time (~13 launches on CUDA)."""
    ids, positions, slots, context, starts, last = (meta[i * rows:i * rows + bucket] for i in range(META_ROWS))
    ids[:len(sampled)].copy_(sampled)
    moving = positions < last
    positions.add_(moving)
    block = meta[META_ROWS * rows:][starts + positions // block_size]
    slots.copy_(torch.where(moving, block * block_size + positions % block_size, scratch_slot))
    context.add_(moving)
