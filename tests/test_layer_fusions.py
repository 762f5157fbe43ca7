"""The fused decoder-layer pieces the engine runs (Triton; the interpreter on CPU, the GPU with
marker gpu) against the torch layer code training runs: residual add + RMSNorm, rotary + KV-cache
write, SwiGLU, at a width, head count and head_dim that are no powers of two."""
import pytest
import torch

from fastazr.kernels.layer_fusions import add_rms_norm, rope_to_cache, swiglu_fused
from fastazr.model import ModelConfig
from fastazr.model.layers import apply_rope, rms_norm, rope_cos_sin, rope_inv_freq, swiglu

# Each kernel rounds where torch rounds, so only RMSNorm's sum order differs: one unit in the
# last place of the output dtype (fp32: ~1e-7 relative; fp16: 2^-10; bf16: 2^-7). The rotary
# must be bit for bit, on the GPU too: its launch turns off FP fusion, without which the
# rounded products and their sum became one fma.rn.bf16 and 18% of q and k differed by a bit.
TOLERANCE = {torch.float32: (1e-6, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
DTYPES = [torch.float32, torch.float16]


def run_all(device, dtype, tokens=5, hidden=72, heads=6, kv_heads=2, head_dim=12, inter=100):
    g = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    rtol, atol = TOLERANCE[dtype]
    x, delta, weight = rand(tokens, hidden), rand(tokens, hidden), rand(hidden)
    expected_sum = x + delta
    normed = add_rms_norm(x, weight, 1e-6, residual=delta)
    torch.testing.assert_close(x, expected_sum, rtol=0, atol=0)  # the residual stream, in place
    torch.testing.assert_close(normed, rms_norm(expected_sum, weight, 1e-6), rtol=rtol, atol=atol)
    torch.testing.assert_close(add_rms_norm(delta, weight, 1e-6), rms_norm(delta, weight, 1e-6), rtol=rtol, atol=atol)

    gate_up = rand(tokens, 2 * inter)
    torch.testing.assert_close(swiglu_fused(gate_up), swiglu(gate_up), rtol=rtol, atol=atol)

    config = ModelConfig(architecture="qwen2", vocab_size=11, hidden_size=heads * head_dim, intermediate_size=8,
                         num_layers=1, num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=4096)
    positions = torch.tensor([0, 3, 17, 400, 2999][:tokens], device=device)
    cos, sin = rope_cos_sin(rope_inv_freq(config, device=device), positions, dtype)
    qkv = rand(tokens, (heads + 2 * kv_heads) * head_dim)
    block_size, blocks = 4, 7
    k_cache = torch.full((blocks, block_size, kv_heads, head_dim), 7.0, device=device, dtype=dtype)
    v_cache = k_cache.clone()
    slots = torch.tensor([5, 0, 27, 9, 14][:tokens], device=device, dtype=torch.int32)
    q = rope_to_cache(qkv, cos, sin, slots, k_cache, v_cache, heads, kv_heads)
    want_q, want_k, want_v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    torch.testing.assert_close(q, apply_rope(want_q.view(tokens, heads, head_dim), cos, sin), rtol=0, atol=0)
    flat_k, flat_v = k_cache.view(-1, kv_heads, head_dim), v_cache.view(-1, kv_heads, head_dim)
    torch.testing.assert_close(flat_k[slots.long()], apply_rope(want_k.view(tokens, kv_heads, head_dim), cos, sin),
                               rtol=0, atol=0)
    torch.testing.assert_close(flat_v[slots.long()], want_v.view(tokens, kv_heads, head_dim), rtol=0, atol=0)
    untouched = torch.ones(flat_k.shape[0], dtype=torch.bool, device=device)
    untouched[slots.long()] = False
    assert (flat_k[untouched] == 7).all() and (flat_v[untouched] == 7).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_fusions_match_the_layer_code(dtype):
    run_all("cpu", dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_fusions_match_the_layer_code(dtype):
    run_all("cuda", dtype)
    run_all("cuda", dtype, tokens=5, hidden=1536, heads=12, kv_heads=2, head_dim=128, inter=8960)
