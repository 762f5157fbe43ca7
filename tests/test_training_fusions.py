"""The training forward's fused RMSNorm, SwiGLU and rotary (kernels/training_fusions.py) against
the torch layer code they replace, outputs and every gradient, at odd shapes: 37 rows (not a
multiple of the programs' stride), widths 72 and 100 (no powers of two), 5 query heads of 12
(neither a power of two). Reference in fp32 from the same (rounded) inputs; the interpreter runs
fp32 and fp16 on CPU, the GPU bf16 (marker gpu)."""
import pytest
import torch

from fastazr.kernels.training_fusions import fused_add_rms_norm, fused_rms_norm, fused_rope_qkv, fused_swiglu
from fastazr.model.config import ModelConfig
from fastazr.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq, swiglu

# The kernels round the forward where torch rounds and keep the backward in fp32; against an fp32
# reference, a few units in the last place of the dtype (bf16: 2^-8 relative a unit).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}


def check(device, dtype, rows=37, hidden=72, inter=100):
    g = torch.Generator().manual_seed(0)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    rtol, atol = TOLERANCE[dtype]
    x, weight = rand(rows, hidden, scale=3.0), rand(hidden)
    dy = torch.randn(rows, hidden, generator=g).to(device, dtype)
    out = fused_rms_norm(x, weight, 1e-6)
    dx, dw = torch.autograd.grad(out, (x, weight), dy)
    xr, wr = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    want = rms_norm(xr, wr, 1e-6)
    want_dx, want_dw = torch.autograd.grad(want, (xr, wr), dy.float())
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(dx.float(), want_dx, rtol=rtol, atol=atol)
    # dweight sums 37 rows: its error grows with the sum's terms
    torch.testing.assert_close(dw.float(), want_dw, rtol=rtol, atol=atol * rows ** 0.5)

    gate_up = rand(rows, 2 * inter, scale=2.0)
    dout = torch.randn(rows, inter, generator=g).to(device, dtype)
    out = fused_swiglu(gate_up)
    (dgu,) = torch.autograd.grad(out, (gate_up,), dout)
    ref = gate_up.detach().float().requires_grad_()
    want = swiglu(ref)
    (want_dgu,) = torch.autograd.grad(want, (ref,), dout.float())
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    torch.testing.assert_close(dgu.float(), want_dgu, rtol=rtol, atol=atol)


def check_add_norm(device, dtype, rows=37, hidden=72):
    """The residual add fused into the next norm: the sum is torch's add bit for bit and the
    normed rows the unfused kernel's (the engine's: its logprobs must equal the trainer's), both
    near the fp32 reference; each gradient the reference's, with gradient arriving through the
    sum, the normed rows, or both."""
    g = torch.Generator().manual_seed(2)
    rtol, atol = TOLERANCE[dtype]
    h, delta = ((torch.randn(rows, hidden, generator=g) * 3).to(device, dtype).requires_grad_() for _ in range(2))
    weight = torch.randn(hidden, generator=g).to(device, dtype).requires_grad_()
    d_total, d_normed = (torch.randn(rows, hidden, generator=g).to(device, dtype) for _ in range(2))
    total, normed = fused_add_rms_norm(h, delta, weight, 1e-6)
    plain = h.detach() + delta.detach()
    assert torch.equal(total, plain)
    torch.testing.assert_close(normed, fused_rms_norm(plain, weight.detach(), 1e-6), rtol=0, atol=0)
    refs = [t.detach().float().requires_grad_() for t in (h, delta, weight)]
    ref_total = refs[0] + refs[1]
    ref_normed = rms_norm(ref_total, refs[2], 1e-6)
    torch.testing.assert_close(normed.float(), ref_normed, rtol=rtol, atol=atol)
    for used, grads in (("both", (d_total, d_normed)), ("normed", (None, d_normed)), ("total", (d_total, None))):
        outs = [o for o, gr in zip((total, normed), grads) if gr is not None]
        ref_outs = [o for o, gr in zip((ref_total, ref_normed), grads) if gr is not None]
        got = torch.autograd.grad(outs, (h, delta, weight), [gr for gr in grads if gr is not None],
                                  retain_graph=True, allow_unused=True)
        want = torch.autograd.grad(ref_outs, refs, [gr.float() for gr in grads if gr is not None],
                                   retain_graph=True, allow_unused=True)
        for name, a, b, scale in zip(("hidden", "delta", "weight"), got, want, (1, 1, rows ** 0.5)):
            if b is None:
                assert a is None or not a.any(), f"{used}: d{name} should be zero"
                continue
            torch.testing.assert_close(a.float(), b, rtol=rtol, atol=atol * scale, msg=lambda m: f"{used}: d{name}: {m}")


