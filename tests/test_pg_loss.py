"""The fused PPO-clip loss (Triton; the interpreter on CPU) against the fp32 torch reference and its
autograd: loss, metrics and both gradients at ragged sizes, extreme ratios, garbage under the mask,
the micro-batch property of the global normalizer, NaN and inf on valid tokens, argument errors
and the CPU fallback."""
import pytest
import torch

from fastazr.kernels import policy_loss as pg_loss_module
from fastazr.kernels.policy_loss import PGLoss, pg_loss
from fastazr.kernels.policy_loss_reference import pg_loss_reference


# fp32 throughout. Per-token gradients differ from autograd's only by exp's last bits and the order
# of a few multiplies (~1e-7 relative); sums over up to 70K tokens in another order by ~1e-6.
FP32_GRAD_RTOL, FP32_GRAD_ATOL = 1e-5, 1e-10
FP32_SUM_RTOL, FP32_SUM_ATOL = 1e-5, 1e-6
SIZES = [1, 37, 1000, 5003]  # 5003: two forward blocks and five backward programs, ragged tails
METRICS = ["clip_fraction", "approx_kl", "mean_ratio", "entropy"]
UPSTREAM = 0.37  # a non-unit upstream gradient, read by the backward through its pointer


def make_inputs(n, *, seed=0, device="cpu", spread=0.6, garbage=True, clip_low=0.2, clip_high=0.2):
    """Log ratios ~N(0, spread) (so ratios land far outside [0.8, 1.2] both ways), advantages of
    both signs, ~30% of tokens masked, and NaN/inf under the mask when `garbage`."""
    g = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(n, generator=g) * 4
    old = logprobs - torch.randn(n, generator=g) * spread
    # Move ratios within 1e-4 of a clip edge off it: exp's last bit may differ between Triton and
    # torch, and at the edge that decides the branch, so the gradient would be 0 on one side only.
    ratio = torch.exp(logprobs - old)
    near = ((ratio - (1 - clip_low)).abs() < 1e-4) | ((ratio - (1 + clip_high)).abs() < 1e-4)
    logprobs = torch.where(near, logprobs + 1e-3, logprobs)
    advantages = torch.randn(n, generator=g)
    entropy = torch.rand(n, generator=g) * 2
    mask = torch.rand(n, generator=g) > 0.3
    if garbage:
        masked = (~mask).nonzero().flatten()
        logprobs[masked[0::4]] = float("nan")
        old[masked[1::4]] = float("inf")
        advantages[masked[2::4]] = float("-inf")
        entropy[masked[3::4]] = float("nan")
        logprobs[masked[3::4]] = float("inf")
    return {k: v.to(device) for k, v in dict(logprobs=logprobs, old_logprobs=old, advantages=advantages,
                                             entropy=entropy, mask=mask).items()}


def run(fn, inputs, **kwargs):
    """Call fn on fresh leaves; return its PGLoss and the gradients of UPSTREAM * loss."""
    lp = inputs["logprobs"].clone().requires_grad_()
    ent = inputs["entropy"].clone().requires_grad_()
    use_entropy = kwargs.pop("use_entropy", True)
    out = fn(lp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"],
             entropy=ent if use_entropy else None, **kwargs)
    (out.loss * UPSTREAM).backward()
    return out, lp.grad, ent.grad


def assert_matches(ours, expected, *, sum_rtol=FP32_SUM_RTOL, sum_atol=FP32_SUM_ATOL):
    (out, dlp, dent), (ref, ref_dlp, ref_dent) = ours, expected
    assert isinstance(out, PGLoss)
    for name in ["loss", *METRICS]:
        value = getattr(out, name)
        assert value.shape == () and value.dtype == torch.float32, name
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, getattr(ref, name), rtol=sum_rtol, atol=sum_atol, msg=name)
    for name in METRICS:
        assert not getattr(out, name).requires_grad, name
    assert torch.isfinite(dlp).all()
    torch.testing.assert_close(dlp, ref_dlp, rtol=FP32_GRAD_RTOL, atol=FP32_GRAD_ATOL)
    if ref_dent is None:
        assert dent is None
    else:
        torch.testing.assert_close(dent, ref_dent, rtol=FP32_GRAD_RTOL, atol=FP32_GRAD_ATOL)


