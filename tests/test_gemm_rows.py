"""GemmRows (fastazr/rollout/gemm_rows.py): the row counts it pads projections to, against a
stand-in GEMM whose bits change at chosen row counts (CPU), and on the GPU against cuBLAS itself
at the decode batch sizes of qwen2.5-1.5b's projections; and the runner's like check of the
fused gate_up + SwiGLU (runner.unfused_rows)."""
import pytest
import torch
import torch.nn.functional as F

from fastazr.kernels.decode_linear import decode_linear, decode_linear_rows
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


def test_a_fast_gemm_takes_only_the_row_counts_where_it_agrees():
    calls = []

    def fast(x, weight, bias=None):
        calls.append(x.shape[0])
        out = row_linear(x, weight, bias)
        return out + 1e-3 if x.shape[0] == 8 else out  # wrong bits at 8 rows

    gemm = GemmRows(CANDIDATES, reference_rows=128, linear=split_linear, fast=fast, fast_rows=lambda weight: 32)
    weight, bias = torch.randn(24, 40), torch.randn(24)
    gemm.learn(weight, bias)
    x = torch.randn(128, 40)
    want = row_linear(x, weight, bias)
    for n in CANDIDATES + [40, 100]:
        calls.clear()
        assert torch.equal(gemm(x[:n], weight, bias), want[:n]), f"{n} rows"
        # fast at the candidates up to its limit (32) where it agrees (not 8, which the
        # stand-in linear computes as it is); 48 pads through linear, 40 and 100 are no candidates
        assert bool(calls) == (n in (1, 2, 4, 16, 32)), f"{n} rows: fast called {calls}"


def test_the_fused_mlp_check_keeps_apart_the_row_counts_whose_bits_differ(monkeypatch):
    """runner.unfused_rows runs the fused gate_up + SwiGLU at every candidate that fused_mlp would
    fuse and reports those where it differs from F.linear + the SwiGLU kernel at the reference
    batch; a candidate fused_mlp leaves alone (past 256 rows here) is not tried."""
    from fastazr.kernels.layer_fusions import swiglu_fused
    from fastazr.rollout import runner

    tried = []

    def fused(x, weight):
        tried.append(x.shape[0])
        out = swiglu_fused(F.linear(x, weight))
        return out + 1 if x.shape[0] == 16 else out  # other bits at 16 rows

    monkeypatch.setattr(runner, "swiglu_linear", fused)
    weight = torch.randn(48, 40).half()  # gate and up of 24 columns; 16-bit: fused at decode sizes
    assert runner.unfused_rows(weight, [1, 8, 16, 64, 256, 512], reference_rows=600) == {16}
    assert tried == [1, 8, 16, 64, 256]


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [
    ((2048, 1536, True), (1536, 1536, False), (17920, 1536, False), (1536, 8960, False)),  # qwen2.5-1.5b
    ((960, 576, False), (576, 576, False), (3072, 576, False), (576, 1536, False)),  # SmolLM2-135M
])
def test_gpu_decode_batches_get_the_large_batch_bits(shapes):
    """cuBLAS, or the engine's decode_linear where GemmRows takes it, at every decode batch size
    of a model's projections equals the same rows of a 4,096-row batch bit for bit (without
    GemmRows qwen2.5-1.5b's down projection differs at most sizes below 224: test output lists
    them). SmolLM2's projections take decode_linear at every decode batch size up to their limit."""
    gemm = GemmRows(graph_buckets(256) + [384, 512, 768, 1024, 1536], fast=decode_linear, fast_rows=decode_linear_rows)
    for n, k, has_bias in shapes:
        weight = (torch.randn(n, k, device="cuda") * 0.02).bfloat16()
        bias = torch.randn(n, device="cuda").bfloat16() if has_bias else None
        gemm.learn(weight, bias)
        x = torch.randn(4096, k, device="cuda").bfloat16()
        want = F.linear(x, weight, bias)
        padded = [m for m in graph_buckets(256) if gemm.rows(weight, bias, m) != m]
        fast = [m for m in gemm.candidates if gemm.takes_fast(weight, bias, m)]
        print(f"{n} x {k}: padded at {padded}, decode_linear at {fast}")
        assert fast == [m for m in gemm.candidates if m <= decode_linear_rows(weight)]
        for m in graph_buckets(256):
            assert torch.equal(gemm(x[:m], weight, bias), want[:m]), f"{n} x {k} at {m} rows"
