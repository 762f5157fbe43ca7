"""Rollout generation: the RolloutBackend interface, the embedded engine that implements it on the
trainer's own parameters (paged KV cache, continuous batching, chunked prefill, prefix sharing,
on-device sampling), and SGLang's offline engine behind the same interface (sglang_backend.py)."""

from .backend import RolloutBackend
from .config import EngineConfig
from .engine import Engine
from .request import FINISH_REASONS, Completion, Request, SamplingParams
from .sglang_backend import SGLangBackend
from .sglang_config import SGLangConfig

__all__ = ["FINISH_REASONS", "Completion", "Engine", "EngineConfig", "Request", "RolloutBackend", "SGLangBackend",
           "SGLangConfig", "SamplingParams"]
