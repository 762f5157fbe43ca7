"""What a caller asks the rollout engine for, and what it gets back."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy (argmax)."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""

    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all."""

    max_new_tokens: int = 256
    """Completion length limit (finish reason 'length')."""

    stop_token_ids: tuple[int, ...] = ()
    """Ids that end the completion (finish reason 'stop_token'); the id is kept in it."""

    stop_strings: tuple[str, ...] = ()
    """Texts that end the completion once its decoded text contains one (finish reason
    'stop_string'); the engine needs a tokenizer for these."""

    ignore_eos: bool = False
    """Keep generating past the model's EOS ids (benchmarks)."""

    seed: int | None = None
    """Sampling seed of this request: the same seed gives the same completion whatever else is in
    the batch. None draws one from the engine's generator."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"SamplingParams.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"SamplingParams.seed must be in [0, 2**63) or None, got {self.seed}")
        if any(not s for s in self.stop_strings):
            raise ValueError("SamplingParams.stop_strings must not contain an empty string")
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)
        self.stop_strings = tuple(self.stop_strings)


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    """Samples of this prompt; they share the prompt's KV blocks when prefix sharing is on, and
    sample i draws its noise from (seed, i), so requests seeded s and s + 1 share no sample."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Request.n must be >= 1, got {self.n}")
        if not self.prompt_ids:
            raise ValueError("Request.prompt_ids is empty: a prompt needs at least one token")
        self.prompt_ids = [int(t) for t in self.prompt_ids]


FINISH_REASONS = ("eos", "stop_token", "stop_string", "length", "prompt_too_long")


@dataclass
class Completion:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    """log p(token) of each completion token under softmax(logits / T), T the request's
    temperature (1 for greedy), before top-k/top-p filtering: what
    fastazr.kernels.linear_logprobs(..., temperature=T) recomputes from the same weights."""
    finish_reason: str
    """One of FINISH_REASONS. 'prompt_too_long': the prompt does not fit the model's context or
    the whole KV cache, and nothing was generated."""
