"""The data-parallel update (fastazr.distributed) on 2 and 3 gloo processes against one process's
PolicyUpdate on all the rollouts: the same metrics, the same new weights, and the ZeRO-1 shards
reassembled equal to the unsharded optimizer's master weights and moments."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.multiprocessing as mp

from distributed_helpers import free_port, rank_env
from fastazr.distributed import DataParallelUpdate, DistributedConfig, World, update_shares
from fastazr.distributed.reducer import BucketLayout
from fastazr.update import PolicyUpdate, UpdateConfig
from test_update import CONFIG, make_rollouts, tiny_model

pytestmark = pytest.mark.slow

# fp32 on every side; what differs is the order of summation: each rank sums its own micro-batches'
# gradients, the reduce-scatter sums the ranks', and the norm adds the shards' squares. The
# tolerance is test_update's (fp32, order only), and a lost or doubled micro-batch moves the
# weights by ~1e-3 (lr), far outside it.
FP32_RTOL, FP32_ATOL = 1e-4, 1e-6
# Three mini-batches of 7 rollouts (2, 2 and 3): at 3 ranks one rank has nothing in two of them
# and must still join their reductions; a 60-token budget gives each rank several micro-batches.
UPDATE = dict(micro_batch_tokens=60, mini_batches=3, **CONFIG)
ROLLOUTS, UPDATES = 7, 2
BUCKET_MIB = 0.01
"""2,621 elements: the tiny model's gradients fall into 15 buckets."""
COMPARED = ("loss", "clip_fraction", "approx_kl", "mean_ratio", "entropy", "grad_norm", "steps", "skipped_steps",
            "loss_tokens", "tokens")
"""Every metric but micro_batches, which counts each rank's own packing."""


def rank_update(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, size, port))
    os.environ.pop("TRITON_INTERPRET", None)  # the torch kernels, on both sides of the comparison
    torch.set_num_threads(1)
    world = World.from_env()
    world.start(torch.device("cpu"), timeout_s=120)
    model = tiny_model("cpu")
    update = DataParallelUpdate(model, UpdateConfig(**UPDATE), world, DistributedConfig(bucket_mib=BUCKET_MIB))
    local, groups = update_shares(make_rollouts(ROLLOUTS), UPDATE["mini_batches"], rank, size)
    metrics, overlapped = [], []
    for _ in range(UPDATES):
        metrics.append(update(local, groups))
        overlapped.append(update.optimizer.reducer.overlapped)
        # the generation phase between updates: the shard and both gradient buffers leave and come back
        update.optimizer.offload()
        assert all(t.untyped_storage().nbytes() == 0 for t in update.optimizer._state_tensors()
                   + update.optimizer._gradients())
        update.optimizer.onload()
    torch.save({"metrics": metrics, "groups": [len(g) for g in groups], "overlapped": overlapped,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
                "optimizer": update.state_dict()}, f"{out}/rank{rank}.pt")
    world.close()


def rank_close(rank: int, size: int, port: int, out: str) -> None:
    os.environ.update(rank_env(rank, size, port))
    world = World.from_env()
    world.start(torch.device("cpu"), timeout_s=60)
    if rank == 1:
        time.sleep(0.5)  # the last rank to get there
        world.store.set("closing", "1")
    world.close()
    if rank == 0:
        # rank 0 hosts the store and outlives the group: it may still read it
        with open(f"{out}/rank0", "w") as f:
            f.write(str(world.store.check(["closing"])))


