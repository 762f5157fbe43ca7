"""The fused Gumbel-max samplers (Triton; the interpreter on CPU, the GPU with marker gpu) against
their torch reference: the same tokens exactly (same hash noise, same first-index tie rule) and
the same logprobs, over a vocabulary that is not a multiple of the kernel's block, mixed greedy
and tempered rows, 64-bit seeds, banned (-inf) tokens and fp16 logits; the sampler from hidden
states (lm_head GEMM and sampling in one kernel) over rows, hidden size and vocabulary that are
multiples of none of its blocks, with its vocabulary in several splits; and the rollout engine's
CPU sampler (int32 hash, in place), bit for bit the reference's."""
import pytest
import torch

from fastazr.rollout.sampler import gumbel_sample_cpu, uniform_noise_cpu

from fastazr.kernels import sampling as sampling_module
from fastazr.kernels.sampling import gumbel_sample, linear_gumbel_sample
from fastazr.kernels.sampling_reference import (gumbel_noise, gumbel_sample_reference,
                                                linear_gumbel_sample_reference, uniform_noise)

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
    assert_follows(tokens, probs, vocab=37)


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor, vocab: int) -> None:
    """Tokens drawn over `vocab` columns: only the first len(probs) ever drawn, each at its
    probability within 4 standard errors."""
    rows, kept = len(tokens), len(probs)
    freq = torch.bincount(tokens, minlength=vocab).float() / rows
    assert (freq[kept:] == 0).all()
    assert ((freq[:kept] - probs).abs() <= 4 * (probs * (1 - probs) / rows).sqrt()).all(), freq


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_fused_sampler_matches_reference(dtype):
    assert_matches_reference(make_rows(7, 151936, dtype, "cuda"), 2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cpu_sampler_is_the_reference_bit_for_bit(dtype):
    # 64-bit seeds, greedy and tempered rows, -inf tokens, a vocabulary that is no power of two;
    # then the noise of 2^16 columns x 40 rows, seed 871079's top of the hash included
    args = make_rows(7, 5003, dtype, "cpu")
    for got, want in zip(gumbel_sample_cpu(*args), gumbel_sample_reference(*args)):
        assert torch.equal(got, want)
    g = torch.Generator().manual_seed(1)
    seeds = torch.cat([torch.randint(0, 2 ** 62, (39,), generator=g), torch.tensor([871079])])
    samples, steps = torch.randint(0, 64, (40,), generator=g), torch.randint(0, 4096, (40,), generator=g)
    samples[-1] = steps[-1] = 0
    assert torch.equal(uniform_noise_cpu(seeds, samples, steps, 1 << 16), uniform_noise(seeds, samples, steps, 1 << 16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_noise_stays_finite_at_the_top_of_the_hash(device):
    """Seed 871079 (sample 0, step 0) hashes column 17 to the top 24-bit value, which used to map
    to u = 1.0 and +inf noise: column 17 then won at any logit (0.9% of draws at V = 151,936).
    Now its noise is finite and the dominant column 0 wins, in the reference and both kernels
    (on the GPU with its fast log, whose -log(u) at the largest u the noise clamps)."""
    seed, zero = torch.tensor([871079], device=device), torch.zeros(1, dtype=torch.long, device=device)
    noise = gumbel_noise(uniform_noise(seed, zero, zero, 64))
    assert torch.isfinite(noise).all() and noise.max() < 16.7
    logits = torch.zeros(1, 64, device=device)
    logits[0, 0], logits[0, 17] = 20.0, -20.0
    one = torch.ones(1, device=device)
    assert gumbel_sample_reference(logits, one, seed, zero, zero)[0].item() == 0
    assert gumbel_sample(logits, one, seed, zero, zero)[0].item() == 0
    # hidden [1, 16] = e_0 and weight column 0 = the logits: hidden @ weight.T is the logits row
    hidden, weight = torch.eye(16, device=device)[:1], torch.zeros(64, 16, device=device)
    weight[:, 0] = logits[0]
    assert linear_gumbel_sample(hidden, weight, one, seed, zero, zero)[0].item() == 0


def linear_rows(rows, hidden_size, vocab, dtype, device, seed=0):
    """Hidden states, an lm_head weight and sampling parameters; rows 2 and 3 pin a dominant
    token in the vocabulary's last partial tile and a greedy tie within a tile and across splits."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, hidden_size, generator=g)
    weight = torch.randn(vocab, hidden_size, generator=g) * 0.5
    hidden[2] = 0.0
    hidden[2, 0] = 1.0
    weight[vocab - 1, 0] = 30.0
    # greedy row 3: columns 5, 40 (the same tile) and vocab - 9 (another split) share the top
    # logit; the first must win
    hidden[3] = 0.0
    hidden[3, 1] = 1.0
    weight[:, 1] = weight[:, 1].clamp(max=1.0)
    weight[5, 1] = weight[40, 1] = weight[vocab - 9, 1] = 4.0
    temperature = torch.tensor([1.0, 0.7, 1.3, 0.0, 0.0, 2.0] * rows)[:rows]
    seeds = torch.arange(rows) * 7919 + 2 ** 40
    samples = torch.arange(rows) % 3
    steps = torch.arange(rows) * 5
    return [t.to(device) for t in (hidden.to(dtype), weight.to(dtype), temperature, seeds, samples, steps)]


# the fp32 logits' sum over H runs in the kernel's tile order, not torch's (~1e-7 relative), and
# the log-sum-exp is merged over tiles and vocabulary splits
LINEAR_LOGPROB_ATOL = {torch.float32: 2e-5, torch.float16: 2e-5, torch.bfloat16: 2e-5}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sampling_from_hidden_states_matches_reference(dtype):
    """37 rows, H = 48, V = 1,000 against the interpreter's 16 x 64 x 32 blocks: 3 row blocks, a
    partial K step, 16 vocabulary tiles in 2 splits."""
    args = linear_rows(37, 48, 1000, dtype, "cpu")
    tokens, logprobs = linear_gumbel_sample(*args)
    want_tokens, want_logprobs = linear_gumbel_sample_reference(*args)
    assert torch.equal(tokens, want_tokens)
    assert tokens[2] == 999 and tokens[3] == 5
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=LINEAR_LOGPROB_ATOL[dtype])
    greedy = [args[0], args[1], torch.zeros(37)] + args[3:]
    tokens, logprobs = linear_gumbel_sample(*greedy, all_greedy=True)
    want_tokens, want_logprobs = linear_gumbel_sample_reference(*greedy)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=LINEAR_LOGPROB_ATOL[dtype])


@pytest.mark.parametrize("merge_splits", [2, 4, 8])
def test_the_split_merge_keeps_the_first_best_over_several_trips(monkeypatch, merge_splits):
    """5 rows fill one row block, so the 1,000 columns fall in 4 vocabulary splits of 256, which
    the merge folds `merge_splits` a trip: two full trips, one, or one part-filled. Greedy row 4
    ties columns 300 (split 1), 700 and 900 (splits 2 and 3) above split 0: the first split
    holding the best wins within a trip, and an earlier trip keeps a tie. Then 150 columns in 3
    splits, whose last trip is part-filled at every size."""
    monkeypatch.setattr(sampling_module, "_MERGE_SPLITS", merge_splits)
    for rows in (linear_rows(5, 48, 150, torch.float32, "cpu", seed=4), linear_rows(5, 48, 150, torch.float16, "cpu")):
        tokens, logprobs = linear_gumbel_sample(*rows)
        want_tokens, want_logprobs = linear_gumbel_sample_reference(*rows)
        assert torch.equal(tokens, want_tokens) and tokens[2] == 149
        torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=LINEAR_LOGPROB_ATOL[rows[0].dtype])
    args = linear_rows(5, 48, 1000, torch.float32, "cpu", seed=3)
    hidden, weight = args[0], args[1]
    hidden[4] = 0.0
    hidden[4, 2] = 1.0
    weight[:, 2] = weight[:, 2].clamp(max=1.0)
    weight[300, 2] = weight[700, 2] = weight[900, 2] = 5.0
    args[2][4] = 0.0
    tokens, logprobs = linear_gumbel_sample(*args)
    want_tokens, want_logprobs = linear_gumbel_sample_reference(*args)
    assert tokens[4] == 300 and tokens[2] == 999
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=LINEAR_LOGPROB_ATOL[torch.float32])


def test_sampling_from_hidden_states_follows_the_softmax():
    """1000 rows whose logits are log(0.5, 0.25, 0.15, 0.1) and -30 elsewhere (37 columns, 3
    tiles): frequencies within 4 standard errors of the softmax."""
    probs = torch.tensor([0.5, 0.25, 0.15, 0.1])
    rows = 1000
    weight = torch.zeros(37, 16)
    weight[:, 0] = torch.cat([probs.log(), torch.full((33,), -30.0)])
    hidden = torch.zeros(rows, 16)
    hidden[:, 0] = 1.0
    tokens, _ = linear_gumbel_sample(hidden, weight, torch.ones(rows), torch.arange(rows) * 104729,
                                     torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long))
    assert_follows(tokens, probs, vocab=37)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,hidden_size,vocab", [(300, 1536, 151936), (64, 576, 49152), (37, 576, 49152),
                                                    (257, 576, 49152)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sampling_from_hidden_states_matches_the_logits_path(dtype, rows, hidden_size, vocab):
    """Qwen2.5-1.5B's lm_head (H = 1536, V = 151,936) at 300 rows, and SmolLM2's (H = 576, V =
    49,152) at one row block, which takes sampling_tiles' small-model tiles and ~128 splits, and
    at 257 rows (in bf16 its 64 x 64 tiles, 3 programs an SM; a partial last row block): the
    same tokens as sampling the fp32 logits that torch.mm computes (the GEMM's fp32 accumulation
    is the same at every tile shape without split-K), greedy ties across splits included, and
    logprobs within 2e-5 of the reference."""
    hidden, weight, *params = linear_rows(rows, hidden_size, vocab, dtype, "cuda")
    weight = weight * 0.05
    tokens, logprobs = linear_gumbel_sample(hidden, weight, *params)
    logits = hidden.float() @ weight.float().t() if dtype == torch.float32 else \
        torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    want_tokens, want_logprobs = gumbel_sample(logits, *params)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs, rtol=0, atol=LINEAR_LOGPROB_ATOL[dtype])
    ref_tokens, ref_logprobs = linear_gumbel_sample_reference(hidden, weight, *params)
    assert (tokens == ref_tokens).float().mean() > 0.99
    torch.testing.assert_close(logprobs, ref_logprobs, rtol=0, atol=1e-3)


@pytest.mark.parametrize("change, message", [
    (dict(temperature=torch.ones(1)), "temperature must be a tensor \\[B=4\\]"),  # read past its end in the kernel
    (dict(temperature=torch.ones(4, dtype=torch.long)), "temperature must be floating"),
    (dict(seeds=torch.arange(4, dtype=torch.int32)), "seeds must be int64"),  # hashed to other tokens on CPU
    (dict(steps=torch.zeros(4, 1, dtype=torch.long)), "steps must be a tensor"),
    (dict(samples=[0, 0, 0, 0]), "samples must be a tensor"),
])
@pytest.mark.parametrize("entry", ["logits", "hidden"])
def test_per_row_inputs_are_checked_at_the_boundary(change, message, entry):
    rows = dict(temperature=torch.ones(4), seeds=torch.arange(4), samples=torch.zeros(4, dtype=torch.long),
                steps=torch.zeros(4, dtype=torch.long))
    rows.update(change)
    hidden, weight = torch.randn(4, 16), torch.randn(50, 16)
    with pytest.raises(ValueError, match=message):
        if entry == "logits":
            gumbel_sample(hidden @ weight.T, **rows)
        else:
            linear_gumbel_sample(hidden, weight, **rows)
