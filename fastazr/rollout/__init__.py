"""Rollout generation: the RolloutBackend interface and the embedded engine that implements it
on the trainer's own parameters (paged KV cache, continuous batching, chunked prefill, prefix
sharing, on-device sampling)."""

from .backend import RolloutBackend
from .config import EngineConfig
from .engine import Engine
from .request import FINISH_REASONS, Completion, Request, SamplingParams

__all__ = ["FINISH_REASONS", "Completion", "Engine", "EngineConfig", "Request", "RolloutBackend", "SamplingParams"]
