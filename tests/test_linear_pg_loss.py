"""linear_pg_loss (the fused linear policy loss) against its fp32 reference and against the
composable path it replaces, on CPU under TRITON_INTERPRET=1 (conftest sets it).

Shapes are odd on purpose: the interpreter's 64-column blocks leave a ragged last block at
V=1000 and 257, and chunk_bytes below makes several row chunks with a ragged last one. bf16 is
tested on the GPU (tests/test_linear_pg_loss_gpu.py): the interpreter misreads bf16 loads.
"""
import pytest
import torch

from fastazr.kernels import linear_logprobs, linear_pg_loss, linear_pg_loss_reference, pg_loss
from fastazr.kernels.linear_policy_loss import resolve_store

# Loss and metrics: relative error; logprobs and entropy: max abs error; gradients: norm-relative
# error. fp32: summation order only. fp16: dLogits are written in fp16 (11-bit mantissa) before
# the two gradient GEMMs, and dWeight sums its row chunks in fp16.
TOLERANCE = {torch.float32: (1e-5, 2e-5, 2e-5), torch.float16: (1e-5, 2e-5, 4e-3)}
FIELDS = ("loss", "clip_fraction", "approx_kl", "mean_ratio", "entropy")


def make_inputs(n, h, v, dtype, seed=0, masked=0.25):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * 3 / h ** 0.5).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    with torch.no_grad():
        logprobs = linear_pg_loss_reference(hidden, weight, targets, torch.zeros(n), torch.zeros(n),
                                            torch.ones(n, dtype=torch.bool)).logprobs
    # old logprobs near the new ones, so ratios fall on both sides of the clip range
    old = logprobs + torch.randn(n, generator=gen) * 0.3
    advantages = torch.randn(n, generator=gen)
    mask = torch.rand(n, generator=gen) >= masked
    return hidden, weight, targets, old, advantages, mask


def run(fn, hidden, weight, *args, **kwargs):
    hidden.grad = weight.grad = None
    out = fn(hidden, weight, *args, **kwargs)
    out.loss.backward()
    return out, hidden.grad.float(), weight.grad.float()


def rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def assert_close(got, want, dtype):
    value_tol, token_tol, grad_tol = TOLERANCE[dtype]
    for name in FIELDS:
        a, b = getattr(got[0], name).item(), getattr(want[0], name).item()
        assert abs(a - b) <= value_tol * max(1.0, abs(b)), (name, a, b)
    assert (got[0].logprobs - want[0].logprobs).abs().max().item() <= token_tol, "logprobs"
    assert rel(got[1], want[1]) <= grad_tol, "grad hidden"
    assert rel(got[2], want[2]) <= grad_tol, "grad weight"


# What a row chunk keeps between its GEMM and its row kernel, per input dtype ('fp16-exp' writes
# dLogits over its 2-byte exps, so 16-bit inputs only).
STORES = [(torch.float32, "fp32-logits"), (torch.float16, "fp32-logits"), (torch.float16, "fp16-exp")]


