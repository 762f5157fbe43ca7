"""One sample being generated: its tokens, how many of them have KV in the cache, its blocks."""

from __future__ import annotations

from dataclasses import dataclass, field

from .request import SamplingParams


@dataclass(eq=False)
class Sequence:
    tokens: list[int]
    num_prompt: int
    params: SamplingParams
    seed: int
    sample: int
    """Index of this sample among its request's n: the noise is drawn from (seed, sample, step)."""
    leader: Sequence | None = None
    """The first sample of the same prompt: this one waits for the leader's prompt to be in
    the cache, then shares its blocks."""
    stop_ids: frozenset[int] = frozenset()
    """Token ids that end this completion: the request's stop tokens, and EOS unless ignored."""
    num_computed: int = 0
    """Tokens whose keys and values are in the cache."""
    blocks: list[int] = field(default_factory=list)
    num_known: int = field(init=False)
    """Leading tokens whose values are on the host (the rest are placeholders, see engine.py)."""
    num_registered: int = 0
    """Leading blocks already offered to the prefix cache."""
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    exhausted: bool = False
    """The last token (maybe not read back yet) reaches max_new_tokens or the longest sequence:
    nothing more is computed, and the sequence finishes when that token is read back."""

    def __post_init__(self) -> None:
        self.num_known = len(self.tokens)

    @property
    def num_completion(self) -> int:
        return len(self.tokens) - self.num_prompt

    @property
    def resolved(self) -> bool:
        """Every token's value is on the host (none is a placeholder for a sampled token still on
        the device)."""
        return self.num_known == len(self.tokens)

    @property
    def prompt_done(self) -> bool:
        return self.num_computed >= self.num_prompt
