"""The paged attention kernels (Triton; the interpreter on CPU, the GPU with marker gpu) against
paged_attention_reference: scattered, shuffled blocks, contexts that end mid-block and mid-tile,
GQA groups that are not powers of two, a head_dim that is not one, split-K with empty splits,
CUDA-graph padding rows, prefill chunks that continue a cached prefix, and exact decodes whose
key chunks are spread over programs (KEY_CHUNK made 64 on CPU, so a few tokens span chunks); and
the rollout engine's batched CPU attention (fastazr/rollout/cpu_attention.py) at the same shapes."""
import pytest
import torch

from fastazr.kernels import attention_math
from fastazr.kernels.paged_attention import (decode_rows, decode_splits, pack_block_tables, paged_decode_attention,
                                             paged_prefill_attention)
from fastazr.kernels.paged_attention_reference import paged_attention_reference
from fastazr.rollout.cpu_attention import StepAttention, context_mask, decode_attention, padded_tables

# fp32 dots run at full precision ("ieee"); only the summation order differs from the reference.
# fp16/bf16: the P.V product is fp32-accurate (attention_math.py), so the error is the output's
# own rounding, half a unit in the last place at magnitudes <= 3 (fp16 2^-11, bf16 2^-8 relative).
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (8e-3, 8e-3)}
# What makes decode, prefill and training agree: the fp16/bf16 outputs are the fp32 reference's
# own rounding bit for bit but for ~0.2% (interpreter, fp16: 99.8%; with P rounded to fp16 before
# P.V, as flash attention does, 70%).
EXACT = 0.99


def assert_close_and_rounded_alike(out, ref, dtype):
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=rtol, atol=atol)
    if dtype != torch.float32:
        same = (out == ref).float().mean().item()
        assert same >= EXACT, f"only {same:.1%} of outputs are the reference's rounding"
# (heads, kv_heads, head_dim): G = 3 with a non-power-of-two head_dim; G = 6 (Qwen2.5-1.5B); MHA
SHAPES = [(9, 3, 48), (12, 2, 64), (4, 4, 32)]


