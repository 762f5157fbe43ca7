"""Differentiable fused RMSNorm (alone or after a residual add), SwiGLU and rotary for the
training forward (the decoder's CUDA path).

The forward math is the engine's (layer_fusions.py), so training and generation round the
same way; the backward kernels here are one pass each. References: the torch compositions
fastazr.model.layers.rms_norm, .swiglu and .apply_rope, which autograd differentiates.

Why: unfused, these two are ~20 elementwise launches a layer forward and backward, each reading
and writing [16K, 1536..8960] tensors; on qwen2.5-1.5b with 16K-token micro-batches that was a
quarter of the update's GPU time (profile: aten::mul 18%, elementwise copies, pow and silu
backward). The rotary of q and k was ~95 ms of a 1.42 s qwen2.5-1.5b update on the H100 (28
layers x 5 micro-batches: 8 multiplies, 4 negations, 3 concatenations, copies and adds a layer
forward and backward, ~0.68 ms); fused it is one launch each way over the qkv projection's
output (95 -> 12 ms an update). fused_add_rms_norm takes the residual add into the norm after
it, and in backward the residual stream's two gradients into the norm's pass: four [T, H]
bf16 adds a layer fewer (an H100 update's 1,405 adds took 42.6 ms; the norms now take 11 more).
The backward math is in fp32 throughout (autograd rounds dy * w and the like to bf16
first), so gradients agree with the reference to bf16 rounding, not bitwise."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.layer_fusions import add_rms_norm, rope_lanes, rope_math, swiglu_fused

__all__ = ["fused_add_rms_norm", "fused_rms_norm", "fused_rope_qkv", "fused_swiglu"]


# Triton specializes integer arguments on divisibility by 16 and compiles a variant per combination;
# row and block counts change with every micro-batch, so each would cost a compile (seconds) mid-update.
@triton.jit(do_not_specialize=["rows"])
def _rms_norm_backward_kernel(dy_ptr, x_ptr, weight_ptr, dtotal_ptr, dx_ptr, dweight_ptr, rows, width, eps,
                              HAS_TOTAL: tl.constexpr, BLOCK: tl.constexpr):
    # Rows pid, pid + programs, ...: each program keeps its share of dweight in registers and
    # writes one partial row, summed by the caller (programs x width fp32, not rows x width).
    pid, programs = tl.program_id(0).to(tl.int64), tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < width
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    dweight = tl.zeros([BLOCK], tl.float32)
    for row in range(pid, rows, programs):
        base = row * width
        x = tl.load(x_ptr + base + cols, mask=inside, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / width + eps)
        # the forward rounds the normalized row to the dtype before the weight multiplies it
        dweight += dy * (xf * rstd).to(x.dtype).to(tl.float32)
        dn = dy * weight
        dx = rstd * dn - xf * (rstd * rstd * rstd) * (tl.sum(dn * xf, axis=0) / width)
        if HAS_TOTAL:  # the residual stream's own gradient: autograd's separate add, fused
            dx += tl.load(dtotal_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
        tl.store(dx_ptr + base + cols, dx.to(x.dtype), mask=inside)
    tl.store(dweight_ptr + pid * width + cols, dweight, mask=inside)


@triton.jit
def _swiglu_backward_kernel(gate_up_ptr, dout_ptr, dgate_up_ptr, width, BLOCK: tl.constexpr):
    row, block = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    inside = cols < width
    gate = tl.load(gate_up_ptr + row * 2 * width + cols, mask=inside, other=0.0)
    up = tl.load(gate_up_ptr + row * 2 * width + width + cols, mask=inside, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + row * width + cols, mask=inside, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    silu = (g * sig).to(gate.dtype).to(tl.float32)  # rounded, as the forward's product saw it
    dgate = dout * up * sig * (1.0 + g * (1.0 - sig))
    tl.store(dgate_up_ptr + row * 2 * width + cols, dgate.to(gate.dtype), mask=inside)
    tl.store(dgate_up_ptr + row * 2 * width + width + cols, (dout * silu).to(gate.dtype), mask=inside)


@triton.jit
def _rope_qkv_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr, stride_qkv,
                     HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                     BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program a token: its q, k and v heads out of the projection's row, q and k rotated.
    t = tl.program_id(0).to(tl.int64)
    d, h, d_ok, partner, sign = rope_lanes(HEAD_DIM, BLOCK_H, BLOCK_D)
    cos = tl.load(cos_ptr + t * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]
    sin = tl.load(sin_ptr + t * HEAD_DIM + d, mask=d_ok, other=0.0)[None, :]
    row = qkv_ptr + t * stride_qkv
    heads = h[:, None] * HEAD_DIM
    q_mask = (h < HEADS)[:, None] & d_ok[None, :]
    x = tl.load(row + heads + d[None, :], mask=q_mask, other=0.0)
    rot = tl.load(row + heads + partner[None, :], mask=q_mask, other=0.0)
    tl.store(q_ptr + t * HEADS * HEAD_DIM + heads + d[None, :], rope_math(x, rot, sign, cos, sin), mask=q_mask)
    kv_mask = (h < KV_HEADS)[:, None] & d_ok[None, :]
    k_row = row + HEADS * HEAD_DIM
    x = tl.load(k_row + heads + d[None, :], mask=kv_mask, other=0.0)
    rot = tl.load(k_row + heads + partner[None, :], mask=kv_mask, other=0.0)
    out = t * KV_HEADS * HEAD_DIM + heads + d[None, :]
    tl.store(k_ptr + out, rope_math(x, rot, sign, cos, sin), mask=kv_mask)
    v = tl.load(k_row + KV_HEADS * HEAD_DIM + heads + d[None, :], mask=kv_mask, other=0.0)
    tl.store(v_ptr + out, v, mask=kv_mask)


@triton.jit
def _rope_grad(g_ptr, partner_ptr, cos, sin_partner, sign, mask):
    # out[d] = x[d] cos[d] + sign[d] x[p] sin[d] with p = partner(d), an involution, so
    # dx[d] = g[d] cos[d] + sign[p] g[p] sin[p], and sign[p] = -sign[d]
    g = tl.load(g_ptr, mask=mask, other=0.0).to(tl.float32)
    g_partner = tl.load(partner_ptr, mask=mask, other=0.0).to(tl.float32)
    return g * cos - sign * g_partner * sin_partner


@triton.jit
def _rope_qkv_backward_kernel(dq_ptr, dk_ptr, dv_ptr, cos_ptr, sin_ptr, dqkv_ptr, stride_dqkv,
                              HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    d, h, d_ok, partner, sign = rope_lanes(HEAD_DIM, BLOCK_H, BLOCK_D)
    sign = sign[None, :]
    cos = tl.load(cos_ptr + t * HEAD_DIM + d, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    sin_partner = tl.load(sin_ptr + t * HEAD_DIM + partner, mask=d_ok, other=0.0).to(tl.float32)[None, :]
    row = dqkv_ptr + t * stride_dqkv
    heads = h[:, None] * HEAD_DIM
    q_mask = (h < HEADS)[:, None] & d_ok[None, :]
    dq = dq_ptr + t * HEADS * HEAD_DIM + heads
    dx = _rope_grad(dq + d[None, :], dq + partner[None, :], cos, sin_partner, sign, q_mask)
    tl.store(row + heads + d[None, :], dx.to(dqkv_ptr.dtype.element_ty), mask=q_mask)
    kv_mask = (h < KV_HEADS)[:, None] & d_ok[None, :]
    k_row = row + HEADS * HEAD_DIM
    dk = dk_ptr + t * KV_HEADS * HEAD_DIM + heads
    dx = _rope_grad(dk + d[None, :], dk + partner[None, :], cos, sin_partner, sign, kv_mask)
    tl.store(k_row + heads + d[None, :], dx.to(dqkv_ptr.dtype.element_ty), mask=kv_mask)
    dv = tl.load(dv_ptr + t * KV_HEADS * HEAD_DIM + heads + d[None, :], mask=kv_mask, other=0.0)
    tl.store(k_row + KV_HEADS * HEAD_DIM + heads + d[None, :], dv, mask=kv_mask)


def _programs(x: torch.Tensor) -> int:
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(x.shape[0], 4 * sms))


def _rms_norm_backward(dy, x, weight, eps, dtotal):
    """(dx [+ dtotal], dweight) of rms_norm at rows x [T, H]."""
    rows, width = x.shape
    dx = torch.empty_like(x)
    programs = _programs(x)
    partial = torch.empty(programs, width, dtype=torch.float32, device=x.device)
    if rows:
        dtotal = None if dtotal is None else dtotal.contiguous()
        _rms_norm_backward_kernel[(programs,)](dy.contiguous(), x, weight, dx if dtotal is None else dtotal, dx, partial,
                                               rows, width, eps, HAS_TOTAL=dtotal is not None,
                                               BLOCK=triton.next_power_of_2(width), num_warps=8)
    else:
        partial.zero_()
    return dx, partial.sum(0).to(weight.dtype)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return add_rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        return *_rms_norm_backward(dy, x, weight, ctx.eps, None), None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, delta, weight, eps):
        ctx.set_materialize_grads(False)
        total = torch.empty_like(hidden)
        normed = add_rms_norm(hidden, weight, eps, residual=delta, total=total)
        ctx.save_for_backward(total, weight)
        ctx.eps = eps
        return total, normed

    @staticmethod
    def backward(ctx, dtotal, dnormed):
        total, weight = ctx.saved_tensors
        if dnormed is None:
            return dtotal, dtotal, None, None
        dx, dweight = _rms_norm_backward(dnormed, total, weight, ctx.eps, dtotal)
        # hidden and delta enter the sum alike: one gradient tensor serves both
        return dx, dx, dweight, None


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        ctx.save_for_backward(gate_up)
        return swiglu_fused(gate_up)

    @staticmethod
    def backward(ctx, dout):
        (gate_up,) = ctx.saved_tensors
        tokens, width = gate_up.shape[0], gate_up.shape[1] // 2
        dgate_up = torch.empty_like(gate_up)
        block = min(2048, triton.next_power_of_2(width))
        if tokens:
            _swiglu_backward_kernel[(tokens, triton.cdiv(width, block))](gate_up, dout.contiguous(), dgate_up, width,
                                                                         BLOCK=block, num_warps=4)
        return dgate_up


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, cos, sin, heads, kv_heads):
        tokens, head_dim = qkv.shape[0], cos.shape[1]
        q = qkv.new_empty(tokens, heads, head_dim)
        k, v = (qkv.new_empty(tokens, kv_heads, head_dim) for _ in range(2))
        if tokens:
            _rope_qkv_kernel[(tokens,)](qkv, cos, sin, q, k, v, qkv.stride(0), **_rope_meta(heads, kv_heads, head_dim),
                                        enable_fp_fusion=False)
        ctx.save_for_backward(cos, sin)
        ctx.heads, ctx.kv_heads = heads, kv_heads
        return q, k, v

    @staticmethod
    def backward(ctx, dq, dk, dv):
        cos, sin = ctx.saved_tensors
        tokens, head_dim = cos.shape
        dqkv = dq.new_empty(tokens, (ctx.heads + 2 * ctx.kv_heads) * head_dim)
        if tokens:
            _rope_qkv_backward_kernel[(tokens,)](dq.contiguous(), dk.contiguous(), dv.contiguous(), cos, sin, dqkv,
                                                 dqkv.stride(0), **_rope_meta(ctx.heads, ctx.kv_heads, head_dim))
        return dqkv, None, None, None, None


def _rope_meta(heads: int, kv_heads: int, head_dim: int) -> dict:
    return dict(HEADS=heads, KV_HEADS=kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(heads),
                BLOCK_D=triton.next_power_of_2(head_dim), num_warps=4)


def fused_add_rms_norm(hidden: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden + delta, rms_norm(hidden + delta)) of contiguous rows [T, H], the sum rounded to
    the dtype before the norm as torch's add rounds it; differentiable in all three tensors."""
    if hidden.dim() != 2 or hidden.shape != delta.shape or not (hidden.is_contiguous() and delta.is_contiguous()):
        raise ValueError(f"fused_add_rms_norm needs contiguous [T, H] hidden and delta of one shape, got "
                         f"{tuple(hidden.shape)} and {tuple(delta.shape)}")
    return _AddRMSNorm.apply(hidden, delta, weight, eps)


