"""Task-Relative REINFORCE++: each of the six (task type, role) groups gets its own baseline.

A response's reward sits on its last token and, with no discount and no critic, every token of
the response has that return. The returns are whitened over all the tokens of the group's
responses, as the reference does with veRL's masked whitening: the mean and (unbiased) variance
are token-weighted, so a long response counts once per token. Every token of a response then
gets the same advantage, (r - mean) / sqrt(var + eps). Whitening per group rather than over the
batch keeps, say, easy deduction solves from setting the baseline of hard induction proposals."""

from __future__ import annotations

import math
from collections import defaultdict

EPS = 1e-8


def whiten(rewards: list[float], lengths: list[int]) -> tuple[list[float], float]:
    """Advantages of one group and the token-weighted std of its rewards. Responses of length
    0 get advantage 0 and weigh nothing."""
    tokens = sum(lengths)
    if tokens == 0:
        return [0.0] * len(rewards), 0.0
    mean = sum(r * n for r, n in zip(rewards, lengths)) / tokens
    squares = sum(n * (r - mean) ** 2 for r, n in zip(rewards, lengths))
    var = squares / (tokens - 1) if tokens > 1 else 0.0
    scale = 1.0 / math.sqrt(var + EPS)
    return [(r - mean) * scale if n else 0.0 for r, n in zip(rewards, lengths)], math.sqrt(var)


def task_relative(groups: list[tuple[str, str]], rewards: list[float], lengths: list[int]
                  ) -> tuple[list[float], dict[tuple[str, str], float]]:
    """Advantages for responses labelled by (task type, role), whitened within each label;
    and each group's reward std."""
    if not len(groups) == len(rewards) == len(lengths):
        raise ValueError(f"task_relative needs a group, a reward and a length per response, got {len(groups)} groups, "
                         f"{len(rewards)} rewards and {len(lengths)} lengths")
    if not all(math.isfinite(r) for r in rewards) or any(n < 0 for n in lengths):
        raise ValueError("task_relative needs finite rewards and response lengths >= 0")
    members: dict[tuple[str, str], list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    advantages = [0.0] * len(rewards)
    stds = {}
    for g, idx in members.items():
        values, stds[g] = whiten([rewards[i] for i in idx], [lengths[i] for i in idx])
        for i, a in zip(idx, values):
            advantages[i] = a
    return advantages, stds