CONFIGS = {
    "bool-mask": dict(),
    "float-mask+entropy-bonus+float-normalizer+asymmetric": dict(
        float_mask=True, entropy_coef=0.01, normalizer="float", clip_high=0.28),
    "entropy-metric-only+tensor-normalizer+asymmetric": dict(
        normalizer="tensor", clip_high=0.28, entropy_coef=0.0),
    "no-entropy+int-tensor-normalizer": dict(use_entropy=False, normalizer="int-tensor", clip_low=0.1),
}


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("n", SIZES)
def test_matches_reference(n, config):
    options = dict(CONFIGS[config])
    inputs = make_inputs(n, seed=n, clip_low=options.get("clip_low", 0.2), clip_high=options.get("clip_high", 0.2))
    if options.pop("float_mask", False):
        inputs["mask"] = inputs["mask"].float()
    if options.get("normalizer") == "float":
        options["normalizer"] = 1.5 * n + 0.25
    elif options.get("normalizer") == "tensor":
        options["normalizer"] = torch.tensor(float(2 * n), dtype=torch.float32)
    elif options.get("normalizer") == "int-tensor":
        options["normalizer"] = torch.tensor([3 * n], dtype=torch.int64)  # shape [1], int: both accepted
    ours, expected = run(pg_loss, inputs, **options), run(pg_loss_reference, inputs, **options)
    assert_matches(ours, expected)
    if n >= 1000:  # the data exercises both branches of the max and both clip edges
        assert expected[0].clip_fraction > 0.05
        dlp = expected[1]
        assert (dlp > 0).any() and (dlp < 0).any() and (inputs["mask"].bool() & (dlp == 0)).any()


def test_clip_edges_and_both_advantage_signs():
    """Hand-placed tokens: ratio e^{+-1} with A > 0 and A < 0, a ratio of exactly 1 (the two branches
    tie inside the range: full gradient), and A = 0."""
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0, 0.0])
    old = torch.tensor([-1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0, 2.0, 0.0])
    inputs = dict(logprobs=lp, old_logprobs=old, advantages=adv, entropy=torch.zeros(6),
                  mask=torch.ones(6, dtype=torch.bool))
    ours, expected = run(pg_loss, inputs), run(pg_loss_reference, inputs)
    assert_matches(ours, expected)
    e = torch.exp(torch.tensor(1.0))
    # ratio e, A=1: clipped (-1.2) > unclipped (-e): clipped, no gradient. ratio e, A=-1: unclipped.
    # ratio 1/e, A=1: unclipped. ratio 1/e, A=-1: clipped at 0.8. ratio 1, A=2: tie, full gradient.
    want = torch.stack([torch.tensor(0.0), e, -1 / e, torch.tensor(0.0), torch.tensor(-2.0), torch.tensor(0.0)])
    torch.testing.assert_close(ours[1], want * UPSTREAM / 6, rtol=FP32_GRAD_RTOL, atol=FP32_GRAD_ATOL)
    torch.testing.assert_close(ours[0].clip_fraction, torch.tensor(2 / 6))


def test_log_ratio_limit():
    """Log ratios at, beyond and far beyond the limit, and a -inf logprob on a valid token: finite
    results, gradient zero strictly beyond the limit (torch.clamp passes it on its closed interval)."""
    limit = 5.0
    lp = torch.tensor([5.0, -5.0, 9.0, -9.0, 1e30, -1e30, float("-inf"), 0.1])
    old = torch.zeros(8)
    adv = torch.tensor([-1.0, 1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0])
    inputs = dict(logprobs=lp, old_logprobs=old, advantages=adv, entropy=torch.rand(8),
                  mask=torch.ones(8, dtype=torch.bool))
    for fn in (pg_loss, pg_loss_reference):
        out, dlp, _ = run(fn, inputs, log_ratio_limit=limit)
        assert all(torch.isfinite(v) for v in out)
        assert torch.isfinite(dlp).all()
        assert (dlp[2:7] == 0).all() and (dlp[[0, 1, 7]] != 0).all(), fn.__name__
    assert_matches(run(pg_loss, inputs, log_ratio_limit=limit), run(pg_loss_reference, inputs, log_ratio_limit=limit))


def test_garbage_under_the_mask_changes_nothing():
    dirty = make_inputs(1000, seed=7, garbage=True)
    clean = make_inputs(1000, seed=7, garbage=False)
    assert not torch.isfinite(dirty["logprobs"]).all()
    for fn in (pg_loss, pg_loss_reference):
        a, b = run(fn, dirty, entropy_coef=0.05), run(fn, clean, entropy_coef=0.05)
        for x, y in zip(a[0], b[0]):
            assert torch.isfinite(x) and torch.equal(x, y), fn.__name__
        assert torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]), fn.__name__
        masked = ~dirty["mask"]
        assert (a[1][masked] == 0).all() and (a[2][masked] == 0).all()


