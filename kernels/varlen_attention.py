"""Causal attention of the training forward over packed variable-length sequences, forward and
backward: what the rollout engine computes, to the last bit.

The forward folds keys with attention_math.softmax_step in the tiles of the engine's prefill
kernel (64 keys from key 0, 128-row warpgroup tiles, chunks of KEY_CHUNK keys merged in order),
through which the engine also decodes by default: its outputs are the engine's bit for bit
(tests/test_varlen_attention.py), and the trainer's logprobs the engine's to fp32 rounding.
torch's and flash-attn's kernels round P to bf16 first and differ from it in ~40% of outputs.
The reference is varlen_attention_reference.py.

The backward is FlashAttention-2's (recompute P from the saved log-sum-exp, never store it): one
kernel for dK and dV that walks the queries of each key tile (all G query heads of its KV head,
so GQA needs no atomics) and one for dQ that walks the key tiles. Gradients need not match
anything bit for bit, so P and dS meet the tensor cores in the input dtype.

Layout: q [T, Hq, D], k and v [T, Hkv, D] with unit stride in D (the fused qkv projection's
column views are fine); cu_seqlens int32 [B + 1]; grids (query or key tiles of the longest
sequence, B, heads), so programs past a shorter sequence's end return at once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels import attention_math
from fastazr.kernels.attention_math import empty_state, finish, fold, softmax_step

__all__ = ["varlen_attention"]

_LOG2E = 1.4426950408889634
# Forward: 128 queries x 64 keys a tile; backward: 64 x 64 (dK and dV accumulators [64, D] fp32
# each stay in registers at D = 128).
_FWD_M, _FWD_N = 128, 64
_BWD_M, _BWD_N = 64, 64


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
    tile, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    if tile * BLOCK_M >= length:
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
def _probabilities(q, k, lse, rows, cols, visible_rows, qk_scale, PRECISION: tl.constexpr):
    """P [M, N] of query rows against key columns, recomputed from the forward's log2-sum-exp;
    exactly 0 outside the causal, in-sequence entries."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    visible = visible_rows[:, None] & (cols[None, :] <= rows[:, None])
    return tl.where(visible, tl.exp2(s - tl.where(visible, lse[:, None], 0.0)), 0.0)


@triton.jit
def _dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, dk_ptr, dv_ptr, qk_scale, scale,
                 sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, heads,
                 GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile, b, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
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
    # queries before this key tile cannot see it: start at the query tile holding its first key
    first = (tile * BLOCK_N) // BLOCK_M * BLOCK_M
    for g in range(GROUPS):
        h = kvh * GROUPS + g
        for m0 in range(first, length, BLOCK_M):
            rows, row_ok, tok = _span(m0, start, length, BLOCK_M)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q = _load(q_ptr, tok, h, sq_t, sq_h, d, q_mask)
            do = _load(do_ptr, tok, h, sdo_t, sdo_h, d, q_mask)
            lse = tl.load(lse_ptr + tok * heads + h, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + tok * heads + h, mask=row_ok, other=0.0)
            p = _probabilities(q, k, lse, rows, cols, row_ok, qk_scale, PRECISION)
            dv = tl.dot(tl.trans(p.to(do.dtype)), do, dv, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk = tl.dot(tl.trans(ds.to(q.dtype)), q, dk, input_precision=PRECISION)
    out = key[:, None] * (heads // GROUPS) * HEAD_DIM + kvh * HEAD_DIM + d[None, :]
    tl.store(dk_ptr + out, (dk * scale).to(dk_ptr.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptr + out, dv.to(dv_ptr.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, cu_ptr, dq_ptr, qk_scale, scale,
               sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sdo_t, sdo_h, heads,
               GROUPS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    tile, b, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    start = tl.load(cu_ptr + b)
    length = tl.load(cu_ptr + b + 1) - start
    if tile * BLOCK_M >= length:
        return
    kvh = h // GROUPS
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    rows, row_ok, tok = _span(tile * BLOCK_M, start, length, BLOCK_M)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q = _load(q_ptr, tok, h, sq_t, sq_h, d, q_mask)
    do = _load(do_ptr, tok, h, sdo_t, sdo_h, d, q_mask)
    lse = tl.load(lse_ptr + tok * heads + h, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + tok * heads + h, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, tl.minimum(length, (tile + 1) * BLOCK_M), BLOCK_N):
        cols, col_ok, key = _span(n0, start, length, BLOCK_N)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = _load(k_ptr, key, kvh, sk_t, sk_h, d, kv_mask)
        v = _load(v_ptr, key, kvh, sv_t, sv_h, d, kv_mask)
        p = _probabilities(q, k, lse, rows, cols, row_ok, qk_scale, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    tl.store(dq_ptr + tok[:, None] * (heads * HEAD_DIM) + h * HEAD_DIM + d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=q_mask)


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor) -> None:
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


class _VarlenAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens, max_seqlen, scale):
        tokens, heads, _ = q.shape
        groups = heads // k.shape[1]
        batch = cu_seqlens.shape[0] - 1
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
        lse = torch.empty(tokens, heads, device=q.device, dtype=torch.float32)
        if tokens and batch and max_seqlen:
            _forward_kernel[(triton.cdiv(max_seqlen, _FWD_M), batch, heads)](
                q, k, v, cu_seqlens, out, lse, scale * _LOG2E, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                v.stride(0), v.stride(1), out.stride(0), out.stride(1), heads, GROUPS=groups, BLOCK_M=_FWD_M,
                BLOCK_N=_FWD_N, CHUNK=attention_math.KEY_CHUNK, SPLIT_P=q.dtype != torch.float32, num_warps=8,
                enable_fp_fusion=False, **_meta(q))
        ctx.save_for_backward(q, k, v, cu_seqlens, out, lse)
        ctx.max_seqlen, ctx.scale = max_seqlen, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, cu_seqlens, out, lse = ctx.saved_tensors
        tokens, heads, _ = q.shape
        kv_heads = k.shape[1]
        batch = cu_seqlens.shape[0] - 1
        dout = dout.contiguous()
        # D_i = sum_d dO * O: the softmax backward's row term, one fused pass in fp32
        delta = torch.einsum("thd,thd->th", dout.float(), out.float())
        dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
        dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
        if tokens and batch and ctx.max_seqlen:
            args = (q, k, v, dout, lse, delta, cu_seqlens)
            strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                       dout.stride(0), dout.stride(1), heads)
            meta = dict(GROUPS=heads // kv_heads, BLOCK_M=_BWD_M, BLOCK_N=_BWD_N, num_warps=8, **_meta(q))
            _dkdv_kernel[(triton.cdiv(ctx.max_seqlen, _BWD_N), batch, kv_heads)](
                *args, dk, dv, ctx.scale * _LOG2E, ctx.scale, *strides, **meta)
            _dq_kernel[(triton.cdiv(ctx.max_seqlen, _BWD_M), batch, heads)](
                *args, dq, ctx.scale * _LOG2E, ctx.scale, *strides, **meta)
        else:
            for grad in (dq, dk, dv):
                grad.zero_()
        return dq, dk, dv, None, None, None


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, scale: float | None = None) -> torch.Tensor:
    """Causal attention of packed sequences (see the module docstring for layouts) -> [T, Hq, D]
    in q's dtype; differentiable in q, k and v. `scale` defaults to head_dim ** -0.5."""
    _check(q, k, v, cu_seqlens)
    scale = q.shape[2] ** -0.5 if scale is None else scale
    return _VarlenAttention.apply(q, k, v, cu_seqlens, int(max_seqlen), scale)