def six_rows(store, vocab):
    """chunk_bytes for ~6 rows a chunk (rows of 64-column-padded fp16 exps, or fp32 logits): at
    V=1000 several chunks and a ragged last one."""
    return 6 * (2 * -(-vocab // 64) * 64 if store == "fp16-exp" else 4 * vocab) + 7


@pytest.mark.parametrize("dtype,store", STORES)
@pytest.mark.parametrize("shape", [(37, 48, 1000), (1, 16, 65), (70, 100, 257)])
@pytest.mark.parametrize("temperature,entropy_coef", [(1.0, 0.0), (0.6, 0.01)])
def test_matches_reference(dtype, store, shape, temperature, entropy_coef):
    inputs = make_inputs(*shape, dtype)
    kwargs = dict(clip_low=0.2, clip_high=0.28, temperature=temperature, entropy_coef=entropy_coef)
    want = run(linear_pg_loss_reference, *inputs, **kwargs)
    got = run(linear_pg_loss, *inputs, **kwargs, chunk_bytes=six_rows(store, shape[2]), store=store)
    assert got[0].logprobs.dtype == torch.float32 and got[0].loss.dtype == torch.float32
    assert_close(got, want, dtype)


@pytest.mark.parametrize("spread", [1.0, 40.0])
@pytest.mark.parametrize("normalizer", [None, 29])
def test_fp16_exps_match_the_fp32_logits(spread, normalizer):
    """store='fp16-exp' against 'fp32-logits' on the same fp16 inputs: the same loss, metrics and
    logprobs to fp32 rounding, gradients within fp16's. spread=40 scales the logits until most
    of a row's exps underflow fp16 (p < 2^-24, stored as 0): the entropy term's p * log2(e) must
    stay 0 there, not NaN."""
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 1000, torch.float16)
    weight = (weight.detach().float() * spread).half().requires_grad_()
    kwargs = dict(temperature=0.8, entropy_coef=0.01, normalizer=normalizer, chunk_bytes=six_rows("fp16-exp", 1000))
    want = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask, **kwargs, store="fp32-logits")
    got = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask, **kwargs, store="fp16-exp")
    assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
    value_tol, token_tol, grad_tol = TOLERANCE[torch.float16]
    for name in FIELDS:
        a, b = getattr(got[0], name).item(), getattr(want[0], name).item()
        assert abs(a - b) <= value_tol * max(1.0, abs(b)), (name, a, b)
    # logprobs reach -800 at spread 40, where fp32's rounding alone is 6e-5: relative there
    delta = (got[0].logprobs - want[0].logprobs).abs()
    assert (delta <= token_tol * want[0].logprobs.abs().clamp_min(1.0)).all(), delta.max()
    assert rel(got[1], want[1]) <= grad_tol and rel(got[2], want[2]) <= grad_tol
    if spread > 1:
        with torch.no_grad():
            p = torch.softmax(hidden.float() @ weight.float().t() / 0.8, dim=-1)
        assert (p < 2 ** -24).float().mean() > 0.5, "the logits should leave most exps below fp16's range"


@pytest.mark.parametrize("normalizer", [None, 29, torch.tensor(41.0)])
def test_equals_the_composable_path(normalizer):
    """The same logprobs, loss, metrics and gradients as linear_logprobs + pg_loss: the path it
    replaces in PolicyUpdate, and the one whose logprobs the engine's match."""
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 1000, torch.float32)

    def composable(hidden, weight, targets, old, advantages, mask):
        logprobs, entropy = linear_logprobs(hidden, weight, targets, 0.8, True)
        out = pg_loss(logprobs, old, advantages, mask, 0.2, 0.2, entropy, 0.01, normalizer)
        return type("Out", (), {**out._asdict(), "logprobs": logprobs.detach()})

    want = run(composable, hidden, weight, targets, old, advantages, mask)
    got = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask, temperature=0.8, entropy_coef=0.01,
              normalizer=normalizer, chunk_bytes=10 * 4 * 1000)
    assert_close(got, want, torch.float32)


def test_micro_batches_add_up_to_the_whole_batch():
    """With the global token count as the normalizer, two calls' losses and gradients sum to one
    call's: what PolicyUpdate's gradient accumulation relies on."""
    hidden, weight, targets, old, advantages, mask = make_inputs(61, 48, 257, torch.float32)
    total = int(mask.sum())
    whole = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask, normalizer=total)
    weight.grad = None
    grads_hidden, loss = [], 0.0
    for part in (slice(0, 23), slice(23, 61)):
        h = hidden.detach()[part].clone().requires_grad_()
        out = linear_pg_loss(h, weight, targets[part], old[part], advantages[part], mask[part], normalizer=total)
        out.loss.backward()
        grads_hidden.append(h.grad)
        loss += out.loss.item()
    assert abs(loss - whole[0].loss.item()) <= 1e-5 * max(1.0, abs(loss))
    assert rel(torch.cat(grads_hidden), whole[1]) <= 2e-5
    assert rel(weight.grad, whole[2]) <= 2e-5


@pytest.mark.parametrize("dtype,store", [STORES[0], STORES[2]])
def test_masked_tokens_are_inert_and_a_bad_token_poisons_the_step(dtype, store):
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 257, dtype)
    old2, adv2 = old.clone(), advantages.clone()
    off = (~mask).nonzero()[:, 0]
    old2[off[0]], adv2[off[1]] = float("nan"), float("inf")  # garbage where the mask is off
    clean = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask, store=store)
    garbage = run(linear_pg_loss, hidden, weight, targets, old2, adv2, mask, store=store)
    assert garbage[0].loss.item() == clean[0].loss.item()
    assert torch.equal(garbage[1], clean[1]) and torch.equal(garbage[2], clean[2])

    on = mask.nonzero()[:, 0]
    adv2 = advantages.clone()
    adv2[on[0]] = float("nan")  # a counted token without a defined loss
    bad = run(linear_pg_loss, hidden, weight, targets, old, adv2, mask, store=store)
    assert all(torch.isnan(getattr(bad[0], name)) for name in FIELDS if name != "entropy")
    assert torch.isnan(bad[1][on[0]]).all(), "the bad token's own hidden gradient is NaN"
    others = torch.ones(37, dtype=torch.bool)
    others[on[0]] = False
    assert torch.isfinite(bad[1][others]).all(), "other tokens' hidden gradients stay finite"


def test_upstream_gradient_scales_and_a_second_backward_is_refused():
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 257, torch.float32)
    once = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask)
    hidden.grad = weight.grad = None
    out = linear_pg_loss(hidden, weight, targets, old, advantages, mask)
    (out.loss * 3.0).backward(retain_graph=True)
    assert rel(hidden.grad, 3 * once[1]) <= 1e-6 and rel(weight.grad, 3 * once[2]) <= 1e-6
    with pytest.raises(RuntimeError, match="ran twice"):
        out.loss.backward()


@pytest.mark.parametrize("scale", [1.0, 1 / 3, -2.5])
def test_upstream_gradient_scales_as_torch_mul_rounds_it(scale):
    """The stored fp16 gradients scaled in place by the upstream gradient: each product in fp32,
    rounded once, bit for bit; 1.0 (skipped) included."""
    # on the GPU where there is one: on CPU tensors only the interpreter runs the fused kernels
    device = "cuda" if torch.cuda.is_available() else "cpu"
    hidden, weight, *rest = (t.to(device) for t in make_inputs(37, 48, 257, torch.float16))
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    targets, old, advantages, mask = rest
    linear_pg_loss(hidden, weight, targets, old, advantages, mask).loss.backward()
    once = hidden.grad, weight.grad
    hidden.grad = weight.grad = None
    upstream = torch.tensor(scale, dtype=torch.float32, device=device)
    linear_pg_loss(hidden, weight, targets, old, advantages, mask).loss.backward(upstream)
    assert hidden.grad.dtype == torch.float16
    for grad, unscaled in zip((hidden.grad, weight.grad), once):
        assert torch.equal(grad, (unscaled.float() * upstream).half())


def test_a_frozen_input_gets_no_gradient_and_the_other_its_own():
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 257, torch.float32)
    both = run(linear_pg_loss, hidden, weight, targets, old, advantages, mask)
    out = linear_pg_loss(hidden, weight.detach(), targets, old, advantages, mask)
    hidden.grad = None
    out.loss.backward()
    assert torch.equal(hidden.grad, both[1])
    weight.grad = None
    linear_pg_loss(hidden.detach(), weight, targets, old, advantages, mask).loss.backward()
    assert torch.equal(weight.grad, both[2])


@pytest.mark.parametrize("dtype,store", [STORES[0], STORES[2]])
def test_out_of_vocabulary_targets_give_nan_logprobs(dtype, store):
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 257, dtype)
    targets = targets.clone()
    targets[3], targets[5] = 257, -1
    out = linear_pg_loss(hidden, weight, targets, old, advantages, mask, store=store)
    bad = torch.zeros(37, dtype=torch.bool)
    bad[[3, 5]] = True
    assert torch.isnan(out.logprobs[bad]).all() and torch.isfinite(out.logprobs[~bad]).all()