NAN, INF = float("nan"), float("inf")


# numpy, under the interpreter, warns about the inf - inf that the last case is about
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("poison", [
    dict(old_logprobs=NAN), dict(logprobs=NAN), dict(advantages=NAN), dict(advantages=INF),
    dict(advantages=-INF), dict(logprobs=-INF, old_logprobs=-INF)])  # the last: a log ratio of inf - inf
def test_a_non_finite_counted_token_makes_both_paths_nan(poison):
    """Issue 20: a NaN old logprob on a valid token gave a NaN loss with a zero gradient on the torch
    path (a step on garbage) and finite values on the Triton path (NaN clamped to -20). Now both: the
    loss and every metric NaN, that token's gradient NaN (so the step's gradient norm is NaN), every
    other token's gradient as without it. Garbage under the mask stays ignored."""
    clean = make_inputs(300, seed=17)
    dirty = {k: v.clone() for k, v in clean.items()}
    token = int(clean["mask"].nonzero()[5])
    for name, value in poison.items():
        dirty[name][token] = value
    others = torch.arange(300) != token
    grads = []
    for fn in (pg_loss, pg_loss_reference):
        out, dlp, dent = run(fn, dirty, entropy_coef=0.01, clip_high=0.28)
        assert all(torch.isnan(v) for v in out), (fn.__name__, out)
        assert torch.isnan(dlp[token]) and torch.isfinite(dlp[others]).all(), fn.__name__
        _, clean_dlp, clean_dent = run(fn, clean, entropy_coef=0.01, clip_high=0.28)
        assert torch.equal(dlp[others], clean_dlp[others]) and torch.equal(dent, clean_dent), fn.__name__
        grads.append(dlp)
    torch.testing.assert_close(grads[0], grads[1], rtol=FP32_GRAD_RTOL, atol=FP32_GRAD_ATOL, equal_nan=True)


@pytest.mark.parametrize("extreme", [dict(old_logprobs=INF), dict(old_logprobs=-INF), dict(logprobs=-INF)])
def test_an_infinite_log_ratio_alone_is_clamped_on_both_paths(extreme):
    """An infinite (not NaN) log ratio is the limit's business: finite results, zero gradient for
    that token, the same on both paths."""
    inputs = make_inputs(300, seed=19)
    token = int(inputs["mask"].nonzero()[5])
    for name, value in extreme.items():
        inputs[name][token] = value
    ours, expected = run(pg_loss, inputs), run(pg_loss_reference, inputs)
    assert_matches(ours, expected)
    assert ours[1][token] == 0


@pytest.mark.parametrize("fn", [pg_loss, pg_loss_reference])
def test_nothing_valid_gives_zeros(fn):
    for n, normalizer in [(0, None), (0, 0.0), (17, None), (17, torch.tensor(0.0))]:
        inputs = make_inputs(n, seed=3)
        inputs["mask"] = torch.zeros(n, dtype=torch.bool)
        out, dlp, dent = run(fn, inputs, normalizer=normalizer, entropy_coef=0.1)
        assert all(torch.equal(v, torch.tensor(0.0)) for v in out), (n, normalizer, out)
        assert dlp.shape == (n,) and (dlp == 0).all() and (dent == 0).all()


@pytest.mark.parametrize("normalizer_kind", ["float", "tensor"])
def test_micro_batches_add_up_to_the_big_batch(normalizer_kind):
    inputs = make_inputs(3001, seed=11)
    total = int(inputs["mask"].sum())
    normalizer = float(total) if normalizer_kind == "float" else torch.tensor(total)
    options = dict(normalizer=normalizer, entropy_coef=0.02, clip_high=0.28)
    big, big_dlp, big_dent = run(pg_loss, inputs, **options)

    lp = inputs["logprobs"].clone().requires_grad_()
    ent = inputs["entropy"].clone().requires_grad_()
    sums = torch.zeros(5)
    for a, b in [(0, 1234), (1234, 1240), (1240, 3001)]:
        out = pg_loss(lp[a:b], inputs["old_logprobs"][a:b], inputs["advantages"][a:b], inputs["mask"][a:b],
                      entropy=ent[a:b], **options)
        (out.loss * UPSTREAM).backward()
        sums += torch.stack([v.detach() for v in out])
    torch.testing.assert_close(sums, torch.stack([v.detach() for v in big]), rtol=1e-6, atol=1e-7)
    # Each token's gradient depends only on that token and the shared normalizer: bitwise equal.
    assert torch.equal(lp.grad, big_dlp) and torch.equal(ent.grad, big_dent)


