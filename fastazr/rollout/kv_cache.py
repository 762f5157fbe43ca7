"""The paged KV cache: one key and one value tensor [layers, blocks, block_size, kv_heads,
head_dim] in the model's dtype, sized from the memory there is when it is created.

One block more than `num_blocks` exists: the scratch block, never handed out, where the padding
rows of a CUDA-graph batch write their keys and values."""

from __future__ import annotations

import torch

from fastazr.model import Decoder

from .config import EngineConfig

CPU_DEFAULT_BYTES = 256 << 20


class KVCache:
    def __init__(self, model: Decoder, config: EngineConfig):
        c = model.config
        per_block = 2 * c.num_layers * config.block_size * c.num_kv_heads * c.head_dim * model.dtype.itemsize
        if config.kv_cache_bytes is not None:
            budget = config.kv_cache_bytes
        elif model.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(model.device)
            budget = int(free * config.kv_memory_fraction)
        else:
            budget = CPU_DEFAULT_BYTES
        self.num_blocks = budget // per_block - 1  # the scratch block comes out of the budget
        if self.num_blocks < 2:
            raise MemoryError(f"the KV cache gets {budget / 2**20:.0f} MiB, under two blocks of {per_block} bytes: "
                              "free GPU memory or raise EngineConfig.kv_memory_fraction / kv_cache_bytes")
        self.block_size = config.block_size
        self.scratch_slot = self.num_blocks * config.block_size
        shape = (c.num_layers, self.num_blocks + 1, config.block_size, c.num_kv_heads, c.head_dim)
        # zeros on CPU: its batched decode attention (cpu_attention.py) reads the slots past each
        # row's context with probability 0, and 0 x NaN from uninitialized memory would be NaN
        # (the default 256 MiB: ~0.06 s a resume_memory())
        make = torch.empty if model.device.type == "cuda" else torch.zeros
        try:
            self.k = make(shape, device=model.device, dtype=model.dtype)
            self.v = make(shape, device=model.device, dtype=model.dtype)
        except torch.OutOfMemoryError as exc:
            self.k = self.v = None
            raise torch.OutOfMemoryError(
                f"the KV cache ({budget / 2**30:.2f} GiB: EngineConfig.kv_memory_fraction x the free memory, or "
                "kv_cache_bytes) could not be allocated: lower kv_memory_fraction (--engine.kv-memory-fraction) "
                f"or set kv_cache_bytes ({str(exc).splitlines()[0]})") from exc

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()
