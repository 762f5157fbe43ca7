"""Next tokens from the last positions' hidden states, on their device, with no host
synchronization.

Sampling is Gumbel-max with counter-based noise (fastazr.kernels.sampling_reference): a sample
depends only on its own seed, sample index and step, so continuous batching, preemption and
recomputation reproduce it exactly. On CUDA, with EngineConfig.sample_in_lm_head (the default),
rows without top-k / top-p never have their logits written: one Triton kernel computes the
lm_head GEMM and samples in its epilogue. Otherwise the lm_head's fp32 logits are computed whole
(Runner.logits) and, without top-k / top-p, sampled by one fused Triton pass on CUDA; with them
they are sorted and filtered here first.

Reported logprobs are log softmax(logits / T) at the chosen token (T = 1 for greedy), before
filtering: the quantity the trainer recomputes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fastazr.kernels.sampling import gumbel_sample, linear_gumbel_sample
from fastazr.kernels.sampling_reference import gumbel_sample_reference


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
        drop |= before >= batch.top_p[:, None]
    ordered = ordered.masked_fill(drop, float("-inf"))
    return torch.empty_like(scaled).scatter_(-1, order, ordered)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> (tokens int64 [B], their fp32 logprobs [B])."""
    if batch.all_greedy:
        logprobs = logits.float().log_softmax(dim=-1)
        tokens = logits.argmax(dim=-1)
        return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)
    args = (batch.temperature, batch.seeds, batch.samples, batch.steps)
    if not (batch.any_top_k or batch.any_top_p):
        # the Triton kernel only on CUDA: under the CPU interpreter it would be far slower than torch
        return (gumbel_sample if logits.is_cuda else gumbel_sample_reference)(logits, *args)
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