def test_torch_fallback_equals_triton(monkeypatch):
    inputs = make_inputs(1000, seed=5)
    options = dict(entropy_coef=0.01, clip_high=0.28, normalizer=torch.tensor(900.0))
    triton_result = run(pg_loss, inputs, **options)
    monkeypatch.setattr(pg_loss_module, "use_triton", lambda tensor: False)
    calls = []
    monkeypatch.setattr(pg_loss_module, "_PGLossFunction", None)  # the Triton path would now fail
    monkeypatch.setattr(pg_loss_module, "pg_loss_reference",
                        lambda *a, **k: calls.append(1) or pg_loss_reference(*a, **k))
    fallback = run(pg_loss, inputs, **options)
    assert calls == [1]
    assert_matches(fallback, triton_result)


def test_constants_get_no_gradient():
    """old_logprobs and advantages that require grad (a caller forgot to detach) are constants all
    the same: no gradient reaches them, and the loss and the logprob gradient are unchanged."""
    inputs = make_inputs(1000, seed=7)
    expected = run(pg_loss, inputs)
    old = inputs["old_logprobs"].clone().requires_grad_()
    adv = inputs["advantages"].clone().requires_grad_()
    got = run(pg_loss, {**inputs, "old_logprobs": old, "advantages": adv})
    assert old.grad is None and adv.grad is None
    assert_matches(got, expected)


def test_strided_inputs():
    """Every other element of [2N] tensors: copied to contiguous once, same results and gradients."""
    inputs = make_inputs(777, seed=13)
    expected = run(pg_loss_reference, inputs, entropy_coef=0.01)
    doubled = {k: torch.stack([v, v], dim=1).flatten() for k, v in inputs.items()}
    lp_base, ent_base = doubled["logprobs"].requires_grad_(), doubled["entropy"].requires_grad_()
    strided = {k: v[::2] for k, v in doubled.items()}
    assert not strided["logprobs"].is_contiguous()
    out = pg_loss(strided["logprobs"], strided["old_logprobs"], strided["advantages"], strided["mask"],
                  entropy=strided["entropy"], entropy_coef=0.01)
    (out.loss * UPSTREAM).backward()
    assert_matches((out, lp_base.grad[::2], ent_base.grad[::2]), expected)
    assert (lp_base.grad[1::2] == 0).all() and (ent_base.grad[1::2] == 0).all()


def test_metrics_are_independent_of_the_backward():
    """The metrics are views of one stats tensor that the backward also reads; adding to one in place
    (an accumulation loop's `total += out.approx_kl`) must neither fail nor change the gradient."""
    inputs = make_inputs(300, seed=9)
    expected = run(pg_loss_reference, inputs)
    lp = inputs["logprobs"].clone().requires_grad_()
    out = pg_loss(lp, inputs["old_logprobs"], inputs["advantages"], inputs["mask"])
    total = out.approx_kl
    total += 100.0
    loss = out.loss
    loss *= UPSTREAM  # the loss is not a view either
    loss.backward()
    torch.testing.assert_close(lp.grad, expected[1], rtol=FP32_GRAD_RTOL, atol=FP32_GRAD_ATOL)


def valid_args():
    inputs = make_inputs(8, seed=1)
    return dict(logprobs=inputs["logprobs"], old_logprobs=inputs["old_logprobs"],
                advantages=inputs["advantages"], mask=inputs["mask"])