def fused_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fastazr.model.layers.rms_norm of contiguous rows x [T, H], differentiable in x and weight."""
    if x.dim() != 2 or not x.is_contiguous():
        raise ValueError(f"fused_rms_norm needs contiguous [T, H] rows, got shape {tuple(x.shape)}")
    return _RMSNorm.apply(x, weight, eps)


def fused_swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """fastazr.model.layers.swiglu of a contiguous gate_up [T, 2 I] -> [T, I], differentiable."""
    if gate_up.dim() != 2 or not gate_up.is_contiguous():
        raise ValueError(f"fused_swiglu needs a contiguous [T, 2 I] input, got shape {tuple(gate_up.shape)}")
    return _SwiGLU.apply(gate_up)


def fused_rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                   kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The qkv projection's output [T, (heads + 2 kv_heads) D] -> q [T, heads, D] and k [T,
    kv_heads, D] rotated by fastazr.model.layers.apply_rope (its bits), and v [T, kv_heads, D],
    all three contiguous; differentiable in qkv. cos and sin [T, D] as Decoder.rotary gives them
    (no gradient flows to them)."""
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError(f"fused_rope_qkv needs [T, W] rows with unit column stride, got shape {tuple(qkv.shape)}")
    if cos.dim() != 2 or cos.shape != sin.shape or cos.shape[0] != qkv.shape[0] or not (
            cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"fused_rope_qkv needs contiguous cos and sin of shape [T={qkv.shape[0]}, D], got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dtype != qkv.dtype or sin.dtype != qkv.dtype:
        raise ValueError(f"fused_rope_qkv: cos and sin must be in qkv's dtype {qkv.dtype}, got {cos.dtype}")
    if not (isinstance(heads, int) and isinstance(kv_heads, int) and heads >= kv_heads >= 1):
        raise ValueError(f"fused_rope_qkv needs heads >= kv_heads >= 1 (grouped-query attention), got heads={heads}, "
                         f"kv_heads={kv_heads}")
    if cos.device != qkv.device or sin.device != qkv.device:
        raise ValueError(f"fused_rope_qkv: cos and sin are on {cos.device} / {sin.device} but qkv on {qkv.device}")
    if qkv.shape[1] != (heads + 2 * kv_heads) * cos.shape[1] or cos.shape[1] % 2:
        raise ValueError(f"fused_rope_qkv: qkv has {qkv.shape[1]} columns, not (heads={heads} + 2 x kv_heads="
                         f"{kv_heads}) x an even head_dim={cos.shape[1]}")
    if cos.requires_grad or sin.requires_grad:
        raise ValueError("fused_rope_qkv passes no gradient to cos and sin: compute them without grad")
    return _RopeQKV.apply(qkv, cos, sin, heads, kv_heads)
