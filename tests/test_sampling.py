"""The fused Gumbel-max sampler (Triton; the interpreter on CPU, the GPU with marker gpu) against
its torch reference: the same tokens exactly (same hash noise, same first-index tie rule) and the
same logprobs, over a vocabulary that is not a multiple of the kernel's block, mixed greedy and
tempered rows, 64-bit seeds, banned (-inf) tokens and fp16 logits."""
import pytest
import torch

from fastazr.kernels.sampling import gumbel_sample
from fastazr.kernels.sampling_reference import gumbel_sample_reference

# the log-sum-exp is summed per lane then merged, not in torch's order: ~1e-6 relative on
# values of magnitude ~10
LOGPROB_ATOL = {torch.float32: 2e-5, torch.float16: 2e-5}


def make_rows(rows, vocab, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=g) * 3).to(dtype)
    logits[1, ::7] = float("-inf")
    logits[2, 4100] = 40.0  # one dominant token past the first block
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.0, 1.0, 2.0][:rows])
    seeds = torch.tensor([5, 2 ** 62 + 3, 7, 7, 11, 2 ** 40, 0][:rows])
    samples = torch.tensor([0, 1, 2, 0, 0, 3, 1][:rows])
    steps = torch.tensor([0, 5, 5, 1000, 2, 0, 9][:rows])
    return [t.to(device) for t in (logits, temperature, seeds, samples, steps)]


def assert_matches_reference(args, atol: float) -> torch.Tensor:
    """The kernel's tokens equal the reference's and its logprobs are within atol; the tokens."""
    tokens, logprobs = gumbel_sample(*args)
    want_tokens, want_logprobs = gumbel_sample_reference(*args)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=atol)
    return tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_sampler_matches_reference(dtype):
    tokens = assert_matches_reference(make_rows(7, 9001, dtype, "cpu"), LOGPROB_ATOL[dtype])
    assert tokens[2] == 4100


def test_fused_sampler_draws_follow_the_softmax():
    """1000 rows of the same logits with distinct seeds: token frequencies within 4 standard
    errors of softmax(logits / T) (the kernel's noise, argmax and lane merge together)."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    rows = 1000
    logits = torch.cat([probs.log(), torch.full((33,), float("-inf"))]).repeat(rows, 1)
    ones = torch.ones(rows)
    tokens, _ = gumbel_sample(logits, ones, torch.arange(rows) * 104729, torch.zeros(rows, dtype=torch.long),
                              torch.zeros(rows, dtype=torch.long))
    freq = torch.bincount(tokens, minlength=37).float() / rows
    assert (freq[4:] == 0).all()
    assert ((freq[:4] - probs).abs() <= 4 * (probs * (1 - probs) / rows).sqrt()).all(), freq


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_sampler_matches_reference(dtype):
    assert_matches_reference(make_rows(7, 151936, dtype, "cuda"), 2e-5)
