"""fastazr.distributed without processes: one process never touches torch.distributed, the division
of work and of cores, the gradient buckets' layout, the gathering of samples in prompt order, the
buffers' digest check, the aggregation of the ranks' timings, and the options."""

from __future__ import annotations

import pytest
import torch

from fastazr.azr.buffers import TaskBuffers
from fastazr.azr.selfplay import Prompt
from fastazr.azr.tasks import Sample
from fastazr.distributed import DistributedConfig, World, shares
from fastazr.distributed.cores import local_cores
from fastazr.distributed.failures import Failures, deliberate
from fastazr.distributed.gather import aggregate_timings, check_buffers, gather_samples
from fastazr.distributed.reducer import ALIGN, BucketLayout
from fastazr.distributed.shards import refusal
from fastazr.options import parse_args
from test_update import tiny_model


def test_one_process_never_creates_a_process_group(monkeypatch):
    """Without torchrun's environment the trainer runs today's single-process path: no rendezvous,
    no process group, no watcher thread, and every collective hands back its input."""
    def refuse(*args, **kwargs):
        raise AssertionError("a single process created a process group")

    monkeypatch.setattr(torch.distributed, "init_process_group", refuse)
    monkeypatch.setattr(torch.distributed, "rendezvous", refuse)
    world = World.from_env({"PATH": "/bin"})
    assert (world.rank, world.size, world.leader) == (0, 1, True)
    world.start(torch.device("cpu"), timeout_s=5)
    with Failures(world) as failures:
        assert failures._thread is None
        assert world.all_gather_object("x") == ["x"] and world.sum([2, 3]) == [2, 3]
        assert world.any(True) and world.max(7) == 7
        world.broadcast_parameters(tiny_model("cpu"))
    world.close()
    assert not torch.distributed.is_initialized()


