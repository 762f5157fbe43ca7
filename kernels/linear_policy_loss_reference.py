"""The fused linear policy loss as a plain fp32 torch composition: the specification
linear_policy_loss.py is tested against. Autograd does its backward through the full [N, V]
logits, so it is for test shapes only. The result type lives here, as PGLoss does beside
pg_loss's reference."""
from __future__ import annotations

from typing import NamedTuple

import torch

from fastazr.kernels.logprobs_reference import linear_logprobs_reference
from fastazr.kernels.policy_loss_reference import pg_loss_reference


class LinearPGLoss(NamedTuple):
    """pg_loss's result (loss, clip_fraction, approx_kl, mean_ratio, entropy), plus the fp32
    per-token logprobs [N] it was computed from (detached)."""
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor
    mean_ratio: torch.Tensor
    entropy: torch.Tensor
    logprobs: torch.Tensor


def linear_pg_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                             old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                             clip_low: float = 0.2, clip_high: float = 0.2, temperature: float = 1.0,
                             entropy_coef: float = 0.0, normalizer: float | torch.Tensor | None = None,
                             log_ratio_limit: float = 20.0):
    """Same arguments and result as fastazr.kernels.linear_pg_loss, computed in fp32 (the inputs
    are upcast; gradients flow back to hidden and weight in their own dtype)."""
    logprobs, entropy = linear_logprobs_reference(hidden.float(), weight.float(), targets, temperature, True)
    out = pg_loss_reference(logprobs, old_logprobs, advantages, mask, clip_low, clip_high, entropy, entropy_coef,
                            normalizer, log_ratio_limit)
    return LinearPGLoss(*out, logprobs.detach())
