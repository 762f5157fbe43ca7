"""The PPO-clip policy-gradient loss as a plain fp32 torch composition: the specification the
Triton kernel (pg_loss.py) is tested against, the baseline its benchmark beats, and the CPU
fallback. Autograd does its backward.

The argument checks and the result type live here too, so the kernel module and this one share
them without importing each other in a circle.
"""
from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch


class PGLoss(NamedTuple):
    """The loss (0-dim fp32, differentiable w.r.t. logprobs and entropy) and detached 0-dim fp32
    metrics. Every field is a sum over valid tokens divided by the same normalizer, so with the
    global normalizer the fields of micro-batches add up to those of the whole batch."""
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    mean_ratio: torch.Tensor
    entropy: torch.Tensor


def check_pg_loss_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, entropy, entropy_coef,
                       normalizer, log_ratio_limit) -> None:
    """Raise a ValueError (TypeError for a wrong kind of object) that names the argument to change.
    Reads only shapes, dtypes, devices and Python numbers: no device synchronization."""
    tensors = {"logprobs": logprobs, "old_logprobs": old_logprobs, "advantages": advantages, "mask": mask}
    if entropy is not None:
        tensors["entropy"] = entropy
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if logprobs.dim() != 1:
        raise ValueError(f"logprobs must be 1-D [N] (flatten the packed tokens first), got shape "
                         f"{tuple(logprobs.shape)}")
    for name, t in tensors.items():
        if t.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but logprobs has shape {tuple(logprobs.shape)}: "
                             "every per-token input must be the same [N]")
        if t.device != logprobs.device:
            raise ValueError(f"{name} is on {t.device} but logprobs is on {logprobs.device}")
        if name != "mask" and not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    for name, value in (("clip_low", clip_low), ("clip_high", clip_high), ("entropy_coef", entropy_coef),
                        ("log_ratio_limit", log_ratio_limit)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(entropy_coef):
        raise ValueError(f"entropy_coef must be a finite number, got {entropy_coef}")
    if not 0 <= clip_low < 1:
        raise ValueError(f"clip_low must be in [0, 1) (ratios are clipped below at 1 - clip_low), got {clip_low}")
    if not clip_high >= 0:
        raise ValueError(f"clip_high must be >= 0 (ratios are clipped above at 1 + clip_high), got {clip_high}")
    if not log_ratio_limit > 0:
        raise ValueError(f"log_ratio_limit must be > 0 (log ratios are clamped to +-log_ratio_limit), "
                         f"got {log_ratio_limit}")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs the per-token entropy: pass entropy=... "
                         "or set entropy_coef=0")
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a number or a 1-element tensor, got shape "
                             f"{tuple(normalizer.shape)}")
        if normalizer.device != logprobs.device and normalizer.device.type != "cpu":
            raise ValueError(f"normalizer is on {normalizer.device} but logprobs is on {logprobs.device}")
        if normalizer.dtype == torch.bool or normalizer.is_complex():
            raise ValueError(f"normalizer must hold a count of tokens, got a {normalizer.dtype} tensor")
        if normalizer.device.type == "cpu":  # read on the host anyway: checked as a number is
            count = normalizer.item()
            if not (math.isfinite(count) and count >= 0):
                raise ValueError(f"normalizer must be a finite number >= 0 (the global count of valid tokens), "
                                 f"got a tensor holding {count}")
    elif normalizer is not None:
        if isinstance(normalizer, bool) or not isinstance(normalizer, numbers.Real):
            raise TypeError(f"normalizer must be None, a number or a tensor, got {type(normalizer).__name__}")
        if not (math.isfinite(normalizer) and normalizer >= 0):
            raise ValueError(f"normalizer must be a finite number >= 0 (the global count of valid tokens), "
                             f"got {normalizer}")


def pg_loss_reference(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_low: float = 0.2, clip_high: float = 0.2,
                      entropy: torch.Tensor | None = None, entropy_coef: float = 0.0,
                      normalizer: float | torch.Tensor | None = None, log_ratio_limit: float = 20.0) -> PGLoss:
    """Same arguments, math and result as fastazr.kernels.policy_loss.pg_loss (see its docstring)."""
    check_pg_loss_args(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, entropy, entropy_coef,
                       normalizer, log_ratio_limit)
    valid = mask != 0
    m = valid.float()

    # Masked positions are replaced before any arithmetic, not multiplied by the mask afterwards:
    # 0 * NaN is NaN, in the sums and in autograd's backward alike.
    def clean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(valid, x.float(), 0.0)

    # A valid token without a defined loss (a NaN log ratio, or an advantage that is not finite):
    # multiplying its logprob by NaN makes its gradient NaN, and `poison` every result, however
    # the clamp and max below would treat the NaN.
    bad = valid & (torch.isnan(logprobs.detach().float() - old_logprobs.detach().float())
                   | ~torch.isfinite(advantages.detach()))
    poison = torch.where(bad.any(), torch.nan, 1.0)
    lp = clean(logprobs) * torch.where(bad, torch.nan, 1.0)
    log_ratio = torch.clamp(lp - clean(old_logprobs.detach()), -log_ratio_limit, log_ratio_limit)
    ratio = torch.exp(log_ratio)
    adv = clean(advantages.detach())
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    pg = torch.maximum(unclipped, clipped)

    if normalizer is None:
        norm = m.sum()
    elif isinstance(normalizer, torch.Tensor):
        norm = normalizer.detach().to(device=m.device, dtype=torch.float32).reshape(())
    else:
        norm = torch.tensor(float(normalizer), device=m.device)
    # no valid token anywhere: every sum is 0, and so is the result; a negative or non-finite count
    # (a device tensor's, unchecked on the host) poisons the step as the kernels do
    denom = torch.where(norm == 0, 1.0, torch.where((norm > 0) & torch.isfinite(norm), norm, torch.nan))

    loss_sum = (m * pg).sum()
    if entropy is None:
        entropy_metric = torch.zeros((), device=m.device)
    else:
        ent = clean(entropy)
        loss_sum = loss_sum - entropy_coef * (m * ent).sum()
        with torch.no_grad():
            entropy_metric = (m * ent).sum() / denom
    # the loss is NaN through the token's own terms, so its other tokens' gradients stay as they are
    loss = loss_sum / denom
    with torch.no_grad():
        return PGLoss(loss=loss,
                      clip_fraction=(m * (clipped > unclipped)).sum() / denom * poison,
                      approx_kl=(m * ((ratio - 1) - log_ratio)).sum() / denom * poison,
                      mean_ratio=(m * ratio).sum() / denom * poison,
                      entropy=entropy_metric * poison)