def check_rope(device, dtype, tokens=37, heads=5, kv_heads=1, head_dim=12):
    g = torch.Generator().manual_seed(1)
    rtol, atol = TOLERANCE[dtype]
    config = ModelConfig(architecture="qwen2", vocab_size=11, hidden_size=heads * head_dim, intermediate_size=8,
                         num_layers=1, num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=8192)
    positions = torch.randint(0, 8000, (tokens,), generator=g).to(device)
    cos, sin = rope_cos_sin(rope_inv_freq(config, device=device), positions, dtype)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = (torch.randn(tokens, width, generator=g) * 2).to(device, dtype).requires_grad_()
    grads = [torch.randn(tokens, n, head_dim, generator=g).to(device, dtype) for n in (heads, kv_heads, kv_heads)]
    q, k, v = fused_rope_qkv(qkv, cos, sin, heads, kv_heads)
    assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
    split = qkv.detach().split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    # the forward must be apply_rope's bits: the engine's exact logprobs assume the trainer's q and k
    torch.testing.assert_close(q, apply_rope(split[0].view(tokens, heads, head_dim), cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(k, apply_rope(split[1].view(tokens, kv_heads, head_dim), cos, sin), rtol=0, atol=0)
    torch.testing.assert_close(v, split[2].view(tokens, kv_heads, head_dim), rtol=0, atol=0)
    # The gradient for any tables, not only rotary ones, whose two halves are equal (so reading
    # sin at d instead of its partner column would pass): random cos and sin here.
    cos, sin = (torch.randn(tokens, head_dim, generator=g).to(device, dtype) for _ in range(2))
    q, k, v = fused_rope_qkv(qkv, cos, sin, heads, kv_heads)
    (got,) = torch.autograd.grad((q, k, v), (qkv,), grads)
    ref = qkv.detach().float().requires_grad_()
    rq, rk, rv = ref.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    outs = (apply_rope(rq.reshape(tokens, heads, head_dim), cos.float(), sin.float()),
            apply_rope(rk.reshape(tokens, kv_heads, head_dim), cos.float(), sin.float()), rv.reshape(tokens, kv_heads, head_dim))
    (want,) = torch.autograd.grad(outs, (ref,), [t.float() for t in grads])
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol)
    # only q used: k's and v's columns of the gradient are zeros, not stale memory
    (only_q,) = torch.autograd.grad(fused_rope_qkv(qkv, cos, sin, heads, kv_heads)[0], (qkv,), grads[0])
    assert torch.equal(only_q[:, heads * head_dim:], torch.zeros_like(only_q[:, heads * head_dim:]))
    torch.testing.assert_close(only_q[:, :heads * head_dim].float(), want[:, :heads * head_dim], rtol=rtol, atol=atol)


def test_fused_rope_refuses_what_it_cannot_rotate():
    cos = sin = torch.zeros(3, 12)
    with pytest.raises(ValueError, match="heads=2"):
        fused_rope_qkv(torch.zeros(3, 60), cos, sin, 2, 1)
    with pytest.raises(ValueError, match="unit column stride"):
        fused_rope_qkv(torch.zeros(48, 3).t(), cos, sin, 2, 1)
    with pytest.raises(ValueError, match="cos and sin"):
        fused_rope_qkv(torch.zeros(3, 48), torch.zeros(4, 12), torch.zeros(4, 12), 2, 1)
    with pytest.raises(ValueError, match="dtype"):
        fused_rope_qkv(torch.zeros(3, 48), cos.half(), sin.half(), 2, 1)
    with pytest.raises(ValueError, match="heads >= kv_heads >= 1"):
        fused_rope_qkv(torch.zeros(3, 84), cos, sin, 1, 3)
    with pytest.raises(ValueError, match="heads >= kv_heads >= 1"):
        fused_rope_qkv(torch.zeros(3, 36), cos, sin, 3, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_training_fusions_match_the_layer_code(dtype):
    check("cpu", dtype)
    check_add_norm("cpu", dtype)
    check_rope("cpu", dtype)
    check_rope("cpu", dtype, heads=6, kv_heads=3, head_dim=10)  # k and v heads past the first


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_fusions_match_the_layer_code_on_gpu(dtype):
    check("cuda", dtype)
    check("cuda", dtype, rows=4099, hidden=1536, inter=8960)  # a real layer's widths
    check_add_norm("cuda", dtype)
    check_add_norm("cuda", dtype, rows=4099, hidden=1536)
    check_rope("cuda", dtype)
    check_rope("cuda", dtype, tokens=4099, heads=12, kv_heads=2, head_dim=128)  # qwen2.5-1.5b's heads


def test_empty_rows_and_bad_layouts():
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    out = fused_rms_norm(x, w, 1e-6)
    dx, dw = torch.autograd.grad(out.sum(), (x, w))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))
    qkv = torch.zeros(0, 48, requires_grad=True)
    q, k, v = fused_rope_qkv(qkv, torch.zeros(0, 12), torch.zeros(0, 12), 2, 1)
    assert q.shape == (0, 2, 12) and k.shape == v.shape == (0, 1, 12)
    assert torch.autograd.grad((q.sum() + k.sum() + v.sum()), qkv)[0].shape == (0, 48)
    with pytest.raises(ValueError, match="contiguous"):
        fused_rms_norm(torch.zeros(4, 8).t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        fused_swiglu(torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match="one shape"):
        fused_add_rms_norm(torch.zeros(4, 8), torch.zeros(4, 7), torch.ones(8), 1e-6)
