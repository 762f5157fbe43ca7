"""What the update trains on: Rollout (one sampled completion and its advantage), and its packing
into token-budget micro-batches.

Micro-batches are bins of whole sequences (prompt + completion, no padding) under a token budget,
filled first-fit in decreasing length order: for AZR's lengths (300-1500 prompt tokens, up to
1024 completion tokens) under 16K tokens this wastes a few % of each bin, against ~40% for
padded batches of mixed lengths. Only completion tokens carry loss: the hidden state at position
t scores token t + 1, so each sequence contributes the rows from its last prompt token to its
second-to-last token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float | list[float]
    """One number for the whole completion, or one per completion token."""
    old_logprobs: list[float] | None = None
    """Per completion token, from the policy that sampled it (the engine's Completion.logprobs);
    needed when UpdateConfig.old_logprobs == 'engine'."""
    loss_mask: list[bool] | None = None
    """Per completion token, False to exclude it from the loss (e.g. tokens past a stop the task
    ignores); default: every completion token counts."""

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise ValueError("Rollout.prompt_ids is empty: the first completion token is scored from the "
                             "prompt's last position, so a prompt needs at least one token")
        n = len(self.completion_ids)
        for name in ("advantage", "old_logprobs", "loss_mask"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ValueError(f"Rollout.{name} has {len(value)} entries for {n} completion tokens: give one "
                                 f"per completion token" + (" or a single number" if name == "advantage" else ""))

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


def plan_micro_batches(lengths: list[int], budget: int) -> list[list[int]]:
    """Indices grouped into bins of at most `budget` tokens (a longer sequence alone), first-fit
    decreasing; bins in creation order, indices ascending inside each."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        slot = next((b for b, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            bins.append([])
            room.append(budget)
            slot = len(bins) - 1
        bins[slot].append(i)
        room[slot] -= lengths[i]
    return [sorted(b) for b in bins]


@dataclass
class MicroBatch:
    """Packed tensors of some rollouts, on the training device."""
    indices: list[int]
    """Which rollouts, in packing order."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    rows: torch.Tensor
    """Positions of the hidden states that score completion tokens [N]."""
    targets: torch.Tensor
    """The completion tokens they score [N]."""
    advantages: torch.Tensor
    mask: torch.Tensor
    old_logprobs: torch.Tensor | None
    num_loss_tokens: int
    """Completion tokens with mask on."""

    @property
    def num_tokens(self) -> int:
        return self.input_ids.numel()


def build_micro_batch(rollouts: list[Rollout], indices: list[int], device: torch.device) -> MicroBatch:
    ids, positions, rows, targets, advantages, masks, old = [], [], [], [], [], [], []
    cu = [0]
    have_old = all(rollouts[i].old_logprobs is not None for i in indices)
    for i in indices:
        r = rollouts[i]
        p, c = len(r.prompt_ids), len(r.completion_ids)
        start = cu[-1]
        ids.append(np.asarray(r.prompt_ids + r.completion_ids, np.int64))
        positions.append(np.arange(p + c, dtype=np.int64))
        rows.append(np.arange(start + p - 1, start + p + c - 1, dtype=np.int64))
        targets.append(np.asarray(r.completion_ids, np.int64))
        advantages.append(np.broadcast_to(np.asarray(r.advantage, np.float32), (c,)))
        masks.append(np.ones(c, bool) if r.loss_mask is None else np.asarray(r.loss_mask, bool))
        if have_old:
            old.append(np.asarray(r.old_logprobs, np.float32))
        cu.append(start + p + c)

    def tensor(parts, dtype=None):
        return torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, dtype)).to(device)

    mask = tensor(masks, bool)
    return MicroBatch(
        indices=list(indices), input_ids=tensor(ids), position_ids=tensor(positions),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=device),
        max_seqlen=max(rollouts[i].num_tokens for i in indices), rows=tensor(rows, np.int64),
        targets=tensor(targets, np.int64), advantages=tensor(advantages, np.float32), mask=mask,
        old_logprobs=tensor(old, np.float32) if have_old else None,
        num_loss_tokens=int(sum(int(m.sum()) for m in masks)))
