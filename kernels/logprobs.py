"""Per-token log-probabilities and entropy straight from hidden states and the lm_head weight.

The logits never exist in memory. The forward is one tiled GEMM whose epilogue folds each
[BLOCK_N, BLOCK_V] tile of logits into three fp32 numbers per token (running max, sum of exps,
sum of exp * logit, in log2 units); vocabulary splits run in parallel and a small kernel merges
them and takes each target's logit as its own dot product. The backward recomputes logit tiles
chunk by chunk over the vocabulary, turns them into dLogits in the GEMM's epilogue (written
once, in the input dtype, into an [N, chunk] buffer of ``chunk_bytes``), and hands that buffer
to two cuBLAS GEMMs: dWeight[chunk] = dLogits^T @ hidden (a complete reduction over all N
tokens, accumulated in fp32 inside the GEMM, never across chunks) and dHidden += dLogits @
weight[chunk] (accumulated across chunks in an fp32 [N, H] buffer).

Work: forward 2*N*H*V FLOP, backward 6*N*H*V (one recompute + two GEMMs). Memory beyond inputs
and gradients: 12 bytes per token per vocabulary split, the dLogits buffer and the fp32 dHidden
(at N=16K, H=1536: 1.08 GiB peak with the gradients, against 27.8 GiB for the naive path).

The algebra is in logprobs_math.py; the fp32 reference in logprobs_reference.py.
"""
import math
import numbers
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from fastazr.kernels.logprobs_chunked import linear_logprobs_chunked
from fastazr.kernels.logprobs_math import chunk_columns
from fastazr.kernels.logprobs_reference import linear_logprobs_reference
from fastazr.kernels.runtime import interpreting, multiprocessors, use_triton


# Globals a kernel reads must be constexpr; the host reads .value.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def logits_tile(h, w, row0, col0, N, V, H, stride_h, stride_w, scale,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                TMA: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 [BLOCK_N, BLOCK_V] tile of hidden @ weight.T * scale, rows row0.., columns col0..

    With TMA, h and w are tensor descriptors: the copy engine fetches the tiles (zero past the
    ends) and frees the registers and instructions that address arithmetic costs. Otherwise they
    are pointers; rows and columns past the end read valid data (index modulo the size), so the
    inner loop carries no row/column masks, and the caller masks their results."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if TMA:
        for k in range(0, H, BLOCK_K):
            acc = tl.dot(h.load([row0, k]), tl.trans(w.load([col0, k])), acc, input_precision=PRECISION)
    else:
        # int64: V * H reaches 5.4e8 at Qwen's 7B shape, past 2^31 with a padded vocabulary
        rows = ((row0 + tl.arange(0, BLOCK_N)) % N).to(tl.int64)
        cols = ((col0 + tl.arange(0, BLOCK_V)) % V).to(tl.int64)
        offs_k = tl.arange(0, BLOCK_K)
        h_ptrs = h + rows[:, None] * stride_h + offs_k[None, :]
        w_ptrs = w + cols[:, None] * stride_w + offs_k[None, :]
        for k in range(0, H, BLOCK_K):
            if EVEN_K:
                a = tl.load(h_ptrs)
                b = tl.load(w_ptrs)
            else:
                k_mask = offs_k[None, :] < H - k
                a = tl.load(h_ptrs, mask=k_mask, other=0.0)
                b = tl.load(w_ptrs, mask=k_mask, other=0.0)
            acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION)
            h_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
    return acc * scale


