"""Differentiable fused RMSNorm and SwiGLU for the training forward (the decoder's CUDA path).

The forward kernels are the engine's (layer_fusions.py), so training and generation round the
same way; the backward kernels here are one pass each. References: the torch compositions
fastazr.model.layers.rms_norm and .swiglu, which autograd differentiates.

Why: unfused, these two are ~20 elementwise launches a layer forward and backward, each reading
and writing [16K, 1536..8960] tensors; on qwen2.5-1.5b with 16K-token micro-batches that was a
quarter of the update's GPU time (profile: aten::mul 18%, elementwise copies, pow and silu
backward). The backward math is in fp32 throughout (autograd rounds dy * w and the like to bf16
first), so gradients agree with the reference to bf16 rounding, not bitwise."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.layer_fusions import add_rms_norm, swiglu_fused

__all__ = ["fused_rms_norm", "fused_swiglu"]


# Triton specializes integer arguments on divisibility by 16 and compiles a variant per combination;
# row and block counts change with every micro-batch, so each would cost a compile (seconds) mid-update.
@triton.jit(do_not_specialize=["rows"])
def _rms_norm_backward_kernel(dy_ptr, x_ptr, weight_ptr, dx_ptr, dweight_ptr, rows, width, eps,
                              BLOCK: tl.constexpr):
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


def _programs(x: torch.Tensor) -> int:
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    return max(1, min(x.shape[0], 4 * sms))


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return add_rms_norm(x, weight, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        rows, width = x.shape
        dx = torch.empty_like(x)
        programs = _programs(x)
        partial = torch.empty(programs, width, dtype=torch.float32, device=x.device)
        if rows:
            _rms_norm_backward_kernel[(programs,)](dy.contiguous(), x, weight, dx, partial, rows, width, ctx.eps,
                                                   BLOCK=triton.next_power_of_2(width), num_warps=8)
        else:
            partial.zero_()
        return dx, partial.sum(0).to(weight.dtype), None


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
