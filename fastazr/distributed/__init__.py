"""Data-parallel self-play over many GPUs and nodes (`torchrun ... -m fastazr.train`): the process
group and its failures (world.py, failures.py), the cores of a node divided among its ranks
(cores.py), who does which part of a step (split.py), what the ranks gather and compare
(gather.py), the bucketed gradient reduce-scatter (reducer.py), the ZeRO-1 optimizer (zero.py)
and the update built from them (update.py), each rank's checkpoint shard (shards.py). A single
process uses none of it. docs/distributed.md has the design and the scaling model."""

from .config import DistributedConfig
from .split import shares, update_shares
from .update import DataParallelUpdate
from .world import World

__all__ = ["DataParallelUpdate", "DistributedConfig", "World", "shares", "update_shares"]