# Triton specializes integer arguments on divisibility by 16 and compiles a variant per combination;
# row and block counts change with every micro-batch, so each would cost a compile (seconds) mid-update.
@triton.jit(do_not_specialize=["N", "n_blocks", "tiles_per_split"])
def _forward_kernel(h, w, part_ptr, exp_out, max_out, N, V, H, stride_h, stride_w, stride_exp, scale,
                    n_blocks, v_tiles, tiles_per_split,
                    WITH_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                    BLOCK_K: tl.constexpr, TMA: tl.constexpr, EVEN_K: tl.constexpr,
                    PRECISION: tl.constexpr, FLATTEN: tl.constexpr, STORE_EXP: tl.constexpr):
    # Logits in log2 units (scale includes log2(e)): exp2 is the hardware's exponential.
    # One flat grid axis (the y/z axes stop at 65,535): consecutive programs share a vocabulary
    # split and walk its weight tiles together, so each tile comes from HBM about once per wave.
    # STORE_EXP (the fused policy loss, linear_policy_loss.py) also keeps each tile's
    # e = 2^(y - m_new) in fp16 [N, V] (exp_out) and m_new per row and tile in fp32 [N, v_tiles]
    # (max_out): softmax = e * 2^(m_new - lse) then needs neither the logits nor their recompute.
    pid = tl.program_id(0)
    split = pid // n_blocks
    row0 = (pid % n_blocks) * BLOCK_N
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, v_tiles)
    for tile in tl.range(first, last, flatten=FLATTEN):
        col0 = tile * BLOCK_V
        y_raw = logits_tile(h, w, row0, col0, N, V, H, stride_h, stride_w, scale,
                            BLOCK_N, BLOCK_V, BLOCK_K, TMA, EVEN_K, PRECISION)
        # Columns past V hold finite logits (zero or wrapped): -inf keeps them out of the
        # softmax, and e = 0 there zeroes their share of sum(e * y_raw).
        y = tl.where(col0 + tl.arange(0, BLOCK_V)[None, :] < V, y_raw, float("-inf"))
        m_new = tl.maximum(m, tl.max(y, 1))
        alpha = tl.exp2(m - m_new)
        e = tl.exp2(y - m_new[:, None])
        s = s * alpha + tl.sum(e, 1)
        if WITH_ENTROPY:
            t = t * alpha + tl.sum(e * y_raw, 1)
        m = m_new
        if STORE_EXP:
            tile_rows = row0 + tl.arange(0, BLOCK_N)
            tl.store(max_out + tile_rows.to(tl.int64) * v_tiles + tile, m_new, mask=tile_rows < N)
            if TMA:
                # a bulk asynchronous store, clipped to [N, V] by the descriptor's shape
                exp_out.store([row0, col0], e.to(tl.float16))
            else:
                tile_cols = col0 + tl.arange(0, BLOCK_V)
                tl.store(exp_out + tile_rows.to(tl.int64)[:, None] * stride_exp + tile_cols[None, :],
                         e.to(tl.float16), mask=(tile_rows < N)[:, None] & (tile_cols < V)[None, :])
    offs_n = row0 + tl.arange(0, BLOCK_N)
    row_ok = offs_n < N
    out = part_ptr + split * 3 * N + offs_n
    tl.store(out, m, mask=row_ok)
    tl.store(out + N, s, mask=row_ok)
    tl.store(out + 2 * N, t, mask=row_ok)


