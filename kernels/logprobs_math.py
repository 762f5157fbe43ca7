"""The softmax algebra shared by the Triton and chunked-torch log-probability paths.

With z = hidden @ weight.T / temperature, p = softmax(z) and lse = logsumexp(z):
  logprob_t = z_t - lse,   entropy = lse - sum_k p_k z_k,
  d logprob_t / d z_k = [k = t] - p_k,   d entropy / d z_k = -p_k (z_k - lse + entropy).
A forward over vocabulary slices keeps, per token and slice, the running max m, the sum of
exp(z - m) and the sum of exp(z - m) * z; these combine exactly across slices.
"""
import torch


def chunk_columns(n_tokens: int, vocab: int, chunk_bytes: int, bytes_per_logit: int, multiple: int = 256) -> int:
    """Vocabulary columns per chunk so that an [n_tokens, chunk] block fits in ``chunk_bytes``."""
    cols = chunk_bytes // max(1, n_tokens * bytes_per_logit)
    cols = max(multiple, cols // multiple * multiple)
    return min(cols, vocab)


def combine_stats(m, s, t, target_logit, targets, vocab):
    """(logprobs, lse, entropy) from combined per-token statistics. A target outside
    [0, vocab) gives a NaN logprob rather than a silently wrong number."""
    lse = m + torch.log(s)
    entropy = lse - t / s
    valid = (targets >= 0) & (targets < vocab)
    logprobs = torch.where(valid, target_logit - lse, float("nan"))
    return logprobs, lse, entropy


def logits_to_grad_(z, c0, targets, lse, entropy, grad_logprobs, grad_entropy, inv_temp):
    """Turn a chunk of fp32 logits z[:, c0:c0+C] into dLoss/dRawLogits, in place."""
    p = torch.exp(z - lse[:, None])
    if grad_entropy is not None:
        z.sub_(lse[:, None]).add_(entropy[:, None]).mul_(p).mul_(-grad_entropy[:, None])
    else:
        z.zero_()
    if grad_logprobs is not None:
        z.sub_(p.mul_(grad_logprobs[:, None]))
        local = targets.long() - c0
        inside = (local >= 0) & (local < z.shape[1])
        z.scatter_add_(1, local.clamp(0, z.shape[1] - 1)[:, None],
                       torch.where(inside, grad_logprobs, 0.0)[:, None])
    return z.mul_(inv_temp)
