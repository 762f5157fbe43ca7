"""Next tokens from the last positions' hidden states, on their device, with no host
synchronization.

Sampling is Gumbel-max with counter-based noise (fastazr.kernels.sampling_reference): a sample
depends only on its own seed, sample index and step, so continuous batching, preemption and
recomputation reproduce it exactly. On CUDA, with EngineConfig.sample_in_lm_head (the default),
rows without top-k / top-p never have their logits written: one Triton kernel computes the
lm_head GEMM and samples in its epilogue. Otherwise the lm_head's fp32 logits are computed whole
(Runner.logits) and, without top-k / top-p, sampled by one fused Triton pass on CUDA (on CPU by
gumbel_sample_cpu, the reference's bits in fewer passes); with them they are sorted and
filtered here first.

Reported logprobs are log softmax(logits / T) at the chosen token (T = 1 for greedy), before
filtering: the quantity the trainer recomputes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fastazr.kernels.sampling import gumbel_sample, linear_gumbel_sample
from fastazr.kernels.sampling_reference import COLUMN_MULTIPLIER, gumbel_sample_reference, row_keys

_MASK32 = 0xFFFFFFFF
_MIX = tuple(m - (1 << 32) for m in (0x85EBCA6B, 0xC2B2AE35))  # murmur3's multipliers as int32 values
_columns: dict[tuple[int, torch.device], torch.Tensor] = {}


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

    def later(self, steps: int) -> SamplingBatch:
        """The same rows `steps` tokens further on (the noise is drawn per step)."""
        return replace(self, steps=self.steps + steps) if steps else self


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
        # rows at 1.0 keep everything: the fp32 cumsum reaches 1.0 before the tail (at 151,936
        # tokens a row beside a top_p < 1 row lost ~16K tokens), and a row's draw must not
        # depend on its neighbours' parameters
        drop |= (before >= batch.top_p[:, None]) & (batch.top_p < 1.0)[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, ordered)


def _as_int32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2^32) -> int32 with the same 32 bits."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _mix32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """sampling_reference._mix32 in place on int32 bits: products wrap at 32 bits, and the
    arithmetic shift's sign bits are masked off (a logical shift)."""
    for shift, multiplier in ((16, _MIX[0]), (13, _MIX[1]), (16, None)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp.bitwise_and_((1 << (32 - shift)) - 1))
        if multiplier is not None:
            x.mul_(multiplier)


def uniform_noise_cpu(seeds: torch.Tensor, samples: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """sampling_reference.uniform_noise, bit for bit, in fewer passes over [B, V]: the hash in int32
    (half the bytes of the reference's int64), in place (no fresh 6-12 MB buffer a pass: on CPU
    each one costs page faults), the column hashes computed once per vocabulary."""
    key = (vocab, seeds.device)
    if key not in _columns:
        cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
        _columns[key] = _as_int32((cols * COLUMN_MULTIPLIER) & _MASK32)
    bits = _columns[key][None, :] ^ _as_int32(row_keys(seeds, samples, steps))[:, None]
    tmp = torch.empty_like(bits)
    _mix32_(bits, tmp)
    torch.bitwise_right_shift(bits, 9, out=tmp)
    return tmp.bitwise_and_((1 << 23) - 1).float().add_(0.5).mul_(1.0 / (1 << 23))


def gumbel_sample_cpu(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, samples: torch.Tensor,
                      steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gumbel_sample_reference's tokens and logprobs, bit for bit, the noise from
    uniform_noise_cpu and made Gumbel in place. 2-core AMD EPYC, 32 x 49,152 (SmolLM2): 16 ms
    against 29 for the reference, ~6% of a decode pass of 32 rows."""
    noise = uniform_noise_cpu(seeds, samples, steps, logits.shape[1])
    noise.log_().neg_().clamp_(min=2.0 ** -24).log_().neg_()  # gumbel_noise, in place
    logits = logits.float()
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    tokens = torch.where(greedy, logits.argmax(dim=-1), noise.add_(scaled).argmax(dim=-1))
    return tokens, scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens int64 [B], their fp32 logprobs [B])."""
    if batch.all_greedy:
        logprobs = logits.float().log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    args = (batch.temperature, batch.seeds, batch.samples, batch.steps)
    if not (batch.any_top_k or batch.any_top_p):
        # the Triton kernel only on CUDA: under the CPU interpreter it would be far slower than torch
        return (gumbel_sample if logits.is_cuda else gumbel_sample_cpu)(logits, *args)
    scaled = logits.float() / torch.where(batch.temperature == 0, 1.0, batch.temperature)[:, None]
    return gumbel_sample_reference(logits, *args, filtered=_filter(scaled, batch))


def sample_hidden(hidden: torch.Tensor, weight: torch.Tensor, batch: SamplingBatch,
                  lm_head: Callable[[torch.Tensor], torch.Tensor], in_gemm: bool = True
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Final-normed hidden states [B, H] and the lm_head weight [V, H] -> (tokens int64 [B], their
    fp32 logprobs [B]). `lm_head(hidden)` gives the fp32 logits where they are needed whole;
    `in_gemm` False always takes that path (EngineConfig.sample_in_lm_head)."""
    if in_gemm and hidden.is_cuda and not (batch.any_top_k or batch.any_top_p):
        return linear_gumbel_sample(hidden, weight, batch.temperature, batch.seeds, batch.samples, batch.steps,
                                    all_greedy=batch.all_greedy)
    return sample(lm_head(hidden), batch)
