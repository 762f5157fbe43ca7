"""Causal attention of the training forward over packed variable-length sequences, forward and
backward: what the rollout engine computes, to the last bit.

The forward folds keys with attention_math.softmax_step in the tiles of the engine's prefill
kernel (64 keys from key 0, 128-row warpgroup tiles, chunks of KEY_CHUNK keys merged in order),
through which the engine also decodes by default: its outputs are the engine's bit for bit
(tests/test_varlen_attention.py), and the trainer's logprobs the engine's to fp32 rounding.
torch's and flash-attn's kernels round P to bf16 first and differ from it in ~40% of outputs.
The reference is varlen_attention_reference.py.

The backward is FlashAttention-2's (recompute P from the saved log-sum-exp, never store it): a
dQ kernel that walks the key tiles of each query tile and also makes the row term
D = rowsum(dO * O) from the tiles it loads, then a dK/dV kernel that walks the query tiles of
each key tile for the query heads of its KV head (GQA needs no atomics; SPLIT programs may share
a KV head's query heads and sum fp32 partials after). Only tiles that straddle the diagonal
are masked, and every grid starts each sequence's heaviest tiles first. Gradients need not
match anything bit for bit, so P and dS meet the tensor cores in the input dtype, and the
backward's tiles are tuned freely (_DQ, _DKDV).

Layout: q [T, Hq, D], k and v [T, Hkv, D] with unit stride in D (the fused qkv projection's
column views are fine); cu_seqlens int32 [B + 1]; grids (heads, B, tiles of the longest
sequence), so programs past a shorter sequence's end return at once."""

from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl

from fastazr.kernels import attention_math
from fastazr.kernels.attention_math import empty_state, finish, fold, softmax_step

__all__ = ["varlen_attention"]

_LOG2E = 1.4426950408889634
# Forward: 128 queries x 64 keys a tile, the engine's prefill tiles (its bits depend on them).
_FWD = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8)
# Backward tiles, free of the forward's bits, for 16-bit inputs: the fastest of 50 on an H100
# at a qwen2.5-1.5b micro-batch (16K tokens, 12 / 2 heads x 128; bench/tune_attention.py,
# docs/kernels.md): fwd+bwd 1.70 ms against 2.30 with the fp32 tiles below. SPLIT: programs
# that share one KV head's query heads for dK and dV (each sums GROUPS / SPLIT of them into an
# fp32 partial, summed after); 3 beat 1 (1.67 ms) and 6 (1.80). fp32 inputs take 64 x 64
# tiles in 8 warps: the 16-bit dQ tiles need 288 KiB of shared memory in fp32, over the
# H100's 227.
_DQ = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
_DKDV = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2, SPLIT=3)
_DQ_FP32 = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)
_DKDV_FP32 = dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3, SPLIT=1)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _span(first, start, length, BLOCK: tl.constexpr):
    """Positions first .. first + BLOCK - 1 of a sequence, which of them it has, and their rows
    in the packed tensors (int64: T x heads x D overflows int32 at 16K tokens)."""
    pos = first + tl.arange(0, BLOCK)
    return pos, pos < length, (start + pos).to(tl.int64)


@triton.jit
def _load(ptr, rows, head, stride_t, stride_h, d, mask):
    """One head's [rows, D] tile of a [T, heads, D] tensor, 0 where `mask` is off."""
    return tl.load(ptr + rows[:, None] * stride_t + head * stride_h + d[None, :], mask=mask, other=0.0)


