"""Per-token log-probabilities and entropy in plain torch, over vocabulary chunks.

The same algorithm as the Triton kernels, built from torch matmuls: the forward keeps running
per-token statistics (max, sum of exps, sum of exp * logit, target logit) over vocabulary chunks;
the backward recomputes each chunk's logits and turns them into dLogits in place. Memory is one
[N, chunk] logits block at a time instead of [N, V]. It is the fallback where Triton cannot run
(a laptop CPU) and the "chunked torch" contender in bench/bench_logprob.py.
"""
import torch

from fastazr.kernels.logprobs_math import chunk_columns, combine_stats, logits_to_grad_


def _chunk_logits(hidden, weight_chunk, inv_temp):
    return torch.mm(hidden, weight_chunk.t()).float().mul_(inv_temp)


class _ChunkedLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, return_entropy, chunk_bytes):
        n, vocab = hidden.shape[0], weight.shape[0]
        inv_temp = 1.0 / temperature
        chunk = chunk_columns(n, vocab, chunk_bytes, bytes_per_logit=4)
        m = torch.full((n,), float("-inf"), device=hidden.device)
        s = torch.zeros(n, device=hidden.device)
        t = torch.zeros(n, device=hidden.device)
        target_logit = torch.zeros(n, device=hidden.device)
        for c0 in range(0, vocab, chunk):
            z = _chunk_logits(hidden, weight[c0:c0 + chunk], inv_temp)
            m_new = torch.maximum(m, z.amax(1))
            alpha = torch.exp(m - m_new)
            e = torch.exp(z - m_new[:, None])
            s = s * alpha + e.sum(1)
            t = t * alpha + (e * z).sum(1)
            m = m_new
            inside = (targets >= c0) & (targets < c0 + z.shape[1])
            local = (targets - c0).clamp(0, z.shape[1] - 1).long()
            target_logit += torch.where(inside, z.gather(1, local[:, None]).squeeze(1), 0.0)
        logprobs, lse, entropy = combine_stats(m, s, t, target_logit, targets, vocab)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.inv_temp, ctx.chunk_bytes = inv_temp, chunk_bytes
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        chunk = chunk_columns(n, vocab, ctx.chunk_bytes, bytes_per_logit=4)
        grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
            if ctx.needs_input_grad[0] else None
        grad_weight = torch.empty_like(weight) if ctx.needs_input_grad[1] else None
        for c0 in range(0, vocab, chunk):
            w = weight[c0:c0 + chunk]
            z = _chunk_logits(hidden, w, ctx.inv_temp)
            dz = logits_to_grad_(z, c0, targets, lse, entropy, grad_logprobs, grad_entropy, ctx.inv_temp)
            dz = dz.to(hidden.dtype)
            if grad_weight is not None:
                torch.mm(dz.t(), hidden, out=grad_weight[c0:c0 + chunk])
            if grad_hidden is not None:
                grad_hidden += torch.mm(dz, w).float()
        if grad_hidden is not None:
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None


def linear_logprobs_chunked(hidden, weight, targets, temperature=1.0, return_entropy=False,
                            chunk_bytes=256 << 20):
    """Torch implementation of :func:`fastazr.kernels.linear_logprobs`; ``chunk_bytes`` bounds
    the fp32 logits block held at once."""
    logprobs, entropy = _ChunkedLinearLogprobs.apply(hidden, weight, targets, temperature,
                                                     return_entropy, chunk_bytes)
    return (logprobs, entropy) if return_entropy else logprobs
