"""The embedded rollout engine: continuous batching over a paged KV cache, on the trainer's own
parameter tensors (see runner.py), behind the RolloutBackend interface.

One generate() call takes every request of a phase. Each step the scheduler picks slices (decode
tokens, prefill chunks), the runner computes them and the hidden states of the slices that end a
sequence, the sampler projects those and picks next tokens on the device, and one
device-to-host copy per step brings them back for the stop checks. A step of decodes only runs
up to EngineConfig.decode_steps forward passes on the device, each sampling the next pass's
input, and brings back all their tokens at once.

The host runs one step ahead of the device: step t+1 is scheduled and launched before step t's
tokens are read back, so scheduling, packing and stop checks (~3 ms at 256 sequences) overlap the
GPU's work instead of adding to it. A token not yet read back sits in its sequence as the
placeholder -1 - (i * n + j): the token row j of the n sampling rows of the step that sampled it
got in its pass i. The runner takes a placeholder input's value from that step's output on the
device; prompt ids are checked to lie in [0, vocab_size) (Request, check_requests), so no prompt
token can pass for one. A sequence that stopped at step t has computed the rest of step t's
passes and all of step t+1's, which are dropped."""

from __future__ import annotations

import gc
import random
from dataclasses import dataclass

import numpy as np
import torch

from fastazr.model import Decoder, Tokenizer

from .backend import RolloutBackend
from .blocks import BlockManager
from .checks import config_and_seed, within_positions
from .config import EngineConfig
from .kv_cache import KVCache
from .request import Completion, Request, check_requests
from .runner import Runner
from .sampler import SamplingBatch, sample_hidden
from .scheduler import Scheduler, Work, decodes_only
from .sequence import Sequence
from .staging import Staging


@dataclass
class _Launched:
    """A step sent to the device whose sampled tokens are not read back yet."""
    work: list[Work]
    seqs: list[Sequence]
    """The sequences that sampled, in row order."""
    positions: list[int]
    """Where each one's first new token goes in its tokens."""
    steps: list[int]
    """How many tokens each one sampled."""
    tokens: torch.Tensor
    """The sampled tokens on the device, flattened [passes * rows]: the next step's
    placeholders read them."""
    host: tuple[torch.Tensor, torch.Tensor]
    """Tokens and logprobs [passes, rows], copied to host memory once `ready` has passed."""
    ready: torch.cuda.Event | None


class _ParamTable:
    """Every sequence's sampling parameters as columns, built once per generate(): a step gathers
    its rows with one index instead of reading five attributes of each of 256 objects."""

    def __init__(self, seqs: list[Sequence]):
        params = [s.params for s in seqs]
        self.row = {id(s): i for i, s in enumerate(seqs)}
        self.floats = np.array([[p.temperature for p in params], [p.top_p for p in params]],
                               np.float32).reshape(2, len(seqs))
        self.ints = np.array([[p.top_k for p in params], [s.seed for s in seqs], [s.sample for s in seqs]],
                             np.int64).reshape(3, len(seqs))


