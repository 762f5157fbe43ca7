"""Next tokens from last-position logits, on the logits' device, with no host synchronization.

Randomness is a counter-based hash of (request seed, sample index, completion step, vocabulary
index) turned
into Gumbel noise, and the token is argmax(logits / T + noise) over the tokens that top-k/top-p
keep: exact sampling from the filtered softmax. A sample therefore depends only on its own seed
and step, not on which other sequences share the batch or on launch order, so continuous
batching, preemption and recomputation reproduce it exactly.

Reported logprobs are log softmax(logits / T) at the chosen token (T = 1 for greedy), before
filtering: the quantity the trainer recomputes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MASK32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finalizer on int64 tensors holding values in [0, 2^32): products wrap in
    int64 but the low 32 bits, all that is kept, are exact."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _MASK32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seeds: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """fp32 [B, vocab] in (0, 1), a pure function of (seed, sample, step, column); all 64 bits of
    the seed count."""
    row = _mix32(_mix32(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    row = _mix32(_mix32(row ^ (samples & _MASK32)) ^ (steps & _MASK32))
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    bits = _mix32(((cols * 0x9E3779B1) & _MASK32) ^ row[:, None])
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 24))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, already on the logits' device."""
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    seeds: torch.Tensor
    samples: torch.Tensor
    steps: torch.Tensor
    any_top_k: bool
    any_top_p: bool
    all_greedy: bool


def _filter(scaled: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """-inf outside each row's top-k and top-p sets (rows with 0 / 1.0 keep everything). top-p
    applies to the distribution renormalized over the top-k set, as Hugging Face, vLLM and
    SGLang do."""
    ordered, order = scaled.sort(dim=-1, descending=True)
    vocab = scaled.shape[-1]
    drop = torch.zeros_like(ordered, dtype=torch.bool)
    if batch.any_top_k:
        k = torch.where(batch.top_k > 0, batch.top_k, vocab).clamp(max=vocab)
        drop |= torch.arange(vocab, device=scaled.device)[None, :] >= k[:, None]
    if batch.any_top_p:
        probs = ordered.masked_fill(drop, float("-inf")).softmax(dim=-1)
        # keep a token while the mass before it is < top_p: the first token always stays
        before = probs.cumsum(dim=-1) - probs
        drop |= before >= batch.top_p[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, ordered)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits [B, V] -> (tokens int64 [B], their logprobs fp32 [B])."""
    greedy = batch.temperature == 0
    scaled = logits / torch.where(greedy, 1.0, batch.temperature)[:, None]
    logprobs = scaled.log_softmax(dim=-1)
    if batch.all_greedy:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = _filter(scaled, batch) if batch.any_top_k or batch.any_top_p else scaled
        gumbel = -torch.log(-torch.log(uniform_noise(batch.seeds, batch.samples, batch.steps, logits.shape[-1])))
        tokens = torch.where(greedy, logits.argmax(dim=-1), (filtered + gumbel).argmax(dim=-1))
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
