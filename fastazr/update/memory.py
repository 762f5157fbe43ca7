"""The GPU's memory taking turns, in one place: while the engine generates, its KV cache holds the
memory and the optimizer state is in pinned host memory (or stays, when it fits); while the
policy trains, the KV cache is gone and the state is back.

    update = PolicyUpdate(model, config)         # first: its fp32 master and gradients exist
    engine = Engine(model, tokenizer)            # then the KV cache takes what is left
    memory = ColocatedMemory(engine, update.optimizer, config, telemetry)   # state out, cache re-sized
    completions = engine.generate(requests)     # generation phase
    memory.to_training()                         # KV cache released, state copied back (async)
    metrics = update(rollouts)                   # trains; the first step waits for the state
    memory.to_generation()                       # state offloaded, KV cache re-created

Gradients are zero between steps, so they are freed in generation either way. The bf16
parameters never move: the engine reads them in place, and the optimizer step writes
them in place."""

from __future__ import annotations

import gc

import torch

from fastazr.rollout.backend import RolloutBackend

from .config import UpdateConfig
from .optimizer import MasterOptimizer
from .telemetry import Telemetry


def offloads(optimizer: MasterOptimizer, config: UpdateConfig) -> bool:
    """Whether the optimizer state leaves the GPU while generating (UpdateConfig.optimizer_offload)."""
    if config.optimizer_offload != "auto":
        return config.optimizer_offload == "cpu"
    if optimizer.device.type != "cuda":
        return False
    total = torch.cuda.get_device_properties(optimizer.device).total_memory
    return optimizer.resident_bytes > config.resident_state_fraction * total


class ColocatedMemory:
    def __init__(self, engine: RolloutBackend, optimizer: MasterOptimizer, config: UpdateConfig,
                 telemetry: Telemetry | None = None):
        self.engine, self.optimizer = engine, optimizer
        self.offload = offloads(optimizer, config)
        self.telemetry = telemetry or Telemetry(optimizer.device)
        self.phase = "training"
        # the engine's KV cache was sized before the state left: release it and size it again
        self.engine.release_memory()
        self.to_generation()

    def _empty_cache(self) -> None:
        # Freed blocks go back to the driver: the KV cache is sized from the driver's free memory,
        # and one tenant's cached blocks would otherwise shrink the other's share.
        gc.collect()
        if self.optimizer.device.type == "cuda":
            torch.cuda.empty_cache()

    def to_training(self) -> None:
        if self.phase == "training":
            return
        with self.telemetry.phase("release_kv"):
            self.engine.release_memory()  # collects garbage and empties torch's cache itself
        # the copies run on a side stream and the first optimizer step waits for them: the phase
        # times only their queueing, so that they overlap the first micro-batches
        with self.telemetry.phase("swap_in_issue", sync=False):
            self.optimizer.onload()
        self.phase = "training"

    def to_generation(self) -> None:
        if self.phase == "generation":
            return
        with self.telemetry.phase("swap_out"):
            self.optimizer.offload(state=self.offload)
        with self.telemetry.phase("create_kv"):
            self._empty_cache()  # the training's cached blocks: the KV cache is sized from what is free
            self.engine.resume_memory()
            self.engine.weights_updated()
        self.phase = "generation"
