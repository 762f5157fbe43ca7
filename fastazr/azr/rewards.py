"""Rewards of the two roles, from the statuses the step assigned (see tasks.Sample.status).

Solver: correct, wrong (a well-formed answer that fails the check) or malformed (no usable
<answer>). Proposer: a valid task earns its learnability, r = 1 - mean solve rate of the
learnability rollouts when that rate is strictly between 0 and 1; a task every rollout solves or
none does teaches nothing and earns `learnability_extreme` (0 in the paper, -0.5 in the reference
code). An invalid or duplicate proposal earns `proposer_invalid`, a malformed one
`proposer_malformed`."""

from __future__ import annotations

from dataclasses import dataclass

MAX_REWARD = 1e6


@dataclass(frozen=True)
class RewardScale:
    solver_correct: float = 1.0
    """A solver answer that passes the check."""

    solver_wrong: float = -0.5
    """A well-formed solver answer that fails the check."""

    solver_malformed: float = -1.0
    """A solver response without a usable <answer>."""

    proposer_invalid: float = -1.0
    """A well-formed proposal the sandbox rejects (the reference code too: -1), or a duplicate
    (the reference code does not look for duplicates)."""

    proposer_malformed: float = -1.0
    """A proposal without the blocks its role needs."""

    learnability_extreme: float = 0.0
    """A valid proposal every learnability rollout solved, or none did (the paper: 0; the
    reference code: -0.5)."""

    def __post_init__(self) -> None:
        # Bounded as well as finite: the advantages square rewards (1e200 overflowed there).
        for name, value in vars(self).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not abs(value) <= MAX_REWARD:
                raise ValueError(f"AZRConfig.rewards.{name} must be a number from -{MAX_REWARD:g} to "
                                 f"{MAX_REWARD:g}, got {value!r}")


def learnability(solve_rate: float, scale: RewardScale) -> float:
    if not 0.0 <= solve_rate <= 1.0:
        raise ValueError(f"a solve rate is a fraction of rollouts, in [0, 1]; got {solve_rate!r}")
    if 0.0 < solve_rate < 1.0:
        return 1.0 - solve_rate
    return scale.learnability_extreme


def solver_reward(status: str, scale: RewardScale) -> float:
    rewards = {"correct": scale.solver_correct, "wrong": scale.solver_wrong, "malformed": scale.solver_malformed}
    if status not in rewards:
        raise ValueError(f"a solve's status is one of {tuple(rewards)}, got {status!r}")
    return rewards[status]


def proposer_reward(status: str, solve_rate: float | None, scale: RewardScale) -> float:
    """status 'valid' needs the learnability rollouts' solve rate."""
    if status not in ("valid", "invalid", "duplicate", "malformed"):
        raise ValueError(f"a proposal's status is valid, invalid, duplicate or malformed, got {status!r}")
    if status == "valid":
        if solve_rate is None:
            raise ValueError("a valid proposal's reward needs its solve rate")
        return learnability(solve_rate, scale)
    if status == "malformed":
        return scale.proposer_malformed
    return scale.proposer_invalid
