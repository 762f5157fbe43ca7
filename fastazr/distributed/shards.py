"""Checkpoints of a data-parallel run: one model copy, and each rank's ZeRO-1 optimizer shard.

    OUT/checkpoints/step_00000042/
        model/                                      rank 0's parameters (every rank holds the same)
        optimizer.rank00000-of-00002.safetensors    rank 0's fp32 master and moments shard
        optimizer.rank00001-of-00002.safetensors    rank 1's
        state.json                                  step, buffers, rank 0's RNG states, world_size
        manifest.json                               every file's size and CRC-32, written last

Rank 0 builds the directory as one process does (fastazr/runlog/checkpoint.py: hidden, summed,
fsynced, renamed into place) and writes the model, its shard and state.json; every other rank
writes its shard beside it (OUT/checkpoints/.step_<n>.shards/) and tells rank 0 through the
rendezvous store, with the file's size and CRC-32 (or its error); rank 0 moves the shards in,
and tells every rank whether the checkpoint exists. All of it runs on each rank's background
writer thread, as one process's checkpoint does, with no collective (those belong to the
training thread): a rank's wait() returns once the whole checkpoint is on disk or has failed.
The run directory must be on a filesystem every node sees (for resume as well).

A shard holds its layout (world size, buckets) in its metadata, and resuming on another world
size is refused with what to change: resharding the moments to other buckets is not done."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open

from fastazr.azr.buffers import TaskBuffers
from fastazr.model import save_hf
from fastazr.model.safetensors_stream import write_safetensors
from fastazr.runlog.checkpoint import CheckpointError
from fastazr.runlog.run_state import Boundary, Checkpointer

from .world import World

TENSORS = ("master", "exp_avg", "exp_avg_sq")


def shard_name(rank: int, size: int) -> str:
    return f"optimizer.rank{rank:05d}-of-{size:05d}.safetensors"


def saved_world_size(directory: Path) -> int:
    """The world size a checkpoint was written by (1: one process)."""
    return json.loads((directory / "state.json").read_text()).get("world_size", 1)


class ShardedCheckpointer(Checkpointer):
    def __init__(self, out: Path, keep: int, world: World):
        super().__init__(out, keep)
        self.world = world
        self._attempt = 0
        """Saves so far: every rank calls save() at the same points, so it names the same save everywhere."""

    def _key(self, what: str) -> str:
        return f"checkpoint/{self._attempt}/{what}"

    def save(self, trainer, at: Boundary, background: bool = True) -> None:
        self.wait()
        if at.step == self.saved_step:
            return
        self._attempt += 1
        optimizer = trainer.update.state_dict(copy=False)
        meta = json.dumps({k: v for k, v in optimizer.items() if k not in TENSORS})
        tensors = {"master": optimizer["master"], "exp_avg": optimizer["exp_avg"][0],
                   "exp_avg_sq": optimizer["exp_avg_sq"][0]}
        ready = None
        if trainer.model.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()  # the update's last writes, seen by the writer's own stream
        staging = self._staging(trainer.model.device)
        shards = self.root / f".step_{at.step:08d}.shards"
        name = shard_name(self.world.rank, self.world.size)
        store, done = self.world.store, self._key("done")

        def write_shard(path: Path) -> dict:
            if staging is not None:
                staging.wait(ready)
            return write_safetensors(path, tensors, metadata={"fastazr": meta}, staging=staging)

        def fill(directory: Path) -> dict:
            if staging is not None:
                staging.wait(ready)  # the weights' copies too follow the update and its all-gather
            model_sums = {}
            save_hf(trainer.model, directory / "model", trainer.game.tokenizer, staging=staging, sums=model_sums)
            sums = {f"model/{k}": v for k, v in model_sums.items()}
            sums[name] = write_shard(directory / name)
            state = {"step": at.step, "rng": at.rng, "engine_seeds": at.engine_seeds, "world_size": self.world.size,
                     "model": trainer.config.model, "buffers": TaskBuffers.state(at.buffers)}
            (directory / "state.json").write_text(json.dumps(state))
            keys = [self._key(f"shard/{r}") for r in range(1, self.world.size)]
            store.wait(keys)  # the store's timeout: --distributed.timeout-s
            for rank, key in enumerate(keys, 1):
                entry = json.loads(store.get(key))
                if "error" in entry:
                    raise CheckpointError(f"rank {rank} could not write its optimizer shard: {entry['error']}")
                os.replace(shards / shard_name(rank, self.world.size), directory / shard_name(rank, self.world.size))
                sums[shard_name(rank, self.world.size)] = entry
            return sums

        def lead() -> None:
            try:
                store.set(done, json.dumps({"ok": str(self._commit(at.step, fill))}))
            except BaseException as exc:  # reported by wait() on the training thread
                store.set(done, json.dumps({"error": str(exc)}))
                self._error = exc
            finally:
                shutil.rmtree(shards, ignore_errors=True)

        def follow() -> None:
            try:
                shards.mkdir(parents=True, exist_ok=True)
                entry = write_shard(shards / name)
            except BaseException as exc:
                entry = {"error": f"{type(exc).__name__}: {exc}"}
            store.set(self._key(f"shard/{self.world.rank}"), json.dumps(entry))
            store.wait([done])
            result = json.loads(store.get(done))
            if "ok" in result:
                self.saved_step = at.step
            else:
                self._error = CheckpointError(f"checkpoint of step {at.step} failed on rank 0: {result['error']}")

        self._launch(lead if self.world.leader else follow, background)

    def restore(self, trainer, directory: Path) -> int:
        """Every rank loads its own shard (and rank 0's RNG states and the buffers); the model's
        weights come from the shards' masters (all-gathered)."""
        size, rank = self.world.size, self.world.rank
        if self.world.leader:
            self._drop_newer(directory)
        state = json.loads((directory / "state.json").read_text())
        if state.get("world_size", 1) != size:
            raise CheckpointError(refusal(directory, state.get("world_size", 1), size))
        try:
            with safe_open(directory / shard_name(rank, size), "pt") as f:
                optimizer = {**json.loads(f.metadata()["fastazr"]), **{k: f.get_tensor(k) for k in TENSORS}}
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint {directory}: the shard of rank {rank} cannot be read ({exc})") from exc
        optimizer["exp_avg"], optimizer["exp_avg_sq"] = [optimizer["exp_avg"]], [optimizer["exp_avg_sq"]]
        try:
            trainer.update.load_state_dict(optimizer)
        except ValueError as exc:  # another model, or another bucketing
            raise CheckpointError(f"{directory} does not fit this run: {exc}") from None
        return self._resume(trainer, state, directory)


def refusal(directory: Path, saved: int, size: int) -> str:
    """Why a checkpoint of `saved` ranks cannot resume on `size`, and what to run instead."""
    how = "without torchrun (one process)" if saved == 1 else f"on {saved} ranks (torchrun: nodes x processes = {saved})"
    return (f"{directory} was written by {'one process' if saved == 1 else f'{saved} ranks'} and this run has "
            f"{'one process' if size == 1 else f'{size} ranks'}: its optimizer state is "
            f"{'whole' if saved == 1 else f'sharded {saved} ways'}, and resharding it is not supported; resume it "
            f"{how}")