def test_close_returns_only_once_every_rank_has_got_there(tmp_path):
    """World.close() ends with every rank's collectives done everywhere before any rank tears its
    connections down (a rank that left early aborted a peer once on CI): rank 0's close must not
    return before rank 1, half a second later, reaches its own."""
    mp.start_processes(rank_close, args=(2, free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    assert (tmp_path / "rank0").read_text() == "True"


def single_process(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_model("cpu")
    update = PolicyUpdate(model, UpdateConfig(**UPDATE))
    metrics = [update(make_rollouts(ROLLOUTS)) for _ in range(UPDATES)]
    return model, update, metrics


def by_name(update: PolicyUpdate) -> dict[str, dict[str, torch.Tensor]]:
    """MasterOptimizer's master and moments, per parameter name."""
    opt = update.optimizer
    moments = {key: torch.cat([s[key] for s in opt._adam()]) for key in ("exp_avg", "exp_avg_sq")}
    flats = {"master": opt.master, **moments}
    return {key: dict(zip(opt.names, opt._views(flat))) for key, flat in flats.items()}


def reassembled(states: list[dict], model: torch.nn.Module, size: int) -> dict[str, dict[str, torch.Tensor]]:
    """The ranks' shards put back together, per parameter name."""
    params = [p for p in model.parameters()]
    layout = BucketLayout(params, size, DistributedConfig(bucket_mib=BUCKET_MIB).bucket_elements)
    out = {}
    for key in ("master", "exp_avg", "exp_avg_sq"):
        flat = torch.zeros(layout.total)
        for rank, state in enumerate(states):
            shard = state[key] if key == "master" else state[key][0]
            for b in layout.buckets:
                flat[b.start + rank * b.chunk:b.start + (rank + 1) * b.chunk] = shard[b.shard_start:b.shard_start
                                                                                     + b.chunk]
        out[key] = {name: flat[s:s + p.numel()].view_as(p)
                    for (name, p), s in zip(model.named_parameters(), layout.starts)}
    return out


@pytest.mark.parametrize("size", [2, 3])
def test_data_parallel_update_equals_one_process_on_all_rollouts(size, tmp_path, monkeypatch):
    mp.start_processes(rank_update, args=(size, free_port(), str(tmp_path)), nprocs=size, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(size)]
    model, update, want = single_process(monkeypatch)
    if size == 3:
        assert any(0 in rank["groups"] for rank in ranks), "a rank without rollouts in a mini-batch"
    for rank in ranks:
        for got, expected in zip(rank["metrics"], want):
            for key in COMPARED:
                assert got[key] == pytest.approx(expected[key], rel=FP32_RTOL, abs=FP32_ATOL), key
        for name, p in model.named_parameters():
            torch.testing.assert_close(rank["weights"][name], p.detach(), rtol=FP32_RTOL, atol=FP32_ATOL, msg=name)
            assert torch.equal(rank["weights"][name], ranks[0]["weights"][name]), "ranks hold different weights"
    # the buckets' reduce-scatters start inside the backward on ranks that have micro-batches
    assert all(n > 0 for n in ranks[0]["overlapped"])
    # ZeRO-1: each rank keeps 1/G of the state, and the shards are the unsharded optimizer's
    shards = [rank["optimizer"]["master"].numel() for rank in ranks]
    assert len(set(shards)) == 1 and shards[0] * size < 1.1 * update.optimizer.master.numel()
    got, expected = reassembled([r["optimizer"] for r in ranks], model, size), by_name(update)
    for key in expected:
        for name, tensor in expected[key].items():
            torch.testing.assert_close(got[key][name], tensor, rtol=FP32_RTOL, atol=FP32_ATOL, msg=f"{key} {name}")


@pytest.mark.gpu
def test_the_sharded_update_on_cuda_with_one_nccl_rank(tmp_path):
    """What only CUDA runs of the data-parallel update: NCCL's reduce-scatter and all-gather, the
    hooks on the autograd device thread, fused AdamW on shard views, bf16 rounding of the
    gathered shard, offloading the shard. One rank (no multi-GPU machine here): it must equal
    PolicyUpdate, the fp32 master to fp32 order and the bf16 weights (rounded from it) mostly
    bit for bit."""
    import torch.distributed as dist

    from fastazr.model import Decoder
    from test_update import TINY

    dist.init_process_group("nccl", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    try:
        models = []
        for _ in range(2):
            model = Decoder(TINY, device="cuda", dtype=torch.bfloat16)
            model.init_weights(0)
            models.append(model)
        world = World()
        world.device = torch.device("cuda", 0)
        sharded = DataParallelUpdate(models[0], UpdateConfig(**UPDATE), world, DistributedConfig(bucket_mib=BUCKET_MIB))
        whole = PolicyUpdate(models[1], UpdateConfig(**UPDATE))
        rollouts = make_rollouts(ROLLOUTS)
        local, groups = update_shares(rollouts, UPDATE["mini_batches"], 0, 1)
        for _ in range(UPDATES):
            got, want = sharded(local, groups), whole(rollouts)
            for key in COMPARED:
                assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-5), key
            assert sharded.optimizer.reducer.overlapped > 0
            sharded.optimizer.offload()
            sharded.optimizer.onload()
        masters = reassembled([sharded.state_dict()], models[0], 1)["master"]
        for name, tensor in by_name(whole)["master"].items():
            torch.testing.assert_close(masters[name].cpu(), tensor.cpu(), rtol=FP32_RTOL, atol=FP32_ATOL, msg=name)
        same = sum(int(torch.equal(p, q)) for p, q in zip(models[0].parameters(), models[1].parameters()))
        assert same >= len(list(models[1].parameters())) - 2, "bf16 weights rounded from equal masters"
    finally:
        dist.destroy_process_group()
