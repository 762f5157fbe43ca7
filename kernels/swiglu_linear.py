"""The MLP's gate_up projection with SwiGLU in the GEMM's epilogue, for generation:
swiglu(x @ gate_up_weight.T) without writing gate_up. Inference only (no backward); the
reference is the layer code training runs, swiglu(F.linear(x, gate_up_weight)) (model.layers).

A program computes the gate tile (weight rows n0..) and the up tile (rows I + n0..) of the same
columns over one K loop that loads each x tile once, rounds both fp32 accumulators to the
model's dtype as cuBLAS's epilogue does, and applies layer_fusions.swiglu_math, the trainer's
SwiGLU kernel's arithmetic. K is never split, and a Triton GEMM without split-K gives cuBLAS's
bits at every tile shape tried (H100, the 1.5B's projections), so the output is the trainer's
F.linear + SwiGLU bit for bit; tests/test_swiglu_linear.py checks it on the GPU.

Why: the unfused pair writes gate_up ([T, 2 I], 2 x 8,960 bf16 a token at Qwen2.5-1.5B) and
reads it back in a second kernel: 33 ms of the 0.33 s prefill of 256 x 256 tokens. Measured on
the H100 node (graph-timed, us, cuBLAS + the SwiGLU kernel vs this kernel's best tiles): 2,048
rows 196 vs 176, 8,192 rows 745 vs 727 on one machine and 802 vs 677 on another, 1,024 rows
even (98.5 vs 98.8), 256 rows cuBLAS's (31.5 vs 38.6); at 64 rows and fewer this kernel again
(26.4 vs 22.7 at 64, 24.7 vs 21.2 at 16), and at SmolLM2's shape at every decode size
(runner.fused_mlp picks)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.layer_fusions import swiglu_math
from fastazr.kernels.logprobs import Tiles, dot_precision, tile_operands, tma_ok
from fastazr.kernels.runtime import await_previous, interpreting, pdl_launch, use_triton
from fastazr.model.layers import swiglu

__all__ = ["swiglu_linear", "swiglu_linear_tiles"]


# Triton specializes integer arguments on divisibility by 16 and compiles a variant per combination;
# row and block counts change with every micro-batch, so each would cost a compile (seconds) mid-update.
@triton.jit(do_not_specialize=["M"])
def _swiglu_linear_kernel(x, w, out_ptr, M, I, K, stride_x, stride_w, stride_o,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
                          PRECISION: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    # Groups of GROUP_M row blocks walk the columns together, so a weight tile is read from
    # HBM about once per group rather than once per row block.
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(I, BLOCK_N)
    group = pid // (GROUP_M * col_blocks)
    first = group * GROUP_M
    size = tl.minimum(tl.cdiv(M, BLOCK_M) - first, GROUP_M)
    m0 = (first + (pid % (GROUP_M * col_blocks)) % size) * BLOCK_M
    n0 = ((pid % (GROUP_M * col_blocks)) // size) * BLOCK_N
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        # Past column I the gate tile reads up rows and the up tile zeros (the copy engine's
        # fill): finite values in columns the store masks off.
        for k in range(0, K, BLOCK_K):
            a = x.load([m0, k])
            acc_gate = tl.dot(a, tl.trans(w.load([n0, k])), acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, tl.trans(w.load([I + n0, k])), acc_up, input_precision=PRECISION)
    else:
        # Rows and columns past the end wrap (index modulo the size): valid loads, masked stores.
        rows = ((m0 + tl.arange(0, BLOCK_M)) % M).to(tl.int64)
        cols = ((n0 + tl.arange(0, BLOCK_N)) % I).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x + rows[:, None] * stride_x + offs_k[None, :]
        gate_ptrs = w + cols[:, None] * stride_w + offs_k[None, :]
        up_ptrs = gate_ptrs + I.to(tl.int64) * stride_w
        for k in range(0, K, BLOCK_K):
            if EVEN_K:
                a = tl.load(x_ptrs)
                g = tl.load(gate_ptrs)
                u = tl.load(up_ptrs)
            else:
                k_ok = offs_k[None, :] < K - k
                a = tl.load(x_ptrs, mask=k_ok, other=0.0)
                g = tl.load(gate_ptrs, mask=k_ok, other=0.0)
                u = tl.load(up_ptrs, mask=k_ok, other=0.0)
            acc_gate = tl.dot(a, tl.trans(g), acc_gate, input_precision=PRECISION)
            acc_up = tl.dot(a, tl.trans(u), acc_up, input_precision=PRECISION)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
    dtype = out_ptr.dtype.element_ty
    out = swiglu_math(acc_gate.to(dtype), acc_up.to(dtype))
    rows_out = m0 + tl.arange(0, BLOCK_M)
    cols_out = n0 + tl.arange(0, BLOCK_N)
    tl.store(out_ptr + rows_out[:, None].to(tl.int64) * stride_o + cols_out[None, :], out,
             mask=(rows_out[:, None] < M) & (cols_out[None, :] < I))


def swiglu_linear_tiles(x: torch.Tensor, inter: int) -> Tiles:
    """Block shape by row count (block_n: rows, block_v: columns of gate and of up), measured
    on the H100 at the 1.5B's shape: 128 x 128 with 8 warps from 512 rows (2,048-8,192 rows:
    9-17% faster than 64 x 128; 3 or 4 stages traded places between runs), 64 x 64 below
    (256 rows: 38.6 us against 41.2). Two fp32 accumulators a program: 128 x 128 with 8 warps
    holds 128 registers a thread for them; 256-column tiles at 3-4 stages need more shared
    memory than the H100's 227 KB (two weight tiles a stage). Decode batches (graph replays,
    best of 16 shapes with pointer loads, all with the same bits): to 16 rows 16 x 32 in 3
    stages, SmolLM2's I = 1,536 3.25 us against 4.55 for 64 x 64, the 1.5B's 21.2 against 22.2;
    to 64 rows 64 x 32 where I is small (SmolLM2 3.81 against 4.59), 64 x 64 where it is large
    (the 1.5B's I = 8,960: 22.7 against 23.1)."""
    if interpreting():
        # small blocks, so that the tests' odd shapes span several tiles each way
        return Tiles(block_n=16, block_v=32, block_k=16, num_warps=4, num_stages=1)
    tma = tma_ok(x)
    if x.dtype == torch.float32:
        # 4-byte elements: 64 x 64 x 32 tiles in 2 stages take 48 KB of shared memory (the 16-bit
        # shapes would need 278 KB of the H100's 227)
        return Tiles(block_n=64, block_v=64, block_k=32, num_warps=4, num_stages=2, tma=tma)
    if x.shape[0] <= 16:
        return Tiles(block_n=16, block_v=32, block_k=64 if x.shape[1] <= 1024 else 128, num_warps=4, num_stages=3)
    if x.shape[0] <= 64 and inter <= 4096:
        return Tiles(block_n=64, block_v=32, block_k=64, num_warps=4, num_stages=4)
    if x.shape[0] < 512:
        return Tiles(block_n=64, block_v=64, block_k=64, num_warps=4, num_stages=4, tma=tma)
    return Tiles(block_n=128, block_v=128, block_k=64, num_warps=8, num_stages=4, tma=tma)


def swiglu_linear(x: torch.Tensor, gate_up_weight: torch.Tensor, tiles: Tiles | None = None) -> torch.Tensor:
    """silu(x @ gate.T) * (x @ up.T) of rows x [T, H] and gate_up_weight [2 I, H] (gate rows
    first, as the decoder stores them) -> [T, I] in x's dtype, each projection rounded to that
    dtype first. The layer code elsewhere than CUDA or the interpreter."""
    if (x.dim() != 2 or gate_up_weight.dim() != 2 or gate_up_weight.shape[1] != x.shape[1]
            or gate_up_weight.shape[0] % 2 or x.dtype != gate_up_weight.dtype):
        raise ValueError(f"x {tuple(x.shape)} {x.dtype} and gate_up_weight {tuple(gate_up_weight.shape)} "
                         f"{gate_up_weight.dtype} must be [T, H] and [2 I, H] of one dtype")
    if not use_triton(x):
        return swiglu(torch.nn.functional.linear(x, gate_up_weight))
    x, weight = x.contiguous(), gate_up_weight.contiguous()
    (m, k), inter = x.shape, weight.shape[0] // 2
    out = torch.empty(m, inter, device=x.device, dtype=x.dtype)
    if not m:
        return out
    tiles = tiles or swiglu_linear_tiles(x, inter)
    a, w = tile_operands(x, weight, tiles)
    grid = (triton.cdiv(m, tiles.block_n) * triton.cdiv(inter, tiles.block_v),)
    _swiglu_linear_kernel[grid](a, w, out, m, inter, k, x.stride(0), weight.stride(0), out.stride(0),
                                BLOCK_M=tiles.block_n, BLOCK_N=tiles.block_v, BLOCK_K=tiles.block_k,
                                GROUP_M=tiles.group_n, TMA=tiles.tma, EVEN_K=k % tiles.block_k == 0,
                                PRECISION=dot_precision(x.dtype), num_warps=tiles.num_warps,
                                num_stages=tiles.num_stages, **pdl_launch(x))
    return out
