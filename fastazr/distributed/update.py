"""The policy update of one rank of a data-parallel run: PolicyUpdate on this rank's share of each
mini-batch, with the ZeRO-1 optimizer, and the counts and sums that must be global.

    update = DataParallelUpdate(model, UpdateConfig(...), world, DistributedConfig())
    local, groups = update_shares(rollouts, update.config.mini_batches, world)   # split.py
    metrics = update(local, groups)    # every rank: the same metrics and the same new weights

What makes G ranks compute one process's update on all the rollouts:
- each mini-batch's loss is divided by its loss tokens over every rank (one all-reduce of G
  counts before training), so the gradients summed over ranks are the whole batch's;
- a mini-batch with no loss token on any rank is skipped on every rank, and one with none on
  this rank still takes its step here (its zero gradients join the reduction);
- the metric sums (loss, clip fraction, ...) are summed over ranks, so every rank returns the
  whole update's metrics; tokens and micro_batches count every rank's too (micro_batches then
  differs from one process's: each rank packs its own share).
Equal up to fp32 summation order (tests/test_distributed_update.py)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from fastazr.update import PolicyUpdate, UpdateConfig

from .config import DistributedConfig
from .world import World
from .zero import ShardedOptimizer


class DataParallelUpdate(PolicyUpdate):
    def __init__(self, model: nn.Module, config: UpdateConfig, world: World, options: DistributedConfig):
        super().__init__(model, config, ShardedOptimizer(model, config, world, options.bucket_elements))
        self.world = world

    def _total(self, counts: list[int]) -> list[int]:
        return [int(n) for n in self.world.sum(counts)]

    def _sum(self, sums: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(sums)
        return sums

    def _backward(self, loss: torch.Tensor, last: bool) -> None:
        # the reducer's hooks add every gradient into the flat buffer as the backward makes it
        # (so no accumulate() after it); in the mini-batch's last backward they also start the
        # buckets' reduce-scatters
        if last:
            self.optimizer.reducer.arm()
        loss.backward()
