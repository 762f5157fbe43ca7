"""Fused PPO-clip policy-gradient loss: one Triton launch forward, one backward.

The eager composition (policy_loss_reference.py) launches dozens of elementwise and reduction kernels
each way and keeps several [N] fp32 temporaries alive for autograd (bench/bench_pg_loss.py counts
them). Here the forward is a single program that streams the tokens once (17 bytes a token) and
writes the loss and every metric; the backward recomputes the ratio from the inputs (13 bytes a
token to read, cheaper than storing it in the forward and reading it back) and writes the
gradients.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastazr.kernels.policy_loss_reference import PGLoss, check_pg_loss_args, pg_loss_reference
from fastazr.kernels.runtime import use_triton

__all__ = ["PGLoss", "pg_loss"]

# The forward is one program, so it is latency-bound: a wide block keeps 4096 tokens of loads
# (~70 KB) in flight per trip through the loop, with 8 tokens a thread (16 warps; 16-byte vector
# loads). The block and the warps shrink for small N, so N=37 does not mask off 99% of the lanes.
_FWD_MAX_BLOCK, _FWD_TOKENS_PER_THREAD = 4096, 8
# The backward is a plain elementwise grid; 1024 tokens a program fills an H100 from N ~ 128K and
# keeps small batches at a few programs.
_BWD_BLOCK, _BWD_WARPS = 1024, 4

# Normalizer modes (constexpr, so each compiles to straight-line code).
_NORM_COUNT, _NORM_VALUE, _NORM_POINTER = 0, 1, 2
# The forward writes the loss to a 0-dim tensor of its own (returned by the autograd Function: a
# view would make `loss /= steps` an error) and 5 fp32 stats: clip_fraction, approx_kl, mean_ratio,
# entropy, then the divisor it used, which the backward reads by pointer. Snapshotting the divisor
# keeps the backward right even if the caller reuses its normalizer tensor before backward.


# Triton specializes integer arguments on divisibility by 16 and compiles a variant per combination;
# row and block counts change with every micro-batch, so each would cost a compile (seconds) mid-update.
@triton.jit(do_not_specialize=["n"])
def _pg_loss_fwd_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, ent_ptr, norm_ptr, loss_ptr, stats_ptr,
                        n, norm_value, lo, hi, limit, entropy_coef,
                        HAS_ENTROPY: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    # One program, a fixed walk over the tokens and a fixed tree in tl.sum: bitwise deterministic,
    # with no atomics and no second pass over partial sums.
    lanes = tl.arange(0, BLOCK)
    acc_pg = tl.zeros([BLOCK], tl.float32)
    acc_clip = tl.zeros([BLOCK], tl.float32)
    acc_kl = tl.zeros([BLOCK], tl.float32)
    acc_ratio = tl.zeros([BLOCK], tl.float32)
    acc_ent = tl.zeros([BLOCK], tl.float32)
    acc_count = tl.zeros([BLOCK], tl.int32)
    acc_bad = tl.zeros([BLOCK], tl.int32)
    for start in range(0, n, BLOCK):
        offs = start + lanes
        inside = offs < n
        # All loads are issued at once; gating the others on the mask would serialize two
        # memory latencies per trip.
        valid = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
        lp = tl.load(lp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        diff = lp - old
        log_ratio = tl.minimum(tl.maximum(diff, -limit), limit)
        ratio = tl.exp(log_ratio)
        unclipped = -adv * ratio
        clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
        # tl.where, never a multiply by the mask: masked positions may hold NaN or inf, and 0 * NaN
        # is NaN.
        acc_pg += tl.where(valid, tl.maximum(unclipped, clipped), 0.0)
        acc_clip += tl.where(valid & (clipped > unclipped), 1.0, 0.0)
        acc_kl += tl.where(valid, (ratio - 1.0) - log_ratio, 0.0)
        acc_ratio += tl.where(valid, ratio, 0.0)
        acc_count += valid.to(tl.int32)
        # A counted token without a defined loss: a NaN log ratio (which the clamp would turn into
        # a finite -limit on the GPU) or an advantage that is not finite.
        acc_bad += (valid & ((diff != diff) | ~(tl.abs(adv) < float("inf")))).to(tl.int32)
        if HAS_ENTROPY:
            ent = tl.load(ent_ptr + offs, mask=inside, other=0.0).to(tl.float32)
            acc_ent += tl.where(valid, ent, 0.0)
    if NORM == 0:  # _NORM_COUNT (plain module ints are not visible inside @triton.jit)
        norm = tl.sum(acc_count, axis=0).to(tl.float32)
    elif NORM == 1:  # _NORM_VALUE
        norm = norm_value
    else:  # _NORM_POINTER
        norm = tl.load(norm_ptr).to(tl.float32)
    # No valid token anywhere: every sum is 0, and dividing by 1 keeps it 0 instead of NaN.
    # a device tensor's count is checked here, without a host sync: < 0 or not finite poisons the step
    denom = tl.where(norm == 0.0, 1.0, tl.where((norm > 0.0) & (norm < float("inf")), norm, float("nan")))
    # Any such token makes the loss and every metric NaN, as the torch composition does: the
    # caller sees it and skips the step rather than training on a silently finite number.
    poison = tl.where(tl.sum(acc_bad, axis=0) > 0, float("nan"), 1.0)
    ent_sum = tl.sum(acc_ent, axis=0)
    tl.store(loss_ptr, (tl.sum(acc_pg, axis=0) - entropy_coef * ent_sum) / denom * poison)
    tl.store(stats_ptr + 0, tl.sum(acc_clip, axis=0) / denom * poison)
    tl.store(stats_ptr + 1, tl.sum(acc_kl, axis=0) / denom * poison)
    tl.store(stats_ptr + 2, tl.sum(acc_ratio, axis=0) / denom * poison)
    tl.store(stats_ptr + 3, ent_sum / denom * poison)
    tl.store(stats_ptr + 4, denom)


@triton.jit
def token_gradient(lp, old, adv, valid, scale, lo, hi, limit):
    """d loss / d logprob of each token (fp32), `scale` the upstream gradient over the divisor:
    shared with the fused linear policy loss (linear_policy_loss.py), so both give the same bits."""
    diff = lp - old
    ratio = tl.exp(tl.minimum(tl.maximum(diff, -limit), limit))
    unclipped = -adv * ratio
    clipped = -adv * tl.minimum(tl.maximum(ratio, lo), hi)
    # The weight autograd gives the unclipped branch of max(unclipped, clipped): all of it when
    # that branch wins, half on a tie (the other half flows through the clipped branch, which
    # passes it on only when the clamp is inactive, i.e. the ratio lies in [lo, hi]).
    in_range = (ratio >= lo) & (ratio <= hi)
    tie = tl.where(in_range, 1.0, 0.5)
    weight = tl.where(unclipped > clipped, 1.0, tl.where(unclipped == clipped, tie, 0.0))
    # torch.clamp passes the gradient on its closed interval, so |diff| == limit still counts.
    passes = valid & (diff >= -limit) & (diff <= limit)
    # A counted token without a defined loss (see the forward) gets a NaN gradient, so that the
    # step's gradient norm is NaN too.
    bad = valid & ((diff != diff) | ~(tl.abs(adv) < float("inf")))
    return tl.where(bad, float("nan"), tl.where(passes, scale * weight * -adv * ratio, 0.0))


@triton.jit(do_not_specialize=["n"])
def _pg_loss_bwd_kernel(lp_ptr, old_ptr, adv_ptr, mask_ptr, grad_loss_ptr, stats_ptr, dlp_ptr, dent_ptr,
                        n, lo, hi, limit, entropy_coef,
                        WRITE_DLP: tl.constexpr, WRITE_DENT: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    valid = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
    # Upstream gradient and divisor by pointer: no host synchronization anywhere in the step.
    scale = tl.load(grad_loss_ptr).to(tl.float32) / tl.load(stats_ptr + 4)  # stats[4]: the divisor
    if WRITE_DLP:
        lp = tl.load(lp_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        old = tl.load(old_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        adv = tl.load(adv_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        dlp = token_gradient(lp, old, adv, valid, scale, lo, hi, limit)
        tl.store(dlp_ptr + offs, dlp, mask=inside)
    if WRITE_DENT:
        tl.store(dent_ptr + offs, tl.where(valid, -entropy_coef * scale, 0.0), mask=inside)


def _launch_forward(logprobs, old_logprobs, advantages, mask, entropy, normalizer, lo, hi, limit, entropy_coef):
    n = logprobs.numel()
    loss = torch.empty((), device=logprobs.device, dtype=torch.float32)
    stats = torch.empty(5, device=logprobs.device, dtype=torch.float32)
    if normalizer is None:
        mode, value, pointer = _NORM_COUNT, 0.0, None
    elif isinstance(normalizer, torch.Tensor):
        mode, value, pointer = _NORM_POINTER, 0.0, normalizer
    else:
        mode, value, pointer = _NORM_VALUE, float(normalizer), None
    block = min(_FWD_MAX_BLOCK, max(128, triton.next_power_of_2(n)))
    warps = max(1, block // (32 * _FWD_TOKENS_PER_THREAD))
    _pg_loss_fwd_kernel[(1,)](logprobs, old_logprobs, advantages, mask, entropy, pointer, loss, stats,
                              n, value, lo, hi, limit, entropy_coef,
                              HAS_ENTROPY=entropy is not None, NORM=mode, BLOCK=block, num_warps=warps)
    return loss, stats


def _launch_backward(grad_loss, stats, logprobs, old_logprobs, advantages, mask, want_dlp, entropy_dtype,
                     lo, hi, limit, entropy_coef):
    want_dent = entropy_dtype is not None
    n = logprobs.numel()
    dlp = torch.empty_like(logprobs) if want_dlp else None
    dent = torch.empty(n, device=logprobs.device, dtype=entropy_dtype) if want_dent else None
    if n:
        _pg_loss_bwd_kernel[(triton.cdiv(n, _BWD_BLOCK),)](
            logprobs, old_logprobs, advantages, mask, grad_loss, stats, dlp, dent,
            n, lo, hi, limit, entropy_coef,
            WRITE_DLP=want_dlp, WRITE_DENT=want_dent, BLOCK=_BWD_BLOCK, num_warps=_BWD_WARPS)
    return dlp, dent


class _PGLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logprobs, old_logprobs, advantages, mask, entropy, normalizer, lo, hi, limit, entropy_coef):
        loss, stats = _launch_forward(logprobs, old_logprobs, advantages, mask, entropy, normalizer,
                                      lo, hi, limit, entropy_coef)
        ctx.save_for_backward(logprobs, old_logprobs, advantages, mask)
        # On ctx rather than saved: the metrics returned to the caller are views of stats, and an
        # in-place `total += out.approx_kl` must not trip autograd's version check on the divisor.
        ctx.stats = stats
        ctx.scalars = (lo, hi, limit, entropy_coef)
        ctx.entropy_dtype = None if entropy is None else entropy.dtype
        ctx.mark_non_differentiable(stats)
        # Autograd would otherwise fill a zero gradient for stats: a launch per backward for nothing.
        ctx.set_materialize_grads(False)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        want_dlp, want_dent = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        if grad_loss is None or not (want_dlp or want_dent):
            return (None,) * 10
        logprobs, old_logprobs, advantages, mask = ctx.saved_tensors
        dlp, dent = _launch_backward(grad_loss, ctx.stats, logprobs, old_logprobs, advantages, mask,
                                     want_dlp, ctx.entropy_dtype if want_dent else None, *ctx.scalars)
        return dlp, None, None, None, dent, None, None, None, None, None


def pg_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
            clip_low: float = 0.2, clip_high: float = 0.2, entropy: torch.Tensor | None = None,
            entropy_coef: float = 0.0, normalizer: float | torch.Tensor | None = None,
            log_ratio_limit: float = 20.0) -> PGLoss:
    """PPO-clip policy-gradient loss over packed tokens, with its metrics, in one launch each way.

    Every per-token input is 1-D [N]: ``logprobs`` (differentiable), ``old_logprobs`` and
    ``advantages`` (constants), ``mask`` (bool, or float/int where nonzero means valid; values are
    not used as weights) and optionally ``entropy`` (differentiable). Floating inputs may be any
    float dtype; the math is fp32. For each valid token i::

        log_ratio_i = clamp(logprobs_i - old_logprobs_i, -log_ratio_limit, log_ratio_limit)
        ratio_i     = exp(log_ratio_i)
        pg_i        = max(-A_i * ratio_i, -A_i * clamp(ratio_i, 1 - clip_low, 1 + clip_high))
        loss        = (sum_i pg_i - entropy_coef * sum_i entropy_i) / normalizer

    ``clip_high > clip_low`` gives the asymmetric ("clip-higher") range. The clamp of the log ratio
    keeps a stale or garbage token from overflowing exp; beyond it the token's gradient is 0.
    Masked tokens may hold anything, NaN and inf included: they never reach a sum or a gradient.
    A valid token whose log ratio is NaN (a NaN logprob or old logprob, or inf - inf) or whose
    advantage is NaN or inf has no defined loss: the loss and every metric are NaN and that token's
    logprob gradient is NaN (other tokens' gradients are unchanged), so a caller that skips
    non-finite steps skips this one. (An infinite log ratio alone, e.g. a -inf logprob, is clamped.)

    ``normalizer`` is what every sum is divided by. Pass the GLOBAL number of valid tokens over all
    micro-batches and data-parallel ranks: then the losses, gradients and metrics of the
    micro-batches add up exactly to those of one big batch (a token-level mean; with the default,
    each call averages over its own tokens and micro-batches are weighted equally instead). A
    Python number or a 1-element tensor on the inputs' device (read by the kernel through its
    pointer, so no host synchronization; a CPU tensor is read on the host, which costs no device
    synchronization either). Default: this call's ``mask`` count. A normalizer of 0 (no valid token)
    divides by 1, so an empty batch gives 0, not NaN.

    Returns PGLoss(loss, clip_fraction, approx_kl, mean_ratio, entropy), each 0-dim fp32 and
    divided by the same normalizer, so that summed over micro-batches they are big-batch means:
    ``clip_fraction`` counts tokens where the clipped branch is strictly larger, ``approx_kl`` is
    the k3 estimator ``(ratio - 1) - log_ratio`` of KL(old || new), ``mean_ratio`` averages ratio,
    ``entropy`` averages the given entropies (0 without them). Metrics are detached; ``loss``
    backpropagates into ``logprobs`` (``-A_i * ratio_i / normalizer`` where the unclipped branch is
    active and the log ratio is inside the limit, else 0) and into ``entropy``
    (``-entropy_coef / normalizer`` on valid tokens).

    Runs Triton on CUDA tensors (and under TRITON_INTERPRET=1); elsewhere, the differentiable
    torch composition in policy_loss_reference.py.
    """
    check_pg_loss_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, entropy, entropy_coef,
                       normalizer, log_ratio_limit)
    if not use_triton(logprobs):
        return pg_loss_reference(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, entropy,
                                 entropy_coef, normalizer, log_ratio_limit)
    if isinstance(normalizer, torch.Tensor):
        # A CPU tensor is a host number already: .item() on it does not wait for the device.
        normalizer = normalizer.item() if normalizer.device != logprobs.device else normalizer.detach()
    # A bool tensor reinterpreted as bytes: a view, no conversion kernel.
    mask = mask.view(torch.uint8) if mask.dtype == torch.bool else mask
    # No-ops for the usual contiguous inputs; a strided input costs one copy. old_logprobs and
    # advantages need no detach: the Function returns no gradient for them.
    loss, stats = _PGLossFunction.apply(
        logprobs.contiguous(), old_logprobs.contiguous(), advantages.contiguous(),
        mask.contiguous(), None if entropy is None else entropy.contiguous(), normalizer,
        1.0 - clip_low, 1.0 + clip_high, float(log_ratio_limit), float(entropy_coef))
    # One unbind makes the four metric views in one op; indexing would cost four (~5 µs each).
    return PGLoss(loss, *stats.unbind()[:4])
