"""Which rank does what: the division of a step's work among the ranks.

Every rank builds the same global lists (the step's prompts from identical buffers and seeds of
(seed, step, purpose); the rollouts from the gathered samples) and takes its share by index:
nothing is sent to say who does what. Which samples exist and their seeds depend on their global
index only, never on the rank or the world size, so G ranks generate the requests one process
would (docs/distributed.md says where the results can still differ)."""

from __future__ import annotations

import heapq

from fastazr.update import Rollout
from fastazr.update.policy_update import split_mini_batches


def shares(weights: list[float], size: int) -> list[list[int]]:
    """Indices of `weights` dealt to `size` ranks: heaviest first, each to the least loaded rank
    (ties: the lower rank; equal weights go round-robin); each rank's indices ascending. No rank
    ends more than the heaviest item above another."""
    out: list[list[int]] = [[] for _ in range(size)]
    loads = [(0.0, rank) for rank in range(size)]
    for i in sorted(range(len(weights)), key=lambda i: (-weights[i], i)):
        load, rank = heapq.heappop(loads)
        out[rank].append(i)
        heapq.heappush(loads, (load + weights[i], rank))
    return [sorted(indices) for indices in out]


def update_shares(rollouts: list[Rollout], mini_batches: int, rank: int, size: int
                  ) -> tuple[list[Rollout], list[range]]:
    """This rank's rollouts of each of the update's mini-batches (the contiguous groups one
    process makes of the whole list), balanced by tokens (a micro-batch's forward and backward
    cost about its tokens), and where each mini-batch's share sits in the returned list."""
    local: list[Rollout] = []
    groups: list[range] = []
    for group in split_mini_batches(len(rollouts), mini_batches):
        mine = shares([rollouts[i].num_tokens for i in group], size)[rank]
        groups.append(range(len(local), len(local) + len(mine)))
        local.extend(rollouts[group[j]] for j in mine)
    return local, groups
