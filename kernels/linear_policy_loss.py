"""The PPO-clip loss straight from hidden states and the lm_head, its gradient made in the forward.

linear_logprobs + pg_loss costs 8*N*H*V FLOP: the logprob forward's GEMM, then a backward that
recomputes every logit tile before its two gradient GEMMs. For PPO-clip nothing forces the
recompute: d loss / d logprob of a token is a function of the token's own logprob, its old
logprob, advantage and mask and the global divisor (pg_loss's rule), so once a row of logits
exists, its logprob, entropy, gradient and dLogits can all be made before the row is dropped.
Per chunk of C token rows:

  Z = hidden[c] @ weight.T             cuBLAS, fp32 out, [C, V]          2*C*H*V
  one Triton program per row           pass 1: max, sum of exps, sum of exp * z -> lse,
                                       entropy, logprob, d loss / d logprob (token_gradient);
                                       pass 2: dLogits, in the input dtype, over the row's own
                                       storage (fp32 in, 2 bytes out: no second buffer)
  dHidden[c] = dLogits @ weight        cuBLAS                             2*C*H*V
  dWeight   += dLogits.T @ hidden[c]   cuBLAS, summed over chunks         2*C*H*V

That is store='fp32-logits'. The row kernel moves 10 bytes a logit (the fp32 row read twice,
dLogits written), ~8.7 ms per 16K tokens at V = 151,936 on an H100: a fifth of the loss at
H = 1536. store='fp16-exp' (16-bit inputs) keeps 2 bytes a logit instead:

  linear_logprobs' forward kernel      its GEMM and running (max, sum of exps, sum of exp * y),
    with STORE_EXP                     plus each tile's e = 2^(y - m) in fp16 and m, the
                                       running max there, per row and tile; its combine kernel
                                       makes lse, entropy and the logprob (its own dot product)
  one Triton program per row           p = e * 2^(m - lse), d loss / d logprob, dLogits over
                                       e's own storage: 4 bytes a logit, one pass
  the two gradient GEMMs               as above

e lies in [0, 1], where fp16 keeps 11 significant bits down to 2^-14 (2^-11 relative: a
quarter of the rounding dLogits then get in bf16) and 2^-25 absolute below; an e under 2^-24
(a p under 2^-24) becomes 0. It is the default for 16-bit inputs (resolve_store).

6*N*H*V in all, the GEMMs' own work. Memory beyond the inputs and the two gradients: one fp32
[C, V] block (``chunk_bytes``). Logits are fp32 so that the logprobs and the softmax in the
gradient keep the precision of linear_logprobs (the engine's logprobs stay the trainer's to fp32
rounding). dWeight sums its chunks in the weight's dtype (an fp32 sum would take 4*V*H bytes
more: 0.93 GB at qwen2.5-1.5b's shapes): one rounding per chunk where linear_logprobs rounds
once, so its error grows with the chunk count (fp16 on the CPU: 3.6e-4 of the norm in one chunk,
6.5e-4 in 13, 9.5e-4 in 52), and chunks are as many rows as ``chunk_bytes`` allows. The loss and the metrics then come from pg_loss's own
forward kernel over all N logprobs, so they are pg_loss's numbers for these logprobs. The
autograd backward scales the stored gradients by the upstream gradient.

The fp32 reference is linear_policy_loss_reference.py; elsewhere than CUDA and the interpreter,
linear_logprobs' chunked torch path and pg_loss's torch reference run instead.
"""
from __future__ import annotations

import math
import numbers

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from fastazr.kernels.logprobs import LN2, LOG2E, _validate as _check_linear, default_tiles, forward_stats
from fastazr.kernels.logprobs_chunked import linear_logprobs_chunked
from fastazr.kernels.linear_policy_loss_reference import LinearPGLoss
from fastazr.kernels.policy_loss import _launch_forward, token_gradient
from fastazr.kernels.policy_loss_reference import check_pg_loss_args, pg_loss_reference
from fastazr.kernels.runtime import interpreting, multiprocessors, use_triton

__all__ = ["LinearPGLoss", "linear_pg_loss"]

STORES = ("auto", "fp32-logits", "fp16-exp")

