"""Which tokens of which sequences the next forward step computes.

Continuous batching: every step, running sequences get their next token (or their next prefill
chunk), oldest first, then waiting ones are admitted while the token budget, the sequence limit
and the free blocks allow. A prompt longer than the remaining budget is prefilled in chunks over
several steps, alongside the decodes of the others. A prefill chunk takes all the budget left,
so nothing is admitted behind it: at most one running sequence is mid-prefill, the newest, and
the decodes ahead of it always get their token. When the cache is full, the most recently
admitted sequence is preempted: its blocks are freed and it goes back to the front of the
queue, to be recomputed (prompt and completion so far) when blocks are free again.

A step of decodes only runs several tokens per sequence on the device (EngineConfig.decode_steps):
each decode gets blocks for as many as it may still generate, up to that number; one that cannot
get them all takes what its blocks hold."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from .blocks import BlockManager
from .config import EngineConfig
from .sequence import Sequence


@dataclass
class Work:
    seq: Sequence
    start: int
    """First token of this step's slice: tokens[start:start + count] are computed."""
    count: int
    steps: int = 1
    """Forward passes: a decode (count 1) may run several, each feeding its sampled token to the
    next, so it computes count + steps - 1 tokens and samples `steps`."""

    @property
    def samples(self) -> bool:
        """This slice reaches the last token, so its logits give the next token."""
        return self.start + self.count == len(self.seq.tokens)


def decodes_only(work: list[Work]) -> bool:
    return all(w.count == 1 and w.samples for w in work)


class Scheduler:
    def __init__(self, config: EngineConfig, blocks: BlockManager, max_len: int):
        self.config, self.blocks, self.max_len = config, blocks, max_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.cached_tokens = 0
        """Tokens found in the prefix cache instead of computed (a re-admission after
        preemption counts again)."""

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def done(self) -> bool:
        return not self.waiting and not self.running

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.num_computed = 0
        self.waiting.appendleft(seq)
        self.preemptions += 1

    def schedule(self) -> list[Work]:
        budget = self.config.max_num_batched_tokens
        work: list[Work] = []
        # Running sequences, oldest first; each needs the tokens past num_computed (1 when decoding).
        # A victim is always the newest, so it has no work in this step yet.
        preempted: set[int] = set()
        for seq in list(self.running):
            if id(seq) in preempted or seq.exhausted:  # preempted by an older sequence, below
                continue
            count = min(len(seq.tokens) - seq.num_computed, budget)
            if count == 0:
                continue
            while not self.blocks.grow(seq, seq.num_computed + count):
                victim = self.running[-1]
                self._preempt(victim)
                preempted.add(id(victim))
                if victim is seq:
                    break
            else:
                work.append(Work(seq, seq.num_computed, count))
                budget -= count
        # Waiting sequences, in order.
        skipped: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            leader = seq.leader
            # A preempted sequence comes back once its last token is read back (the next step); a
            # follower once its leader's prompt is cached.
            if not seq.resolved or (self.config.prefix_sharing and leader is not None and leader.finish_reason is None
                                    and not leader.prompt_done):
                skipped.append(seq)
                continue
            self.blocks.share_prefix(seq)
            count = min(len(seq.tokens) - seq.num_computed, budget)
            if not self.blocks.grow(seq, seq.num_computed + count):
                self.blocks.release(seq)
                seq.num_computed = 0
                self.waiting.appendleft(seq)
                break
            self.running.append(seq)
            self.cached_tokens += seq.num_computed
            work.append(Work(seq, seq.num_computed, count))
            budget -= count
        self.waiting.extendleft(reversed(skipped))
        if self.config.decode_steps > 1 and work and decodes_only(work):
            self._plan_steps(work)
        return work

    def _plan_steps(self, work: list[Work]) -> None:
        bs, most = self.blocks.block_size, self.config.decode_steps
        for w in work:
            seq = w.seq
            steps = min(most, seq.params.max_new_tokens - seq.num_completion, self.max_len - len(seq.tokens))
            if steps > 1 and not self.blocks.grow(seq, w.start + steps):
                steps = len(seq.blocks) * bs - w.start
            w.steps = steps

    def finish(self, seq: Sequence) -> None:
        """seq stopped: running, or preempted while its last token was on the way back."""
        if seq in self.running:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.blocks.release(seq)
