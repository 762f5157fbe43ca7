"""Causal attention over packed variable-length sequences in plain fp32 torch: the reference the
training attention kernel (varlen_attention.py) is tested against, outputs and gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def varlen_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               scale: float | None = None) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D]; sequence b owns rows cu_seqlens[b] .. cu_seqlens[b + 1] - 1
    -> [T, Hq, D] fp32, each token attending to itself and the earlier tokens of its sequence.
    Differentiable in q, k and v."""
    groups = q.shape[1] // k.shape[1]
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        query, key, value = (x[start:end].float().transpose(0, 1) for x in (q, k, v))
        key, value = key.repeat_interleave(groups, dim=0), value.repeat_interleave(groups, dim=0)
        outs.append(F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape, dtype=torch.float32)
