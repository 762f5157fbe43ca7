"""Task buffers, one per task type: the valid tasks proposed so far, seeded with the identity.

Proposers sample their reference tasks here and solver batches fill up from here. A buffer
rejects a task whose normalized program and input it already holds (the same function with other
comments or spacing on the same input is no new task), and past `capacity` drops its oldest
entries: the reference implementation keeps the oldest, which freezes the references a
proposer sees once the buffer is full."""

from __future__ import annotations

import ast
import numbers
from collections import OrderedDict
from dataclasses import asdict

import numpy as np

from ..tasks.values import parse_model_text
from .tasks import TASK_TYPES, InductionTask, Triplet

SEED_PROGRAM = "def f(a):\n    return a"
SEED_TRIPLET = Triplet(SEED_PROGRAM, "'Hello world'", "'Hello world'")
SEED_INDUCTION = InductionTask(
    SEED_PROGRAM, "The function gives back what it was given.",
    shown=(("'Hello world'", "'Hello world'"), ("[1, 2, 3]", "[1, 2, 3]")),
    hidden=(("42", "42"), ("{'a': (1, 2)}", "{'a': (1, 2)}")))


def normalized_program(source: str) -> str:
    """The program without comments and with canonical spacing (ast.unparse), or the stripped
    text when it does not parse."""
    try:
        return ast.unparse(parse_model_text(source))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return source.strip()


def task_key(item: Triplet | InductionTask) -> tuple[str, ...]:
    if isinstance(item, Triplet):
        return normalized_program(item.program), item.input
    return (normalized_program(item.program),) + tuple(i for i, _ in item.pairs)


class TaskBuffer:
    def __init__(self, seed: Triplet | InductionTask, capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, numbers.Integral) or capacity < 1:
            raise ValueError(f"a task buffer needs an integer capacity >= 1 (AZRConfig.buffer_capacity), "
                             f"got {capacity!r}")
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, ...], Triplet | InductionTask] = OrderedDict()
        self.add(seed)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, item: Triplet | InductionTask) -> bool:
        return task_key(item) in self._items

    def items(self) -> list[Triplet | InductionTask]:
        """Oldest first."""
        return list(self._items.values())

    def add(self, item: Triplet | InductionTask) -> bool:
        """Whether the item was new (a duplicate is not added)."""
        key = task_key(item)
        if key in self._items:
            return False
        self._items[key] = item
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return True

    def sample(self, count: int, rng: np.random.Generator, replace: bool = False) -> list[Triplet | InductionTask]:
        """count items drawn uniformly; without replacement at most len(self) come back."""
        _check_count(count)
        items = self.items()
        if not replace:
            count = min(count, len(items))
        picks = rng.choice(len(items), size=count, replace=replace) if count else []
        return [items[i] for i in picks]


def _check_count(count) -> None:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < 0:
        raise ValueError(f"a number of tasks to draw must be an integer >= 0, got {count!r}")


class TaskBuffers:
    """The three buffers. Induction proposals pick their program from the deduction and abduction
    buffers: any validated program can be the hidden function of an induction task."""

    def __init__(self, capacity: int):
        self.by_task = {"deduction": TaskBuffer(SEED_TRIPLET, capacity), "abduction": TaskBuffer(SEED_TRIPLET, capacity),
                        "induction": TaskBuffer(SEED_INDUCTION, capacity)}

    def __getitem__(self, task: str) -> TaskBuffer:
        return self.by_task[task]

    def snapshot(self) -> dict[str, list[Triplet | InductionTask]]:
        """Every buffer's tasks, oldest first: a cheap copy (tasks are immutable) that state() can
        encode later, after the buffers moved on."""
        return {t: self.by_task[t].items() for t in TASK_TYPES}

    @staticmethod
    def state(snapshot: dict[str, list[Triplet | InductionTask]]) -> dict[str, list[dict]]:
        """A snapshot as JSON-ready dicts (checkpoints)."""
        return {t: [asdict(item) for item in items] for t, items in snapshot.items()}

    def load_state(self, state: dict[str, list[dict]]) -> None:
        """Replace every buffer's tasks by a state(), in its order. Keys are recomputed as add()
        makes them, so deduplication continues exactly as before the checkpoint."""
        for task in TASK_TYPES:
            buffer = self.by_task[task]
            buffer._items.clear()
            for record in state[task]:
                if task == "induction":
                    record = {**record, "shown": tuple(map(tuple, record["shown"])),
                              "hidden": tuple(map(tuple, record["hidden"]))}
                    buffer.add(InductionTask(**record))
                else:
                    buffer.add(Triplet(**record))

    def sizes(self) -> dict[str, int]:
        return {t: len(self.by_task[t]) for t in TASK_TYPES}

    def programs(self, count: int, rng: np.random.Generator) -> list[str]:
        """count programs for induction proposals, uniformly over the deduction and abduction
        buffers' distinct programs (with replacement)."""
        _check_count(count)
        pool = list(dict.fromkeys(t.program for task in ("deduction", "abduction") for t in self.by_task[task].items()))
        return [pool[i] for i in rng.choice(len(pool), size=count)] if count else []
