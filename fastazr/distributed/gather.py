"""What the ranks of a data-parallel run exchange in a self-play step besides gradients: the samples
each generated and judged (so every rank holds the step's whole batch, and so identical task
buffers, rewards and TRR++ statistics over the global (task, role) groups), a digest of the
buffers in debug runs, and each rank's phase timings.

A gather moves every sample's response tokens, logprobs, text and verdict once to every rank:
at the paper's batch (384 trained responses and up to 8 x 192 learnability rollouts of up to
1,024 tokens) a few MB a step, against the model-sized gradient traffic of the update. The
prompts' tokens do not travel: every rank built the same prompts."""

from __future__ import annotations

import dataclasses
import hashlib

from fastazr.azr.buffers import TaskBuffers
from fastazr.azr.selfplay import Prompt
from fastazr.azr.tasks import Sample

from .world import World


def gather_samples(world: World, local: list[Sample], share: list[int], prompts: list[Prompt]) -> list[Sample]:
    """Every rank's samples of its share of `prompts`, in prompt order (each prompt's n samples
    together): what one process generating every prompt holds. Alone: `local` itself."""
    if world.size == 1:
        return local
    light = [dataclasses.replace(s, prompt_ids=[]) for s in local]
    by_prompt: dict[int, list[Sample]] = {}
    for indices, samples in world.all_gather_object((share, light)):
        position = 0
        for k in indices:
            by_prompt[k] = samples[position:position + prompts[k].n]
            position += prompts[k].n
    gathered = []
    for k, prompt in enumerate(prompts):
        for s in by_prompt[k]:
            s.prompt_ids = prompt.ids
            gathered.append(s)
    return gathered


def check_buffers(world: World, buffers: TaskBuffers, step: int) -> None:
    """Raise, naming the ranks, unless every rank's task buffers are the same tasks in the same
    order (a digest of each rank's, all-gathered)."""
    digest = hashlib.blake2b(repr(buffers.snapshot()).encode(), digest_size=16).hexdigest()
    digests = world.all_gather_object(digest)
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"after step {step} the task buffers of rank(s) {differ} differ from rank 0's: the ranks "
                           "no longer play one game (a bug: please report it with the run's config.toml)")


TIMED = ("time/", "swap/")


def aggregate_timings(timings: list[dict[str, float]]) -> dict[str, float]:
    """The ranks' timing metrics as one: each phase's time is the slowest rank's (what the step
    waited for), with the mean over ranks beside it (time_mean/<phase>, swap_mean/<part>: a max
    far above the mean is a straggler); memory peaks are the largest; generated tokens/s are the
    batch's tokens over the slowest rank's generation time."""
    out = dict(timings[0])
    for key in timings[0]:
        values = [t[key] for t in timings]
        if key.startswith(TIMED):
            out[key] = max(values)
            head, tail = key.split("/", 1)
            out[f"{head}_mean/{tail}"] = sum(values) / len(values)
        elif key.endswith("memory_gib"):
            out[key] = max(values)
    generating = out["time/generate_propose"] + out["time/generate_solve"]
    out["tokens_per_s"] = (out["tokens/generate_propose"] + out["tokens/generate_solve"]) / max(generating, 1e-9)
    return out
