"""x @ weight.T (+ bias) for the few rows of a decode step, as a Triton GEMM launched with
programmatic dependent launch. Inference only; the reference is F.linear, which the trainer runs.

A program computes one BLOCK_M x BLOCK_N tile over the whole K loop (never split; the logprob
kernels' logits_tile), accumulating in fp32 and rounding once to the model's dtype, with the
bias added in fp32 before that rounding. The engine takes it for a projection shape and row
count only where it gives F.linear's bits at the trainer's batch size (rollout/gemm_rows.py
checks every candidate once, on random data).

Why: in a decode pass of a small model every GEMM is a few microseconds of launch and ramp for
0.2-1.2 us of weight bytes at 3 TB/s (SmolLM2-135M at 64 rows: 120 cuBLAS GEMMs took 465 us
of a ~1 ms pass on the H100). Launched with PDL, this kernel's launch overlaps the tail of the
kernel before it, which cuBLAS's launches cannot."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastazr.kernels.logprobs import dot_precision, logits_tile
from fastazr.kernels.runtime import await_previous, interpreting, pdl_launch, use_triton

__all__ = ["LinearTiles", "decode_linear", "decode_linear_rows", "decode_linear_tiles"]


@dataclass(frozen=True)
class LinearTiles:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# Row counts change with every batch: specializing M would compile a variant per count mid-run.
@triton.jit(do_not_specialize=["M"])
def _linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_x, stride_w, stride_o,
                   HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   EVEN_K: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    await_previous(PDL)
    n0 = tl.program_id(0) * BLOCK_N
    m0 = tl.program_id(1) * BLOCK_M
    # the logprob kernels' tile loop with pointer loads (x 1.0: exact), so one K order serves both
    acc = logits_tile(x_ptr, w_ptr, m0, n0, M, N, K, stride_x, stride_w, 1.0, BLOCK_N=BLOCK_M, BLOCK_V=BLOCK_N,
                      BLOCK_K=BLOCK_K, TMA=False, EVEN_K=EVEN_K, PRECISION=PRECISION)
    rows_out = m0 + tl.arange(0, BLOCK_M)
    cols_out = n0 + tl.arange(0, BLOCK_N)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols_out, mask=cols_out < N, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows_out[:, None].to(tl.int64) * stride_o + cols_out[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=(rows_out[:, None] < M) & (cols_out[None, :] < N))


def decode_linear_rows(weight: torch.Tensor) -> int:
    """The most rows at which decode_linear is taken for this weight (0: never). H100, graph
    replays, us a GEMM at 16 / 64 / 256 rows, cuBLAS against decode_linear: SmolLM2's qkv
    (553K elements) 2.96 / 3.19 / 3.41 against 2.49 / 2.82 / 2.96, its o 3.11 / 3.18 / 3.40
    against 2.61 / 2.79 / 2.86, its down (885K) 4.36 / 4.44 / 4.72 against 4.51 / 4.25 / 4.53;
    its gate_up (1.8M) 3.22 / 3.39 against 2.76 / 2.90, at 256 rows 4.02 against 4.37.
    qwen2.5-1.5b's (2.4M-27.5M elements) lose at most counts: its qkv and o at 16 rows (4.59
    against 4.85, 4.38 against 4.61), its down at every count (9.4-17.1 against 16.5-28.1), its
    gate_up at 256 rows (26.6 against 44.4). SmolLM2's down at 16 rows loses alone, but chained
    (the four projections x 30 layers in one graph, each at its best tiles of the sweep, nothing
    between them) SmolLM2's took 423 us through cuBLAS and 381 through decode_linear at 64 rows,
    399 and 363 at 16. Shapes between these sizes (qwen2.5-0.5b's qkv, 1.03M elements, and o)
    were not timed. Only 16-bit weights on CUDA: fp32's GEMMs were not measured."""
    if not weight.is_cuda or weight.dtype not in (torch.float16, torch.bfloat16):
        return 0
    if weight.numel() <= 1 << 20:
        return 256
    return 64 if weight.numel() <= 2 << 20 else 0


def decode_linear_tiles(rows: int, k: int, dtype: torch.dtype) -> LinearTiles:
    """The tiles that won most of the sweep over 8-16 shapes at each of SmolLM2's projections and
    16, 64 and 256 rows (H100; 3 stages won 2 of the 12): 32 columns a program, so that a
    576-column output spreads over 18 SMs; a K tile of 64 at K = 576, of 128 at K = 1,536;
    16-row programs where 16 rows are all."""
    if interpreting():
        # small blocks, so that the tests' odd shapes span several tiles each way
        return LinearTiles(block_m=16, block_n=16, block_k=16, num_warps=4, num_stages=1)
    if dtype == torch.float32:
        # 4-byte elements: half the K tile, so that 4 stages fit the shared memory of the 16-bit ones
        return LinearTiles(block_m=16 if rows <= 16 else 64, block_n=32, block_k=32, num_warps=4, num_stages=4)
    return LinearTiles(block_m=16 if rows <= 16 else 64, block_n=32, block_k=64 if k <= 1024 else 128, num_warps=4,
                       num_stages=4)


def decode_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  tiles: LinearTiles | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) of rows x [T, K] and weight [N, K] (bias [N]) of one dtype ->
    [T, N]. F.linear itself elsewhere than CUDA or the interpreter."""
    if (x.dim() != 2 or weight.dim() != 2 or weight.shape[1] != x.shape[1] or x.dtype != weight.dtype
            or (bias is not None and (bias.shape != (weight.shape[0],) or bias.dtype != x.dtype))):
        raise ValueError(f"decode_linear: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype} "
                         f"and bias {None if bias is None else (tuple(bias.shape), bias.dtype)} must be [T, K], "
                         f"[N, K] and [N] of one dtype")
    if not use_triton(x):
        return torch.nn.functional.linear(x, weight, bias)
    x, weight = x.contiguous(), weight.contiguous()
    (m, k), n = x.shape, weight.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if not m:
        return out
    tiles = tiles or decode_linear_tiles(m, k, x.dtype)
    grid = (triton.cdiv(n, tiles.block_n), triton.cdiv(m, tiles.block_m))
    _linear_kernel[grid](x, weight, weight if bias is None else bias.contiguous(), out, m, n, k,
                         x.stride(0), weight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
                         BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
                         EVEN_K=k % tiles.block_k == 0, PRECISION=dot_precision(x.dtype), **pdl_launch(x),
                         num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return out
