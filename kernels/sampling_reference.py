"""Gumbel-max sampling with counter-based noise, in plain torch: the reference of sampling.py and
the rollout sampler's path on CPU and whenever top-k / top-p filter the logits.

The noise for (request seed, sample index, completion step, vocabulary column) is a pure hash
(murmur3's 32-bit finalizer), so a sequence's draw never depends on the rest of the batch, on
launch order, or on being recomputed after preemption. argmax(logits / T + Gumbel noise) samples
exactly from softmax(logits / T)."""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF
# Weyl-sequence multiplier spreading consecutive vocabulary columns over the 32-bit space
COLUMN_MULTIPLIER = 0x9E3779B1


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2^32): products wrap in
    int64 but the low 32 bits, all that is kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def row_keys(seeds: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """int64 [B] in [0, 2^32): one key per (seed, sample, step); all 64 bits of the seed count."""
    row = _mix32(_mix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    return _mix32(_mix32(row ^ (samples & _MASK32)) ^ (steps & _MASK32))


def uniform_noise(seeds: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 [B, vocab] in (0, 1), a pure function of (seed, sample, step, column)."""
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32(((cols * COLUMN_MULTIPLIER) & _MASK32) ^ row_keys(seeds, samples, steps)[:, None])
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


def gumbel_sample_reference(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                            samples: torch.Tensor, steps: torch.Tensor,
                            filtered: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype, computed in fp32), per-row temperature [B] (0 = greedy),
    seeds / samples / steps int64 [B] -> (tokens int64 [B], fp32 logprobs [B]).

    The logprob is log softmax(logits / T) at the token (T = 1 for greedy rows), before any
    filtering: the quantity the trainer recomputes. `filtered` optionally replaces logits / T
    for the draw (-inf outside a top-k / top-p set)."""
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    gumbel = -torch.log(-torch.log(uniform_noise(seeds, samples, steps, logits.shape[-1])))
    drawn = ((scaled if filtered is None else filtered) + gumbel).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs
