"""linear_logprobs against the fp32 reference, on CPU under TRITON_INTERPRET=1 (conftest sets it).

Shapes are odd on purpose: with the interpreter's tiles (16 rows, 64 columns, 32 deep) N=37,
H=48, V=1000 leaves a ragged last tile on every axis. bf16 is tested on the GPU only: this
Triton's interpreter misreads bf16 loads.
"""
import pytest
import torch

from fastazr.kernels import linear_logprobs, linear_logprobs_reference
from fastazr.kernels import logprobs as module
from fastazr.kernels.logprobs_chunked import linear_logprobs_chunked

# Max abs error on logprobs/entropy, and norm-relative error on gradients. fp32: accumulation
# order only. fp16: the backward writes dLogits in fp16 (11-bit mantissa) before the GEMMs.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 3e-3)}


def make_inputs(n, h, v, dtype, seed=0, logit_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    # logits with std ~logit_scale: peaked softmaxes like a trained model's, not uniform ones
    weight = (torch.randn(v, h, generator=gen) * logit_scale / h ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    return hidden, weight, targets


def run(fn, hidden, weight, targets, temperature, grad_logprobs, grad_entropy, **kwargs):
    hidden.grad = weight.grad = None
    logprobs, entropy = fn(hidden, weight, targets, temperature, True, **kwargs)
    loss = (logprobs * grad_logprobs).sum()
    if grad_entropy is not None:
        loss = loss + (entropy * grad_entropy).sum()
    loss.backward()
    return logprobs.detach(), entropy.detach(), hidden.grad.float(), weight.grad.float()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_matches(got, want, dtype):
    out_tol, grad_tol = TOLERANCE[dtype]
    assert (got[0] - want[0]).abs().max().item() <= out_tol, "logprobs"
    assert (got[1] - want[1]).abs().max().item() <= out_tol, "entropy"
    assert rel(got[2], want[2]) <= grad_tol, "grad hidden"
    assert rel(got[3], want[3]) <= grad_tol, "grad weight"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(37, 48, 1000), (1, 16, 65), (70, 100, 257)])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_reference(dtype, shape, temperature):
    hidden, weight, targets = make_inputs(*shape, dtype)
    gen = torch.Generator().manual_seed(1)
    grad_logprobs, grad_entropy = torch.randn(shape[0], generator=gen), torch.randn(shape[0], generator=gen)
    want = run(linear_logprobs_reference, hidden, weight, targets, temperature, grad_logprobs, grad_entropy)
    got = run(linear_logprobs, hidden, weight, targets, temperature, grad_logprobs, grad_entropy)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_matches(got, want, dtype)


def test_backward_over_many_vocabulary_chunks():
    """chunk_bytes small enough that dLogits is built 64 columns at a time (16 chunks, the last
    one ragged): dWeight slices and the fp32 dHidden accumulation must line up."""
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    g = torch.randn(37, generator=torch.Generator().manual_seed(2))
    want = run(linear_logprobs_reference, hidden, weight, targets, 1.0, g, g)
    got = run(linear_logprobs, hidden, weight, targets, 1.0, g, g, chunk_bytes=37 * 4 * 64)
    assert_matches(got, want, torch.float32)


def test_entropy_gradient_alone_and_logprob_gradient_alone():
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    g = torch.randn(37, generator=torch.Generator().manual_seed(3))
    for use_logprobs in (True, False):
        grads = []
        for fn in (linear_logprobs_reference, linear_logprobs):
            hidden.grad = weight.grad = None
            logprobs, entropy = fn(hidden, weight, targets, 1.0, True)
            ((logprobs if use_logprobs else entropy) * g).sum().backward()
            grads.append((hidden.grad.clone(), weight.grad.clone()))
        assert rel(grads[1][0], grads[0][0]) < 2e-5 and rel(grads[1][1], grads[0][1]) < 2e-5


def test_without_entropy_returns_logprobs_only():
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    logprobs = linear_logprobs(hidden, weight, targets)
    assert logprobs.shape == (37,)
    assert torch.allclose(logprobs, linear_logprobs_reference(hidden, weight, targets), atol=2e-5)


def test_frozen_weight_or_frozen_hidden():
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    want = run(linear_logprobs_reference, hidden, weight, targets, 1.0, torch.ones(37), None)
    for frozen in (hidden, weight):
        frozen.requires_grad_(False)
        hidden.grad = weight.grad = None
        linear_logprobs(hidden, weight, targets).sum().backward()
        trained, index = (weight, 3) if frozen is hidden else (hidden, 2)
        assert frozen.grad is None
        assert rel(trained.grad, want[index]) < 2e-5
        frozen.requires_grad_(True)


def test_tied_embedding_gradient_sums_both_uses():
    """The lm_head is the embedding matrix: its gradient is the lookup's plus the kernel's."""
    vocab, h, n = 300, 32, 41
    gen = torch.Generator().manual_seed(4)
    embedding = (torch.randn(vocab, h, generator=gen) * 0.5).requires_grad_()
    ids = torch.randint(0, vocab, (n,), generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    mix = torch.randn(h, h, generator=gen) / h ** 0.5
    grads = []
    for fn in (linear_logprobs_reference, linear_logprobs):
        embedding.grad = None
        hidden = torch.tanh(embedding[ids] @ mix)
        fn(hidden, embedding, targets).sum().backward()
        grads.append(embedding.grad.clone())
    assert rel(grads[1], grads[0]) < 2e-5


def test_micro_batches_accumulate_to_the_full_batch_gradient():
    hidden, weight, targets = make_inputs(70, 48, 1000, torch.float32)
    linear_logprobs(hidden, weight, targets).sum().backward()
    full = weight.grad.clone()
    weight.grad = None
    for rows in (slice(0, 13), slice(13, 50), slice(50, 70)):
        linear_logprobs(hidden[rows], weight, targets[rows]).sum().backward()
    assert rel(weight.grad, full) < 2e-6


def test_out_of_vocabulary_target_gives_nan_not_a_crash():
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    targets[5], targets[9] = 1000, -1
    logprobs = linear_logprobs(hidden.detach(), weight.detach(), targets)
    assert logprobs[[5, 9]].isnan().all()
    assert logprobs[torch.arange(37) != 5].isnan().sum() == 1


def test_empty_batch():
    hidden, weight, targets = make_inputs(0, 48, 1000, torch.float32)
    logprobs, entropy = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert logprobs.shape == entropy.shape == (0,)
    (logprobs.sum() + entropy.sum()).backward()
    assert weight.grad.abs().sum() == 0


def test_chunked_torch_path_matches_reference():
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    g = torch.randn(37, generator=torch.Generator().manual_seed(5))
    want = run(linear_logprobs_reference, hidden, weight, targets, 0.7, g, g)
    got = run(linear_logprobs_chunked, hidden, weight, targets, 0.7, g, g, chunk_bytes=37 * 4 * 256)
    assert_matches(got, want, torch.float32)


def test_cpu_without_interpreter_uses_the_chunked_path(monkeypatch):
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    called = []
    monkeypatch.setattr(module, "use_triton", lambda tensor: False)
    monkeypatch.setattr(module, "linear_logprobs_chunked",
                        lambda *args, **kwargs: called.append(1) or linear_logprobs_chunked(*args, **kwargs))
    logprobs = module.linear_logprobs(hidden, weight, targets)
    assert called and torch.allclose(logprobs, linear_logprobs_reference(hidden, weight, targets), atol=2e-5)


@pytest.mark.parametrize("make, message", [
    (lambda h, w, t: (h[None], w, t, 1.0), "flatten the batch"),
    (lambda h, w, t: (h[:, :40], w, t, 1.0), "hidden size 40"),
    (lambda h, w, t: (h, w, t[:-1], 1.0), "targets must be integer"),
    (lambda h, w, t: (h, w, t.float(), 1.0), "targets must be integer"),
    (lambda h, w, t: (h, w.double(), t, 1.0), "share one of fp32/fp16/bf16"),
    (lambda h, w, t: (h, w, t, 0.0), "temperature must be a positive"),
    (lambda h, w, t: (h, w, t, float("nan")), "temperature must be a positive"),
    (lambda h, w, t: (h, w, t, True), "temperature must be a positive"),
    (lambda h, w, t: (h, w, t > 0, 1.0), "targets must be integer"),  # bools computed silently in the interpreter
    (lambda h, w, t: (h, w[:0], t, 1.0), "the vocabulary needs at least one token"),  # a ZeroDivisionError
])
def test_bad_arguments_say_what_to_change(make, message):
    hidden, weight, targets = make_inputs(37, 48, 1000, torch.float32)
    with pytest.raises(ValueError, match=message):
        linear_logprobs(*make(hidden, weight, targets))


@pytest.mark.parametrize("chunk_bytes", [0, float("nan"), "1", True])
def test_chunk_bytes_must_be_a_positive_integer(chunk_bytes):
    hidden, weight, targets = make_inputs(5, 48, 100, torch.float32)
    with pytest.raises(ValueError, match="chunk_bytes must be a positive integer"):
        linear_logprobs(hidden, weight, targets, chunk_bytes=chunk_bytes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk_bytes", [512 << 20, 37 * 2 * 300])
@pytest.mark.parametrize("persistent", [False, True])
def test_tensor_descriptor_path(dtype, chunk_bytes, persistent):
    """The GPU's default path loads tiles through TMA descriptors (zero padding past the ends
    instead of wrapped indices) and stores dLogits through one; the interpreter runs it too.
    V=1001 in one chunk makes the dLogits buffer's natural row stride misaligned for the copy
    engine; the small chunk_bytes splits the vocabulary into four chunks. ``persistent``: the
    flattened loops and a backward grid of 2 programs (the CPU counts as 2 SMs), each walking
    many tiles in groups of 2 row blocks (N=37 makes 3 row blocks: the last group is ragged)."""
    hidden, weight, targets = make_inputs(37, 48, 1001, dtype)
    gen = torch.Generator().manual_seed(6)
    g_logprobs, g_entropy = torch.randn(37, generator=gen), torch.randn(37, generator=gen)
    want = run(linear_logprobs_reference, hidden, weight, targets, 0.8, g_logprobs, g_entropy)
    tiles = module.Tiles(block_n=16, block_v=64, block_k=32, num_warps=4, num_stages=1, tma=True,
                         group_n=2 if persistent else 8, flatten=persistent, programs_per_sm=1)
    with torch.no_grad():
        logprobs, lse, entropy = module.forward_stats(hidden, weight, targets, 1 / 0.8, True, tiles)
        grad_hidden, grad_weight = module.backward_grads(
            hidden, weight, targets, lse, entropy, g_logprobs, g_entropy, 1 / 0.8, True, True,
            chunk_bytes=chunk_bytes, tiles=tiles)
    assert_matches((logprobs, entropy, grad_hidden.float(), grad_weight.float()), want, dtype)
