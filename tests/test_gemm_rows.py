"""GemmRows (fastazr/rollout/gemm_rows.py): the row counts it pads projections to, against a
stand-in GEMM whose bits change at chosen row counts (CPU), and on the GPU against cuBLAS itself
at the decode batch sizes of qwen2.5-1.5b's projections."""
import pytest
import torch
import torch.nn.functional as F

from fastazr.rollout.gemm_rows import GemmRows
from fastazr.rollout.runner import graph_buckets

CANDIDATES = [1, 2, 4, 8, 16, 32, 48, 64]
SPLIT = {1, 2, 4, 16, 48}  # row counts at which the stand-in "splits K" and rounds differently


def row_linear(x, weight, bias=None):
    """A GEMM whose rows never depend on the batch (CPU BLAS's do: it blocks by row count too)."""
    out = (x[:, None, :] * weight[None]).sum(-1)
    return out if bias is None else out + bias


def split_linear(x, weight, bias=None):
    out = row_linear(x, weight, bias)
    return out + 1e-3 if x.shape[0] in SPLIT else out


def test_pads_to_the_next_row_count_with_the_reference_bits():
    gemm = GemmRows(CANDIDATES, reference_rows=128, linear=split_linear)
    weight, bias = torch.randn(24, 40), torch.randn(24)
    gemm.learn(weight, bias)
    # the next candidate that does not split; past the last splitting candidate (48) nothing pads
    assert [gemm.rows(weight, bias, n) for n in CANDIDATES] == [8, 8, 8, 8, 32, 32, 64, 64]
    assert gemm.rows(weight, bias, 40) == 64, "a row count between candidates below the floor pads to it"
    assert gemm.rows(weight, bias, 100) == 100
    x = torch.randn(128, 40)
    want = row_linear(x, weight, bias)
    for n in CANDIDATES + [40, 100]:
        assert torch.equal(gemm(x[:n], weight, bias), want[:n]), f"{n} rows"


def test_a_shape_it_has_not_learned_is_an_error():
    gemm = GemmRows(CANDIDATES, reference_rows=128, linear=split_linear)
    gemm.learn(torch.randn(24, 40))
    with pytest.raises(RuntimeError, match="has not seen"):
        gemm.rows(torch.randn(24, 40), torch.randn(24), 4)  # the same matrix with a bias is another key


def test_everything_agreeing_pads_nothing():
    gemm = GemmRows(CANDIDATES, reference_rows=128, linear=row_linear)
    weight = torch.randn(8, 16)
    gemm.learn(weight)
    assert all(gemm.rows(weight, None, n) == n for n in CANDIDATES + [3, 100])


@pytest.mark.gpu
def test_gpu_decode_batches_get_the_large_batch_bits():
    """cuBLAS at every decode batch size of qwen2.5-1.5b's projections, through GemmRows, equals
    the same rows of a 4,096-row batch bit for bit (without it the down projection differs at
    most sizes below 224: test output lists them)."""
    gemm = GemmRows(graph_buckets(256) + [384, 512, 768, 1024, 1536])
    for n, k, has_bias in ((2048, 1536, True), (1536, 1536, False), (17920, 1536, False), (1536, 8960, False)):
        weight = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        bias = torch.randn(n, device="cuda").bfloat16() if has_bias else None
        gemm.learn(weight, bias)
        x = torch.randn(4096, k, device="cuda").bfloat16()
        want = F.linear(x, weight, bias)
        padded = [m for m in graph_buckets(256) if gemm.rows(weight, bias, m) != m]
        print(f"{n} x {k}: padded at {padded}")
        for m in graph_buckets(256):
            assert torch.equal(gemm(x[:m], weight, bias), want[:m]), f"{n} x {k} at {m} rows"
