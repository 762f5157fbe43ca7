"""The decode steps' Triton GEMM (kernels/decode_linear.py) against F.linear, which the trainer runs.

CPU (Triton's interpreter): row, column and K counts that are multiples of no block, with and
without a bias, against the fp32 GEMM rounded to the dtype. GPU (marker gpu): bit for bit
against cuBLAS at a 2,048-row batch, at SmolLM2's projection shapes and decode row counts; and
a CUDA graph of dependent launches with programmatic dependent launch equals plain launches."""
import pytest
import torch
import torch.nn.functional as F

from fastazr.kernels import runtime
from fastazr.kernels.decode_linear import LinearTiles, decode_linear, decode_linear_rows
from fastazr.kernels.layer_fusions import add_rms_norm

# The interpreter's dot sums in another order than torch's fp32 GEMM (~1e-7 relative), which
# can move a rounded output by one unit in the last place of the dtype (fp16: 2^-10).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def operands(rows: int, k: int, n: int, dtype: torch.dtype, bias: bool, device: str = "cpu"):
    g = torch.Generator().manual_seed(rows * 1000 + k + n)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    weight = (torch.randn(n, k, generator=g) / k ** 0.5).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    return x, weight, b


def reference(x, weight, bias):
    return F.linear(x.float(), weight.float(), None if bias is None else bias.float()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("k", [48, 40])  # 40: the last K step is partial
def test_matches_the_fp32_gemm(dtype, bias, k):
    # 37 rows: 3 row blocks of 16, the last partial; 70 columns: 5 blocks of 16, the last partial
    x, weight, b = operands(37, k, 70, dtype, bias)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(decode_linear(x, weight, b), reference(x, weight, b), rtol=rtol, atol=atol)


def test_one_row_and_wider_tiles():
    x, weight, b = operands(1, 40, 19, torch.float32, True)
    tiles = LinearTiles(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=1)
    torch.testing.assert_close(decode_linear(x, weight, b, tiles), reference(x, weight, b), rtol=1e-5, atol=1e-5)


def test_empty_and_mismatched_inputs():
    x, weight, b = operands(3, 32, 24, torch.float32, True)
    assert decode_linear(x[:0], weight, b).shape == (0, 24)
    with pytest.raises(ValueError, match="must be"):
        decode_linear(x, weight[:, :16])
    with pytest.raises(ValueError, match="must be"):
        decode_linear(x, weight, b[:20])
    with pytest.raises(ValueError, match="one dtype"):
        decode_linear(x, weight.half())


def test_never_chosen_off_cuda():
    assert decode_linear_rows(torch.zeros(8, 8, dtype=torch.bfloat16)) == 0


@pytest.mark.gpu
def test_gpu_row_limits_by_weight_size():
    assert decode_linear_rows(torch.zeros(960, 576, dtype=torch.bfloat16, device="cuda")) == 256
    assert decode_linear_rows(torch.zeros(3072, 576, dtype=torch.bfloat16, device="cuda")) == 64
    assert decode_linear_rows(torch.zeros(2048, 1536, dtype=torch.bfloat16, device="cuda")) == 0
    assert decode_linear_rows(torch.zeros(960, 576, dtype=torch.float32, device="cuda")) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, k, bias", [(960, 576, False), (576, 576, False), (3072, 576, False), (576, 1536, False),
                                        (1000, 576, True), (200, 1000, True)])
def test_gpu_bits_are_the_large_batch_cublas(dtype, n, k, bias):
    x, weight, b = operands(2048, k, n, dtype, bias, device="cuda")
    want = F.linear(x, weight, b)
    for rows in (1, 7, 16, 37, 64, 200, 256):
        got = decode_linear(x[:rows], weight, b)
        assert torch.equal(got, want[:rows]), f"{rows} rows: {(got != want[:rows]).float().mean():.2e} differ"


@pytest.mark.gpu
def test_gpu_fp32_and_odd_shapes_match_the_fp32_gemm():
    for rows, k, n, dtype in ((37, 200, 70, torch.float32), (5, 1000, 333, torch.float32), (3, 40, 19, torch.bfloat16)):
        x, weight, b = operands(rows, k, n, dtype, True, device="cuda")
        rtol, atol = (1e-5, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)  # bf16: one unit in the last place
        torch.testing.assert_close(decode_linear(x, weight, b), reference(x, weight, b), rtol=rtol, atol=atol)


def chain(hidden, w1, w2, norm):
    normed = add_rms_norm(hidden, norm, 1e-6)
    for _ in range(30):
        delta = decode_linear(decode_linear(normed, w1), w2)
        normed = add_rms_norm(hidden, norm, 1e-6, residual=delta)  # hidden += delta, in place
    return normed


@pytest.mark.gpu
def test_gpu_dependent_launches_in_a_graph_equal_plain_launches():
    """Thirty layers of dependent launches (GEMM, GEMM, residual add + RMSNorm), captured in a
    CUDA graph with programmatic dependent launch, where each kernel may start during its
    predecessor's tail, give what plain eager launches give: PDL launches capture and replay.
    That each kernel waits before it reads is checked on its PTX (test_pdl.py); a race here
    would show only now and then."""
    x, w1, _ = operands(64, 576, 1536, torch.bfloat16, False, device="cuda")
    w2 = (torch.randn(576, 1536, device="cuda") / 1536 ** 0.5).bfloat16()
    norm = torch.rand(576, device="cuda").bfloat16() + 0.5
    saved = runtime.PDL
    try:
        runtime.PDL = False
        plain = chain(x.clone(), w1, w2, norm)
        runtime.PDL = True
        assert runtime.pdl(x), "the GPU tests run on Hopper: PDL must be on"
        chain(x.clone(), w1, w2, norm)  # compiles outside the capture
        start = x.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = chain(start, w1, w2, norm)
        graph.replay()
        torch.cuda.synchronize()
    finally:
        runtime.PDL = saved
    assert torch.equal(captured, plain)
