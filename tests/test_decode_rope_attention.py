"""paged_decode_rope_attention, the rotary + cache write fused into the exact decode attention
(Triton; the interpreter on CPU, the GPU with marker gpu), against the two launches it replaces
(rope_to_cache, then paged_prefill_attention): the same output and cache bits, at a GQA group and
a head_dim that are no powers of two, contexts that end mid-block, exactly on a key chunk's end
and one past it, a CUDA-graph padding row (context 0, a scratch slot), sequences whose chunks are
spread over several programs (only the program holding the new key may write it, and it must
write before any of its threads reads the cache), and qkv rows that are a view of wider rows; and
against the trainer's rotary and the plain attention reference in values."""
import builtins

import pytest
import torch
import triton
import triton.language as tl
import triton.runtime.interpreter as interpreter

from fastazr.kernels import attention_math
from fastazr.kernels.layer_fusions import rope_to_cache
from fastazr.kernels.paged_attention import (decode_rows, pack_block_tables, paged_decode_rope_attention,
                                             paged_prefill_attention)
from fastazr.kernels.paged_attention_reference import decode_rope_attention_reference
from fastazr.model import ModelConfig
from fastazr.model.layers import rope_cos_sin, rope_inv_freq

from test_paged_attention import TOLERANCE, make_cache

# a new token that is its context's first key; the last key of a chunk (KEY_CHUNK 64 here); the
# first of the second chunk; 4 chunks; a padding row; 3 chunks, the last partial; mid-block
CONTEXTS = [1, 64, 65, 193, 0, 130, 23]


