"""Type and range checks for the engine's inputs (SamplingParams, Request, EngineConfig, Engine).
A bad value fails where it is given, with the field's name and what to change, instead of
corrupting generation later: a negative token id would read as the placeholder of another
sequence's token (engine.py), a str prompt as its characters, a float as its truncation, a bool
as 0 or 1."""

from __future__ import annotations

import dataclasses
import math
import numbers
from array import array
from typing import Any


def _kind(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def integer(field: str, value: Any, low: int, high: int | None = None, hint: str = "") -> int:
    """value as an int in [low, high]. bool and float (even 2.0) are refused: they are not counts
    or ids, and a float would be truncated."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{field} must be an int, got {_kind(value)}{hint}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{field} must be {bounds}, got {value}{hint}")
    return value


def real(field: str, value: Any) -> float:
    """value as a finite float (ints allowed); the caller checks the range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{field} must be a number, got {_kind(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{field} must be a finite number, got {value}")
    return value


def flag(field: str, value: Any) -> bool:
    """A bool: "no" or 0 would otherwise pass as true or false by their truthiness."""
    if not isinstance(value, bool):
        raise TypeError(f"{field} must be True or False, got {_kind(value)}")
    return value


def token_ids(field: str, value: Any) -> list[int]:
    """Non-negative int token ids from a list, tuple, range, or 1-D integer tensor or array. A str
    is refused (its characters are not token ids: encode it with the tokenizer); the model's
    vocabulary bound is checked by the engine, which knows the model."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{field} must be token ids, got a {type(value).__name__}: encode text with the tokenizer")
    if hasattr(value, "ndim") and hasattr(value, "tolist"):  # torch tensor or numpy array
        if value.ndim != 1:
            raise ValueError(f"{field} must be 1-D, got shape {tuple(value.shape)}")
        value = value.tolist()
    try:
        values = list(value)
    except TypeError:
        raise TypeError(f"{field} must be a list of token ids, got {_kind(value)}") from None
    try:
        ids = array("q", values)  # C speed for long prompts; refuses floats, str and overflow
        if bool in map(type, values):  # but takes True and False as 1 and 0
            raise TypeError
    except (TypeError, OverflowError):
        for i, v in enumerate(values):  # name the first bad one
            integer(f"{field}[{i}]", v, 0, 2 ** 63 - 1)
        raise
    if ids and min(ids) < 0:
        i = next(i for i, t in enumerate(ids) if t < 0)
        raise ValueError(f"{field}[{i}] is {ids[i]}: token ids must be >= 0")
    return ids.tolist()


def within_positions(option: str, length: int | None, positions: int) -> None:
    """A context-length option at most the model's max_position_embeddings: the model has no
    trained positions past it."""
    if length is not None and length > positions:
        raise ValueError(f"{option} is {length}, past the model's {positions} positions (max_position_embeddings): "
                         f"set it to at most {positions}, or None for all of them")


def config_and_seed(owner: str, config, kind: type, seed):
    """A rollout backend's config (default kind()) and seed (None: the OS draws one), checked. The
    backend keeps its own copy, rebuilt through __post_init__: a field set on the caller's object
    after it was built is checked here, and a field set after this call cannot reach the backend
    unchecked."""
    if config is not None and not isinstance(config, kind):
        raise TypeError(f"{owner}'s config must be an {kind.__name__}, got {type(config).__name__}")
    if seed is not None:
        seed = integer(f"{owner}'s seed", seed, 0, hint=" (or None to draw one from the OS)")
    return (kind() if config is None else dataclasses.replace(config)), seed