@pytest.mark.parametrize("fn", [pg_loss, pg_loss_reference])
@pytest.mark.parametrize("change,error,pattern", [
    (dict(clip_low=-0.1), ValueError, "clip_low"),
    (dict(clip_low=1.0), ValueError, "clip_low"),
    (dict(clip_high=-0.01), ValueError, "clip_high"),
    (dict(clip_high=float("nan")), ValueError, "clip_high"),
    (dict(log_ratio_limit=0.0), ValueError, "log_ratio_limit"),
    (dict(entropy_coef=0.01), ValueError, "entropy"),
    (dict(normalizer=-1.0), ValueError, "normalizer"),
    (dict(normalizer=float("inf")), ValueError, "normalizer"),
    (dict(normalizer=torch.ones(2)), ValueError, "normalizer"),
    (dict(normalizer="8"), TypeError, "normalizer"),
    (dict(old_logprobs=torch.zeros(7)), ValueError, "old_logprobs has shape"),
    (dict(advantages=torch.zeros(8, 1)), ValueError, "advantages has shape"),
    (dict(mask=torch.ones(9, dtype=torch.bool)), ValueError, "mask has shape"),
    (dict(entropy=torch.zeros(3), entropy_coef=0.1), ValueError, "entropy has shape"),
    (dict(logprobs=torch.zeros(2, 4), old_logprobs=torch.zeros(2, 4), advantages=torch.zeros(2, 4),
          mask=torch.ones(2, 4)), ValueError, "logprobs must be 1-D"),
    (dict(advantages=torch.zeros(8, dtype=torch.long)), ValueError, "advantages must be a floating"),
    (dict(old_logprobs=[0.0] * 8), TypeError, "old_logprobs must be a torch.Tensor"),
    (dict(logprobs=[0.0] * 8), TypeError, "logprobs must be a torch.Tensor"),  # was an AttributeError in dispatch
    (dict(entropy=torch.zeros(8), entropy_coef=float("nan")), ValueError, "entropy_coef must be a finite"),
    (dict(entropy=torch.zeros(8), entropy_coef=float("inf")), ValueError, "entropy_coef must be a finite"),
    (dict(entropy=torch.zeros(8), entropy_coef="0.1"), TypeError, "entropy_coef must be a number"),
    (dict(clip_low=True), TypeError, "clip_low must be a number"),
    (dict(normalizer=torch.ones(1, dtype=torch.bool)), ValueError, "normalizer must hold a count"),
    (dict(normalizer=torch.tensor(-4.0)), ValueError, "normalizer must be a finite number >= 0"),
    (dict(normalizer=torch.tensor([float("nan")])), ValueError, "normalizer must be a finite number >= 0"),
    (dict(normalizer=True), TypeError, "normalizer must be None, a number or a tensor"),
])
def test_errors_name_the_argument(fn, change, error, pattern):
    with pytest.raises(error, match=pattern):
        fn(**{**valid_args(), **change})


@pytest.mark.parametrize("count", [-4.0, float("inf"), float("nan")])
def test_a_normalizer_the_host_does_not_read_poisons_the_step(count, monkeypatch):
    """A normalizer tensor on the logprobs' device is read by the kernels only (no host sync), so
    a negative or non-finite count cannot be refused at the call: it makes the loss and every
    metric NaN (the step is then skipped) instead of flipping the loss's sign. On the CPU the
    call refuses it (above), so the launches are driven directly here."""
    from fastazr.kernels import policy_loss_reference
    from fastazr.kernels.linear_policy_loss import _divisor
    from fastazr.kernels.policy_loss import _launch_forward
    args = valid_args()
    mask = args["mask"].to(torch.uint8)
    normalizer = torch.tensor([count])
    loss, stats = _launch_forward(args["logprobs"], args["old_logprobs"], args["advantages"], mask, None,
                                  normalizer, 0.8, 1.2, 20.0, 0.0)
    assert torch.isnan(loss) and torch.isnan(stats).all()
    assert torch.isnan(_divisor(mask, normalizer)).all()
    monkeypatch.setattr(policy_loss_reference, "check_pg_loss_args", lambda *a: None)
    assert torch.isnan(pg_loss_reference(**args, normalizer=normalizer).loss)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [65536, 70001])
def test_cuda_matches_reference(n):
    inputs = make_inputs(n, seed=n, device="cuda", clip_high=0.28)
    options = dict(entropy_coef=0.01, clip_high=0.28)
    ours = run(pg_loss, inputs, **options)
    assert_matches(ours, run(pg_loss_reference, inputs, **options))
    again = run(pg_loss, inputs, **options)  # one program, fixed order: bitwise repeatable
    assert all(torch.equal(a, b) for a, b in zip(ours[0], again[0])) and torch.equal(ours[1], again[1])
    # the global normalizer on the device, read by pointer
    total = inputs["mask"].sum()
    assert_matches(run(pg_loss, inputs, normalizer=total, **options),
                   run(pg_loss_reference, inputs, normalizer=total, **options))
