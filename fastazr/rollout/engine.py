"""The embedded rollout engine: continuous batching over a paged KV cache, on the trainer's own
parameter tensors (see runner.py), behind the RolloutBackend interface.

One generate() call takes every request of a phase. Each step the scheduler picks slices (decode
tokens, prefill chunks), the runner computes them and the logits of the slices that end a
sequence, the sampler picks next tokens on the device, and one device-to-host copy per step
brings them back for the stop checks."""

from __future__ import annotations

import gc
import random

import torch

from fastazr.model import Decoder, Tokenizer

from .backend import RolloutBackend
from .blocks import BlockManager
from .config import EngineConfig
from .kv_cache import KVCache
from .request import Completion, Request
from .runner import Runner
from .sampler import SamplingBatch, sample
from .scheduler import Scheduler
from .sequence import Sequence


class Engine(RolloutBackend):
    def __init__(self, model: Decoder, tokenizer: Tokenizer | None = None, config: EngineConfig | None = None,
                 seed: int = 0):
        self.model, self.tokenizer = model, tokenizer
        self.config = config or EngineConfig()
        self.runner = Runner(model, self.config)
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids.update(tokenizer.stop_token_ids)
        self._seeds = random.Random(seed)
        self.cache: KVCache | None = None
        self.blocks: BlockManager | None = None
        self.stats: dict[str, int] = {}
        """Counters of the last generate(): steps, computed_tokens, cached_tokens (tokens reused
        from the prefix cache, re-admissions after preemption included), preemptions."""
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

    @property
    def max_len(self) -> int:
        """Longest sequence: the model's context, the configured limit and the whole cache."""
        limit = self.config.max_model_len or self.model.config.max_position_embeddings
        return min(limit, self.blocks.num_blocks * self.config.block_size)

    # generation

    def generate(self, requests: list[Request]) -> list[list[Completion]]:
        if self.cache is None:
            raise RuntimeError("Engine.generate() after release_memory(): call resume_memory() first")
        if any(r.params.stop_strings for r in requests) and self.tokenizer is None:
            raise ValueError("SamplingParams.stop_strings needs a tokenizer: pass one to Engine(...)")
        scheduler = Scheduler(self.config, self.blocks)
        groups: list[list[Sequence]] = []
        for request in requests:
            base = request.params.seed if request.params.seed is not None else self._seeds.getrandbits(62)
            group: list[Sequence] = []
            for i in range(request.n):
                seq = Sequence(tokens=list(request.prompt_ids), num_prompt=len(request.prompt_ids),
                               params=request.params, seed=base, sample=i, leader=group[0] if group else None)
                group.append(seq)
                if seq.num_prompt >= self.max_len:
                    seq.finish_reason = "prompt_too_long"
                else:
                    scheduler.add(seq)
            groups.append(group)
        self.stats = dict(steps=0, computed_tokens=0)
        try:
            while not scheduler.done:
                self._step(scheduler)
        finally:
            scheduler.abort()
        self.stats.update(cached_tokens=scheduler.cached_tokens, preemptions=scheduler.preemptions)
        return [[Completion(s.tokens[:s.num_prompt], s.tokens[s.num_prompt:], s.logprobs, s.finish_reason)
                 for s in group] for group in groups]

    def _step(self, scheduler: Scheduler) -> None:
        work = scheduler.schedule()
        if not work:
            raise RuntimeError("the scheduler found nothing to run: a bug, please report it")
        logits = self.runner.forward(work, self.cache)
        for w in work:
            w.seq.num_computed += w.count
            self.blocks.register(w.seq)
        self.stats["steps"] += 1
        self.stats["computed_tokens"] += sum(w.count for w in work)
        sampling = [w.seq for w in work if w.samples]
        tokens, logprobs = sample(logits, self._sampling_batch(sampling, logits.device))
        for seq, token, logprob in zip(sampling, tokens.tolist(), logprobs.tolist()):
            seq.tokens.append(token)
            seq.logprobs.append(logprob)
            seq.finish_reason = self._finish_reason(seq, token)
            if seq.finish_reason is not None:
                scheduler.finish(seq)

    def _sampling_batch(self, seqs: list[Sequence], device: torch.device) -> SamplingBatch:
        params = [s.params for s in seqs]

        def column(values, dtype):
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return SamplingBatch(
            temperature=column([p.temperature for p in params], torch.float32),
            top_k=column([p.top_k for p in params], torch.int64),
            top_p=column([p.top_p for p in params], torch.float32),
            seeds=column([s.seed for s in seqs], torch.int64),
            samples=column([s.sample for s in seqs], torch.int64),
            steps=column([s.num_completion for s in seqs], torch.int64),
            any_top_k=any(p.top_k > 0 for p in params),
            any_top_p=any(p.top_p < 1.0 for p in params),
            all_greedy=all(p.temperature == 0 for p in params))

    def _finish_reason(self, seq: Sequence, token: int) -> str | None:
        p = seq.params
        if token in self.eos_ids and not p.ignore_eos:
            return "eos"
        if token in p.stop_token_ids:
            return "stop_token"
        if p.stop_strings and self._hit_stop_string(seq):
            return "stop_string"
        if seq.num_completion >= p.max_new_tokens or len(seq.tokens) >= self.max_len:
            return "length"
        return None

    def _hit_stop_string(self, seq: Sequence) -> bool:
        # A stop string of m characters spans at most 4m byte-level tokens; one more token covers
        # a character split across the window's start.
        window = 4 * max(len(s) for s in seq.params.stop_strings) + 1
        tail = self.tokenizer.decode(seq.tokens[max(seq.num_prompt, len(seq.tokens) - window):])
        return any(s in tail for s in seq.params.stop_strings)