# 2048 fp32 columns a trip: 8 KB of loads in flight per program with 8 warps (4 per thread).
# The interpreter gets small blocks so that CI's odd vocabularies span several of them.
_BLOCK_V = 64 if interpreting() else 2048
_WARPS = 8
# The fp16-exp row kernel's trip: this many of the forward's vocabulary tiles (8 x 256 columns on
# a GPU, as _BLOCK_V; 2 x 64 under the interpreter, so CI's trips hold a tile boundary).
_EXP_TILES = 2 if interpreting() else 8
# elements a program of _scale_kernel; small under the interpreter so CI's gradients span several
_SCALE_BLOCK = 64 if interpreting() else 4096


# Per-token tensors come whole with the chunk's first row as a number, not as slices: a slice's
# address would change Triton's 16-byte alignment specialization from chunk to chunk (a compile).
# V and the row strides stay specialized (fixed per model: one compile), so Triton knows the rows
# are 16-byte aligned and moves them in 16-byte vectors (8 scalar loads a thread a trip without).
@triton.jit(do_not_specialize=["r0"])
def _rows_kernel(z_ptr, dz_ptr, tgt_ptr, old_ptr, adv_ptr, mask_ptr, denom_ptr, logp_ptr, ent_ptr,
                 r0, V, stride_z, stride_dz, inv_temp, lo, hi, limit, entropy_coef,
                 BLOCK_V: tl.constexpr):
    local = tl.program_id(0).to(tl.int64)
    row = r0 + local
    z_row = z_ptr + local * stride_z
    cols = tl.arange(0, BLOCK_V)
    scale = inv_temp * LOG2E  # logits in log2 units, as linear_logprobs' kernels keep them
    # pass 1: per-lane running max, sum of 2^(y - max) and sum of 2^(y - max) * y, merged at the end
    m = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    t = tl.zeros((BLOCK_V,), tl.float32)
    for c0 in range(0, V, BLOCK_V):
        ok = c0 + cols < V
        y = tl.load(z_row + c0 + cols, mask=ok, other=float("-inf")) * scale
        m_new = tl.maximum(m, y)
        # A lane past the vocabulary's end keeps m = -inf and s = t = 0; its differences are kept
        # away from -inf - -inf (NaN) rather than masked after it.
        alpha = tl.exp2(tl.where(m_new == float("-inf"), 0.0, m - m_new))
        e = tl.exp2(tl.where(ok, y - m_new, float("-inf")))
        s = s * alpha + e
        t = t * alpha + e * tl.where(ok, y, 0.0)
        m = m_new
    big_m = tl.max(m, 0)
    w = tl.exp2(tl.where(m == float("-inf"), float("-inf"), m - big_m))
    s_row = tl.sum(s * w, 0)
    t_row = tl.sum(t * w, 0)
    lse = (big_m + tl.log2(s_row)) * LN2
    entropy = lse - t_row / s_row * LN2
    tgt = tl.load(tgt_ptr + row)
    in_vocab = (tgt >= 0) & (tgt < V)
    target_logit = tl.load(z_row + tl.where(in_vocab, tgt, 0).to(tl.int64))
    # A target outside the vocabulary has no logit: NaN says so, as linear_logprobs does.
    logp = tl.where(in_vocab, target_logit * inv_temp - lse, float("nan"))
    tl.store(logp_ptr + row, logp)
    tl.store(ent_ptr + row, entropy)
    valid = tl.load(mask_ptr + row) != 0
    inv_denom = 1.0 / tl.load(denom_ptr)
    glp = token_gradient(logp, tl.load(old_ptr + row).to(tl.float32), tl.load(adv_ptr + row).to(tl.float32),
                         valid, inv_denom, lo, hi, limit)
    gent = tl.where(valid, -entropy_coef * inv_denom, 0.0)
    # pass 2: dLogits = inv_temp * (glp * (onehot - p) - gent * p * (z' - lse + entropy))
    dz_row = dz_ptr + local * stride_dz
    for c0 in range(0, V, BLOCK_V):
        ok = c0 + cols < V
        y = tl.load(z_row + c0 + cols, mask=ok, other=0.0) * scale
        p = tl.exp2(y - lse * LOG2E)
        g = glp * (tl.where(c0 + cols == tgt, 1.0, 0.0) - p)
        g -= gent * p * (y * LN2 - (lse - entropy))
        # dz_row aliases z_row's bytes. Trip k stores columns [k*B, (k+1)*B) at 2 bytes each: the
        # bytes of fp32 columns [k*B/2, (k+1)*B/2), all read by earlier trips except in trip 0,
        # where they are this trip's own columns, which other threads may still be loading: every
        # load of the trip completes first.
        tl.debug_barrier()
        tl.store(dz_row + c0 + cols, (g * inv_temp).to(dz_ptr.dtype.element_ty), mask=ok)


