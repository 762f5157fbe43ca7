"""Plain fp32 torch reference for per-token log-probabilities and entropy from hidden states.

Materializes the full [N, V] fp32 logits (10 GB at N=16K, V=151,936), so it is for tests and
benchmarks at small shapes, or as ground truth at real shapes on a GPU with room for it.
"""
import torch


def linear_logprobs_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              temperature: float = 1.0, return_entropy: bool = False):
    """log softmax(hidden @ weight.T / temperature)[i, targets[i]] (and the softmax's entropy), in fp32.

    Gradients reach ``hidden`` and ``weight`` in their own dtypes through the fp32 upcast.
    """
    logits = (hidden.float() @ weight.float().t()) / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logprobs = logp_all.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    if not return_entropy:
        return logprobs
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logprobs, entropy
