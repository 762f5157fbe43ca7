"""World: this process's place in a data-parallel run, its process group, and the few small
collectives the self-play step needs. The engine is PyTorch's own: torchrun launches the
processes and sets their environment, torch.distributed connects them (NCCL between GPUs, gloo
between CPU processes).

    world = World.from_env()                  # torchrun's RANK, WORLD_SIZE, LOCAL_RANK, ...
    world.start(torch.device("cuda", world.local_rank), timeout_s=1800)
    everyone = world.all_gather_object(mine)  # a list, one entry per rank
    world.close()

Without torchrun's environment (or with one process), World() is rank 0 of 1: start() creates
no process group and every collective returns its input, so a single process runs exactly the
code it ran before data parallelism existed."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
"""What torchrun sets for each process (with MASTER_ADDR and MASTER_PORT, read by the rendezvous)."""


class World:
    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1):
        if not 0 <= rank < size or not 0 <= local_rank < local_size <= size:
            raise ValueError(f"rank {rank} of {size} (local {local_rank} of {local_size}) is no place in a world: "
                             "launch with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE")
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.device = torch.device("cpu")
        """Where collectives' tensors live: this rank's GPU under NCCL, the CPU under gloo."""
        self.store: dist.Store | None = None
        """The rendezvous's key-value store, under the prefix 'fastazr/' (failures use it)."""

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "World":
        environ = os.environ if environ is None else environ
        if "WORLD_SIZE" not in environ:
            return cls()
        missing = [name for name in ENV if name not in environ]
        if missing:
            raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun "
                             "(torchrun --nproc-per-node G -m fastazr.train ...), which sets all of "
                             f"{', '.join(ENV)}")
        try:
            values = [int(environ[name]) for name in ENV]
        except ValueError:
            raise ValueError(f"{', '.join(f'{n}={environ[n]!r}' for n in ENV)}: each must be an integer") from None
        return cls(*values)

    @property
    def leader(self) -> bool:
        """Rank 0: the one that logs, writes metrics and samples, and builds checkpoints."""
        return self.rank == 0

    def start(self, device: torch.device, timeout_s: float) -> None:
        """Join the process group (nothing to join alone). Every collective, and every wait on
        the store, fails after timeout_s instead of hanging."""
        if self.size == 1:
            return
        timeout = timedelta(seconds=timeout_s)
        # The store the rendezvous returns is torchrun's own (hosted by its agent, so it outlives
        # any worker), or rank 0's without torchrun. Keys of the process group and of this
        # package live under separate prefixes.
        store, _, _ = next(dist.rendezvous("env://", self.rank, self.size, timeout=timeout))
        store.set_timeout(timeout)
        self.store = dist.PrefixStore("fastazr", store)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device if device.type == "cuda" else torch.device("cpu")
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.PrefixStore("pg", store),
                                rank=self.rank, world_size=self.size, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)

    def close(self) -> None:
        """Leave the process group at a normal end (after a failure, leave it to the process's
        exit: a peer may never reach the barrier). The barrier makes every rank wait until all
        have issued and finished their last collective before any tears its connections down:
        gloo finishes a collective on a rank once that rank holds its result, while its peers may
        still be exchanging with it. Without it CI once saw a rank of the 3-process update test
        abort (SIGABRT, "terminate called without an active exception") while its peers ran on."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    # collectives: the identity alone

    def all_gather_object(self, obj) -> list:
        """Every rank's obj, in rank order (pickled: for tasks, samples and timings, not tensors)."""
        if self.size == 1:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def sum(self, values: list[float], dtype: torch.dtype = torch.float64) -> list[float]:
        """The elementwise sum over ranks (float64 by default: exact for counts up to 2**53)."""
        if self.size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=dtype, device=self.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def any(self, flag: bool) -> bool:
        """Whether flag is set on some rank: every rank takes the same branch after it."""
        return bool(self.max(int(flag)))

    def max(self, value: int) -> int:
        """The largest of the ranks' values."""
        if self.size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor.item())

    def broadcast_parameters(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters into every rank's: the ranks start from the same bits whatever
        each one's loader or random init did (ZeRO-1's all-gather keeps them equal after)."""
        if self.size == 1:
            return
        with torch.no_grad():
            for p in module.parameters():
                dist.broadcast(p.data, src=0)
