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
    """fp32 [B, vocab] in [2^-24, 1 - 2^-24], a pure function of (seed, sample, step, column).

    23 bits of the hash, not 24: (2^24 - 1 + 0.5) / 2^24 rounds to 1.0 in fp32, whose Gumbel noise
    is +inf, so that column won whatever its logit. At Qwen's 151,936 columns that was 0.9% of
    all draws: a uniformly random token instead of a sample of the softmax."""
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32(((cols * COLUMN_MULTIPLIER) & _MASK32) ^ row_keys(seeds, samples, steps)[:, None])
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(uniform: torch.Tensor) -> torch.Tensor:
    """-log(-log(u)), at most 16.6 for the largest u. The kernels' fast log may round -log(u) of
    the largest u (5.96e-8) to 0: the clamp keeps that finite there, and changes no exact value."""
    return -torch.log((-torch.log(uniform)).clamp(min=2.0 ** -24))


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
    gumbel = gumbel_noise(uniform_noise(seeds, samples, steps, logits.shape[-1]))
    drawn = ((scaled if filtered is None else filtered) + gumbel).argmax(dim=-1)
    tokens = torch.where(greedy, logits.argmax(dim=-1), drawn)
    logprobs = scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def linear_gumbel_sample_reference(hidden: torch.Tensor, weight: torch.Tensor, temperature: torch.Tensor,
                                   seeds: torch.Tensor, samples: torch.Tensor,
                                   steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gumbel_sample_reference on the fp32 logits hidden [B, H] @ weight [V, H].T."""
    return gumbel_sample_reference(hidden.float() @ weight.float().t(), temperature, seeds, samples, steps)