def test_torchrun_environment_is_read_and_a_partial_one_refused():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}
    world = World.from_env(env)
    assert (world.rank, world.size, world.local_rank, world.local_size, world.leader) == (3, 8, 1, 2, False)
    with pytest.raises(ValueError, match="LOCAL_RANK, LOCAL_WORLD_SIZE is not: launch with torchrun"):
        World.from_env({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="no place in a world"):
        World(rank=2, size=2)


def test_shares_cover_every_index_once_and_balance_the_load():
    weights = [1, 8, 1, 1, 8, 1, 1, 1, 1]  # two prompts with 8 learnability rollouts, seven single ones
    parts = shares(weights, 3)
    assert sorted(i for part in parts for i in part) == list(range(len(weights)))
    loads = [sum(weights[i] for i in part) for part in parts]
    assert max(loads) - min(loads) <= max(weights)
    assert shares([1] * 5, 2) == [[0, 2, 4], [1, 3]]  # equal weights: round-robin
    assert shares([1] * 2, 3) == [[0], [1], []]  # more ranks than items: some get none
    assert shares([2, 1], 1) == [[0, 1]]  # alone: everything, in order


def test_local_cores_divide_the_node_without_oversubscription():
    cores = list(range(16))
    blocks = [local_cores(r, 3, cores) for r in range(3)]
    assert blocks == [list(range(0, 5)), list(range(5, 10)), list(range(10, 16))]
    with pytest.raises(ValueError, match="3 ranks on this node but only 2 cores"):
        local_cores(0, 3, [0, 1])


@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_bucket_layout_splits_every_bucket_into_equal_chunks(size):
    params = [p for p in tiny_model("cpu").parameters()]
    layout = BucketLayout(params, size, bucket_elements=3000)
    assert len(layout.buckets) > 3
    assert layout.total == size * layout.shard_size
    taken = torch.zeros(layout.total, dtype=torch.int32)
    for i, p in enumerate(params):
        taken[layout.starts[i]:layout.starts[i] + p.numel()] += 1
    assert int(taken.max()) == 1 and int(taken.sum()) == sum(p.numel() for p in params)
    for b in layout.buckets:
        assert b.size % (ALIGN * size) == 0 and b.chunk * size == b.size
        matrices = [i for i in b.params if params[i].dim() >= 2]
        assert list(b.params[:len(matrices)]) == matrices, "matrices first: one decayed range a bucket"
        # the last layers first: the backward's order
        assert b.params == tuple(sorted(b.params, key=lambda i: (params[i].dim() < 2, -i)))
    decays = 0
    for rank in range(size):
        decayed, rest = layout.decay_ranges(rank)
        assert sum(z - a for a, z in decayed + rest) == layout.shard_size
        decays += sum(z - a for a, z in decayed)
    assert decays == sum(p.numel() for p in params if p.dim() >= 2), "weight decay on the matrices, all of them"


class Gathering(World):
    """A world of 2 whose all-gather hands back what the other rank is scripted to send."""

    def __init__(self, other):
        super().__init__(rank=0, size=2)
        self.other = other

    def all_gather_object(self, obj) -> list:
        return [obj, self.other]


def sample(name: str) -> Sample:
    return Sample("deduction", "solve", [9, 9], [1], [0.0], name, "stop")


def test_gathered_samples_come_back_in_prompt_order_with_their_prompts():
    prompts = [Prompt("deduction", "solve", [k, k], None, n=n) for k, n in enumerate([1, 2, 1])]
    mine = [sample("p0"), sample("p2")]
    theirs = ([1], [sample("p1a"), sample("p1b")])
    got = gather_samples(Gathering(theirs), mine, [0, 2], prompts)
    assert [s.text for s in got] == ["p0", "p1a", "p1b", "p2"]
    assert [s.prompt_ids for s in got] == [[0, 0], [1, 1], [1, 1], [2, 2]]
    alone = gather_samples(World(), mine, [0, 2], prompts)
    assert alone is mine


def test_task_buffers_that_differ_between_ranks_stop_the_run():
    buffers = TaskBuffers(10)
    with pytest.raises(RuntimeError, match=r"after step 3 the task buffers of rank\(s\) \[1\] differ"):
        check_buffers(Gathering("another digest"), buffers, 3)
    check_buffers(World(), buffers, 3)


def test_timings_show_the_slowest_rank_and_the_mean():
    ranks = [{"time/train": 1.0, "time/generate_propose": 2.0, "time/generate_solve": 2.0, "swap/create_kv_s": 0.5,
              "tokens/generate_propose": 100, "tokens/generate_solve": 300, "tokens_per_s": 100.0,
              "gpu_memory_gib": 3.0, "host_memory_gib": 1.0},
             {"time/train": 3.0, "time/generate_propose": 1.0, "time/generate_solve": 1.0, "swap/create_kv_s": 0.1,
              "tokens/generate_propose": 100, "tokens/generate_solve": 300, "tokens_per_s": 200.0,
              "gpu_memory_gib": 5.0, "host_memory_gib": 0.5}]
    got = aggregate_timings(ranks)
    assert got["time/train"] == 3.0 and got["time_mean/train"] == 2.0
    assert got["swap/create_kv_s"] == 0.5 and got["swap_mean/create_kv_s"] == pytest.approx(0.3)
    assert got["gpu_memory_gib"] == 5.0 and got["host_memory_gib"] == 1.0
    assert got["tokens_per_s"] == 100.0  # 400 tokens over the slowest rank's 4 s of generation


def test_options_of_a_data_parallel_run():
    config = parse_args(["--distributed.bucket-mib", "1", "--distributed.check-buffers", "true"], cuda_available=False)
    assert config.distributed.bucket_elements == 2**18 and config.distributed.check_buffers
    assert DistributedConfig().timeout_s == 1800  # bad values: tests/test_train.py's option checks


def test_exits_that_are_no_failure_and_the_refusal_to_reshard(tmp_path):
    assert deliberate(None) and deliberate(SystemExit(130)) and not deliberate(SystemExit("fastazr: out of memory"))
    assert not deliberate(RuntimeError("x"))
    text = refusal(tmp_path, 4, 2)
    assert "written by 4 ranks and this run has 2 ranks" in text and "resume it on 4 ranks" in text
    assert "without torchrun" in refusal(tmp_path, 1, 2)
