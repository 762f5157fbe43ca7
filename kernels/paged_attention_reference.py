"""Causal attention of packed queries over a paged KV cache, in plain torch: the CPU path of the
rollout engine and the reference its Triton kernels are tested against.

Sequence i has q_lens[i] new query tokens (1 when decoding, a chunk when prefilling) at the end
of its context_lens[i] tokens, whose keys and values live in the cache blocks block_tables[i]
(the new tokens' included: the engine writes them before attending). Query j of sequence i sits
at position context_lens[i] - q_lens[i] + j and attends to keys at positions <= its own."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastazr.model.layers import apply_rope


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              q_lens: list[int], context_lens: list[int], block_tables: list[list[int]],
                              scale: float) -> torch.Tensor:
    """q [T, Hq, D] (T = sum(q_lens)); k_cache, v_cache [num_blocks, block_size, Hkv, D]
    -> [T, Hq, D] in q's dtype, computed in fp32."""
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    groups = q.shape[1] // kv_heads
    out = torch.empty_like(q)
    start = 0
    for q_len, ctx, table in zip(q_lens, context_lens, block_tables):
        blocks = torch.tensor(table[:-(-ctx // block_size)], device=q.device, dtype=torch.long)
        k = k_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(groups, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:ctx].float().repeat_interleave(groups, dim=1)
        query = q[start:start + q_len].float()
        positions = torch.arange(ctx - q_len, ctx, device=q.device)
        mask = torch.arange(ctx, device=q.device)[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(query.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                  attn_mask=mask, scale=scale)
        out[start:start + q_len] = attended.transpose(0, 1).to(q.dtype)
        start += q_len
    return out


def decode_rope_attention_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                                    k_cache: torch.Tensor, v_cache: torch.Tensor, context_lens: list[int],
                                    block_tables: list[list[int]], heads: int, scale: float) -> torch.Tensor:
    """What paged_decode_rope_attention computes, as the decoder's layers write it: row b of qkv
    [B, (heads + 2 Hkv) D] is sequence b's new token; its key, rotated by the trainer's
    apply_rope, and its value go to flat slot slots[b] of the caches (in place), then its rotated
    query attends -> [B, heads, D]."""
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    batch = qkv.shape[0]
    index = slots.long()
    k_cache.view(-1, kv_heads, head_dim)[index] = apply_rope(k.reshape(batch, kv_heads, head_dim), cos, sin)
    v_cache.view(-1, kv_heads, head_dim)[index] = v.reshape(batch, kv_heads, head_dim)
    q = apply_rope(q.reshape(batch, heads, head_dim), cos, sin)
    return paged_attention_reference(q, k_cache, v_cache, [1] * batch, context_lens, block_tables, scale)