@triton.jit(do_not_specialize=["N", "splits"])
def _combine_kernel(part_ptr, h_ptr, w_ptr, tgt_ptr, logp_ptr, lse_ptr, ent_ptr,
                    N, V, H, stride_h, stride_w, inv_temp, splits,
                    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """Merge the splits' (max, sum, sum * logit) in log2 units into natural-log lse and entropy,
    and take each target's logit as its own dot product (N * H multiply-adds: 0.1% of the GEMM's
    work, and it keeps a compare-and-select off every logit of the forward's epilogue). `splits`
    is a runtime loop bound, not a constexpr: it follows the row count (up to 192 at V = 49,152),
    and a 192-times unrolled loop took Triton 180 s to compile in the middle of an H100 update."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    big_m = tl.full((BLOCK,), float("-inf"), tl.float32)
    for sp in range(splits):
        big_m = tl.maximum(big_m, tl.load(part_ptr + sp * 3 * N + offs, mask=ok, other=0.0))
    s = tl.zeros((BLOCK,), tl.float32)
    t = tl.zeros((BLOCK,), tl.float32)
    for sp in range(splits):
        base = part_ptr + sp * 3 * N + offs
        w = tl.exp2(tl.load(base, mask=ok, other=0.0) - big_m)
        s += w * tl.load(base + N, mask=ok, other=1.0)
        t += w * tl.load(base + 2 * N, mask=ok, other=0.0)
    lse = (big_m + tl.log2(s)) * LN2
    tgt = tl.load(tgt_ptr + offs, mask=ok, other=0)
    valid = (tgt >= 0) & (tgt < V)
    rows = offs.to(tl.int64)
    cols = tl.where(valid & ok, tgt, 0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    dot = tl.zeros((BLOCK,), tl.float32)
    for k in range(0, H, BLOCK_K):
        k_ok = ok[:, None] & (offs_k[None, :] < H - k)
        a = tl.load(h_ptr + rows[:, None] * stride_h + k + offs_k[None, :], mask=k_ok, other=0.0)
        b = tl.load(w_ptr + cols[:, None] * stride_w + k + offs_k[None, :], mask=k_ok, other=0.0)
        dot += tl.sum(a.to(tl.float32) * b.to(tl.float32), 1)
    # A target outside the vocabulary has no logit: NaN says so instead of a wrong number.
    logp = tl.where(valid, dot * inv_temp - lse, float("nan"))
    tl.store(logp_ptr + offs, logp, mask=ok)
    tl.store(lse_ptr + offs, lse, mask=ok)
    tl.store(ent_ptr + offs, lse - t / s * LN2, mask=ok)


@triton.jit(do_not_specialize=["N", "c0", "chunk_cols", "n_blocks", "v_blocks"])
def _grad_logits_kernel(h, w, tgt_ptr, lse_ptr, ent_ptr, glp_ptr, gent_ptr, dz,
                        N, V, H, stride_h, stride_w, stride_dz, scale, inv_temp, c0, chunk_cols,
                        n_blocks, v_blocks,
                        HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_N: tl.constexpr,
                        TMA: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr,
                        FLATTEN: tl.constexpr):
    # A grid of one program per tile walks one tile each; a persistent grid (FLATTEN) walks
    # several, and the flattened loop issues the next tile's loads during this tile's epilogue.
    # GROUP_N row blocks sweep the chunk's columns together: their weight tiles are shared in L2.
    per_group = GROUP_N * v_blocks
    for tile_id in tl.range(tl.program_id(0), n_blocks * v_blocks, tl.num_programs(0), flatten=FLATTEN):
        first_n = (tile_id // per_group) * GROUP_N
        group = tl.minimum(n_blocks - first_n, GROUP_N)
        pid_n = first_n + (tile_id % per_group) % group
        pid_v = (tile_id % per_group) // group
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
        offs_v = c0 + offs_c
        y = logits_tile(h, w, pid_n * BLOCK_N, c0 + pid_v * BLOCK_V, N, V, H, stride_h, stride_w, scale,
                        BLOCK_N, BLOCK_V, BLOCK_K, TMA, EVEN_K, PRECISION)
        row_ok = offs_n < N
        lse = tl.load(lse_ptr + offs_n, mask=row_ok, other=0.0)
        glp = tl.load(glp_ptr + offs_n, mask=row_ok, other=0.0)
        tgt = tl.load(tgt_ptr + offs_n, mask=row_ok, other=-1)
        p = tl.exp2(y - (lse * LOG2E)[:, None])
        g = glp[:, None] * (tl.where(offs_v[None, :] == tgt[:, None], 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            ent = tl.load(ent_ptr + offs_n, mask=row_ok, other=0.0)
            gent = tl.load(gent_ptr + offs_n, mask=row_ok, other=0.0)
            g -= gent[:, None] * p * (y * LN2 - (lse - ent)[:, None])
        g = g * inv_temp
        if TMA:
            # a bulk asynchronous store, clipped to [N, chunk_cols] by the descriptor's shape
            dz.store([pid_n * BLOCK_N, pid_v * BLOCK_V], g.to(dz.dtype))
        else:
            out = dz + offs_n.to(tl.int64)[:, None] * stride_dz + offs_c[None, :]
            tl.store(out, g.to(dz.dtype.element_ty), mask=row_ok[:, None] & (offs_c[None, :] < chunk_cols))


@dataclass(frozen=True)
class Tiles:
    """Block shape and launch parameters of the two GEMM kernels; ``tma`` loads tiles with the
    tensor-memory-accelerator copy engine (Hopper and newer). ``flatten`` software-pipelines each
    program's walk over tiles across tile boundaries and makes the backward's dLogits grid
    persistent, ``programs_per_sm`` programs per SM."""
    block_n: int
    block_v: int
    block_k: int
    num_warps: int
    num_stages: int
    group_n: int = 8
    tma: bool = False
    flatten: bool = False
    programs_per_sm: int = 1


def default_tiles(hidden: torch.Tensor, backward: bool) -> Tiles:
    """Measured with bench/tune_logprob.py on an H100 at N=16K, bf16 (ms at H=1536 / 3584).
    Forward: 64 x 256 tiles, 4 warps, the tile loop flattened 10.8 / 34.1 (11.8 / 35.7 without
    flattening: the next tile's loads then wait for this tile's softmax epilogue); at H=3584,
    128 x 256 tiles with 8 warps and 3 stages, flattened, 33.6. Backward (the dLogits GEMM plus
    cuBLAS's 21.1 / 51.1): at H=1536 a persistent grid of 2 programs per SM over 128 x 128 tiles
    33.2 vs 35.2 for one 256 x 128 tile per program; at H=3584 the latter 77.9, the persistent
    grids 78.0-84.4 (the longer K loop already hides the epilogue)."""
    if interpreting():
        # Small blocks so that CI's odd shapes (N=37, H=48, V=1000) span several tiles each way.
        return Tiles(block_n=16, block_v=64, block_k=32, num_warps=4, num_stages=1)
    if hidden.dtype == torch.float32:
        return Tiles(block_n=64, block_v=64, block_k=32, num_warps=4, num_stages=3)
    tma = tma_ok(hidden)
    small = hidden.shape[1] <= 2048
    if backward and small:
        return Tiles(block_n=128, block_v=128, block_k=64, num_warps=4, num_stages=4, group_n=16, tma=tma,
                     flatten=tma, programs_per_sm=2)
    if backward:
        return Tiles(block_n=256, block_v=128, block_k=64, num_warps=8, num_stages=3, group_n=16, tma=tma)
    if small:
        return Tiles(block_n=64, block_v=256, block_k=64, num_warps=4, num_stages=4, tma=tma, flatten=tma)
    return Tiles(block_n=128, block_v=256, block_k=64, num_warps=8, num_stages=3, tma=tma, flatten=tma)


def tma_ok(hidden: torch.Tensor) -> bool:
    # The copy engine needs compute capability 9.0+ and 16-byte aligned rows.
    return (hidden.is_cuda and torch.cuda.get_device_capability(hidden.device)[0] >= 9
            and (hidden.shape[1] * hidden.element_size()) % 16 == 0)


def tile_operands(hidden, weight, tiles: Tiles):
    if not tiles.tma:
        return hidden, weight
    return (TensorDescriptor.from_tensor(hidden, [tiles.block_n, tiles.block_k]),
            TensorDescriptor.from_tensor(weight, [tiles.block_v, tiles.block_k]))


def _grad_grid(hidden: torch.Tensor, tiles: Tiles, n_tiles: int) -> int:
    """Programs of the backward's dLogits kernel: one per tile, or a persistent grid (the CPU
    under the interpreter counts as 2 SMs)."""
    if not tiles.flatten:
        return n_tiles
    sms = multiprocessors(hidden, interpreted=2)
    return min(n_tiles, tiles.programs_per_sm * sms)


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs mean "check me exactly": TF32 would cost them 3 significant digits.
    return "ieee" if dtype == torch.float32 else "tf32"


def vocab_splits(hidden: torch.Tensor, n_blocks: int, v_tiles: int, per_sm: int = 2) -> int:
    """Vocabulary splits so that the forward grid has about per_sm programs an SM."""
    programs = per_sm * multiprocessors(hidden, interpreted=2) if hidden.is_cuda else 4
    return max(1, min(v_tiles, math.ceil(programs / n_blocks)))


def forward_stats(hidden, weight, targets, inv_temp, with_entropy, tiles=None, store=None, out=None, splits=None):
    """(logprobs, lse, entropy) fp32 [N]; entropy is None unless ``with_entropy``.

    ``store`` = (exp [N, >= V] fp16, row_max [N, cdiv(V, tiles.block_v)] fp32) also keeps every
    logit as its tile's e = 2^(y - m) and m (see _forward_kernel); ``out`` = three fp32 [N]
    tensors to write the results into; ``splits`` = vocabulary splits (default: vocab_splits)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    tiles = tiles or default_tiles(hidden, backward=False)
    n_blocks = triton.cdiv(n, tiles.block_n)
    v_tiles = triton.cdiv(vocab, tiles.block_v)
    per_split = triton.cdiv(v_tiles, min(v_tiles, splits or vocab_splits(hidden, n_blocks, v_tiles)))
    splits = triton.cdiv(v_tiles, per_split)
    partials = torch.empty((splits, 3, n), dtype=torch.float32, device=hidden.device)
    h_op, w_op = tile_operands(hidden, weight, tiles)
    # without a store, placeholders: any tensor, and a stride that never changes Triton's specialization
    exp_out, max_out = store if store is not None else (partials, partials)
    stride_exp = exp_out.stride(0) if store is not None else 0
    if store is not None and tiles.tma:
        exp_out = TensorDescriptor.from_tensor(exp_out[:, :vocab], [tiles.block_n, tiles.block_v])
    _forward_kernel[(splits * n_blocks,)](
        h_op, w_op, partials, exp_out, max_out, n, vocab, h, hidden.stride(0), weight.stride(0), stride_exp,
        inv_temp * LOG2E.value, n_blocks, v_tiles, per_split,
        WITH_ENTROPY=with_entropy, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
        BLOCK_K=tiles.block_k, TMA=tiles.tma, EVEN_K=h % tiles.block_k == 0,
        PRECISION=dot_precision(hidden.dtype), FLATTEN=tiles.flatten, STORE_EXP=store is not None,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    if out is None:
        out = tuple(torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(3))
    logprobs, lse, entropy = out
    block = 64
    _combine_kernel[(triton.cdiv(n, block),)](
        partials, hidden, weight, targets, logprobs, lse, entropy, n, vocab, h,
        hidden.stride(0), weight.stride(0), inv_temp, splits, BLOCK=block, BLOCK_K=128, num_warps=4)
    return logprobs, lse, entropy if with_entropy else None


def _accumulate_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b with acc fp32: cuBLAS writes the fp32 result directly (no rounding of the
    product to bf16) where torch offers it (out_dtype, CUDA only)."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif acc.is_cuda:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc += torch.mm(a, b).float()


def backward_grads(hidden, weight, targets, lse, entropy, grad_logprobs, grad_entropy, inv_temp,
                   need_hidden, need_weight, chunk_bytes, tiles=None):
    """(dHidden or None, dWeight or None)."""
    n, h = hidden.shape
    vocab = weight.shape[0]
    tiles = tiles or default_tiles(hidden, backward=True)
    if grad_logprobs is None:
        grad_logprobs = torch.zeros(n, dtype=torch.float32, device=hidden.device)
    chunk = chunk_columns(n, vocab, chunk_bytes, hidden.element_size(), multiple=tiles.block_v)
    # Rows padded to 64 columns: the copy engine needs 16-byte aligned row strides (V=50257 is odd).
    dz_buffer = torch.empty((n, triton.cdiv(chunk, 64) * 64), dtype=hidden.dtype, device=hidden.device)
    grad_hidden = torch.zeros((n, h), dtype=torch.float32, device=hidden.device) if need_hidden else None
    grad_weight = torch.empty_like(weight) if need_weight else None
    n_blocks = triton.cdiv(n, tiles.block_n)
    h_op, w_op = tile_operands(hidden, weight, tiles)
    for c0 in range(0, vocab, chunk):
        cols = min(chunk, vocab - c0)
        v_blocks = triton.cdiv(cols, tiles.block_v)
        dz = dz_buffer[:, :cols]
        _grad_logits_kernel[(_grad_grid(hidden, tiles, n_blocks * v_blocks),)](
            h_op, w_op, targets, lse, entropy if entropy is not None else lse, grad_logprobs,
            grad_entropy if grad_entropy is not None else grad_logprobs,
            TensorDescriptor.from_tensor(dz, [tiles.block_n, tiles.block_v]) if tiles.tma else dz,
            n, vocab, h, hidden.stride(0), weight.stride(0), dz_buffer.stride(0), inv_temp * LOG2E.value,
            inv_temp, c0, cols, n_blocks, v_blocks,
            HAS_GRAD_ENTROPY=grad_entropy is not None, BLOCK_N=tiles.block_n, BLOCK_V=tiles.block_v,
            BLOCK_K=tiles.block_k, GROUP_N=tiles.group_n, TMA=tiles.tma, EVEN_K=h % tiles.block_k == 0,
            PRECISION=dot_precision(hidden.dtype), FLATTEN=tiles.flatten, num_warps=tiles.num_warps,
            num_stages=tiles.num_stages)
        if need_weight:
            torch.mm(dz.t(), hidden, out=grad_weight[c0:c0 + cols])
        if need_hidden:
            _accumulate_fp32(grad_hidden, dz, weight[c0:c0 + cols])
    if need_hidden:
        grad_hidden = grad_hidden.to(hidden.dtype)
    return grad_hidden, grad_weight


class _LinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, chunk_bytes):
        inv_temp = 1.0 / temperature
        logprobs, lse, entropy = forward_stats(hidden, weight, targets, inv_temp, return_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temp, ctx.chunk_bytes = inv_temp, chunk_bytes
        return (logprobs, entropy) if return_entropy else logprobs

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy=None):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_hidden, grad_weight = backward_grads(
            hidden, weight, targets, lse, entropy,
            None if grad_logprobs is None else grad_logprobs.float().contiguous(),
            None if grad_entropy is None else grad_entropy.float().contiguous(),
            ctx.inv_temp, ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.chunk_bytes)
        return grad_hidden, grad_weight, None, None, None, None


def _validate(hidden, weight, targets, temperature, chunk_bytes):
    for name, t in (("hidden", hidden), ("weight", weight), ("targets", targets)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"linear_logprobs: {name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(f"linear_logprobs: hidden must be [N, H] and weight [V, H]; got "
                         f"{tuple(hidden.shape)} and {tuple(weight.shape)} (flatten the batch first)")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprobs: hidden size {hidden.shape[1]} != weight's {weight.shape[1]}")
    if not weight.shape[0]:
        raise ValueError("linear_logprobs: weight has no rows: the vocabulary needs at least one token")
    if targets.shape != (hidden.shape[0],) or targets.dtype.is_floating_point or targets.dtype.is_complex \
            or targets.dtype == torch.bool:
        raise ValueError(f"linear_logprobs: targets must be integer [N={hidden.shape[0]}]; "
                         f"got {targets.dtype} {tuple(targets.shape)}")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"linear_logprobs: hidden and weight must share one of fp32/fp16/bf16; "
                         f"got {hidden.dtype} and {weight.dtype}")
    if hidden.device != weight.device or hidden.device != targets.device:
        raise ValueError(f"linear_logprobs: hidden ({hidden.device}), weight ({weight.device}) and "
                         f"targets ({targets.device}) must be on one device")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) \
            or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"linear_logprobs: temperature must be a positive number, got {temperature!r}")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes <= 0:
        raise ValueError(f"linear_logprobs: chunk_bytes must be a positive integer, got {chunk_bytes!r}")


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    temperature: float = 1.0, return_entropy: bool = False, *,
                    chunk_bytes: int = 512 << 20):
    """Per-token log-probabilities of ``targets`` under softmax(hidden @ weight.T / temperature).

    hidden [N, H] and weight [V, H] (fp32, fp16 or bf16; a tied embedding matrix works as the
    weight), targets [N] integer. Returns fp32 logprobs [N], and fp32 entropy [N] of the same
    softmax when ``return_entropy``. Differentiable in hidden and weight, through both outputs.
    ``chunk_bytes`` bounds the backward's dLogits buffer (N x chunk in the input dtype): smaller
    saves memory, larger makes the backward's GEMMs longer and faster. Triton on CUDA (and under
    TRITON_INTERPRET=1), the chunked torch implementation elsewhere.
    """
    _validate(hidden, weight, targets, temperature, chunk_bytes)
    if hidden.shape[0] == 0:
        return linear_logprobs_reference(hidden, weight, targets, temperature, return_entropy)
    if not use_triton(hidden):
        return linear_logprobs_chunked(hidden, weight, targets, temperature, return_entropy,
                                       chunk_bytes=chunk_bytes)
    return _LinearLogprobs.apply(hidden.contiguous(), weight.contiguous(), targets.contiguous(),
                                 float(temperature), bool(return_entropy), chunk_bytes)
