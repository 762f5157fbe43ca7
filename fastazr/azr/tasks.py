"""The objects of the game: task types, roles, and the validated tasks the buffers hold.

A deduction or abduction task is a triplet (program, input, output): the output was computed by
the sandbox, never taken from the model. An induction task is a program with the message its
proposer wrote and the (input, output) pairs the sandbox computed: `shown` go into the solver's
prompt, `hidden` judge its answer."""

from __future__ import annotations

from dataclasses import dataclass, field

TASK_TYPES = ("deduction", "abduction", "induction")
ROLES = ("propose", "solve")
GROUPS = tuple((task, role) for task in TASK_TYPES for role in ROLES)
"""The six (task type, role) groups Task-Relative REINFORCE++ normalizes separately."""


@dataclass(frozen=True)
class Triplet:
    """A deduction or abduction task: f(*input) == output, all as Python source / repr text."""

    program: str
    input: str
    """Argument source, literal values only ("[3, 1], 'a'"), as fastazr.tasks rebuilt it."""
    output: str
    """repr of the program's value on the input, as the sandbox returned it."""
    step: int = -1
    """The training step that proposed it (-1: the seed)."""


@dataclass(frozen=True)
class InductionTask:
    """An induction task: write a program that maps every shown input to its output and also
    reproduces the hidden pairs."""

    program: str
    message: str
    """The proposer's description of what the program does, shown to the solver."""
    shown: tuple[tuple[str, str], ...]
    hidden: tuple[tuple[str, str], ...]
    step: int = -1

    @property
    def pairs(self) -> tuple[tuple[str, str], ...]:
        return self.shown + self.hidden


@dataclass
class Sample:
    """One generated response and everything the step learned about it: the unit that rewards,
    advantages, the update and the samples log read."""

    task: str
    role: str
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str
    status: str = ""
    """propose: 'valid', 'invalid', 'duplicate' or 'malformed'; solve: 'correct', 'wrong' or
    'malformed'."""
    reason: str = ""
    """Why a response was judged as it was (the parser's or the validator's words)."""
    reward: float = 0.0
    advantage: float = 0.0
    trained: bool = True
    """False for learnability rollouts: generated and checked, never trained on."""
    details: dict = field(default_factory=dict)
    """What the sample proposed or answered, for the samples log (program, input, output, ...)."""