class Engine(RolloutBackend):
    def __init__(self, model: Decoder, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 seed: int | None = None):
        """`seed` seeds the generator that draws the sampling seeds of requests without one: None
        (the default) takes it from the OS, so unseeded requests differ across engines and runs
        (a fixed default would repeat the same samples in every fresh process); an int makes
        them reproducible. A request's own SamplingParams.seed ignores it."""
        config, seed = config_and_seed("Engine", config, EngineConfig, seed)
        within_positions("EngineConfig.max_model_len", config.max_model_len, model.config.max_position_embeddings)
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.staging = Staging(model.device)
        self.runner = Runner(model, self.config, self.staging)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids.update(tokenizer.stop_token_ids)
        self._seeds = random.Random(seed)
        self.cache: KVCache | None = None
        self.blocks: BlockManager | None = None
        self.stats: dict[str, int] = {}
        """Counters of the last generate(): steps, computed_tokens (the one extra token a sequence
        computes in the step after it stopped included), cached_tokens (tokens reused from the
        prefix cache, re-admissions after preemption included), preemptions."""
        self.resume_memory()

    # memory phases

    def release_memory(self) -> None:
        self.runner.reset()
        self.cache = self.blocks = None
        gc.collect()
        if self.model.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume_memory(self) -> None:
        if self.cache is None:
            self.cache = KVCache(self.model, self.config)
            self.blocks = BlockManager(self.cache.num_blocks, self.config.block_size, self.config.prefix_sharing)

    def weights_updated(self) -> None:
        if self.blocks is not None:
            self.blocks.forget()

    def seed_state(self) -> tuple:
        """The generator of unseeded requests' seeds, for checkpoints (set_seed_state restores it)."""
        return self._seeds.getstate()

    def set_seed_state(self, state: tuple) -> None:
        self._seeds.setstate(state)

    @property
    def max_len(self) -> int:
        """Longest sequence: the model's context, the configured limit and the whole cache."""
        if self.blocks is None:
            raise RuntimeError("Engine.max_len depends on the KV cache, which release_memory() gave back: "
                               "call resume_memory() first")
        limit = self.config.max_model_len or self.model.config.max_position_embeddings
        return min(limit, self.blocks.num_blocks * self.config.block_size)

    # generation

    def generate(self, requests: list[Request], progress=None) -> list[list[Completion]]:
        """See RolloutBackend.generate. `progress(n)` is called once per step whose tokens were
        read back, with the completion tokens it added (stop-trimmed: the calls sum to the
        completions' lengths)."""
        if progress is not None and not callable(progress):
            raise TypeError(f"Engine.generate()'s progress must be a callable taking a token count "
                            f"(a bar's update method), got {type(progress).__name__}")
        if self.cache is None:
            raise RuntimeError("Engine.generate() after release_memory(): call resume_memory() first")
        # a negative id set after the Request was built would read as another sequence's placeholder
        check_requests(requests, self.model.config.vocab_size, "Engine.generate()")
        if any(r.params.stop_strings for r in requests) and self.tokenizer is None:
            raise ValueError("SamplingParams.stop_strings needs a tokenizer: pass one to Engine(...)")
        self.blocks.reclaim()  # what an exception out of the last call left taken (BlockManager.reclaim)
        scheduler = Scheduler(self.config, self.blocks, self.max_len)
        groups: list[list[Sequence]] = []
        for request in requests:
            p = request.params
            base = p.seed if p.seed is not None else self._seeds.getrandbits(62)
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else frozenset(self.eos_ids))
            group: list[Sequence] = []
            for i in range(request.n):
                seq = Sequence(tokens=list(request.prompt_ids), num_prompt=len(request.prompt_ids), params=p,
                               seed=base, sample=i, leader=group[0] if group else None, stop_ids=stop_ids)
                group.append(seq)
                if seq.num_prompt >= self.max_len:
                    seq.finish_reason = "prompt_too_long"
                else:
                    scheduler.add(seq)
            groups.append(group)
        self.stats = dict(steps=0, passes=0, computed_tokens=0)
        table = _ParamTable([seq for group in groups for seq in group])
        inflight: _Launched | None = None
        # An interrupt inside torch.no_grad's __enter__ (the runner's passes) can land after it
        # turned gradients off and before its __exit__ is armed: the trainer would then run its
        # next update without autograd ("element 0 of tensors does not require grad").
        grad_enabled = torch.is_grad_enabled()
        try:
            while not scheduler.done or inflight is not None:
                work = scheduler.schedule()
                if not work and inflight is None:
                    raise RuntimeError("the scheduler found nothing to run: a bug, please report it")
                launched = self._launch(work, inflight, table) if work else None
                if inflight is not None:
                    added = self._resolve(inflight, scheduler)
                    if progress is not None and added:
                        progress(added)
                if launched is not None:
                    # the prefix cache hashes token values: blocks of tokens read back so far
                    for w in launched.work:
                        if w.seq.finish_reason is None:
                            self.blocks.register(w.seq)
                inflight = launched
        finally:
            torch.set_grad_enabled(grad_enabled)
            self.blocks.reclaim()
        self.stats.update(cached_tokens=scheduler.cached_tokens, preemptions=scheduler.preemptions)
        return [[Completion(s.tokens[:s.num_prompt], s.tokens[s.num_prompt:], s.logprobs, s.finish_reason)
                 for s in group] for group in groups]

    def _launch(self, work: list[Work], previous: _Launched | None, table: _ParamTable) -> _Launched:
        """Queue the step's forward passes and sampling on the device; returns without waiting."""
        sampling = [w for w in work if w.samples]
        self.staging.begin_step()
        batch = self._sampling_batch([w.seq for w in sampling], table)
        inputs = previous.tokens if previous is not None else None

        def pick(hidden: torch.Tensor, i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
            return sample_hidden(hidden, self.model.lm_head_weight, batch.later(i), self.runner.logits,
                                 self.config.sample_in_lm_head)

        if decodes_only(work):
            tokens, logprobs = self.runner.decode(work, self.cache, inputs, pick)
        else:
            tokens, logprobs = (t[None] for t in pick(self.runner.forward(work, self.cache, inputs)))
        self.stats["steps"] += 1
        self.stats["passes"] += tokens.shape[0]
        for w in work:
            computed = w.count + w.steps - 1
            w.seq.num_computed += computed
            self.stats["computed_tokens"] += computed
        positions, steps, n, max_len = [], [], len(sampling), self.max_len
        for j, w in enumerate(sampling):
            seq = w.seq
            positions.append(len(seq.tokens))
            steps.append(w.steps)
            seq.tokens.extend(range(-1 - j, -1 - j - w.steps * n, -n))
            seq.exhausted = seq.num_completion >= seq.params.max_new_tokens or len(seq.tokens) >= max_len
        host = (self.staging.download(tokens), self.staging.download(logprobs))
        return _Launched(work, [w.seq for w in sampling], positions, steps, tokens.reshape(-1), host,
                         self.staging.end_step())

    def _resolve(self, step: _Launched, scheduler: Scheduler) -> int:
        """Wait for a step's tokens, put them in place of their placeholders and check stops.
        Returns how many completion tokens the sequences kept."""
        if step.ready is not None:
            step.ready.synchronize()
        columns, logprob_columns = (t.t().tolist() for t in step.host)
        max_len, kept = self.max_len, 0
        for seq, pos, steps, tokens, logprobs in zip(step.seqs, step.positions, step.steps, columns, logprob_columns):
            if seq.finish_reason is not None:  # stopped a step earlier: these rows were extra
                continue
            tokens, logprobs = tokens[:steps], logprobs[:steps]
            seq.tokens[pos:pos + steps] = tokens
            seq.logprobs.extend(logprobs)
            seq.num_known = pos + steps
            stop = self._stop(seq, pos, tokens, max_len)
            if stop is not None:
                end, seq.finish_reason = stop
                del seq.tokens[end:]
                del seq.logprobs[end - seq.num_prompt:]
                seq.num_known = end
                scheduler.finish(seq)
            kept += seq.num_known - pos
        return kept

    def _sampling_batch(self, seqs: list[Sequence], table: _ParamTable) -> SamplingBatch:
        n = len(seqs)
        rows = np.fromiter((table.row[id(s)] for s in seqs), np.int64, n)
        steps = np.fromiter((len(s.tokens) - s.num_prompt for s in seqs), np.int64, n)
        floats, ints = table.floats[:, rows], table.ints[:, rows]
        # rows of a multiple of 4 columns, so that each parameter the sampler kernels read starts on
        # a 16-byte boundary whatever n is: Triton compiles a kernel per alignment pattern of its
        # pointers (runner.aligned_offsets), and n changes as sequences finish
        width = -(-n // 4) * 4
        padded_floats, padded_ints = np.zeros((2, width), np.float32), np.zeros((4, width), np.int64)
        padded_floats[:, :n], padded_ints[:3, :n], padded_ints[3, :n] = floats, ints, steps
        (temperature, top_p), (top_k, seeds, samples, steps_t) = (
            self.staging.upload(a)[:, :n] for a in (padded_floats, padded_ints))
        return SamplingBatch(temperature=temperature, top_p=top_p, top_k=top_k, seeds=seeds, samples=samples,
                             steps=steps_t, any_top_k=bool((ints[0] > 0).any()), any_top_p=bool((floats[1] < 1).any()),
                             all_greedy=bool((floats[0] == 0).all()))

    def _stop(self, seq: Sequence, pos: int, tokens: list[int], max_len: int) -> tuple[int, str] | None:
        """(tokens seq keeps, finish reason) if one of `tokens`, just placed at pos, stops it."""
        p = seq.params
        if p.stop_strings or not seq.stop_ids.isdisjoint(tokens):
            for i, token in enumerate(tokens):
                if token in seq.stop_ids:
                    return pos + i + 1, "eos" if token in self.eos_ids and not p.ignore_eos else "stop_token"
                if p.stop_strings and self._hit_stop_string(seq, pos + i + 1):
                    return pos + i + 1, "stop_string"
        end = pos + len(tokens)
        if end - seq.num_prompt >= p.max_new_tokens or end >= max_len:
            return end, "length"
        return None

    def _hit_stop_string(self, seq: Sequence, end: int) -> bool:
        # A stop string of m characters spans at most 4m byte-level tokens; one more token covers
        # a character split across the window's start.
        window = 4 * max(len(s) for s in seq.params.stop_strings) + 1
        tail = self.tokenizer.decode(seq.tokens[max(seq.num_prompt, end - window):end])
        return any(s in tail for s in seq.params.stop_strings)