@pytest.mark.parametrize("dtype,store,gemms", [(*STORES[0], 4), (*STORES[2], 0)])
def test_no_grad_spends_no_gemm_on_gradients(monkeypatch, dtype, store, gemms):
    """needs_input_grad ignores torch.no_grad(): the gradient GEMMs would run for nothing. fp32
    logits come from one cuBLAS GEMM per chunk of 10 rows; fp16 exps from a Triton kernel."""
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 257, dtype)
    chunk = 10 * (4 * 257 if store == "fp32-logits" else 2 * 320)
    with_grad = linear_pg_loss(hidden, weight, targets, old, advantages, mask, chunk_bytes=chunk, store=store)
    calls = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or mm(*a, **k))
    monkeypatch.setattr(torch.Tensor, "addmm_", lambda *a, **k: calls.append(1))
    with torch.no_grad():
        out = linear_pg_loss(hidden, weight, targets, old, advantages, mask, chunk_bytes=chunk, store=store)
    assert len(calls) == gemms, "no gradient GEMM"
    assert out.loss.item() == with_grad.loss.item() and torch.equal(out.logprobs, with_grad.logprobs)


@pytest.mark.parametrize("change,message", [
    (dict(old_logprobs=torch.zeros(36)), "old_logprobs must be a tensor of shape"),
    (dict(mask=torch.ones(37, 2)), "mask must be a tensor of shape"),
    (dict(temperature=0.0), "temperature must be a positive number"),
    (dict(entropy_coef=float("nan")), "entropy_coef must be a finite number"),
    (dict(entropy_coef="0.1"), "entropy_coef must be a finite number"),
    (dict(clip_low=1.5), "clip_low must be in"),
    (dict(normalizer=-1), "normalizer must be a finite number >= 0"),
    (dict(chunk_bytes=0), "chunk_bytes must be a positive integer"),
    (dict(store="fp16"), "store must be one of 'auto', 'fp32-logits', 'fp16-exp'"),
    (dict(store="fp16-exp"), "store='fp16-exp' writes dLogits over the 2-byte exps, so it needs fp16"),
])
def test_bad_arguments_name_what_to_change(change, message):
    hidden, weight, targets, old, advantages, mask = make_inputs(37, 48, 257, torch.float32)
    args = {**dict(old_logprobs=old, advantages=advantages, mask=mask), **change}
    with pytest.raises(ValueError, match=message):
        linear_pg_loss(hidden, weight, targets, **args)


def test_auto_store_takes_fp16_exps_for_16_bit_inputs():
    for dtype, h, want in [(torch.float16, 48, "fp16-exp"), (torch.bfloat16, 3584, "fp16-exp"),
                           (torch.float32, 48, "fp32-logits")]:
        assert resolve_store("auto", torch.empty(1, h, dtype=dtype)) == want
        assert resolve_store("fp32-logits", torch.empty(1, h, dtype=dtype)) == "fp32-logits"


@pytest.mark.parametrize("tokens,rows,block_n,sms", [(16384, 2640, 64, 132), (16384, 2640, 128, 132),
                                                     (16384, 2640, 64, 114), (70001, 2640, 64, 132),
                                                     (37, 6, 16, 2), (37, 100, 16, 2), (100, 3, 16, 2)])
def test_exp_chunks_fill_whole_waves(tokens, rows, block_n, sms):
    """A chunk's forward grid (row blocks x vocabulary splits) fills 2 x SMs programs without a
    ragged wave where a divisor allows: 287 programs on 132 SMs cost the H100 ~40% of the
    forward. Never more rows than chunk_bytes allows, never more programs than the two waves."""
    from fastazr.kernels.linear_policy_loss import exp_chunk_rows, exp_splits
    got = exp_chunk_rows(tokens, rows, block_n, sms)
    splits = exp_splits(got, block_n, sms)
    assert 1 <= got <= max(1, min(rows, tokens)) and splits >= 1
    blocks = -(-got // block_n)
    assert blocks * splits <= 2 * sms or blocks > 2 * sms
    if got < tokens and rows >= 2 * block_n:
        assert got % block_n == 0 and got >= rows // 2 - block_n
        if any((2 * sms) % b == 0 for b in range((rows // block_n + 1) // 2, rows // block_n + 1)):
            assert blocks * splits == 2 * sms, (got, splits)
