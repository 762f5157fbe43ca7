"""Causal attention over the rollout engine's paged KV cache: a split-K decode kernel and a varlen
prefill kernel. Inference only (no backward); the plain-torch reference is
paged_attention_reference.py, which computes the same thing one sequence at a time.

Both kernels take the block tables ragged: `tables` is every sequence's block ids back to back
(int32) and `table_starts[b]` is where sequence b's begin, so the engine copies only the blocks
in use each step (256 sequences of 512 tokens: 32 KB) instead of a [B, max_len / block_size]
matrix (2 MB at a 32K context). `pack_block_tables` builds them from lists.

GQA: one program serves all G = Hq / Hkv query heads of a KV head, so each key and value tile is
read from memory once per group, not once per query head (Qwen2.5-1.5B: G = 6). The rows of a
program's score tile are (query token, head in group) pairs: a decode program has G rows (padded
to the 16 that tl.dot needs), a prefill program BLOCK_M tokens x G.

Decode is memory-bound (every step reads each sequence's whole context), so its parallelism has
to cover the GPU even at small batch: the context of each sequence is cut into `num_splits`
equal chunks (split-K), each program writes a partial output and its log-sum-exp, and a second
kernel merges them. The grid depends only on (B, Hkv, num_splits), never on the context lengths
in device memory, so a CUDA graph captures it once per batch size.

Every tile goes through attention_math.softmax_step, which the training forward
(varlen_attention.py) takes too. The prefill kernel's tiles and key chunks are the trainer's, so
its outputs are the trainer's bit for bit, also for one-token decode slices
(EngineConfig.exact_logprobs), in 16-row programs for 16-bit inputs (`decode_rows`); the
decode kernel, whose splits do not follow the trainer's key chunks, is not held to those bits.
For decodes the prefill kernel can split too, along chunk boundaries rather
than into equal parts (`splits`): each program leaves the states of the chunks it took, and
_fold_kernel folds them in order, as one program would have. A decode pass can hand it the qkv
projection's rows instead of q (`paged_decode_rope_attention`): the kernel then rotates q and the
new key itself and writes the key and value to the cache before reading it, which saves the
rotary kernel's launch a layer."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels import attention_math
from fastazr.kernels.attention_math import empty_state, finish, fold, softmax_step
from fastazr.kernels.layer_fusions import rope_lanes, rope_math
from fastazr.kernels.runtime import await_previous, multiprocessors, pdl_launch

__all__ = ["pack_block_tables", "paged_decode_attention", "paged_prefill_attention", "decode_splits", "decode_rows",
           "paged_decode_rope_attention"]

_LOG2E = 1.4426950408889634
# A decode program walks its chunk 64 tokens (4 blocks of 16) at a time: 16 KB of K and V in
# flight at head_dim 128, bf16.
_DECODE_BLOCK_N = 64
# Prefill programs hold ~128 score rows (BLOCK_M tokens x G heads) against 64 keys.
_PREFILL_ROWS, _PREFILL_BLOCK_N = 128, 64
_MAX_SPLITS = 32


def _precision(dtype: torch.dtype) -> str:
    # fp32 caches (the CPU-default dtype, tests) get full-precision dots; tf32 would cost ~1e-3.
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _attend_tile(q, k_ptr, v_ptr, table, pos, valid, visible, kvh, sk_b, sk_t, sk_h, d, d_ok, m, l, acc, qk_scale,
                 PAGE: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr):
    """The keys at context positions `pos`, looked up block by block in the table, folded into
    the score rows' state by the shared softmax step; `visible` [rows, N] masks scores."""
    page = tl.load(table + pos // PAGE, mask=valid, other=0)
    offs = page.to(tl.int64) * sk_b + (pos % PAGE) * sk_t + kvh * sk_h
    kv_mask = valid[:, None] & d_ok[None, :]
    k = tl.load(k_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + offs[:, None] + d[None, :], mask=kv_mask, other=0.0)
    return softmax_step(q, k, v, visible, m, l, acc, qk_scale, PRECISION, SPLIT_P)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, starts_ptr, ctx_ptr, out_ptr, part_ptr, lse_ptr,
                   qk_scale, sq_b, sq_h, sk_b, sk_t, sk_h, so_b, so_h,
                   GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   PAGE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                   PRECISION: tl.constexpr, SPLIT_P: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    ctx = tl.load(ctx_ptr + b)
    table = tables_ptr + tl.load(starts_ptr + b)
    # Equal chunks rounded up to whole tiles; trailing splits of a short context are empty.
    chunk = tl.cdiv(tl.cdiv(ctx, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, ctx)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    heads = kvh * GROUPS + g
    row_ok = g < GROUPS
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * sq_b + heads[:, None] * sq_h + d[None, :], mask=row_ok[:, None] & d_ok[None, :],
                other=0.0)
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < end
        m, l, acc = _attend_tile(q, k_ptr, v_ptr, table, pos, valid, valid[None, :], kvh, sk_b, sk_t, sk_h, d, d_ok,
                                 m, l, acc, qk_scale, PAGE, PRECISION, SPLIT_P)
    # An empty chunk (or a padding row with ctx = 0) has l = 0: output 0, log-sum-exp -inf.
    out, lse = finish(m, l, acc)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * so_b + heads[:, None] * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok[None, :])
    else:
        # partials are fp32 [B, Hq, NUM_SPLITS, BLOCK_D] and [B, Hq, NUM_SPLITS], log2 domain
        row = (b * (GROUPS * tl.num_programs(1)) + heads) * NUM_SPLITS + split
        tl.store(part_ptr + row[:, None] * BLOCK_D + d[None, :], out, mask=row_ok[:, None])
        tl.store(lse_ptr + row, lse, mask=row_ok)


