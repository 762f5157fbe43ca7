"""KV-cache block bookkeeping: a free list in least-recently-freed order, reference counts, and
a prefix cache that maps the token content of full blocks to the blocks holding their keys and
values.

A block enters the prefix cache when it is full and computed; it stays findable after its last
user frees it, until the allocator hands it out again (oldest freed first), so a prompt that
comes back soon after is not recomputed. A key is a 128-bit BLAKE2 digest of the previous
block's key and this block's tokens, so equal keys mean equal whole prefixes (a collision is a
2^-64 event at a billion blocks) at a fixed 16 bytes however deep the prefix."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

from .sequence import Sequence

Key = bytes


def block_key(parent: Key | None, tokens: list[int]) -> Key:
    data = (parent or b"") + array("q", tokens).tobytes()
    return hashlib.blake2b(data, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_sharing: bool):
        self.num_blocks, self.block_size, self.prefix_sharing = num_blocks, block_size, prefix_sharing
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.refs = [0] * num_blocks
        self.keys: list[Key | None] = [None] * num_blocks
        self.cache: dict[Key, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def _key(self, seq: Sequence, i: int) -> Key:
        parent = self.keys[seq.blocks[i - 1]] if i else None
        return block_key(parent, seq.tokens[i * self.block_size:(i + 1) * self.block_size])

    def share_prefix(self, seq: Sequence) -> None:
        """Give a new sequence the cached blocks of its longest cached prefix of full blocks,
        leaving at least its last token to compute (its logits start the completion)."""
        if not self.prefix_sharing or seq.blocks:
            return
        parent = None
        for i in range((len(seq.tokens) - 1) // self.block_size):
            key = block_key(parent, seq.tokens[i * self.block_size:(i + 1) * self.block_size])
            block = self.cache.get(key)
            if block is None:
                break
            if self.refs[block] == 0:
                del self.free[block]
            self.refs[block] += 1
            seq.blocks.append(block)
            parent = key
        seq.num_registered = len(seq.blocks)
        seq.num_computed = len(seq.blocks) * self.block_size

    def grow(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for the first `tokens` tokens of seq; False (nothing allocated) if too few are free."""
        need = self.blocks_for(tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > len(self.free):
            return False
        for _ in range(need):
            block, _ = self.free.popitem(last=False)
            if self.keys[block] is not None:
                if self.cache.get(self.keys[block]) == block:
                    del self.cache[self.keys[block]]
                self.keys[block] = None
            self.refs[block] = 1
            seq.blocks.append(block)
        return True

    def register(self, seq: Sequence) -> None:
        """Offer seq's full, computed blocks of known tokens to the prefix cache."""
        if not self.prefix_sharing:
            return
        full = min(seq.num_computed, seq.num_known) // self.block_size
        for i in range(seq.num_registered, full):
            block = seq.blocks[i]
            if self.keys[block] is None:
                key = self._key(seq, i)
                self.keys[block] = key
                self.cache.setdefault(key, block)
        seq.num_registered = max(seq.num_registered, full)

    def release(self, seq: Sequence) -> None:
        for block in reversed(seq.blocks):
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self.free[block] = None
        seq.blocks = []
        seq.num_registered = 0

    def reclaim(self) -> None:
        """Every block back to the free list, keeping the prefix cache: only between generate()
        calls, when no sequence holds one. An exception from a signal handler (Ctrl-C, an alarm),
        which Python runs between any two bytecodes, can leave blocks taken and not recorded (in
        grow(), between popping one and appending it) or held by a sequence the scheduler no
        longer tracks (popped from its queue, not yet running). The scheduler's state dies with
        the call, so instead of making every step atomic, generate() calls this on its way out
        and on its way in, restoring the one invariant that outlives a call; an interrupted
        reclaim is finished by the next. A block's key is recorded before it enters the cache
        and dropped after it leaves, and never while a sequence can write the block, so a
        reclaimed block in the cache holds the keys and values its key names."""
        if len(self.free) < self.num_blocks:
            for block in range(self.num_blocks):
                if block not in self.free:
                    self.free[block] = None
        self.refs = [0] * self.num_blocks

    def forget(self) -> None:
        """Drop the prefix cache (the weights changed, so cached keys and values are stale)."""
        self.cache.clear()
        self.keys = [None] * self.num_blocks
