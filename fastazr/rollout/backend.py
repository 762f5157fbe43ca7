"""The interface every rollout backend implements: the embedded engine (engine.py) and SGLang
(sglang_backend.py). The trainer talks to this and nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod

from .request import Completion, Request


class RolloutBackend(ABC):
    @abstractmethod
    def generate(self, requests: list[Request], progress=None) -> list[list[Completion]]:
        """Every request of a phase together (any mix of roles and task types); result i holds
        request i's n completions, in sample order.

        progress: None, or a callable progress(n) the backend calls as completion tokens come
        in, n the tokens since its last call; the calls sum to the completions' total length.
        A backend calls it per step or chunk of tokens, never per token of each sequence, so a
        progress bar costs nothing measurable. It must not change the results."""

    @abstractmethod
    def release_memory(self) -> None:
        """Give back the KV cache (and anything else only generation uses) so training can use
        the memory; generate() fails until resume_memory()."""

    @abstractmethod
    def resume_memory(self) -> None:
        """Re-create what release_memory() gave back, sized from the memory free now."""

    @abstractmethod
    def weights_updated(self) -> None:
        """The policy's parameters changed: nothing computed from the old ones may be reused."""

    def close(self) -> None:
        """Free what the backend holds outside this process (SGLang's scheduler processes). The
        embedded engine holds nothing there; its memory goes with the object."""