# The same rows from the stored exps (store='fp16-exp'): e = 2^(y - m) in fp16 and m, the
# forward's running max at e's vocabulary tile, make p = e * 2^(m - lse) without the logit. The
# row's lse, entropy and logprob come from linear_logprobs' forward (combine kernel); pass 1 is gone
# and pass 2 moves 4 bytes a logit (the fp16 read, dLogits written over it) instead of 10. A trip
# is [BLOCK_V // TILE_V, TILE_V]: one m per tile row, broadcast, rather than one gather a logit.
@triton.jit(do_not_specialize=["r0"])
def _exp_rows_kernel(exp_ptr, dz_ptr, max_ptr, tgt_ptr, old_ptr, adv_ptr, mask_ptr, denom_ptr, logp_ptr, lse_ptr,
                     ent_ptr, r0, V, v_tiles, stride_exp, inv_temp, lo, hi, limit, entropy_coef,
                     TILE_V: tl.constexpr, TILES: tl.constexpr, ENTROPY: tl.constexpr):
    local = tl.program_id(0).to(tl.int64)
    row = r0 + local
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(ent_ptr + row)
    tgt = tl.load(tgt_ptr + row)
    valid = tl.load(mask_ptr + row) != 0
    inv_denom = 1.0 / tl.load(denom_ptr)
    glp = token_gradient(tl.load(logp_ptr + row), tl.load(old_ptr + row).to(tl.float32),
                         tl.load(adv_ptr + row).to(tl.float32), valid, inv_denom, lo, hi, limit)
    gent = tl.where(valid, -entropy_coef * inv_denom, 0.0)
    lse2 = lse * LOG2E
    exp_row = exp_ptr + local * stride_exp
    dz_row = dz_ptr + local * stride_exp
    max_row = max_ptr + local * v_tiles
    BLOCK_V: tl.constexpr = TILES * TILE_V
    tiles = tl.arange(0, TILES)
    cols = tiles[:, None] * TILE_V + tl.arange(0, TILE_V)[None, :]
    for c0 in range(0, V, BLOCK_V):
        ok = c0 + cols < V
        e = tl.load(exp_row + c0 + cols, mask=ok, other=0.0).to(tl.float32)
        m = tl.load(max_row + c0 // TILE_V + tiles, mask=c0 // TILE_V + tiles < v_tiles, other=0.0)
        p = e * tl.exp2(m - lse2)[:, None]
        g = glp * (tl.where(c0 + cols == tgt, 1.0, 0.0) - p)
        if ENTROPY:
            # y = m + log2(e); an e that underflowed fp16 (p < 2^-24) has p * y -> 0, not 0 * -inf
            g -= gent * tl.where(e > 0.0, p * ((m[:, None] + tl.log2(e)) * LN2 - (lse - entropy)), 0.0)
        # dz_row is exp_row's bytes: every load of the trip completes before its stores
        tl.debug_barrier()
        tl.store(dz_row + c0 + cols, (g * inv_temp).to(dz_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _scale_kernel(x_ptr, g_ptr, n, BLOCK: tl.constexpr):
    g = tl.load(g_ptr).to(tl.float32)
    if g != 1.0:
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ok = offs < n
        x = tl.load(x_ptr + offs, mask=ok)
        tl.store(x_ptr + offs, (x.to(tl.float32) * g).to(x_ptr.dtype.element_ty), mask=ok)


def _scale_(grad: torch.Tensor, scale: torch.Tensor) -> None:
    """grad *= scale (a 1-element device tensor), in place: each product in fp32, rounded once
    to grad's dtype; nothing but the scale is read when it is 1 (loss.backward()'s, and
    PolicyUpdate's). torch's grad.mul_(scale) broadcasts the 0-dim tensor through its
    unvectorized kernel: 1.06 ms for dHidden and dWeight at N = 16K, H = 1536 on the H100,
    2.98 ms at H = 3584, 2-3% of the whole loss."""
    n = grad.numel()
    _scale_kernel[(triton.cdiv(n, _SCALE_BLOCK),)](grad, scale, n, BLOCK=_SCALE_BLOCK, num_warps=4)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> None:
    """out = hidden @ weight.T in fp32, accumulated in fp32 (cuBLAS writes fp32 itself)."""
    if hidden.dtype == torch.float32:
        torch.mm(hidden, weight.t(), out=out)
    elif hidden.is_cuda:
        torch.mm(hidden, weight.t(), out_dtype=torch.float32, out=out)
    else:  # the interpreter's CPU tensors: the same products, exactly, in fp32
        torch.mm(hidden.float(), weight.float().t(), out=out)


def chunk_rows(tokens: int, vocab: int, chunk_bytes: int, store: str = "fp32-logits") -> int:
    """Token rows per chunk: a [rows, vocab] block within chunk_bytes, at least one row; fp32
    logits, or fp16 exps in rows padded to 64 columns (the copy engine's 16-byte row stride)."""
    per_row = 4 * vocab if store == "fp32-logits" else 2 * _padded(vocab)
    return max(1, min(tokens, chunk_bytes // per_row))


def _padded(vocab: int) -> int:
    return triton.cdiv(vocab, 64) * 64


def resolve_store(store: str, hidden: torch.Tensor) -> str:
    """'auto' -> 'fp16-exp' for 16-bit inputs, 'fp32-logits' for fp32 (whose dLogits need 4
    bytes). Measured (H100, N = 16K, bf16, forward + backward; docs/kernels.md): 37.8 against
    43.5 ms at H = 1536 and 82.2 against 86.6 at H = 3584 (V = 151,936), 6.4 against 7.6 at
    H = 576 (V = 49,152): the row kernel moves 4 bytes a logit instead of 10 (3.5 against 8.7 ms
    at V = 151,936), and the logits GEMM in Triton keeps up with cuBLAS's fp32-out one."""
    if store != "auto":
        return store
    return "fp16-exp" if hidden.dtype != torch.float32 else "fp32-logits"


def _divisor(mask: torch.Tensor, normalizer) -> torch.Tensor:
    """pg_loss's divisor as a 1-element fp32 device tensor (0 becomes 1), with no host sync."""
    if normalizer is None:
        count = (mask != 0).sum(dtype=torch.float32).reshape(1)
    elif isinstance(normalizer, torch.Tensor):
        count = normalizer.detach().to(device=mask.device, dtype=torch.float32).reshape(1)
    else:
        count = torch.full((1,), float(normalizer), dtype=torch.float32, device=mask.device)
    # pg_loss's rule: 0 counts as 1; a device tensor < 0 or not finite poisons the step (no host sync)
    return torch.where(count == 0, 1.0, torch.where((count > 0) & torch.isfinite(count), count, torch.nan))


def _logit_chunks(hidden, weight, rows, per_token, policy, logprobs, entropy):
    """(first row, dLogits [C, V]) per chunk, from fp32 logits cuBLAS writes (store='fp32-logits')."""
    n, vocab = hidden.shape[0], weight.shape[0]
    inv_temp, lo, hi, limit, entropy_coef = policy
    z = torch.empty((rows, vocab), dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block = z[:r1 - r0]
        _logits(hidden[r0:r1], weight, block)
        # dLogits in the input dtype over each fp32 row's own bytes: a [C, V] view with the
        # fp32 row's stride
        dz = block.view(hidden.dtype)[:, :vocab]
        _rows_kernel[(r1 - r0,)](
            block, dz, *per_token, logprobs, entropy, r0, vocab, block.stride(0), dz.stride(0), inv_temp, lo, hi,
            limit, entropy_coef, BLOCK_V=_BLOCK_V, num_warps=_WARPS)
        yield r0, dz


def exp_chunk_rows(tokens: int, rows: int, block_n: int, sms: int) -> int:
    """Rows a chunk for store='fp16-exp', from the rows chunk_bytes allows. A chunk's forward grid
    is row blocks x vocabulary splits (exp_splits), one program an SM at a time by shared memory
    (4 stages of 40 KB), each walking its split's vocabulary tiles: 287 programs on the H100's 132
    SMs (41 blocks x 7 splits) took 15.2 ms for the forward at N = 16K, H = 1536, 12.1 once the
    grid filled whole waves. So a chunk takes as many row blocks as divide 2 x SMs, down to half
    of what chunk_bytes allows; whole blocks apart, every chunk's slices keep their 16-byte
    alignment (one compile)."""
    if rows >= tokens:
        return tokens
    blocks = rows // block_n
    if blocks == 0:
        return rows - rows % 16 if rows >= 16 else rows
    fits = [b for b in range((blocks + 1) // 2, blocks + 1) if (2 * sms) % b == 0]
    return (fits[-1] if fits else blocks) * block_n


def exp_splits(rows: int, block_n: int, sms: int) -> int:
    """Vocabulary splits of a chunk's forward grid: as many as fill 2 x SMs programs."""
    return max(1, 2 * sms // triton.cdiv(rows, block_n))


def _exp_chunks(hidden, weight, rows, per_token, policy, logprobs, entropy):
    """(first row, dLogits [C, V]) per chunk, from the fp16 exps linear_logprobs' forward
    kernel stores beside its statistics (store='fp16-exp')."""
    n, vocab = hidden.shape[0], weight.shape[0]
    inv_temp, lo, hi, limit, entropy_coef = policy
    targets = per_token[0]
    tiles = default_tiles(hidden, backward=False)
    sms = multiprocessors(hidden, interpreted=2)
    rows = exp_chunk_rows(n, rows, tiles.block_n, sms)
    v_tiles = triton.cdiv(vocab, tiles.block_v)
    exps = torch.empty((rows, _padded(vocab)), dtype=torch.float16, device=hidden.device)
    row_max = torch.empty((rows, v_tiles), dtype=torch.float32, device=hidden.device)
    lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        block, block_max = exps[:r1 - r0], row_max[:r1 - r0]
        forward_stats(hidden[r0:r1], weight, targets[r0:r1], inv_temp, True, tiles, store=(block, block_max),
                      out=(logprobs[r0:r1], lse[r0:r1], entropy[r0:r1]), splits=exp_splits(r1 - r0, tiles.block_n, sms))
        dz = block.view(hidden.dtype)[:, :vocab]
        _exp_rows_kernel[(r1 - r0,)](
            block, dz, block_max, *per_token, logprobs, lse, entropy, r0, vocab, v_tiles, block.stride(0), inv_temp,
            lo, hi, limit, entropy_coef, TILE_V=tiles.block_v, TILES=_EXP_TILES, ENTROPY=entropy_coef != 0,
            num_warps=_WARPS)
        yield r0, dz


class _LinearPGLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logprobs, advantages, mask, normalizer, lo, hi, limit,
                entropy_coef, inv_temp, rows, store, want_hidden, want_weight):
        n, vocab = hidden.shape[0], weight.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty(n, dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if want_hidden else None
        grad_weight = torch.empty_like(weight) if want_weight else None
        divisor = _divisor(mask, normalizer)
        per_token = (targets, old_logprobs, advantages, mask, divisor)
        policy = (inv_temp, lo, hi, limit, entropy_coef)
        chunks = _exp_chunks if store == "fp16-exp" else _logit_chunks
        for r0, dz in chunks(hidden, weight, rows, per_token, policy, logprobs, entropy):
            r1 = r0 + dz.shape[0]
            if want_hidden:
                torch.mm(dz, weight, out=grad_hidden[r0:r1])
            if want_weight:
                if r0 == 0:
                    torch.mm(dz.t(), hidden[r0:r1], out=grad_weight)
                else:
                    grad_weight.addmm_(dz.t(), hidden[r0:r1])
        loss, stats = _launch_forward(logprobs, old_logprobs, advantages, mask, entropy, normalizer, lo, hi, limit,
                                      entropy_coef)
        ctx.grads = (grad_hidden, grad_weight)
        ctx.mark_non_differentiable(stats, logprobs)
        ctx.set_materialize_grads(False)
        return loss, stats, logprobs

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_stats, _grad_logprobs):
        if ctx.grads is None:
            raise RuntimeError("linear_pg_loss's backward ran twice: its gradients were made in the forward and "
                               "are handed out once, to one backward for all inputs (call linear_pg_loss again "
                               "rather than retain_graph=True or one autograd.grad call per input)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None
        if grad_loss is None:
            return (None,) * 16
        # In place: a scaled copy of dWeight would be 0.47 GB more at qwen2.5-1.5b.
        for grad in (grad_hidden, grad_weight):
            if grad is not None:
                _scale_(grad, grad_loss)
        return (grad_hidden, grad_weight) + (None,) * 14


def _check(hidden, weight, targets, old_logprobs, advantages, mask, clip_low, clip_high, temperature, entropy_coef,
           normalizer, log_ratio_limit, chunk_bytes, store) -> None:
    _check_linear(hidden, weight, targets, temperature, chunk_bytes)
    if store not in STORES:
        raise ValueError(f"linear_pg_loss: store must be one of {', '.join(map(repr, STORES))}, got {store!r}")
    if store == "fp16-exp" and hidden.dtype == torch.float32:
        raise ValueError("linear_pg_loss: store='fp16-exp' writes dLogits over the 2-byte exps, so it needs fp16 "
                         "or bf16 hidden and weight; use store='fp32-logits' (or 'auto') for fp32")
    for name, t in (("old_logprobs", old_logprobs), ("advantages", advantages), ("mask", mask)):
        if not isinstance(t, torch.Tensor) or t.shape != targets.shape:
            raise ValueError(f"linear_pg_loss: {name} must be a tensor of shape {tuple(targets.shape)} (one value "
                             f"per token row of hidden), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != hidden.device:
            raise ValueError(f"linear_pg_loss: {name} is on {t.device} but hidden is on {hidden.device}")
    # pg_loss's own checks, with old_logprobs standing in for the logprobs this call makes
    check_pg_loss_args(old_logprobs, old_logprobs, advantages, mask, clip_low, clip_high, None, 0.0, normalizer,
                       log_ratio_limit)
    if isinstance(entropy_coef, bool) or not isinstance(entropy_coef, numbers.Real) or not math.isfinite(entropy_coef):
        raise ValueError(f"linear_pg_loss: entropy_coef must be a finite number, got {entropy_coef!r}")


def linear_pg_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, old_logprobs: torch.Tensor,
                   advantages: torch.Tensor, mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                   temperature: float = 1.0, entropy_coef: float = 0.0,
                   normalizer: float | torch.Tensor | None = None, log_ratio_limit: float = 20.0, *,
                   chunk_bytes: int = 768 << 20, store: str = "auto") -> LinearPGLoss:
    """pg_loss(linear_logprobs(hidden, weight, targets, temperature), old_logprobs, advantages,
    mask, clip_low, clip_high, entropy, entropy_coef, normalizer, log_ratio_limit), fused.

    hidden [N, H] and weight [V, H] as linear_logprobs takes them (fp32, fp16 or bf16), targets
    [N] integer, and pg_loss's per-token inputs, one per row of hidden. The entropy (of the same
    tempered softmax) is always computed, so the entropy metric is always filled; entropy_coef
    puts it in the loss. Returns LinearPGLoss: pg_loss's loss and metrics, and the logprobs.
    The loss backpropagates into hidden and weight; its gradients are computed here, in the
    forward (see the module docstring), and one backward hands them out. ``store`` is what a
    row chunk keeps of its logits between the GEMM and the row kernel: 'fp32-logits' (cuBLAS's),
    'fp16-exp' (16-bit inputs: each logit's 2^(y - m) beside its tile's running max m, from
    linear_logprobs' forward kernel) or 'auto' (resolve_store). ``chunk_bytes`` bounds that block
    (768 MiB: 1,324 rows of fp32 logits at V = 151,936, 2,640 of fp16 exps; with the gradients
    1.2 GiB beyond the inputs at N = 16K, H = 1536 by arithmetic: the GPU test holds the
    measured peak to the issue's 1.5 GiB).
    """
    _check(hidden, weight, targets, old_logprobs, advantages, mask, clip_low, clip_high, temperature, entropy_coef,
           normalizer, log_ratio_limit, chunk_bytes, store)
    if not use_triton(hidden) or hidden.shape[0] == 0:
        logprobs, entropy = linear_logprobs_chunked(hidden, weight, targets, temperature, True)
        out = pg_loss_reference(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, entropy, entropy_coef,
                                normalizer, log_ratio_limit)
        return LinearPGLoss(*out, logprobs.detach())
    if isinstance(normalizer, torch.Tensor) and normalizer.device != hidden.device:
        normalizer = normalizer.item()  # a CPU tensor is a host number already: no device sync
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    store = resolve_store(store, hidden)
    rows = chunk_rows(hidden.shape[0], weight.shape[0], chunk_bytes, store)
    # decided here: inside forward grad mode is off, and needs_input_grad ignores no_grad(), under
    # which two GEMMs a chunk would be spent on gradients nobody takes
    grad = torch.is_grad_enabled()
    loss, stats, logprobs = _LinearPGLossFunction.apply(
        hidden.contiguous(), weight.contiguous(), targets.contiguous(), old_logprobs.contiguous(),
        advantages.contiguous(), mask.contiguous(), normalizer, 1.0 - clip_low, 1.0 + clip_high,
        float(log_ratio_limit), float(entropy_coef), 1.0 / temperature, rows, store, grad and hidden.requires_grad,
        grad and weight.requires_grad)
    return LinearPGLoss(loss, *stats.unbind()[:4], logprobs)
