"""What a caller asks the rollout engine for, and what it gets back."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field

from .checks import flag, integer, real, token_ids

MIN_TEMPERATURE = 0.01
"""The lowest positive temperature SamplingParams takes; use 0 for greedy. Completion.logprobs
are of softmax(logits / T) and the trainer recomputes them at the same T, so a smaller T is
refused rather than quietly run as another (greedy reports T = 1, which the trainer would not
use). Below 0.01, sampling is argmax in all but near-ties, and the engine's and the trainer's
logprob differences, which grow as 1 / T (EngineConfig.exact_logprobs gives their size at T = 1),
reach 100x; far below (1e-38) logits / T overflows fp32: NaN logprobs and tokens that are not
the argmax. vLLM lifts temperatures under 0.01 to 0.01 for the same overflow."""

TOP_K_MAX = 2 ** 31 - 1


# The engine keeps top_p in fp32, where 1e-46 is 0: every token was dropped and each draw was token 0.
TOP_P_MIN = 1e-30


@dataclass
class SamplingParams:
    temperature: float = 1.0
    """0 means greedy (argmax); otherwise at least MIN_TEMPERATURE."""

    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""

    top_k: int = 0
    """Keep the k most likely tokens; 0 keeps all (as does any k >= the vocabulary size). At most
    TOP_K_MAX."""

    max_new_tokens: int = 256
    """Completion length limit (finish reason 'length')."""

    stop_token_ids: tuple[int, ...] = ()
    """Ids that end the completion (finish reason 'stop_token'); the id is kept in it. One int is
    taken as one id."""

    stop_strings: tuple[str, ...] = ()
    """Texts that end the completion once its decoded text contains one (finish reason
    'stop_string'); the engine needs a tokenizer for these. One str is taken as one text, not as
    its characters."""

    ignore_eos: bool = False
    """Keep generating past the model's EOS ids (benchmarks)."""

    seed: int | None = None
    """Sampling seed of this request: the same seed gives the same completion whatever else is in
    the batch. None draws one from the engine's generator."""

    def __post_init__(self) -> None:
        self.temperature = real("SamplingParams.temperature", self.temperature)
        if self.temperature != 0 and not self.temperature >= MIN_TEMPERATURE:
            raise ValueError(f"SamplingParams.temperature must be 0 (greedy) or >= {MIN_TEMPERATURE}, got "
                             f"{self.temperature}: see fastazr.rollout.request.MIN_TEMPERATURE for why")
        self.top_p = real("SamplingParams.top_p", self.top_p)
        if not TOP_P_MIN <= self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in [{TOP_P_MIN}, 1] (1 = off; any value below the top "
                             f"token's probability keeps only that token), got {self.top_p}")
        self.top_k = integer("SamplingParams.top_k", self.top_k, 0, TOP_K_MAX,
                             " (0 = off; any k >= the vocabulary size keeps every token)")
        self.max_new_tokens = integer("SamplingParams.max_new_tokens", self.max_new_tokens, 1)
        if isinstance(self.stop_token_ids, numbers.Integral) and not isinstance(self.stop_token_ids, bool):
            self.stop_token_ids = (self.stop_token_ids,)
        self.stop_token_ids = tuple(token_ids("SamplingParams.stop_token_ids", self.stop_token_ids))
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)
        try:
            self.stop_strings = tuple(self.stop_strings)
        except TypeError:
            raise TypeError(f"SamplingParams.stop_strings must be a str or a tuple of str, "
                            f"got {self.stop_strings!r}") from None
        for i, s in enumerate(self.stop_strings):
            if not isinstance(s, str):
                raise TypeError(f"SamplingParams.stop_strings[{i}] must be a str, got {s!r}")
            if not s:
                raise ValueError(f"SamplingParams.stop_strings[{i}] is empty: it would stop every completion at once")
        self.ignore_eos = flag("SamplingParams.ignore_eos", self.ignore_eos)
        if self.seed is not None:
            self.seed = integer("SamplingParams.seed", self.seed, 0, 2 ** 63 - 1, " (or None)")


@dataclass
class Request:
    prompt_ids: list[int]
    """Token ids in [0, the model's vocabulary size): a list, tuple, or 1-D integer tensor or
    array, stored as a list of ints. Engine.generate() checks the upper bound."""
    params: SamplingParams = field(default_factory=SamplingParams)
    n: int = 1
    """Samples of this prompt; they share the prompt's KV blocks when prefix sharing is on, and
    sample i draws its noise from (seed, i), so requests seeded s and s + 1 share no sample."""

    def __post_init__(self) -> None:
        self.prompt_ids = token_ids("Request.prompt_ids", self.prompt_ids)
        if not self.prompt_ids:
            raise ValueError("Request.prompt_ids is empty: a prompt needs at least one token")
        if not isinstance(self.params, SamplingParams):
            raise TypeError(f"Request.params must be a SamplingParams, got {type(self.params).__name__}")
        self.n = integer("Request.n", self.n, 1)


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


def check_requests(requests: list[Request], vocab_size: int, caller: str) -> None:
    """A list of Requests whose token ids lie in the model's vocabulary: the embedding lookup
    would fail on larger ones (a device-side assert on CUDA). Checked at generate() time, since a
    Request's fields can be changed after it was built: its SamplingParams are checked again
    too (once per distinct object; a NaN temperature set afterwards drew token 0 every step)."""
    if isinstance(requests, Request) or not isinstance(requests, (list, tuple)):
        raise TypeError(f"{caller} takes a list of Requests, got {type(requests).__name__}")
    checked: set[int] = set()
    for i, request in enumerate(requests):
        if not isinstance(request, Request):
            raise TypeError(f"requests[{i}] must be a Request, got {type(request).__name__}")
        if not isinstance(request.params, SamplingParams):
            raise TypeError(f"requests[{i}].params must be a SamplingParams, got {type(request.params).__name__}")
        if id(request.params) not in checked:
            try:
                request.params.__post_init__()
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"requests[{i}].params: {exc}") from None
            checked.add(id(request.params))
        request.n = integer(f"requests[{i}].n", request.n, 1)
        if not isinstance(request.prompt_ids, list) or not request.prompt_ids:
            raise ValueError(f"requests[{i}].prompt_ids must be a non-empty list of token ids, got "
                             f"{request.prompt_ids!r:.80}")
        for name, ids in (("prompt_ids", request.prompt_ids), ("params.stop_token_ids", request.params.stop_token_ids)):
            if ids and not (min(ids) >= 0 and max(ids) < vocab_size):
                j = next(j for j, t in enumerate(ids) if not 0 <= t < vocab_size)
                raise ValueError(f"requests[{i}].{name}[{j}] is {ids[j]}: token ids must be in [0, {vocab_size}), "
                                 "the model's vocab_size")
