"""AZRConfig: the self-play game's options (batch sizes, prompts, lengths, rewards, buffers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from fastazr.rollout.request import MIN_TEMPERATURE

from .rewards import RewardScale

PROMPT_FORMATS = ("auto", "chat", "plain")


@dataclass
class AZRConfig:
    batch_size: int = 64
    """B: proposals of each task type per step, and solver tasks of each task type per step
    (the paper's 64: 6 x 64 = 384 trained responses a step)."""

    references: int = 6
    """K: reference tasks from the buffer shown to each deduction and abduction proposer."""

    induction_inputs: int = 10
    """N: inputs an induction proposer is asked to write for its program."""

    induction_min_pairs: int = 4
    """Fewest distinct inputs that must run for an induction proposal to be valid; half of the
    pairs (rounded up) are shown to the solver, the rest judge its program."""

    learnability_rollouts: int = 8
    """n: solver rollouts per valid proposal that estimate its solve rate (generated and
    checked, never trained on)."""

    propose_max_tokens: int = 1024
    """Longest proposer response, in tokens."""

    solve_max_tokens: int = 1024
    """Longest solver response, in tokens."""

    temperature: float = 1.0
    """Sampling temperature of every response, at least 0.01 (the update scores logprobs at the
    same one: on the command line it also sets --update.temperature)."""

    top_p: float = 1.0
    """Nucleus sampling of every response (1 = off; on-policy training wants it off)."""

    stop_at_answer: bool = True
    """End a response at its first </answer>: what follows is never read, so it is not
    generated or trained on."""

    fixed_response_tokens: int | None = None
    """Timing runs: every response is exactly this many tokens (EOS and </answer> ignored). For
    random-init models, whose text is noise."""

    prompt_format: str = "auto"
    """'chat' (the tokenizer's chat template), 'plain' (base models: "User: ... Assistant:
    <think>"), or 'auto' (chat when the tokenizer has a template)."""

    answer_prefill: bool = False
    """Start every response inside its <answer> block, at the opening of the first block it must
    write (prompts.PREFILL): no <think>, and a block the model leaves open is closed at the end of
    its response. For small models that never adopt the answer format on their own (the embedded
    SmolLM2-135M: no valid proposal without it), where every reward would be -1 and every
    advantage 0. Off: the paper's format."""

    buffer_capacity: int = 10_000
    """Most tasks a buffer keeps; past it the oldest go."""

    seed_tasks: int = 0
    """Before step 1, propose (untrained) until the deduction and abduction buffers hold this
    many tasks each (0: start from the identity seed alone, as the paper does)."""

    max_answer_chars: int = 20_000
    """Longest <answer> content read; a longer answer is malformed."""

    rewards: RewardScale = field(default_factory=RewardScale)
    """Reward of each outcome of each role."""

    def __post_init__(self) -> None:
        def positive_int(name: str, minimum: int = 1) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"AZRConfig.{name} must be an integer >= {minimum}, got {value!r}")

        for name in ("batch_size", "references", "induction_inputs", "propose_max_tokens",
                     "solve_max_tokens", "buffer_capacity", "max_answer_chars"):
            positive_int(name)
        # one rollout's solve rate is 0 or 1, where learnability gives every proposal the same reward
        positive_int("learnability_rollouts", 2)
        positive_int("induction_min_pairs", 2)
        positive_int("seed_tasks", 0)
        if self.induction_min_pairs > self.induction_inputs:
            raise ValueError(f"AZRConfig.induction_min_pairs ({self.induction_min_pairs}) must be <= "
                             f"induction_inputs ({self.induction_inputs})")
        if self.seed_tasks > self.buffer_capacity:
            raise ValueError(f"AZRConfig.seed_tasks ({self.seed_tasks}) must be <= buffer_capacity "
                             f"({self.buffer_capacity}): the seeding stage could never fill the buffers")
        if self.fixed_response_tokens is not None:
            positive_int("fixed_response_tokens")
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"AZRConfig.{name} must be a finite number, got {value!r}")
        if not self.temperature >= MIN_TEMPERATURE:
            raise ValueError(f"AZRConfig.temperature must be >= {MIN_TEMPERATURE} (self-play samples; see "
                             f"fastazr.rollout.request.MIN_TEMPERATURE), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"AZRConfig.top_p must be in (0, 1], got {self.top_p}")
        for name in ("stop_at_answer", "answer_prefill"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"AZRConfig.{name} takes true or false, got {getattr(self, name)!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ValueError(f"AZRConfig.prompt_format must be one of {PROMPT_FORMATS}, got {self.prompt_format!r}")
        if not isinstance(self.rewards, RewardScale):  # which checks its own values
            raise ValueError("AZRConfig.rewards must be a RewardScale")