@triton.jit
def _forward_kernel(q_ptr, k_ptr, v_ptr, cu_ptr, out_ptr, lse_ptr, qk_scale,
                    sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, so_t, so_h, heads,
                    GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                    SPLIT_P: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    # grid axis 2 counts from each sequence's last (longest) query tile: every sequence's heavy
    # tiles start in the first wave instead of the last one's trailing behind the triangle
    tile = tl.cdiv(length, BLOCK_M) - 1 - tl.program_id(2)
    if tile < 0:
        return
    kvh = h // GROUPS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows, row_ok, tok = _span(tile * BLOCK_M, start, length, BLOCK_M)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load(q_ptr, tok, h, sq_t, sq_h, d, q_mask)
    m, l, acc = empty_state(BLOCK_M, BLOCK_D)
    kv_end = tl.minimum(length, (tile + 1) * BLOCK_M)
    for c0 in range(0, kv_end, CHUNK):
        m_c, l_c, acc_c = empty_state(BLOCK_M, BLOCK_D)
        for n0 in range(c0, tl.minimum(c0 + CHUNK, kv_end), BLOCK_N):
            cols, col_ok, key = _span(n0, start, length, BLOCK_N)
            kv_mask = col_ok[:, None] & d_ok[None, :]
            k = _load(k_ptr, key, kvh, sk_t, sk_h, d, kv_mask)
            v = _load(v_ptr, key, kvh, sv_t, sv_h, d, kv_mask)
            visible = col_ok[None, :] & (cols[None, :] <= rows[:, None])
            m_c, l_c, acc_c = softmax_step(q, k, v, visible, m_c, l_c, acc_c, qk_scale, PRECISION, SPLIT_P)
        m, l, acc = fold(m, l, acc, m_c, l_c, acc_c)
    out, lse = finish(m, l, acc)
    tl.store(out_ptr + tok[:, None] * so_t + h * so_h + d[None, :], out.to(out_ptr.dtype.element_ty), mask=q_mask)
    tl.store(lse_ptr + tok * heads + h, lse, mask=row_ok)


@triton.jit
def _probabilities(q, k, lse, rows, cols, qk_scale, PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
    """P [M, N] of query rows against key columns, recomputed from the forward's log2-sum-exp.
    CAUSAL: the tile straddles the diagonal, and P is exactly 0 above it. Rows and columns past
    the sequence need no mask: their q, dO and D (or k and v) were loaded as 0, which zeroes
    every product they enter."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.exp2(s - lse[:, None])
    if CAUSAL:
        p = tl.where(cols[None, :] <= rows[:, None], p, 0.0)
    return p


@triton.jit
def _dkdv_step(q_ptr, do_ptr, lse_ptr, delta_ptr, k, v, dk, dv, m0, start, length, cols, h, d, d_ok, qk_scale,
               sq_t, sq_h, sdo_t, sdo_h, heads,
               BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
    """dK and dV of a key tile plus the contribution of query rows m0 .. m0 + BLOCK_M - 1 of head h."""
    rows, row_ok, tok = _span(m0, start, length, BLOCK_M)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load(q_ptr, tok, h, sq_t, sq_h, d, q_mask)
    do = _load(do_ptr, tok, h, sdo_t, sdo_h, d, q_mask)
    lse = tl.load(lse_ptr + tok * heads + h, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + tok * heads + h, mask=row_ok, other=0.0)
    p = _probabilities(q, k, lse, rows, cols, qk_scale, PRECISION, CAUSAL)
    dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    return dk, dv


# `tokens` changes with every micro-batch; specialized (divisible by 16 or not), it would cost a
# compile mid-update
@triton.jit(do_not_specialize=["tokens"])
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, dk_ptr, dv_ptr, qk_scale, scale,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, heads, tokens,
                 GROUPS: tl.constexpr, SPLIT: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    kvh, part = tl.program_id(0) // SPLIT, tl.program_id(0) % SPLIT
    b = tl.program_id(1)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    # key tile 0 sees every query: grid axis 2 in natural order starts the heaviest tiles first
    tile = tl.program_id(2)
    if tile * BLOCK_N >= length:
        return
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    cols, col_ok, key = _span(tile * BLOCK_N, start, length, BLOCK_N)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = _load(k_ptr, key, kvh, sk_t, sk_h, d, kv_mask)
    v = _load(v_ptr, key, kvh, sv_t, sv_h, d, kv_mask)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    # queries before the key tile cannot see it; those in its span see part of it (BLOCK_N is a
    # multiple of BLOCK_M); those after see all of it, unmasked
    diagonal_end = tl.minimum(length, (tile + 1) * BLOCK_N)
    for g in range(GROUPS // SPLIT):
        h = kvh * GROUPS + part * (GROUPS // SPLIT) + g
        for m0 in range(tile * BLOCK_N, diagonal_end, BLOCK_M):
            dk, dv = _dkdv_step(q_ptr, do_ptr, lse_ptr, delta_ptr, k, v, dk, dv, m0, start, length, cols, h, d,
                                d_ok, qk_scale, sq_t, sq_h, sdo_t, sdo_h, heads, BLOCK_M, PRECISION, True)
        for m0 in range(diagonal_end, length, BLOCK_M):
            dk, dv = _dkdv_step(q_ptr, do_ptr, lse_ptr, delta_ptr, k, v, dk, dv, m0, start, length, cols, h, d,
                                d_ok, qk_scale, sq_t, sq_h, sdo_t, sdo_h, heads, BLOCK_M, PRECISION, False)
    # SPLIT > 1: partials [SPLIT, T, Hkv, D] in fp32, summed by the caller
    out = (part * tokens + key[:, None]) * (heads // GROUPS) * HEAD_DIM + kvh * HEAD_DIM + d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(k_ptr, v_ptr, q, do, lse, delta, dq, n0, start, length, rows, kvh, d, d_ok, qk_scale,
             sk_t, sk_h, sv_t, sv_h, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, CAUSAL: tl.constexpr):
    cols, col_ok, key = _span(n0, start, length, BLOCK_N)
    kv_mask = col_ok[:, None] & d_ok[None, :]
    k = _load(k_ptr, key, kvh, sk_t, sk_h, d, kv_mask)
    v = _load(v_ptr, key, kvh, sv_t, sv_h, d, kv_mask)
    p = _probabilities(q, k, lse, rows, cols, qk_scale, PRECISION, CAUSAL)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, out_ptr, lse_ptr, delta_ptr, cu_ptr, dq_ptr, qk_scale, scale,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, so_t, so_h, heads,
               GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    tile = tl.cdiv(length, BLOCK_M) - 1 - tl.program_id(2)  # heaviest first, as in the forward
    if tile < 0:
        return
    kvh = h // GROUPS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows, row_ok, tok = _span(tile * BLOCK_M, start, length, BLOCK_M)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load(q_ptr, tok, h, sq_t, sq_h, d, q_mask)
    do = _load(do_ptr, tok, h, sdo_t, sdo_h, d, q_mask)
    lse = tl.load(lse_ptr + tok * heads + h, mask=row_ok, other=0.0)
    # D_i = sum_d dO * O, the softmax backward's row term, made here from the tile's dO and O
    # and stored for the dK/dV kernel that runs next (no separate pass, no fp32 copies)
    o = _load(out_ptr, tok, h, so_t, so_h, d, q_mask)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(delta_ptr + tok * heads + h, delta, mask=row_ok)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # key tiles wholly before the query tile need no mask (BLOCK_M is a multiple of BLOCK_N)
    for n0 in range(0, tile * BLOCK_M, BLOCK_N):
        dq = _dq_step(k_ptr, v_ptr, q, do, lse, delta, dq, n0, start, length, rows, kvh, d, d_ok, qk_scale,
                      sk_t, sk_h, sv_t, sv_h, BLOCK_N, PRECISION, False)
    for n0 in range(tile * BLOCK_M, tl.minimum(length, (tile + 1) * BLOCK_M), BLOCK_N):
        dq = _dq_step(k_ptr, v_ptr, q, do, lse, delta, dq, n0, start, length, rows, kvh, d, d_ok, qk_scale,
                      sk_t, sk_h, sv_t, sv_h, BLOCK_N, PRECISION, True)
    tl.store(dq_ptr + tok[:, None] * (heads * HEAD_DIM) + h * HEAD_DIM + d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
           scale: float | None) -> None:
    """Shapes, dtypes, devices and the Python numbers: no host synchronization. cu_seqlens's
    values (0 first, T last, nondecreasing, no sequence longer than max_seqlen) stay the
    caller's contract: reading them would wait for the device every layer."""
    for name, t in (("q", q), ("k", k), ("v", v), ("cu_seqlens", cu_seqlens)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"varlen_attention: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"varlen_attention: {name} is on {t.device} but q is on {q.device}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"varlen_attention: cu_seqlens must be 1-D [B + 1], got shape {tuple(cu_seqlens.shape)}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, numbers.Integral) \
            or not 0 <= max_seqlen <= q.shape[0]:
        raise ValueError(f"varlen_attention: max_seqlen must be an integer from 0 to T={q.shape[0]}, got {max_seqlen!r}")
    if max_seqlen == 0 and q.shape[0] and cu_seqlens.numel() > 1:
        raise ValueError("varlen_attention: max_seqlen is 0 but there are tokens: pass the longest sequence's length")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, numbers.Real)
                              or not (math.isfinite(scale) and scale > 0)):
        raise ValueError(f"varlen_attention: scale must be a finite number > 0, got {scale!r}")
    if q.dim() != 3 or k.shape != v.shape or k.dim() != 3 or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"varlen_attention needs q [T, Hq, D] and k, v [T, Hkv, D], got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k.shape[1]})")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("varlen_attention needs q, k and v with unit stride in head_dim")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k and v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")


