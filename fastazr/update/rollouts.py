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
    """Each per-token field is a list, tuple, 1-D numpy array or CPU tensor; all are checked here
    (lengths, kinds of number, ids >= 0) so that a misaligned field fails by name instead of
    training on shifted values. NaN or inf in a counted advantage or old logprob is accepted: the
    loss is then NaN and the update skips that optimizer step (metrics skipped_steps)."""
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
        prompt = _per_token("prompt_ids", self.prompt_ids, "i")
        if not len(prompt):
            raise ValueError("Rollout.prompt_ids is empty: the first completion token is scored from the "
                             "prompt's last position, so a prompt needs at least one token")
        n = len(_per_token("completion_ids", self.completion_ids, "i"))
        advantage = np.asarray(self.advantage)
        if advantage.ndim == 0:
            _check_kind("advantage", advantage, "f")
        else:
            _check_length("advantage", _per_token("advantage", self.advantage, "f"), n)
        if self.old_logprobs is not None:
            _check_length("old_logprobs", _per_token("old_logprobs", self.old_logprobs, "f"), n)
        if self.loss_mask is not None:
            _check_length("loss_mask", _per_token("loss_mask", self.loss_mask, "b"), n)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)


# what each kind of per-token field accepts, as numpy dtype kinds: ids are integers; masks bools
# (or 0/1 integers); real numbers also take integers
_KINDS = {"i": ("iu", "integers"), "f": ("fiu", "real numbers"), "b": ("biu", "bools")}


def _check_kind(name: str, values: np.ndarray, kind: str) -> None:
    accepted, words = _KINDS[kind]
    # an empty list converts to float64: no value to be of the wrong kind
    if values.size and values.dtype.kind not in accepted:
        raise TypeError(f"Rollout.{name} must hold {words}, got {values.dtype} values")
    if kind == "i" and values.size and values.min() < 0:
        raise ValueError(f"Rollout.{name} holds the negative token id {int(values.min())}: ids are in [0, vocab)")
    if kind == "b" and values.dtype.kind in "iu" and not np.isin(values, (0, 1)).all():
        raise ValueError(f"Rollout.{name} must hold bools (or 0/1), got other integers")


def _per_token(name: str, value, kind: str) -> np.ndarray:
    """value as a 1-D numpy array of the right kind of number, or an error naming Rollout.<name>."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"Rollout.{name} must be a sequence of numbers (list, tuple, numpy array or "
                        f"tensor), got {type(value).__name__} {value!r}")
    try:
        values = np.asarray(value)
    except (TypeError, ValueError, OverflowError, RuntimeError) as error:
        raise TypeError(f"Rollout.{name} must be a sequence of numbers (list, tuple, numpy array or CPU tensor): "
                        f"{error}") from None
    if values.ndim != 1:
        raise ValueError(f"Rollout.{name} must be 1-D (one entry per token), got shape {values.shape}")
    _check_kind(name, values, kind)
    return values


def _check_length(name: str, values: np.ndarray, n: int) -> None:
    if len(values) != n:
        raise ValueError(f"Rollout.{name} has {len(values)} entries for {n} completion tokens: give one "
                         f"per completion token" + (" or a single number" if name == "advantage" else ""))


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


def build_micro_batch(rollouts: list[Rollout], indices: list[int], device: torch.device,
                      vocab_size: int | None = None) -> MicroBatch:
    """The rollouts at `indices` packed on `device`; with vocab_size, every id is checked to be below
    it here, on the host (out of range, the embedding would fail on a device-side assert)."""
    ids, positions, rows, targets, advantages, masks, old = [], [], [], [], [], [], []
    cu = [0]
    have_old = all(rollouts[i].old_logprobs is not None for i in indices)
    for i in indices:
        r = rollouts[i]
        p, c = len(r.prompt_ids), len(r.completion_ids)
        start = cu[-1]
        completion = np.asarray(r.completion_ids, np.int64)
        ids.append(np.concatenate([np.asarray(r.prompt_ids, np.int64), completion]))
        if vocab_size is not None and ids[-1].max() >= vocab_size:
            raise ValueError(f"rollout {i} holds the token id {int(ids[-1].max())}, outside the model's "
                             f"vocabulary [0, {vocab_size})")
        positions.append(np.arange(p + c, dtype=np.int64))
        rows.append(np.arange(start + p - 1, start + p + c - 1, dtype=np.int64))
        targets.append(completion)
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
