"""Paged attention on CPU for the rollout engine, batched: what runs in place of the Triton
kernels there. kernels/paged_attention_reference.py stays the plain reference (these functions are
tested against it); its loop over sequences costs ~10 small ops a sequence and copies each
sequence's keys and values once per query head of their group.

Decodes (one query at the end of its context) all attend at once: one index_select per K and V
gathers every row's blocks into a padded [B, L, Hkv, D] copy, and two matmuls, each query head
group of G heads against its KV head (no copy per query head), take scores and outputs, with the
positions past each row's context masked. 2-core AMD EPYC, fp32, SmolLM2's heads (9 q, 3 kv,
head_dim 64), 32 rows of 50-130 keys, one layer: 1.1 ms against 9.8 for the reference (a loaded
machine). The padded positions read whatever their slots hold and get probability 0: the cache
is zeroed when created on CPU (kv_cache.py), so they hold 0 or an earlier token's finite values,
never NaN.

Prefill chunks attend one sequence at a time through SDPA with GQA (is_causal when the chunk is
the whole context, a bottom-right causal mask after a cached prefix): compute-bound, once a prompt."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def padded_tables(block_tables: list[list[int]], context_lens: list[int], block_size: int,
                  device: torch.device) -> torch.Tensor:
    """int64 [B, blocks of the longest context]: each row's first blocks, padded with block 0."""
    used = [-(-ctx // block_size) for ctx in context_lens]
    table = np.zeros((len(block_tables), max(used)), np.int64)
    for row, (blocks, count) in enumerate(zip(block_tables, used)):
        table[row, :count] = blocks[:count]
    return torch.from_numpy(table).to(device)


def context_mask(context: torch.Tensor, width: int) -> torch.Tensor:
    """bool [B, 1, 1, width]: key positions inside each row's context (computed once a pass, shared
    by every layer)."""
    return (torch.arange(width, device=context.device)[None, :] < context[:, None])[:, None, None, :]


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                     mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D], one query a row at the last position of its context; tables int64 [B, W]
    (padded_tables), mask [B, 1, 1, W * block_size] (context_mask); caches [blocks, block_size,
    Hkv, D] -> [B, Hq, D] in q's dtype, computed in fp32 (no copy when it is fp32)."""
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    width = tables.shape[1] * k_cache.shape[1]
    index = tables.reshape(-1)
    k = k_cache.index_select(0, index).view(rows, width, kv_heads, dim).float()
    v = v_cache.index_select(0, index).view(rows, width, kv_heads, dim).float()
    query = q.float().view(rows, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(query, k.permute(0, 2, 3, 1)).mul_(scale)  # [B, Hkv, G, W]
    probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
    return torch.matmul(probs, v.transpose(1, 2)).reshape(rows, heads, dim).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, blocks: list[int],
                      context: int, scale: float) -> torch.Tensor:
    """One sequence's chunk: q [T, Hq, D] at positions context - T .. context - 1, each attending to
    the keys at and before its own -> [T, Hq, D] in q's dtype, computed in fp32."""
    count, block_size = q.shape[0], k_cache.shape[1]
    index = torch.tensor(blocks[:-(-context // block_size)], dtype=torch.int64, device=q.device)
    k = k_cache.index_select(0, index).flatten(0, 1)[:context].float().transpose(0, 1)
    v = v_cache.index_select(0, index).flatten(0, 1)[:context].float().transpose(0, 1)
    query = q.float().transpose(0, 1)
    if count == context:
        out = F.scaled_dot_product_attention(query, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        mask = torch.arange(context, device=q.device)[None, :] <= torch.arange(context - count, context,
                                                                                device=q.device)[:, None]
        out = F.scaled_dot_product_attention(query, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    return out.transpose(0, 1).to(q.dtype)


class StepAttention:
    """paged_attention_reference's contract (q [T, Hq, D] packed by q_lens), with the step's
    tables and masks built once and used by every layer: the one-query slices go through
    decode_attention together, the others through prefill_attention one by one."""

    def __init__(self, q_lens: list[int], context_lens: list[int], block_tables: list[list[int]], block_size: int,
                 scale: float, device: torch.device):
        self.scale = scale
        starts = np.concatenate([[0], np.cumsum(q_lens)]).tolist()
        singles = [i for i, count in enumerate(q_lens) if count == 1]
        self.all_single = len(singles) == len(q_lens)
        self.rows = torch.tensor([starts[i] for i in singles], dtype=torch.int64, device=device)
        self.tables = self.mask = None
        if singles:
            contexts = [context_lens[i] for i in singles]
            self.tables = padded_tables([block_tables[i] for i in singles], contexts, block_size, device)
            self.mask = context_mask(torch.tensor(contexts, device=device), self.tables.shape[1] * block_size)
        self.chunks = [(starts[i], starts[i + 1], block_tables[i], context_lens[i])
                       for i, count in enumerate(q_lens) if count != 1]

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        if self.all_single:
            return decode_attention(q, k_cache, v_cache, self.tables, self.mask, self.scale)
        out = torch.empty_like(q)
        if self.tables is not None:
            out[self.rows] = decode_attention(q[self.rows], k_cache, v_cache, self.tables, self.mask, self.scale)
        for start, end, blocks, context in self.chunks:
            out[start:end] = prefill_attention(q[start:end], k_cache, v_cache, blocks, context, self.scale)
        return out