def _meta(q: torch.Tensor) -> dict:
    head_dim = q.shape[2]
    return dict(HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), PRECISION=_precision(q.dtype))


def _backward_tiles(dtype: torch.dtype) -> tuple[dict, dict]:
    dq, dkdv = (_DQ_FP32, _DKDV_FP32) if dtype == torch.float32 else (_DQ, _DKDV)
    # the kernels' masked/unmasked loop bounds step whole tiles of the other side
    if dq["BLOCK_M"] % dq["BLOCK_N"] or dkdv["BLOCK_N"] % dkdv["BLOCK_M"]:
        raise ValueError(f"backward tiles must nest: dQ's BLOCK_M a multiple of its BLOCK_N, dK/dV's BLOCK_N a "
                         f"multiple of its BLOCK_M; got {dq} and {dkdv}")
    return dq, dkdv


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        tokens, heads, _ = q.shape
        groups = heads // k.shape[1]
        batch = cu_seqlens.shape[0] - 1
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(tokens, heads, device=q.device, dtype=torch.float32)
        if tokens and batch and max_seqlen:
            _forward_kernel[(heads, batch, triton.cdiv(max_seqlen, _FWD["BLOCK_M"]))](
                q, k, v, cu_seqlens, out, lse, scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), out.stride(0), out.stride(1), heads, GROUPS=groups,
                CHUNK=attention_math.KEY_CHUNK, SPLIT_P=q.dtype != torch.float32, enable_fp_fusion=False,
                **_FWD, **_meta(q))
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
        tokens, heads, _ = q.shape
        kv_heads = k.shape[1]
        groups = heads // kv_heads
        batch = cu_seqlens.shape[0] - 1
        dout = dout.contiguous()
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        if not (tokens and batch and ctx.max_seqlen):
            return dq.zero_(), torch.zeros_like(k), torch.zeros_like(v), None, None, None
        dq_tiles, dkdv = _backward_tiles(q.dtype)
        tiles = {key: value for key, value in dkdv.items() if key != "SPLIT"}
        split = math.gcd(dkdv["SPLIT"], groups)
        if split == 1:
            dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
            dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        else:  # fp32 partials of each part of a KV head's query heads: 2 x SPLIT x T x Hkv x D x 4 bytes
            dk = torch.empty(split, *k.shape, device=k.device, dtype=torch.float32)
            dv = torch.empty(split, *v.shape, device=v.device, dtype=torch.float32)
        delta = torch.empty(tokens, heads, device=q.device, dtype=torch.float32)
        strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                   dout.stride(0), dout.stride(1))
        meta = dict(GROUPS=groups, **_meta(q))
        _dq_kernel[(heads, batch, triton.cdiv(ctx.max_seqlen, dq_tiles["BLOCK_M"]))](
            q, k, v, dout, out, lse, delta, cu_seqlens, dq, ctx.scale * _LOG2E, ctx.scale, *strides,
            out.stride(0), out.stride(1), heads, **meta, **dq_tiles)
        _dkdv_kernel[(kv_heads * split, batch, triton.cdiv(ctx.max_seqlen, tiles["BLOCK_N"]))](
            q, k, v, dout, lse, delta, cu_seqlens, dk, dv, ctx.scale * _LOG2E, ctx.scale, *strides, heads, tokens,
            SPLIT=split, **meta, **tiles)
        if split > 1:
            dk, dv = dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)
        return dq, dk, dv, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of packed sequences (see the module docstring for layouts) -> [T, Hq, D]
    in q's dtype; differentiable in q, k and v. `scale` defaults to head_dim ** -0.5."""
    _check(q, k, v, cu_seqlens, max_seqlen, scale)
    scale = q.shape[2] ** -0.5 if scale is None else float(scale)
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)
