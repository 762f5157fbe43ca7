"""The training forward's fused RMSNorm and SwiGLU (kernels/training_fusions.py) against the torch
layer code they replace, outputs and every gradient, at odd shapes: 37 rows (not a multiple of
the programs' stride), widths 72 and 100 (no powers of two). Reference in fp32 from the same
(rounded) inputs; the interpreter runs fp32 and fp16 on CPU, the GPU bf16 (marker gpu)."""
import pytest
import torch

from fastazr.kernels.training_fusions import fused_rms_norm, fused_swiglu
from fastazr.model.layers import rms_norm, swiglu

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rms_norm_and_swiglu_match_the_layer_code(dtype):
    check("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_and_swiglu_match_the_layer_code_on_gpu(dtype):
    check("cuda", dtype)
    check("cuda", dtype, rows=4099, hidden=1536, inter=8960)  # a real layer's widths


def test_empty_rows_and_bad_layouts():
    x = torch.zeros(0, 8, requires_grad=True)
    w = torch.ones(8, requires_grad=True)
    out = fused_rms_norm(x, w, 1e-6)
    dx, dw = torch.autograd.grad(out.sum(), (x, w))
    assert dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))
    with pytest.raises(ValueError, match="contiguous"):
        fused_rms_norm(torch.zeros(4, 8).t(), torch.ones(4), 1e-6)
    with pytest.raises(ValueError, match="contiguous"):
        fused_swiglu(torch.zeros(2, 3, 8))
