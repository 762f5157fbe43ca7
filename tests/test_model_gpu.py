"""The model on a CUDA device (marker gpu; run through the device tool): every attention
backend the GPU has against a naive fp32 reference and against each other, in bf16."""

import pytest
import torch

from fastazr.model import available_backends, load, pack, save_hf
from fastazr.model.attention import varlen_causal_attention
from model_helpers import naive_attention

pytestmark = pytest.mark.gpu

# bf16 inputs and outputs (8 mantissa bits): one rounding of O(1) values is ~4e-3 relative.
BF16_ATOL, BF16_RTOL = 2e-2, 2e-2
LENGTHS = [1, 300, 1029, 77, 2000]


@pytest.mark.parametrize("heads,kv_heads,dim", [(12, 2, 128), (14, 2, 64), (28, 4, 128)])
def test_every_backend_matches_naive_in_bf16(heads, kv_heads, dim):
    device = torch.device("cuda")
    backends = available_backends(device, torch.bfloat16)
    assert "torch_varlen" in backends or "flash_attn" in backends, backends
    total = sum(LENGTHS)
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q = (torch.randn(total, heads, dim, device=device, generator=g) * 2).bfloat16()
    k = (torch.randn(total, kv_heads, dim, device=device, generator=g) * 2).bfloat16()
    v = torch.randn(total, kv_heads, dim, device=device, generator=g).bfloat16()
    expected = naive_attention(q, k, v, cu)
    for backend in backends:
        got = varlen_causal_attention(q, k, v, cu, max(LENGTHS), backend).float()
        torch.testing.assert_close(got, expected, atol=BF16_ATOL, rtol=BF16_RTOL, msg=backend)


def test_backends_agree_through_the_whole_model():
    """24 bf16 layers compound rounding, so no backend matches fp32 tightly; each must be as
    close to the fp32 model as SDPA in bf16 is."""
    model, _ = load("qwen2.5-0.5b", device="cuda", seed=3)
    p = pack([torch.randint(0, 151936, (n,)).tolist() for n in LENGTHS], device="cuda")
    with torch.no_grad():
        exact = model.float()
        exact.attention = "sdpa"
        reference = exact(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen)
        model = exact.bfloat16()
        errors = {}
        for backend in available_backends(model.device, model.dtype):
            model.attention = backend
            hidden = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen).float()
            errors[backend] = ((hidden - reference).abs().mean() / reference.abs().mean()).item()
    print("mean relative error vs fp32:", errors)
    assert all(e < 0.05 for e in errors.values()), errors
    assert all(e <= 1.5 * errors["sdpa"] for e in errors.values()), errors


def test_backward_through_the_fast_backend_with_checkpointing():
    model, _ = load("qwen2.5-0.5b", device="cuda", seed=4)
    model.train()
    p = pack([torch.randint(0, 151936, (n,)).tolist() for n in (700, 333)], device="cuda")
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        hidden = model(p.input_ids, p.position_ids, p.cu_seqlens, p.max_seqlen)
        (hidden.float().pow(2).mean()).backward()
        grads.append(model.layers[0].attn.qkv_weight.grad.float().clone())
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=2e-2)


def test_checkpoint_round_trip_on_cuda(tmp_path):
    model, _ = load("qwen2.5-0.5b", device="cuda", seed=5)
    save_hf(model, tmp_path / "q")
    again, _ = load(tmp_path / "q", device="cuda")
    assert again.device.type == "cuda" and again.dtype == torch.bfloat16
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name
