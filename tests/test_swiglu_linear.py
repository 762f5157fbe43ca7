"""The engine's gate_up GEMM with SwiGLU in its epilogue against the layer code training runs.

CPU (Triton's interpreter): both load paths (pointers, and the copy engine's tensor
descriptors), at row, column and K counts that are multiples of no block, against the fp32
GEMM rounded to the dtype then the layer's swiglu. GPU (marker gpu): bit for bit against the
trainer's F.linear + SwiGLU kernel at the 1.5B's shape and at every decode-like row count."""
import pytest
import torch
import torch.nn.functional as F

from fastazr.kernels.layer_fusions import swiglu_fused
from fastazr.kernels.logprobs import Tiles
from fastazr.kernels.swiglu_linear import swiglu_linear
from fastazr.model.layers import swiglu

# The interpreter's dot sums in another order than torch's fp32 GEMM (~1e-7 relative), which
# can move a rounded gate or up by one unit in the last place of the dtype (fp16: 2^-10).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}


def reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return swiglu(F.linear(x.float(), weight.float()).to(x.dtype))


def operands(rows: int, hidden: int, inter: int, dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(rows * 1000 + hidden)
    x = torch.randn(rows, hidden, generator=g).to(device, dtype)
    weight = (torch.randn(2 * inter, hidden, generator=g) / hidden ** 0.5).to(device, dtype)
    return x, weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tma", [False, True])
@pytest.mark.parametrize("hidden", [48, 40])  # 40: the last K step is partial
def test_matches_the_layer_code(dtype, tma, hidden):
    # 37 rows: 3 row blocks of 16, the last partial; I = 70: 3 column blocks of 32, the last
    # partial, where the gate tile reaches into the up rows and the up tile past the end
    x, weight = operands(37, hidden, 70, dtype)
    tiles = Tiles(block_n=16, block_v=32, block_k=16, num_warps=4, num_stages=1, group_n=2, tma=tma)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(swiglu_linear(x, weight, tiles), reference(x, weight), rtol=rtol, atol=atol)


def test_gate_and_up_are_not_interchangeable():
    # silu(gate) * up is not symmetric: a kernel that read the halves the other way round fails
    x, weight = operands(5, 32, 24, torch.float32)
    swapped = torch.cat(weight.chunk(2)[::-1])
    out = swiglu_linear(x, weight)
    torch.testing.assert_close(out, reference(x, weight), rtol=1e-5, atol=1e-5)
    assert (out - reference(x, swapped)).abs().max() > 1e-2


def test_empty_and_mismatched_inputs():
    x, weight = operands(3, 32, 24, torch.float32)
    assert swiglu_linear(x[:0], weight).shape == (0, 24)
    with pytest.raises(ValueError, match="must be"):
        swiglu_linear(x, weight[:, :16])
    with pytest.raises(ValueError, match="must be"):
        swiglu_linear(x, weight[:47])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("hidden, inter", [(1536, 8960), (576, 1536)])  # qwen2.5-1.5b, SmolLM2-135M
def test_gpu_bits_are_the_trainer_linear_and_swiglu(dtype, hidden, inter):
    # the trainer: cuBLAS at a large batch (no split-K), then the SwiGLU kernel it trains with;
    # the row counts cross every tile rule of swiglu_linear_tiles
    x, weight = operands(2048, hidden, inter, dtype, device="cuda")
    want = swiglu_fused(F.linear(x, weight))
    for rows in (2048, 1000, 256, 200, 64, 37, 17, 16, 5, 1):
        got = swiglu_linear(x[:rows], weight)
        assert torch.equal(got, want[:rows]), f"{rows} rows: {(got != want[:rows]).float().mean():.2e} differ"


@pytest.mark.gpu
def test_gpu_odd_shapes_match_the_layer_code():
    x, weight = operands(37, 200, 70, torch.float32, device="cuda")
    torch.testing.assert_close(swiglu_linear(x, weight), reference(x, weight), rtol=1e-5, atol=1e-5)
