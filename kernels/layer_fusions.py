"""Fused elementwise pieces of a decoder layer for generation: residual add + RMSNorm, rotary
embedding + KV-cache write, and SwiGLU. Inference only (no backward); the references are the
torch compositions in fastazr.model.layers that training runs, and every intermediate is rounded
to the model's dtype where torch rounds it, so the engine's hidden states stay the trainer's.

Why: in a decode step the tensors are tiny ([256, 1536]) and each torch op is its own launch of
a few microseconds; the unfused layer is ~35 launches (RMSNorm alone is 7, rotary 12), ~1,000 a
step for a 28-layer model, which costs more than reading the weights. Fused, a layer is 9."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.runtime import await_previous, pdl_launch

__all__ = ["add_rms_norm", "rope_to_cache", "swiglu_fused"]


@triton.jit
def _add_rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, total_ptr, width, eps,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    row = tl.program_id(0).to(tl.int64) * width
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    x = tl.load(x_ptr + row + cols, mask=inside, other=0.0)
    if HAS_RESIDUAL:
        # hidden + delta, rounded to the dtype as torch's add does: the residual stream, written
        # to total_ptr (x itself in the engine, a new tensor for autograd in the trainer)
        x = (x.to(tl.float32) + tl.load(residual_ptr + row + cols, mask=inside, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(total_ptr + row + cols, x, mask=inside)
    xf = x.to(tl.float32)
    normed = (xf * tl.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)).to(x.dtype)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0)
    tl.store(out_ptr + row + cols, (weight.to(tl.float32) * normed.to(tl.float32)).to(x.dtype), mask=inside)


@triton.jit
def rope_math(x, rot, sign, cos, sin):
    """x * cos + rotate_half(x) * sin for x, its partner columns rot (unsigned) and their signs
    (-1 in the first half), each product rounded to the dtype as torch does: the trainer's rotary
    (training_fusions.fused_rope_qkv) and the engine's share it, so both give apply_rope's bits.
    Launches that use it turn FP fusion off: with it, ptxas-bound LLVM contracts the rounded
    product and the sum into one fma.rn.bf16, and 18% of q and k differed from torch's rotary by
    a bit (enough to move logprobs 2.5e-2 from the engine's over 30 layers)."""
    dtype = cos.dtype
    rot = (rot.to(tl.float32) * sign).to(dtype).to(tl.float32)
    return ((x.to(tl.float32) * cos.to(tl.float32)).to(dtype).to(tl.float32)
            + (rot * sin.to(tl.float32)).to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def rope_lanes(HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """Columns d and heads h of a program's [BLOCK_H, BLOCK_D] rotary tile, which columns are
    real, and rope_math's partner columns and signs: rotate_half pairs column d with d + D/2
    (negated) in the first half and with d - D/2 after."""
    d = tl.arange(0, BLOCK_D)
    half: tl.constexpr = HEAD_DIM // 2
    return (d, tl.arange(0, BLOCK_H), d < HEAD_DIM, tl.where(d < half, d + half, d - half),
            tl.where(d < half, -1.0, 1.0))


@triton.jit
def _rope_to_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, slots_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
                          stride_qkv, stride_q,
                          HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                          BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    t = tl.program_id(0)
    d, h, d_ok, partner, sign = rope_lanes(HEAD_DIM, BLOCK_H, BLOCK_D)
    row = qkv_ptr + t.to(tl.int64) * stride_qkv
    cos = tl.load(cos_ptr + t * HEAD_DIM + d, mask=d_ok, other=0.0)
    sin = tl.load(sin_ptr + t * HEAD_DIM + d, mask=d_ok, other=0.0)
    slot = tl.load(slots_ptr + t).to(tl.int64)

    q_mask = (h < HEADS)[:, None] & d_ok[None, :]
    x = tl.load(row + h[:, None] * HEAD_DIM + d[None, :], mask=q_mask, other=0.0)
    rot = tl.load(row + h[:, None] * HEAD_DIM + partner[None, :], mask=q_mask, other=0.0)
    q = rope_math(x, rot, sign, cos, sin)
    tl.store(q_ptr + t.to(tl.int64) * stride_q + h[:, None] * HEAD_DIM + d[None, :], q, mask=q_mask)

    kv_mask = (h < KV_HEADS)[:, None] & d_ok[None, :]
    k_row = row + HEADS * HEAD_DIM
    x = tl.load(k_row + h[:, None] * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0)
    rot = tl.load(k_row + h[:, None] * HEAD_DIM + partner[None, :], mask=kv_mask, other=0.0)
    k = rope_math(x, rot, sign, cos, sin)
    dest = slot * (KV_HEADS * HEAD_DIM) + h[:, None] * HEAD_DIM + d[None, :]
    tl.store(k_cache_ptr + dest, k, mask=kv_mask)
    v = tl.load(k_row + KV_HEADS * HEAD_DIM + h[:, None] * HEAD_DIM + d[None, :], mask=kv_mask, other=0.0)
    tl.store(v_cache_ptr + dest, v, mask=kv_mask)


@triton.jit
def swiglu_math(gate, up):
    """silu(gate) * up of gate and up in the model's dtype, rounded where torch rounds; shared
    with the gate_up GEMM whose epilogue applies it (swiglu_linear.py), so both give one bit
    pattern."""
    g = gate.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(gate.dtype)


@triton.jit
def _swiglu_kernel(gate_up_ptr, out_ptr, width, BLOCK: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=inside, other=0.0)
    tl.store(out_ptr + row * width + cols, swiglu_math(gate, up), mask=inside)


def add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                 total: torch.Tensor | None = None) -> torch.Tensor:
    """rms_norm(x + residual) of rows x [T, H] (contiguous). With `residual`, x + residual (the
    residual stream) is written to `total`, by default x itself (in place), saving a separate add."""
    total = x if total is None else total
    if not (x.is_contiguous() and total.is_contiguous()) or (residual is not None and not residual.is_contiguous()):
        raise ValueError("add_rms_norm needs contiguous [T, H] rows")
    out = torch.empty_like(x)
    if x.shape[0]:
        _add_rms_norm_kernel[(x.shape[0],)](x, x if residual is None else residual, weight, out, total, x.shape[1], eps,
                                            HAS_RESIDUAL=residual is not None,
                                            BLOCK=triton.next_power_of_2(x.shape[1]), num_warps=4,
                                            **pdl_launch(x))
    return out


def rope_to_cache(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """The fused q/k/v projection output qkv [T, (Hq + 2 Hkv) D] -> rotated q [T, Hq, D]; the
    rotated k and the v of token t go to flat slot slots[t] of caches [.., block_size, Hkv, D]
    (contiguous). cos, sin [T, D] as Decoder.rotary gives them."""
    tokens = qkv.shape[0]
    head_dim = cos.shape[1]
    if qkv.stride(1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("rope_to_cache needs qkv rows with unit column stride and contiguous cos / sin")
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("rope_to_cache needs contiguous caches")
    q = torch.empty(tokens, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    if tokens:
        _rope_to_cache_kernel[(tokens,)](qkv, cos, sin, slots, q, k_cache, v_cache, qkv.stride(0), q.stride(0),
                                         HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim,
                                         BLOCK_H=triton.next_power_of_2(heads),
                                         BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4,
                                         enable_fp_fusion=False, **pdl_launch(qkv))
    return q


def swiglu_fused(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of gate_up [T, 2 I] (contiguous) -> [T, I]."""
    if not gate_up.is_contiguous():
        raise ValueError("swiglu_fused needs a contiguous [T, 2 I] input")
    tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
    out = gate_up.new_empty(tokens, width)
    block = min(2048, triton.next_power_of_2(width))
    if tokens:
        _swiglu_kernel[(tokens, triton.cdiv(width, block))](gate_up, out, width, BLOCK=block, num_warps=4,
                                                            **pdl_launch(out))
    return out
