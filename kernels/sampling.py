"""Fused Gumbel-max sampling: one pass over each row of logits computes the log-sum-exp of
logits / T, the counter-based noise and the argmax together, and returns the token and its
logprob. Inference only (nothing to differentiate); the reference is sampling_reference.py.

The torch composition materializes the noise and its hash intermediates as [B, V] int64 and
fp32 tensors: ~10 passes over 311 MB at B = 256, V = 151,936. This kernel reads the logits
once (B x V x 4 bytes) and writes 12 bytes a row. Rows with top-k / top-p are not handled here
(their filter needs a sort); the rollout sampler sends those through the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.sampling_reference import COLUMN_MULTIPLIER, gumbel_sample_reference
from fastazr.kernels.runtime import use_triton

__all__ = ["gumbel_sample"]

# 4096 columns a trip: 37 trips over Qwen's vocabulary, 16 KB of fp32 loads in flight per program.
_BLOCK_V = 4096


@triton.jit
def _mix32(x):
    # uint32: products wrap mod 2^32 and shifts are logical, exactly the reference's masked int64
    # arithmetic at a fraction of the cost (64-bit integer multiplies are emulated on the GPU)
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _low32(x):
    return (x & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, seeds_ptr, samples_ptr, steps_ptr, tokens_ptr, logprobs_ptr, vocab,
                   stride_row, MULTIPLIER: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    # row_keys() of the reference, here rather than as ~20 tiny torch launches (~0.2 ms of host
    # time a decode step)
    seed = tl.load(seeds_ptr + row)
    key = _mix32(_mix32(_low32(seed)) ^ _low32(seed >> 32))
    key = _mix32(_mix32(key ^ _low32(tl.load(samples_ptr + row))) ^ _low32(tl.load(steps_ptr + row)))
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK_V], tl.int64)
    best_scaled = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols < vocab
        scaled = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        # per-lane online log-sum-exp; lanes merge once after the loop
        m_new = tl.maximum(m, scaled)
        # a lane that has seen only -inf (padding, a banned token) subtracts 0, not -inf: no NaN
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - m_safe) + tl.exp(scaled - m_safe)
        m = m_new
        bits = _mix32((cols.to(tl.uint32) * MULTIPLIER) ^ key)
        u = ((bits >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        gumbel = -tl.log(-tl.log(u))
        score = tl.where(inside, scaled + tl.where(greedy, 0.0, gumbel), float("-inf"))
        # strictly greater: the first column wins a tie, as torch.argmax picks
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
        best_scaled = tl.where(better, scaled, best_scaled)
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    winner = tl.max(best, axis=0)
    # the lowest column among lanes holding the maximum score
    col = tl.min(tl.where(best == winner, best_col, vocab), axis=0)
    picked = tl.max(tl.where(best_col == col, best_scaled, float("-inf")), axis=0)
    tl.store(tokens_ptr + row, col)
    tl.store(logprobs_ptr + row, picked - lse)


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, samples: torch.Tensor,
                  steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What gumbel_sample_reference(logits, temperature, seeds, samples, steps) returns, in one
    kernel on CUDA (or the interpreter); the reference elsewhere."""
    if not use_triton(logits):
        return gumbel_sample_reference(logits, temperature, seeds, samples, steps)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch:
        _sample_kernel[(batch,)](logits, temperature.float().contiguous(), seeds.contiguous(), samples.contiguous(),
                                 steps.contiguous(), tokens, logprobs, vocab, logits.stride(0),
                                 MULTIPLIER=COLUMN_MULTIPLIER, BLOCK_V=_BLOCK_V, num_warps=8)
    return tokens, logprobs