@triton.jit
def _merge_kernel(part_ptr, lse_ptr, out_ptr, so_b, so_h, num_heads,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    row = (b * num_heads + h) * NUM_SPLITS
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, BLOCK_D)
    lse = tl.load(lse_ptr + row + s)
    top = tl.max(lse, axis=0)
    # a padding row has every split at -inf: subtract 0 instead, so the weights are exp2(-inf) = 0
    weight = tl.exp2(lse - tl.where(top > float("-inf"), top, 0.0))
    part = tl.load(part_ptr + (row + s)[:, None] * BLOCK_D + d[None, :])
    total = tl.sum(weight, axis=0)
    out = tl.sum(part * weight[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * so_b + h * so_h + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


@triton.jit
def _rope_decode(qkv_ptr, q_rows, cos_ptr, sin_ptr, slots_ptr, k_ptr, v_ptr, t, kvh, ctx, split, sqkv_t, sk_b,
                 sk_t, sk_h, q_mask, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_D: tl.constexpr, PAGE: tl.constexpr, CHUNK: tl.constexpr, SPLITS: tl.constexpr):
    """A decode program's query rows, rotated from the qkv projection's row t at position ctx - 1
    (cos and sin read from tables of every position), and, in the program whose key chunk holds
    that position, the token's rotated key and its value written to cache slot slots[t] for KV
    head kvh: what layer_fusions.rope_to_cache computes, in the same rounding (rope_math), without
    its launch, q's round trip and the gather of cos and sin. The caller reads the cache only
    after the barrier, which makes this program's writes visible to all its threads."""
    d, _, d_ok, partner, sign = rope_lanes(HEAD_DIM, 1, BLOCK_D)
    pos = tl.maximum(ctx, 1) - 1  # a padding row (context 0) rotates by position 0
    cos = tl.load(cos_ptr + pos * HEAD_DIM + d, mask=d_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * HEAD_DIM + d, mask=d_ok, other=0.0)
    x = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
    rot = tl.load(q_rows + partner[None, :], mask=q_mask, other=0.0)
    q = rope_math(x, rot, sign[None, :], cos[None, :], sin[None, :])
    if split == (pos // CHUNK) % SPLITS:
        row = qkv_ptr + t.to(tl.int64) * sqkv_t + (HEADS + kvh) * HEAD_DIM
        k = rope_math(tl.load(row + d, mask=d_ok, other=0.0), tl.load(row + partner, mask=d_ok, other=0.0), sign,
                      cos, sin)
        v = tl.load(row + KV_HEADS * HEAD_DIM + d, mask=d_ok, other=0.0)
        slot = tl.load(slots_ptr + t).to(tl.int64)
        dest = (slot // PAGE) * sk_b + (slot % PAGE) * sk_t + kvh * sk_h + d
        tl.store(k_ptr + dest, k, mask=d_ok)
        tl.store(v_ptr + dest, v, mask=d_ok)
    tl.debug_barrier()
    return q


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, starts_ptr, cu_q_ptr, ctx_ptr, out_ptr, state_ptr, acc_ptr,
                    cos_ptr, sin_ptr, slots_ptr, qk_scale, max_chunks, sq_t, sq_h, sk_b, sk_t, sk_h, so_t, so_h,
                    GROUPS: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    PAGE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr,
                    SPLITS: tl.constexpr, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr, ROPE: tl.constexpr,
                    KV_HEADS: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    tile, b, axis2 = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    kvh, split = axis2 // SPLITS, axis2 % SPLITS
    if ROPE:  # one query a sequence
        q0, q_len = b, 1
    else:
        q0 = tl.load(cu_q_ptr + b)
        q_len = tl.load(cu_q_ptr + b + 1) - q0
    if tile * BLOCK_M >= q_len:
        return
    ctx = tl.load(ctx_ptr + b)
    table = tables_ptr + tl.load(starts_ptr + b)

    r = tl.arange(0, BLOCK_M * BLOCK_G)
    tok = tile * BLOCK_M + r // BLOCK_G
    g = r % BLOCK_G
    heads = kvh * GROUPS + g
    row_ok = (tok < q_len) & (g < GROUPS)
    q_pos = ctx - q_len + tok
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = q_ptr + (q0 + tok)[:, None] * sq_t + heads[:, None] * sq_h
    q_mask = row_ok[:, None] & d_ok[None, :]
    if ROPE:
        # only the program whose chunk holds the new key writes it: tiles must not straddle chunks
        tl.static_assert(CHUNK % BLOCK_N == 0)
        q = _rope_decode(q_ptr, q_rows, cos_ptr, sin_ptr, slots_ptr, k_ptr, v_ptr, q0, kvh, ctx, split, sq_t, sk_b,
                         sk_t, sk_h, q_mask, GROUPS * KV_HEADS, KV_HEADS, HEAD_DIM, BLOCK_D, PAGE, CHUNK, SPLITS)
    else:
        q = tl.load(q_rows + d[None, :], mask=q_mask, other=0.0)
    m, l, acc = empty_state(BLOCK_M * BLOCK_G, BLOCK_D)
    # Keys up to this tile's last query; key 0 is visible to every row, so no row stays at -inf.
    # With SPLITS > 1, this program takes every SPLITS-th chunk and leaves each one's state for
    # _fold_kernel (one query a sequence: rows are sequences).
    kv_end = tl.minimum(ctx, ctx - q_len + (tile + 1) * BLOCK_M)
    for c0 in range(split * CHUNK, kv_end, SPLITS * CHUNK):
        m_c, l_c, acc_c = empty_state(BLOCK_M * BLOCK_G, BLOCK_D)
        for n0 in range(c0, tl.minimum(c0 + CHUNK, kv_end), BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            valid = pos < kv_end
            visible = valid[None, :] & (pos[None, :] <= q_pos[:, None])
            m_c, l_c, acc_c = _attend_tile(q, k_ptr, v_ptr, table, pos, valid, visible, kvh, sk_b, sk_t, sk_h, d,
                                           d_ok, m_c, l_c, acc_c, qk_scale, PAGE, PRECISION, SPLIT_P)
        if SPLITS == 1:
            m, l, acc = fold(m, l, acc, m_c, l_c, acc_c)
        else:
            slot = ((q0 + tok) * (GROUPS * tl.num_programs(2) // SPLITS) + heads) * max_chunks + c0 // CHUNK
            tl.store(state_ptr + 2 * slot, m_c, mask=row_ok)
            tl.store(state_ptr + 2 * slot + 1, l_c, mask=row_ok)
            tl.store(acc_ptr + slot[:, None] * BLOCK_D + d[None, :], acc_c, mask=row_ok[:, None])
    if SPLITS == 1:
        out, _ = finish(m, l, acc)
        tl.store(out_ptr + (q0 + tok)[:, None] * so_t + heads[:, None] * so_h + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _fold_kernel(state_ptr, acc_ptr, ctx_ptr, out_ptr, max_chunks, so_t, so_h, num_heads,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK: tl.constexpr, PDL: tl.constexpr):
    """The chunk states of one decode row (sequence b, head h), folded in order: the bits of one
    program walking them all."""
    await_previous(PDL)
    b, h = tl.program_id(0), tl.program_id(1)
    first = (b * num_heads + h) * max_chunks
    one = tl.arange(0, 1)
    d = tl.arange(0, BLOCK_D)
    m, l, acc = empty_state(1, BLOCK_D)
    for c in range(0, tl.cdiv(tl.load(ctx_ptr + b), CHUNK)):
        slot = first + c
        m_c = tl.load(state_ptr + 2 * slot + one)
        l_c = tl.load(state_ptr + 2 * slot + 1 + one)
        acc_c = tl.load(acc_ptr + slot * BLOCK_D + d[None, :])
        m, l, acc = fold(m, l, acc, m_c, l_c, acc_c)
    out, _ = finish(m, l, acc)
    tl.store(out_ptr + b * so_t + h * so_h + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=d[None, :] < HEAD_DIM)


def pack_block_tables(block_tables: list[list[int]], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Lists of block ids -> (tables int32 [sum of lengths], table_starts int32 [B])."""
    starts, flat = [], []
    for table in block_tables:
        starts.append(len(flat))
        flat.extend(table)
    return (torch.tensor(flat or [0], dtype=torch.int32, device=device),
            torch.tensor(starts, dtype=torch.int32, device=device))


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[int, int]:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match in shape and layout")
    if k_cache.dim() != 4 or k_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("the caches must be [num_blocks, block_size, kv_heads, head_dim] and q [.., heads, head_dim], "
                         "contiguous in head_dim")
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if heads % kv_heads or q.shape[2] != k_cache.shape[3] or q.dtype != k_cache.dtype:
        raise ValueError(f"q {tuple(q.shape)} {q.dtype} does not fit the cache {tuple(k_cache.shape)} {k_cache.dtype}: "
                         "heads must be a multiple of kv_heads, with the same head_dim and dtype")
    return heads // kv_heads, kv_heads


def decode_splits(batch: int, kv_heads: int, num_sms: int) -> int:
    """Split-K factor that gives about two programs per SM: 1 at batch 256 with 2 KV heads, 32 at
    batch 1 on an H100 (132 SMs)."""
    want = triton.cdiv(2 * num_sms, max(1, batch * kv_heads))
    return min(_MAX_SPLITS, triton.next_power_of_2(want))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                           table_starts: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           num_splits: int = 1, out: torch.Tensor | None = None) -> torch.Tensor:
    """One query per sequence: q [B, Hq, D] at position context_lens[b] - 1, attending to keys
    0 .. context_lens[b] - 1 of caches [num_blocks, block_size, Hkv, D] -> [B, Hq, D] in q's dtype.
    A row with context_lens[b] = 0 (CUDA-graph padding) gives zeros. num_splits is a power of two.
    `out`, when given, receives the result (a [B, Hq, D] view with unit stride in D)."""
    groups, kv_heads = _check_cache(q, k_cache, v_cache)
    if num_splits < 1 or num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two, got {num_splits}")
    batch, heads, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out
    block_d = triton.next_power_of_2(head_dim)
    part = lse = out
    if num_splits > 1:
        part = torch.empty(batch, heads, num_splits, block_d, device=q.device, dtype=torch.float32)
        lse = torch.empty(batch, heads, num_splits, device=q.device, dtype=torch.float32)
    _decode_kernel[(batch, kv_heads, num_splits)](
        q, k_cache, v_cache, tables, table_starts, context_lens, out, part, lse,
        scale * _LOG2E, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUPS=groups, BLOCK_G=max(16, triton.next_power_of_2(groups)), HEAD_DIM=head_dim, BLOCK_D=block_d,
        PAGE=k_cache.shape[1], BLOCK_N=_DECODE_BLOCK_N, NUM_SPLITS=num_splits, PRECISION=_precision(q.dtype),
        SPLIT_P=q.dtype != torch.float32, num_warps=4, enable_fp_fusion=False, **pdl_launch(q))
    if num_splits > 1:
        _merge_kernel[(batch, heads)](part, lse, out, out.stride(0), out.stride(1), heads,
                                      HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits, num_warps=4,
                                      enable_fp_fusion=False, **pdl_launch(q))
    return out


def _prefill_warps(rows: int, block_d: int, dtype: torch.dtype, programs: int, sms: int) -> int:
    """Warps of a prefill-kernel program holding `rows` score rows, in a grid of `programs` on a
    GPU of `sms` multiprocessors. 16-row decode tiles of 16-bit heads take 2 where 128 wide, and
    where 64 wide once the grid has at least 4 programs an SM, with the same bits: 0 of 3.8M
    outputs differed from the training forward at 1, 2, 4 or 8 warps in the sweep timed here, and
    SmolLM2's decodes gave the same bits at 2, 4 and 8 (fp32's float row sum follows the tile's
    layout, so it keeps 4). H100, one qwen2.5-1.5b layer's exact decode (16 rows, CUDA-graph
    replays over 4 layers' caches), 256 x 256-512 keys 43.7 us against 46.6 with 4 warps,
    66.6-73.6 with 1, 48.3-55.0 with 8; 128 x 300-2,400 keys 77.4 against 77.9. SmolLM2's heads
    (rotary in the launch, 12 layers' caches, 59-314 keys): 768 programs 21.3 us against 22.6
    with 4 warps, 576 18.5 against 19.0, 480 16.8 against 15.5, 192 13.0 against 12.1 (the
    engine at 256 sequences 171.4K against 166.8K tokens/s, the same tokens); other widths were
    not measured and keep 4."""
    if rows >= 128:
        return 8
    if rows > 16 or dtype == torch.float32:
        return 4
    return 2 if block_d == 128 or (block_d == 64 and programs >= 4 * sms) else 4


def decode_rows(dtype: torch.dtype) -> int:
    """Score rows of a prefill-kernel program whose slices are all one decode token: 16 for 16-bit
    inputs (G heads of one token fill a tile of 16 at G <= 16; H100, AZR mix on qwen2.5-1.5b,
    exact mode: 34,116-34,535 tokens/s with 64 rows, 39,505-39,640 with 16), 64 for fp32, whose
    float row sum is held to the trainer's bits only at the heights the GPU tests check."""
    return 64 if dtype == torch.float32 else 16


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                            table_starts: torch.Tensor, cu_q_lens: torch.Tensor, context_lens: torch.Tensor,
                            max_q_len: int, scale: float, out: torch.Tensor | None = None,
                            rows: int | None = None, splits: int = 1, max_context: int | None = None) -> torch.Tensor:
    """Packed queries q [T, Hq, D]: sequence b owns rows cu_q_lens[b] .. cu_q_lens[b + 1] - 1, the
    last q_len tokens of its context_lens[b]; each attends causally to its cached keys, its own
    new ones included -> [T, Hq, D] in q's dtype. max_q_len bounds the grid (the host knows it).
    `out`, when given, receives the result. `rows`: score rows a program holds (128 by default); a
    row's result does not depend on it for 16-bit inputs at any power of two from 16 (row sums in
    fixed point, attention_math.row_sum), for fp32 at 64 or 128 (its float row sum follows the
    tile's layout; those two agree in the GPU tests, others were not tried).
    Decodes, one real token in a tile, take decode_rows(dtype).

    `splits` > 1 (decodes only: max_q_len 1) spreads each sequence's KEY_CHUNK-key chunks over
    that many programs and folds their states in a second kernel, with the same bits as 1: what
    fills the GPU when few sequences decode long contexts. It keeps an fp32 state per row, head
    and chunk of up to `max_context` keys (default: the longest context, read from the device,
    which a CUDA graph cannot do): at 32K keys, 400 KB a sequence for 12 heads of 128."""
    return _prefill(q, k_cache, v_cache, tables, table_starts, cu_q_lens, context_lens, max_q_len, scale, out, rows,
                    splits, max_context, None)


def paged_decode_rope_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                                k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                                table_starts: torch.Tensor, context_lens: torch.Tensor, heads: int, scale: float,
                                rows: int | None = None, splits: int = 1, max_context: int | None = None,
                                out: torch.Tensor | None = None) -> torch.Tensor:
    """layer_fusions.rope_to_cache, then paged_prefill_attention over one query a sequence, in
    one launch (plus the fold's, with `splits` > 1): sequence b decodes the token of qkv's row b
    ([B, (heads + 2 Hkv) D], unit column stride) at position context_lens[b] - 1, rotated by row
    context_lens[b] - 1 of cos, sin [P, D] (contiguous tables of positions 0 .. P - 1, as
    Decoder.rotary gives them; a padding row, context 0, takes row 0); its rotated key and its
    value go to flat cache slot slots[b], and its rotated query heads attend -> [B, heads, D].
    The same bits as the two calls: each program rotates its rows of q with rope_math, and the
    program whose key chunk holds the new token writes it before it reads the cache. What it
    saves a layer: a launch, q's round trip through memory, and (once a pass) the gather of each
    row's cos and sin; a decode pass of SmolLM2-135M was ~240 launches of a few us each."""
    if qkv.dim() != 2 or k_cache.dim() != 4:
        raise ValueError(f"qkv {tuple(qkv.shape)} must be [B, (heads + 2 kv_heads) head_dim] and the caches "
                         f"{tuple(k_cache.shape)} [num_blocks, block_size, kv_heads, head_dim]")
    kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    if qkv.shape[1] != (heads + 2 * kv_heads) * head_dim or qkv.stride(1) != 1:
        raise ValueError(f"qkv {tuple(qkv.shape)} must be [B, (heads + 2 kv_heads) head_dim] = [B, "
                         f"{(heads + 2 * kv_heads) * head_dim}] with unit column stride")
    batch = context_lens.shape[0]
    if qkv.shape[0] != batch or slots.shape != (batch,):
        raise ValueError(f"one token a sequence: qkv {tuple(qkv.shape)} and slots {tuple(slots.shape)} must have "
                         f"{batch} rows, one per context length")
    if cos.dim() != 2 or cos.shape[1] != head_dim or sin.shape != cos.shape:
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be tables [positions, "
                         f"{head_dim}] (every context's last position among them: the kernel does not check)")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ValueError(f"cos and sin ({cos.dtype}, {sin.dtype}) must be in qkv's dtype {qkv.dtype}: the rotary "
                         "rounds each product to it, as the trainer's does")
    if not (cos.is_contiguous() and sin.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("paged_decode_rope_attention needs contiguous cos, sin and caches")
    q = qkv[:, :heads * head_dim].unflatten(1, (heads, head_dim))
    # the kernel takes row b as sequence b's query (ROPE): no cu_seqlens
    return _prefill(q, k_cache, v_cache, tables, table_starts, context_lens, context_lens, 1, scale, out, rows,
                    splits, max_context, (cos, sin, slots))


def _prefill(q, k_cache, v_cache, tables, table_starts, cu_q_lens, context_lens, max_q_len, scale, out, rows, splits,
             max_context, rope):
    groups, kv_heads = _check_cache(q, k_cache, v_cache)
    head_dim = q.shape[2]
    batch = context_lens.shape[0]
    out = torch.empty(q.shape, device=q.device, dtype=q.dtype) if out is None else out
    block_g = triton.next_power_of_2(groups)
    block_m = max(1, (rows or _PREFILL_ROWS) // block_g)
    # tl.dot needs 16 rows: a lone token of a small group still gets a 16-row tile
    block_m = max(block_m, triton.cdiv(16, block_g))
    block_d = triton.next_power_of_2(head_dim)
    chunk = attention_math.KEY_CHUNK
    state = chunk_acc = out
    max_chunks = 1
    if splits > 1:
        if max_q_len != 1 or q.shape[0] != batch:
            raise ValueError(f"splits > 1 is for decodes, one query a sequence (max_q_len 1): got {q.shape[0]} "
                             f"queries for {batch} sequences, max_q_len {max_q_len}")
        if max_context is None:
            max_context = int(context_lens.max()) if batch else 1
        max_chunks = max(1, triton.cdiv(max_context, chunk))
        state = torch.empty(q.shape[0] * q.shape[1] * max_chunks * 2, device=q.device, dtype=torch.float32)
        chunk_acc = torch.empty(q.shape[0] * q.shape[1] * max_chunks, block_d, device=q.device, dtype=torch.float32)
    grid = (triton.cdiv(max_q_len, block_m), batch, kv_heads * splits)
    cos, sin, slots = rope if rope is not None else (out, out, out)
    _prefill_kernel[grid](
        q, k_cache, v_cache, tables, table_starts, cu_q_lens, context_lens, out, state, chunk_acc, cos, sin, slots,
        scale * _LOG2E, max_chunks, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1),
        GROUPS=groups, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d, PAGE=k_cache.shape[1], BLOCK_M=block_m,
        BLOCK_N=_PREFILL_BLOCK_N, CHUNK=chunk, SPLITS=splits, PRECISION=_precision(q.dtype),
        SPLIT_P=q.dtype != torch.float32, ROPE=rope is not None, KV_HEADS=kv_heads,
        num_warps=_prefill_warps(block_m * block_g, block_d, q.dtype, grid[0] * grid[1] * grid[2],
                                 multiprocessors(q, interpreted=1)),
        enable_fp_fusion=False, **pdl_launch(q))
    if splits > 1 and batch:
        _fold_kernel[(batch, q.shape[1])](state, chunk_acc, context_lens, out, max_chunks, out.stride(0), out.stride(1),
                                          q.shape[1], HEAD_DIM=head_dim, BLOCK_D=block_d, CHUNK=chunk, num_warps=1,
                                          enable_fp_fusion=False, **pdl_launch(q))
    return out