def decode_inputs(contexts, heads, kv_heads, head_dim, block_size, dtype, device, wider=0, stalled=()):
    """Caches (make_cache's: garbage in unowned slots), block tables, and a new token a sequence:
    qkv rows (a view of rows `wider` columns wider when asked), cos and sin of its position
    ctx - 1, and its slot; a padding row writes to a block no sequence owns, as a graph's does,
    and so do the `stalled` rows: a sequence at its last position, which a decode pass recomputes
    into that scratch slot while its context (and the key cached at ctx - 1) stays
    (decode_advance)."""
    k, v, tables = make_cache(contexts, heads, kv_heads, head_dim, block_size, dtype, device, seed=5)
    g = torch.Generator().manual_seed(6)
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(len(contexts), width + wider, generator=g).to(device, dtype)[:, :width]
    owned = {b for table in tables for b in table}
    scratch = next(b for b in range(k.shape[0]) if b not in owned) * block_size
    slots = torch.tensor([table[(c - 1) // block_size] * block_size + (c - 1) % block_size
                          if c and i not in stalled else scratch
                          for i, (table, c) in enumerate(zip(tables, contexts))], dtype=torch.int32, device=device)
    config = ModelConfig(architecture="qwen2", vocab_size=11, hidden_size=heads * head_dim, intermediate_size=8,
                         num_layers=1, num_heads=heads, num_kv_heads=kv_heads, max_position_embeddings=4096)
    # tables of every position, as the engine keeps them (a few rows past the longest context)
    cos, sin = rope_cos_sin(rope_inv_freq(config, device=device), torch.arange(max(contexts) + 3, device=device),
                            dtype)
    return k, v, tables, qkv, cos, sin, slots


def check_fused(contexts, heads, kv_heads, head_dim, block_size, dtype, device, splits, wider=0, stalled=()):
    k, v, tables, qkv, cos, sin, slots = decode_inputs(contexts, heads, kv_heads, head_dim, block_size, dtype,
                                                       device, wider, stalled)
    flat, starts = pack_block_tables(tables, device)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    one_each = torch.arange(len(contexts) + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    k_two, v_two = k.clone(), v.clone()
    rows_cos, rows_sin = (table[(ctx.long() - 1).clamp(min=0)] for table in (cos, sin))
    q = rope_to_cache(qkv, rows_cos, rows_sin, slots, k_two, v_two, heads, kv_heads)
    want = paged_prefill_attention(q, k_two, v_two, flat, starts, one_each, ctx, 1, scale, rows=decode_rows(dtype),
                                   splits=splits)
    got = paged_decode_rope_attention(qkv, cos, sin, slots, k, v, flat, starts, ctx, heads, scale,
                                      rows=decode_rows(dtype), splits=splits)
    # the scratch block takes several rows' keys in any order: its bytes are garbage by design
    kept = [b for b in range(k.shape[0]) if not stalled or b != int(slots[stalled[0]]) // block_size]
    assert torch.equal(k[kept], k_two[kept]) and torch.equal(v[kept], v_two[kept]), \
        "the fused kernel wrote other cache bits"
    assert torch.equal(got, want), (f"{(got != want).sum().item()} of {got.numel()} outputs differ from "
                                    "rope_to_cache + paged_prefill_attention")
    live = [i for i, c in enumerate(contexts) if c]
    k_ref, v_ref = k.clone(), v.clone()
    ref = decode_rope_attention_reference(qkv, rows_cos, rows_sin, slots, k_ref, v_ref, contexts, tables, heads, scale)
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(got[live].float(), ref[live].float(), rtol=rtol, atol=atol)
    # the rotary is the trainer's bit for bit (rope_math rounds where apply_rope does)
    assert torch.equal(k[kept], k_ref[kept]) and torch.equal(v[kept], v_ref[kept])
    assert not got[[i for i, c in enumerate(contexts) if not c]].any(), "a padding row attended"


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_decode_equals_rope_then_attention(monkeypatch, dtype, splits):
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    check_fused(CONTEXTS, 9, 3, 48, 16, dtype, "cpu", splits)


def test_fused_rope_decode_small_blocks_and_strided_rows(monkeypatch):
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    check_fused([37, 64, 3, 129], 12, 2, 64, 4, torch.float32, "cpu", 2, wider=24)


@pytest.mark.parametrize("splits", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_rope_decode_of_a_stalled_row(monkeypatch, dtype, splits):
    """A row whose slot is the scratch slot while its context is not 0 attends to the key cached
    at its context's last position, not to the token it rotates: what the two launches do (the
    rotated key goes to scratch, the attention reads the cache)."""
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    check_fused([5, 64, 65, 129, 23, 0], 9, 3, 48, 16, dtype, "cpu", splits, stalled=(0, 2, 3))


@triton.jit
def _order_kernel(counter_ptr, order_ptr):
    tl.store(order_ptr + tl.program_id(0), tl.atomic_add(counter_ptr, 1))


def test_fused_rope_decode_with_programs_in_reverse_order(monkeypatch):
    """The interpreter runs a grid's programs one by one in order, so split 0 of a sequence runs
    before its others and a wrong writer (say split 0 writing a key another split reads) would
    still find the key written. Walked backwards (the interpreter iterates the grid with its
    module's `range`), a program that reads the new key before its writer ran shows. A GPU runs
    them in any order at once; there the barrier after the write matters too, which no CPU test
    can see."""
    monkeypatch.setattr(interpreter, "range", lambda *a: list(reversed(builtins.range(*a))), raising=False)
    counter, order = torch.zeros(1, dtype=torch.int32), torch.zeros(4, dtype=torch.int32)
    _order_kernel[(4,)](counter, order)
    assert order.tolist() == [3, 2, 1, 0], "the interpreter no longer walks the grid with its module's range"
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    for splits in (2, 3):
        check_fused(CONTEXTS, 9, 3, 48, 16, torch.float32, "cpu", splits)


def test_fused_rope_decode_names_bad_shapes():
    k, v, tables, qkv, cos, sin, slots = decode_inputs([5, 9], 9, 3, 48, 16, torch.float32, "cpu")
    flat, starts = pack_block_tables(tables, "cpu")
    ctx = torch.tensor([5, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"\(heads \+ 2 kv_heads\) head_dim\] = \[B, 672\]"):
        paged_decode_rope_attention(qkv, cos, sin, slots, k, v, flat, starts, ctx, 8, 1.0)
    with pytest.raises(ValueError, match="must have 2 rows"):
        paged_decode_rope_attention(qkv, cos, sin, slots[:1], k, v, flat, starts, ctx, 9, 1.0)
    with pytest.raises(ValueError, match=r"must be tables \[positions, 48\]"):
        paged_decode_rope_attention(qkv, cos[:, :40], sin[:, :40], slots, k, v, flat, starts, ctx, 9, 1.0)
    with pytest.raises(ValueError, match="must be in qkv's dtype"):
        paged_decode_rope_attention(qkv.half(), cos, sin, slots, k.half(), v.half(), flat, starts, ctx, 9, 1.0)
    with pytest.raises(ValueError, match="contiguous cos"):
        paged_decode_rope_attention(qkv, cos.t().contiguous().t(), sin, slots, k, v, flat, starts, ctx, 9, 1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_fused_rope_decode(monkeypatch, dtype):
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    for splits in (1, 2, 4):
        check_fused(CONTEXTS, 9, 3, 64, 16, dtype, "cuda", splits)
        check_fused(CONTEXTS, 12, 2, 128, 16, dtype, "cuda", splits, wider=8)
        check_fused([5, 64, 65, 129, 23, 0], 9, 3, 64, 16, dtype, "cuda", splits, stalled=(0, 2, 3))
