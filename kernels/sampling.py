"""Fused Gumbel-max sampling, in two forms. gumbel_sample: one pass over each row of logits
computes the log-sum-exp of logits / T, the counter-based noise and the argmax together, and
returns the token and its logprob. linear_gumbel_sample: the same straight from the final hidden
states and the lm_head weight, the logits never written: the lm_head GEMM's epilogue folds each
logit tile into the row's running log-sum-exp and best noisy score. Inference only (nothing to
differentiate); the reference is sampling_reference.py.

The torch composition materializes the noise and its hash intermediates as [B, V] int64 and
fp32 tensors: ~10 passes over 311 MB at B = 256, V = 151,936. gumbel_sample reads the logits
once (B x V x 4 bytes) and writes 12 bytes a row; linear_gumbel_sample also skips writing and
reading those logits (H100, B = 256, Qwen2.5-1.5B, graph-timed: cuBLAS's fp32 lm_head GEMM
and gumbel_sample together 413 us, linear_gumbel_sample 362, the same tokens). Rows with top-k /
top-p are not handled here (their filter needs a sort); the rollout sampler sends those through
the reference."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.logprobs import Tiles, default_tiles, dot_precision, logits_tile, tile_operands, vocab_splits
from fastazr.kernels.runtime import await_previous, interpreting, pdl_launch, use_triton
from fastazr.kernels.sampling_reference import (COLUMN_MULTIPLIER, gumbel_sample_reference,
                                                linear_gumbel_sample_reference)

__all__ = ["gumbel_sample", "linear_gumbel_sample"]

# 4096 columns a trip: 37 trips over Qwen's vocabulary, 16 KB of fp32 loads in flight per program.
_BLOCK_V = 4096
# The split merge's block: 16 rows x 128 splits (SmolLM2's 64-row decode has 192 splits). The
# interpreter takes 2 splits a trip, so that CI's 4 splits span two trips.
_MERGE_ROWS, _MERGE_SPLITS = (16, 2) if interpreting() else (16, 128)


@triton.jit
def _mix32(x):
    # uint32: products wrap mod 2^32 and shifts are logical, exactly the reference's masked int64
    # arithmetic at a fraction of the cost (64-bit integer multiplies are emulated on the GPU)
    x = x ^ (x >> 16)
    x = x * 0x85EBCA6B
    x = x ^ (x >> 13)
    x = x * 0xC2B2AE35
    return x ^ (x >> 16)


@triton.jit
def _low32(x):
    return (x & 0xFFFFFFFF).to(tl.uint32)


@triton.jit
def _row_key(seed, sample, step):
    """row_keys() of the reference (seed, sample, step int64, scalars or vectors), here rather
    than as ~20 tiny torch launches (~0.2 ms of host time a decode step)."""
    key = _mix32(_mix32(_low32(seed)) ^ _low32(seed >> 32))
    return _mix32(_mix32(key ^ _low32(sample)) ^ _low32(step))


@triton.jit
def _gumbel(cols, key, MULTIPLIER: tl.constexpr):
    """The reference's Gumbel noise (uniform_noise, gumbel_noise) of vocabulary columns under row
    keys (broadcastable int shapes)."""
    bits = _mix32((cols.to(tl.uint32) * MULTIPLIER) ^ key)
    u = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
    return -tl.log(tl.maximum(-tl.log(u), 5.9604644775390625e-08))


@triton.jit
def _sample_kernel(logits_ptr, temp_ptr, seeds_ptr, samples_ptr, steps_ptr, tokens_ptr, logprobs_ptr, vocab,
                   stride_row, MULTIPLIER: tl.constexpr, BLOCK_V: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    row = tl.program_id(0)
    temp = tl.load(temp_ptr + row)
    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    key = _row_key(tl.load(seeds_ptr + row), tl.load(samples_ptr + row), tl.load(steps_ptr + row))
    base = logits_ptr + row.to(tl.int64) * stride_row
    m = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    best = tl.full([BLOCK_V], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK_V], tl.int64)
    best_scaled = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, vocab, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        inside = cols < vocab
        scaled = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32) * inv_t
        # per-lane online log-sum-exp; lanes merge once after the loop
        m_new = tl.maximum(m, scaled)
        # a lane that has seen only -inf (padding, a banned token) subtracts 0, not -inf: no NaN
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        s = s * tl.exp(m - m_safe) + tl.exp(scaled - m_safe)
        m = m_new
        score = tl.where(inside, scaled + tl.where(greedy, 0.0, _gumbel(cols, key, MULTIPLIER)), float("-inf"))
        # strictly greater: the first column wins a tie, as torch.argmax picks
        better = score > best
        best = tl.where(better, score, best)
        best_col = tl.where(better, cols, best_col)
        best_scaled = tl.where(better, scaled, best_scaled)
    top = tl.max(m, axis=0)
    lse = top + tl.log(tl.sum(s * tl.exp(m - top), axis=0))
    winner = tl.max(best, axis=0)
    # the lowest column among lanes holding the maximum score
    col = tl.min(tl.where(best == winner, best_col, vocab), axis=0)
    picked = tl.max(tl.where(best_col == col, best_scaled, float("-inf")), axis=0)
    tl.store(tokens_ptr + row, col)
    tl.store(logprobs_ptr + row, picked - lse)


@triton.jit
def _linear_sample_kernel(h, w, temp_ptr, seeds_ptr, samples_ptr, steps_ptr, part_ptr, col_ptr,
                          N, V, H, stride_h, stride_w, n_blocks, v_tiles, tiles_per_split,
                          MULTIPLIER: tl.constexpr, NOISE: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
                          PRECISION: tl.constexpr, FLATTEN: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    # The grid of the trainer's logprob forward (logprobs.py): program = (vocabulary split, row
    # block), consecutive programs share a split's weight tiles in L2. Each leaves per row its
    # split's max and sum of exp(logits / T - max), best noisy score, that score's column and
    # logit / T; _linear_merge_kernel folds the splits in order.
    pid = tl.program_id(0)
    split = pid // n_blocks
    row0 = (pid % n_blocks) * BLOCK_N
    rows = row0 + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    temp = tl.load(temp_ptr + rows, mask=row_ok, other=1.0)
    greedy = temp == 0.0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    key = _row_key(tl.load(seeds_ptr + rows, mask=row_ok, other=0), tl.load(samples_ptr + rows, mask=row_ok, other=0),
                   tl.load(steps_ptr + rows, mask=row_ok, other=0))
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_col = tl.zeros([BLOCK_N], tl.int32)
    best_scaled = tl.zeros([BLOCK_N], tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, v_tiles)
    for tile in tl.range(first, last, flatten=FLATTEN):
        col0 = tile * BLOCK_V
        cols = col0 + tl.arange(0, BLOCK_V)
        y = logits_tile(h, w, row0, col0, N, V, H, stride_h, stride_w, 1.0,
                        BLOCK_N, BLOCK_V, BLOCK_K, TMA, EVEN_K, PRECISION)
        # columns past V hold finite logits (zero or wrapped rows): -inf keeps them out; every
        # tile has a column inside, so m stays finite and exp(m - m_new) needs no guard
        scaled = tl.where(cols[None, :] < V, y * inv_t[:, None], float("-inf"))
        m_new = tl.maximum(m, tl.max(scaled, 1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(scaled - m_new[:, None]), 1)
        m = m_new
        score = scaled
        if NOISE:
            score += tl.where(greedy[:, None], 0.0, _gumbel(cols[None, :], key[:, None], MULTIPLIER))
        tile_best = tl.max(score, 1)
        # the tile's lowest column holding its best score; an earlier tile keeps a tie
        tile_col = tl.min(tl.where(score == tile_best[:, None], cols[None, :], V), 1)
        tile_scaled = tl.max(tl.where(cols[None, :] == tile_col[:, None], scaled, float("-inf")), 1)
        better = tile_best > best
        best = tl.where(better, tile_best, best)
        best_col = tl.where(better, tile_col, best_col)
        best_scaled = tl.where(better, tile_scaled, best_scaled)
    out = part_ptr + split * 4 * N + rows
    tl.store(out, m, mask=row_ok)
    tl.store(out + N, s, mask=row_ok)
    tl.store(out + 2 * N, best, mask=row_ok)
    tl.store(out + 3 * N, best_scaled, mask=row_ok)
    tl.store(col_ptr + split * N + rows, best_col, mask=row_ok)


@triton.jit
def _linear_merge_kernel(part_ptr, col_ptr, tokens_ptr, logprobs_ptr, N, splits, BLOCK_R: tl.constexpr,
                         BLOCK_S: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    # A [BLOCK_S splits, BLOCK_R rows] block a trip, folded online. A loop of one split a trip
    # was a chain of dependent loads: 42 us at 64 rows in 192 splits (SmolLM2's decode, H100, 3%
    # of a step). With this merge and sampling_tiles' small-model tiles the step took 49 us less.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < N
    top = tl.full([BLOCK_R], float("-inf"), tl.float32)
    total = tl.zeros([BLOCK_R], tl.float32)
    best = tl.full([BLOCK_R], float("-inf"), tl.float32)
    col = tl.zeros([BLOCK_R], tl.int32)
    picked = tl.zeros([BLOCK_R], tl.float32)
    for s0 in range(0, splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        inside = (sp < splits)[:, None] & ok[None, :]
        base = part_ptr + sp[:, None] * 4 * N + rows[None, :]
        # every real split's max is finite (each holds a column inside the vocabulary); padding
        # reads -inf with a sum of 0, so it adds 0 * exp(-inf) = 0 and never wins
        m = tl.load(base, mask=inside, other=float("-inf"))
        new_top = tl.maximum(top, tl.max(m, 0))
        safe = tl.where(new_top > float("-inf"), new_top, 0.0)
        total = total * tl.exp(top - safe) + tl.sum(tl.load(base + N, mask=inside, other=0.0) *
                                                    tl.exp(m - safe[None, :]), 0)
        top = new_top
        score = tl.load(base + 2 * N, mask=inside, other=float("-inf"))
        block_best = tl.max(score, 0)
        # the block's first split holding its best score (lower columns win a tie), and an
        # earlier block keeps a tie: strictly greater
        first = tl.min(tl.where(score == block_best[None, :], sp[:, None], splits), 0)
        at_first = sp[:, None] == first[None, :]
        better = block_best > best
        best = tl.where(better, block_best, best)
        col = tl.where(better, tl.max(tl.where(at_first, tl.load(col_ptr + sp[:, None] * N + rows[None, :],
                                                                   mask=inside, other=0), -1), 0), col)
        picked = tl.where(better, tl.max(tl.where(at_first, tl.load(base + 3 * N, mask=inside, other=0.0),
                                                  float("-inf")), 0), picked)
    tl.store(tokens_ptr + rows, col.to(tl.int64), mask=ok)
    tl.store(logprobs_ptr + rows, picked - (top + tl.log(total)), mask=ok)


def _check_rows(where: str, rows: torch.Tensor, temperature, seeds, samples, steps) -> None:
    """Shapes, dtypes and devices of the per-row inputs: [B] each, temperature floating, the
    hash's inputs int64 (an int32 seed hashed to other tokens on CPU and was read as 64 bits by
    the kernel). Values are not read: that would cost a host synchronization every step (the
    engine checks temperatures where requests come in)."""
    for name, t in (("temperature", temperature), ("seeds", seeds), ("samples", samples), ("steps", steps)):
        if not isinstance(t, torch.Tensor) or t.shape != (rows.shape[0],) or t.device != rows.device:
            raise ValueError(f"{where}: {name} must be a tensor [B={rows.shape[0]}] on {rows.device}, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}"
                             f"{' on ' + str(t.device) if isinstance(t, torch.Tensor) else ''}")
        if name == "temperature" and not t.is_floating_point():
            raise ValueError(f"{where}: temperature must be floating point, got {t.dtype}")
        if name != "temperature" and t.dtype != torch.int64:
            raise ValueError(f"{where}: {name} must be int64, got {t.dtype}")


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor, samples: torch.Tensor,
                  steps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What gumbel_sample_reference(logits, temperature, seeds, samples, steps) returns, in one
    kernel on CUDA (or the interpreter); the reference elsewhere."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"gumbel_sample: logits must be a floating tensor [B, V], got "
                         f"{logits.dtype if isinstance(logits, torch.Tensor) else type(logits).__name__}")
    _check_rows("gumbel_sample", logits, temperature, seeds, samples, steps)
    if not use_triton(logits):
        return gumbel_sample_reference(logits, temperature, seeds, samples, steps)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    tokens = torch.empty(batch, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(batch, dtype=torch.float32, device=logits.device)
    if batch:
        _sample_kernel[(batch,)](logits, temperature.float().contiguous(), seeds.contiguous(), samples.contiguous(),
                                 steps.contiguous(), tokens, logprobs, vocab, logits.stride(0),
                                 MULTIPLIER=COLUMN_MULTIPLIER, BLOCK_V=_BLOCK_V, num_warps=8,
                                 **pdl_launch(logits))
    return tokens, logprobs


def sampling_tiles(hidden: torch.Tensor, vocab: int) -> tuple[Tiles, int]:
    """Block shape of linear_gumbel_sample's GEMM and its programs an SM (vocabulary splits).
    The logprob forward's (logprobs.py), but 128 vocabulary columns a tile instead of 256 at
    16-bit: the epilogue holds ~5 fp32 values per logit (scaled logit, hash, noise, score, exp)
    for 64 x 128 / 128 threads = 64 logits a thread. H100, 256 rows x 151,936, us: 64 x 128, 4
    warps, 4 stages, flattened, 2 programs an SM 351-362; 3 stages 380-390; 128 x 128 or 128 x 64
    339-390; 64 x 64 348-431; 64 x 256 453 with 8 warps, 1,316-1,610 with 4 (spills); unflattened
    10-15% slower. A small model's short K loop hides less of the epilogue (SmolLM2's lm_head:
    H = 576, V = 49,152; 4 weights in turn so that none sits in L2; the same tokens in every
    shape): at 64 rows, one row block, 64 x 128 x 64 tiles with 8 warps and one program an SM
    (128 splits) 40.5-42.6 us, the large model's choice 75-78; at 256 rows 64 x 64 tiles, 4
    warps, 4 stages, 3 programs an SM 79.8 us, the large model's choice 107.4, 2 programs 91.5,
    cuBLAS's fp32 logits + gumbel_sample 105.3. Those past 64 rows are taken only at the
    measured kind of shape (H <= 1024, V <= 65,536)."""
    tiles = default_tiles(hidden, backward=False)
    if interpreting() or hidden.dtype == torch.float32:
        return tiles, 2
    if hidden.shape[1] <= 1024 and hidden.shape[0] <= 64:
        return Tiles(block_n=64, block_v=128, block_k=64, num_warps=8, num_stages=4, tma=tiles.tma,
                     flatten=tiles.tma), 1
    if hidden.shape[1] <= 1024 and vocab <= 65536:
        return Tiles(block_n=64, block_v=64, block_k=64, num_warps=4, num_stages=4, tma=tiles.tma,
                     flatten=tiles.tma), 3
    return Tiles(block_n=64, block_v=128, block_k=64, num_warps=4, num_stages=4, tma=tiles.tma, flatten=tiles.tma), 2


def linear_gumbel_sample(hidden: torch.Tensor, weight: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                         samples: torch.Tensor, steps: torch.Tensor, all_greedy: bool = False,
                         tiles: Tiles | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """gumbel_sample(hidden @ weight.T in fp32, ...) without the logits: hidden [B, H] and weight
    [V, H] of one dtype -> (tokens int64 [B], fp32 logprobs [B]). `all_greedy` (every temperature
    0) skips the noise. The reference elsewhere than CUDA or the interpreter."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or hidden.dtype != weight.dtype \
            or hidden.device != weight.device or not hidden.is_floating_point() or not weight.shape[0]:
        raise ValueError(f"linear_gumbel_sample: hidden {tuple(hidden.shape)} {hidden.dtype} and weight "
                         f"{tuple(weight.shape)} {weight.dtype} must be [B, H] and [V >= 1, H] of one floating dtype, "
                         "on one device")
    _check_rows("linear_gumbel_sample", hidden, temperature, seeds, samples, steps)
    if not use_triton(hidden):
        return linear_gumbel_sample_reference(hidden, weight, temperature, seeds, samples, steps)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    (n, h), vocab = hidden.shape, weight.shape[0]
    tokens = torch.empty(n, dtype=torch.int64, device=hidden.device)
    logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
    if not n:
        return tokens, logprobs
    tiles, per_sm = (tiles, 2) if tiles else sampling_tiles(hidden, vocab)
    n_blocks = triton.cdiv(n, tiles.block_n)
    v_tiles = triton.cdiv(vocab, tiles.block_v)
    per_split = triton.cdiv(v_tiles, vocab_splits(hidden, n_blocks, v_tiles, per_sm))
    splits = triton.cdiv(v_tiles, per_split)
    partials = torch.empty(splits, 4, n, dtype=torch.float32, device=hidden.device)
    columns = torch.empty(splits, n, dtype=torch.int32, device=hidden.device)
    h_op, w_op = tile_operands(hidden, weight, tiles)
    _linear_sample_kernel[(splits * n_blocks,)](
        h_op, w_op, temperature.float().contiguous(), seeds.contiguous(), samples.contiguous(), steps.contiguous(),
        partials, columns, n, vocab, h, hidden.stride(0), weight.stride(0), n_blocks, v_tiles, per_split,
        MULTIPLIER=COLUMN_MULTIPLIER, NOISE=not all_greedy, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
        BLOCK_K=tiles.block_k, TMA=tiles.tma, EVEN_K=h % tiles.block_k == 0, PRECISION=dot_precision(hidden.dtype),
        FLATTEN=tiles.flatten, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
        **pdl_launch(hidden))
    _linear_merge_kernel[(triton.cdiv(n, _MERGE_ROWS),)](partials, columns, tokens, logprobs, n, splits,
                                                         BLOCK_R=_MERGE_ROWS, BLOCK_S=_MERGE_SPLITS, num_warps=4,
                                                         **pdl_launch(hidden))
    return tokens, logprobs