def make_cache(contexts, heads, kv_heads, head_dim, block_size, dtype, device, seed=0):
    """Caches with every sequence's blocks drawn at random (not in order) from a shared pool, and
    garbage (huge values) in every slot no sequence owns: a read past a context shows at once."""
    g = torch.Generator().manual_seed(seed)
    needed = [-(-c // block_size) for c in contexts]
    num_blocks = sum(needed) + 5
    order = torch.randperm(num_blocks, generator=g).tolist()
    tables, at = [], 0
    for n in needed:
        tables.append(order[at:at + n])
        at += n
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k = torch.full(shape, 1e4)
    v = torch.full(shape, -1e4)
    for table, ctx in zip(tables, contexts):
        for p in range(ctx):
            k[table[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=g)
            v[table[p // block_size], p % block_size] = torch.randn(kv_heads, head_dim, generator=g)
    return k.to(device, dtype), v.to(device, dtype), tables


def assert_decodes(out, q, k, v, tables, contexts, scale, dtype):
    """Rows with context match the reference; padding rows (context 0) are zeros."""
    live = [i for i, c in enumerate(contexts) if c > 0]
    ref = paged_attention_reference(q[live], k, v, [1] * len(live), [contexts[i] for i in live],
                                    [tables[i] for i in live], scale)
    assert_close_and_rounded_alike(out[live], ref, dtype)
    dead = [i for i, c in enumerate(contexts) if c == 0]
    assert torch.equal(out[dead], torch.zeros_like(out[dead]))


def check_decode(contexts, heads, kv_heads, head_dim, block_size, dtype, splits, device):
    k, v, tables = make_cache(contexts, heads, kv_heads, head_dim, block_size, dtype, device)
    q = torch.randn(len(contexts), heads, head_dim).to(device, dtype)
    flat, starts = pack_block_tables(tables, device)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, k, v, flat, starts, ctx, scale, num_splits=splits)
    assert_decodes(out, q, k, v, tables, contexts, scale, dtype)


def check_prefill(q_lens, contexts, heads, kv_heads, head_dim, block_size, dtype, device):
    k, v, tables = make_cache(contexts, heads, kv_heads, head_dim, block_size, dtype, device, seed=1)
    q = torch.randn(sum(q_lens), heads, head_dim).to(device, dtype)
    flat, starts = pack_block_tables(tables, device)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    out = paged_prefill_attention(q, k, v, flat, starts, cu, ctx, max(q_lens), scale)
    ref = paged_attention_reference(q, k, v, q_lens, contexts, tables, scale)
    assert_close_and_rounded_alike(out, ref, dtype)


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(heads, kv_heads, head_dim, dtype):
    # 1 token; one block exactly; mid-block; mid-tile past one 64-token tile; three tiles + 1
    check_decode([1, 16, 23, 100, 193], heads, kv_heads, head_dim, 16, dtype, 1, "cpu")


@pytest.mark.parametrize("splits", [2, 8])
def test_decode_split_k(splits):
    # splits of 193 tokens: ragged last split; 5 tokens over 8 splits: seven empty splits; a
    # padding row with no context at all
    check_decode([193, 5, 0, 70], 9, 3, 48, 16, torch.float32, splits, "cpu")


def test_decode_small_blocks_cross_pages_within_a_tile():
    check_decode([37, 64, 3], 12, 2, 64, 4, torch.float32, 2, "cpu")


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(heads, kv_heads, head_dim, dtype):
    # a fresh prompt; a chunk after a 30-token cached prefix; a single token (decode-like); a
    # chunk longer than one query tile
    check_prefill([21, 9, 1, 150], [21, 39, 77, 150], heads, kv_heads, head_dim, 16, dtype, "cpu")


def test_prefill_small_blocks():
    check_prefill([5, 33], [18, 33], 9, 3, 48, 4, torch.float32, "cpu")


def check_split_decode(contexts, heads, kv_heads, head_dim, dtype, device, splits=(2, 3, 4)):
    """Decodes through the prefill kernel's tiles, each sequence's chunks in one program or
    spread over several: the same bits; and the reference's values."""
    k, v, tables = make_cache(contexts, heads, kv_heads, head_dim, 16, dtype, device, seed=2)
    q = torch.randn(len(contexts), heads, head_dim).to(device, dtype)
    flat, starts = pack_block_tables(tables, device)
    ctx = torch.tensor(contexts, dtype=torch.int32, device=device)
    one_each = torch.arange(len(contexts) + 1, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5

    def decode(n, max_context=None):
        return paged_prefill_attention(q, k, v, flat, starts, one_each, ctx, 1, scale, rows=decode_rows(dtype),
                                       splits=n, max_context=max_context)

    whole = decode(1)
    for n in splits:
        assert torch.equal(decode(n), whole), f"{n} programs a sequence fold to other bits than one"
    # a state buffer sized for longer contexts than there are (what a CUDA graph holds)
    assert torch.equal(decode(splits[0], max_context=4 * max(contexts)), whole)
    assert_decodes(whole, q, k, v, tables, contexts, scale, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_decode_folds_chunks_to_the_same_bits(monkeypatch, dtype):
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    # within one chunk; exactly one; one key into the second; 4 chunks (more than 3 programs take
    # one each); a padding row; 3 chunks, the last partial
    check_split_decode([1, 64, 65, 193, 0, 130], 9, 3, 48, dtype, "cpu")


@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_step_attention_matches_reference(heads, kv_heads, head_dim, dtype):
    # decodes (1 token, a full block, mid-block, 193) around prefill chunks: a fresh prompt, a
    # chunk after a cached prefix; unowned slots hold +-1e4, so a padded key that leaks shows
    q_lens = [1, 21, 1, 9, 1, 1]
    contexts = [1, 21, 16, 39, 23, 193]
    k, v, tables = make_cache(contexts, heads, kv_heads, head_dim, 16, dtype, "cpu", seed=3)
    q = torch.randn(sum(q_lens), heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    out = StepAttention(q_lens, contexts, tables, 16, scale, q.device)(q, k, v)
    ref = paged_attention_reference(q, k, v, q_lens, contexts, tables, scale)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])
    # decodes only, as in a decode round: tables padded to a later pass's contexts, masked to this one's
    contexts = [37, 64, 3, 100]
    k, v, tables = make_cache([c + 5 for c in contexts], heads, kv_heads, head_dim, 4, dtype, "cpu", seed=4)
    q = torch.randn(len(contexts), heads, head_dim).to(dtype)
    padded = padded_tables(tables, [c + 5 for c in contexts], 4, q.device)
    out = decode_attention(q, k, v, padded, context_mask(torch.tensor(contexts), padded.shape[1] * 4), scale)
    ref = paged_attention_reference(q, k, v, [1] * len(contexts), contexts, tables, scale)
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOLERANCE[dtype][0], atol=TOLERANCE[dtype][1])


def test_shape_errors_name_the_problem():
    k = torch.zeros(4, 16, 2, 64)
    q = torch.zeros(1, 5, 64)
    flat, starts = pack_block_tables([[0]], "cpu")
    ctx = torch.ones(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        paged_decode_attention(q, k, k, flat, starts, ctx, 1.0)
    with pytest.raises(ValueError, match="power of two"):
        paged_decode_attention(torch.zeros(1, 4, 64), k, k, flat, starts, ctx, 1.0, num_splits=3)
    cu = torch.tensor([0, 2], dtype=torch.int32)
    with pytest.raises(ValueError, match="max_q_len"):
        paged_prefill_attention(torch.zeros(2, 4, 64), k, k, flat, starts, cu, ctx, 2, 1.0, splits=2)


def test_decode_splits_cover_the_gpu():
    assert decode_splits(256, 2, 132) == 1
    assert decode_splits(1, 2, 132) == 32
    assert decode_splits(16, 2, 132) == 16


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_decode_and_prefill(dtype):
    for splits in (1, 4, 32):
        check_decode([1, 16, 23, 100, 193, 0, 1000], 12, 2, 128, 16, dtype, splits, "cuda")
    check_prefill([21, 9, 1, 150, 700], [21, 39, 77, 150, 1000], 12, 2, 128, 16, dtype, "cuda")
    check_prefill([3, 64], [40, 64], 14, 2, 64, 16, dtype, "cuda")
    # KEY_CHUNK as shipped: 1 to 6 chunks a sequence
    check_split_decode([1, 511, 512, 513, 0, 1500, 3000], 12, 2, 128, dtype, "cuda", splits=(2, 4, 32))
