"""The node's CPU cores divided among its local ranks, so that G ranks' sandboxes and torch thread
pools never share a core (oversubscribed, torch's CPU threads slow several-fold and the sandbox's
per-job timeouts start to fire on waits, not work).

Rank i of L on a node takes the i-th of L contiguous, near-equal blocks of the cores the
launcher gave the process (its affinity mask): a block is a run of neighbouring core ids, which
on most machines share caches and a NUMA node. The sandbox then starts one pinned worker per core
of the block (SandboxConfig.workers defaults to the affinity's size) and torch runs that many
threads."""

from __future__ import annotations

import os

import torch


def local_cores(local_rank: int, local_size: int, available: list[int]) -> list[int]:
    """The block of `available` cores that local rank `local_rank` of `local_size` takes."""
    if len(available) < local_size:
        raise ValueError(f"{local_size} ranks on this node but only {len(available)} cores ({available}) for them: "
                         f"each rank needs a core of its own; launch at most {len(available)} processes per node "
                         "(torchrun --nproc-per-node)")
    cores = sorted(available)
    start, stop = (len(cores) * i // local_size for i in (local_rank, local_rank + 1))
    return cores[start:stop]


def pin_local_cores(local_rank: int, local_size: int) -> list[int]:
    """Restrict this process (and every process and thread it starts later) to its block of the
    node's cores and size torch's thread pool to it; returns the block. Alone on a node, nothing
    changes."""
    available = sorted(os.sched_getaffinity(0))
    if local_size == 1:
        return available
    mine = local_cores(local_rank, local_size, available)
    os.sched_setaffinity(0, mine)
    torch.set_num_threads(len(mine))
    return mine
