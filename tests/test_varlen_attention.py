"""The training attention kernel (kernels/varlen_attention.py) against its fp32 reference, output
and the gradients of q, k and v, at odd shapes: sequences of 1, 37 and 130 tokens (one past a
128-query tile), GQA groups of 3 with head_dim 48, and its agreement bit for bit with the
engine's paged decode and prefill kernels, which is what makes the trainer's logprobs the
engine's. The interpreter runs fp32 and fp16 on CPU, the GPU bf16 (marker gpu)."""
import pytest
import torch
import triton
import triton.language as tl

from fastazr.kernels import attention_math
from fastazr.kernels.paged_attention import (decode_rows, pack_block_tables, paged_decode_attention,
                                            paged_prefill_attention)
from fastazr.kernels.varlen_attention import varlen_attention
from fastazr.kernels.varlen_attention_reference import varlen_attention_reference

# Outputs: the fp32 result rounded once (half a unit in the last place at magnitudes <= 3).
# Gradients: P and dS meet the tensor cores in the input dtype, a few units in the last place.
TOLERANCE = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (8e-3, 8e-3)}
GRAD_TOLERANCE = {torch.float32: (5e-5, 5e-5), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}
# Share of outputs equal bit for bit between two kernels (measured in the interpreter, fp16:
# ~99.8%); rounding P before P.V, as flash attention does, gives ~70%.
EXACT = 0.99


def make(lengths, heads, kv_heads, head_dim, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    total = sum(lengths)
    # k and v as column views of one fused projection, as the decoder passes them
    qkv = torch.randn(total, (heads + 2 * kv_heads) * head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=1)
    q = q.reshape(total, heads, head_dim).contiguous()
    k, v = k.view(total, kv_heads, head_dim), v.view(total, kv_heads, head_dim)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    dout = torch.randn(total, heads, head_dim, generator=g).to(device, dtype)
    return q, k, v, cu, dout


def check(lengths, heads, kv_heads, head_dim, dtype, device):
    q, k, v, cu, dout = make(lengths, heads, kv_heads, head_dim, dtype, device)
    leaves = [x.detach().requires_grad_() for x in (q, k, v)]
    out = varlen_attention(*leaves, cu, max(lengths))
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    want = varlen_attention_reference(*ref_leaves, cu)
    want_grads = torch.autograd.grad(want, ref_leaves, dout.float())
    rtol, atol = TOLERANCE[dtype]
    torch.testing.assert_close(out.float(), want, rtol=rtol, atol=atol)
    if dtype != torch.float32:
        same = (out == want.to(dtype)).float().mean().item()
        assert same >= EXACT, f"only {same:.1%} of outputs are the fp32 result's rounding"
    rtol, atol = GRAD_TOLERANCE[dtype]
    for name, got, expected in zip("qkv", grads, want_grads):
        torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol, msg=lambda m: f"d{name}: {m}")


def paged_cache(lengths, k, v, cu, block_size=16):
    """The packed keys and values k, v [T, Hkv, D] (sequence b at rows cu[b]..) in a paged cache,
    each sequence's blocks in reverse order so that table lookups are exercised -> (k_cache,
    v_cache, flat tables, table starts, context lengths)."""
    blocks = [-(-n // block_size) for n in lengths]
    k_cache = k.new_zeros(sum(blocks), block_size, *k.shape[1:])
    v_cache = torch.zeros_like(k_cache)
    tables, at = [], sum(blocks)
    for n, start, count in zip(lengths, cu.tolist(), blocks):
        tables.append(list(range(at - count, at))[::-1])
        at -= count
        position = torch.arange(n, device=k.device)
        block = torch.tensor(tables[-1], device=k.device)[position // block_size]
        k_cache[block, position % block_size] = k[start:start + n]
        v_cache[block, position % block_size] = v[start:start + n]
    flat, starts = pack_block_tables(tables, k.device)
    return k_cache, v_cache, flat, starts, torch.tensor(lengths, dtype=torch.int32, device=k.device)


def check_engine_agreement(lengths, heads, kv_heads, head_dim, dtype, device, block_size=16):
    """The training forward, the engine's prefill over a paged cache of the same keys, and its
    decode of each sequence's last token: the same bits."""
    q, k, v, cu, _ = make(lengths, heads, kv_heads, head_dim, dtype, device, seed=1)
    out = varlen_attention(q, k, v, cu, max(lengths))
    k_cache, v_cache, flat, starts, ctx = paged_cache(lengths, k, v, cu, block_size)
    scale = head_dim ** -0.5
    prefill = paged_prefill_attention(q, k_cache, v_cache, flat, starts, cu, ctx, max(lengths), scale)
    last = (cu[1:] - 1).long()
    decode = paged_decode_attention(q[last].contiguous(), k_cache, v_cache, flat, starts, ctx, scale, num_splits=4)
    # decoding through the prefill kernel (EngineConfig.exact_logprobs): one query row a sequence
    one_each = torch.arange(len(lengths) + 1, dtype=torch.int32, device=device)
    rows = decode_rows(dtype)
    exact_decode = paged_prefill_attention(q[last].contiguous(), k_cache, v_cache, flat, starts, one_each, ctx, 1,
                                           scale, rows=rows)
    # the same, each sequence's key chunks spread over 3 programs and folded after
    split_decode = paged_prefill_attention(q[last].contiguous(), k_cache, v_cache, flat, starts, one_each, ctx, 1,
                                           scale, rows=rows, splits=3)
    assert torch.equal(split_decode, exact_decode), "chunks folded in a second kernel differ from one program's"
    if device == "cuda":  # same tiles, same instructions: the same bits, all of them
        assert torch.equal(prefill, out), "the engine's prefill differs from the training forward"
        assert torch.equal(exact_decode, out[last]), "decoding through the prefill tiles differs from training"
        # 16-bit row sums are fixed point (attention_math.row_sum): every tile height keeps the
        # bits; fp32's float sums keep them across the 64- and 128-row warpgroup tiles only
        for other in (32, 64, 128) if dtype != torch.float32 else (128,):
            got = paged_prefill_attention(q[last].contiguous(), k_cache, v_cache, flat, starts, one_each, ctx, 1,
                                          scale, rows=other, splits=1 + 3 * (other == 32))
            assert torch.equal(got, exact_decode), f"{other}-row tiles differ from {rows}-row ones"
    for name, engine, ours in (("prefill", prefill, out), ("decode", decode, out[last]),
                               ("decode through the prefill kernel", exact_decode, out[last])):
        if dtype == torch.float32:  # nothing rounds to fewer bits: only fp32 summation order differs
            torch.testing.assert_close(engine, ours, rtol=2e-5, atol=2e-5)
            continue
        same = (engine == ours).float().mean().item()
        assert same >= EXACT, f"the engine's {name} and the training forward agree in only {same:.1%} of outputs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(9, 3, 48), (4, 4, 32)])
def test_matches_reference(dtype, heads, kv_heads, head_dim):
    check([1, 37, 130], heads, kv_heads, head_dim, dtype, "cpu")


def test_agrees_with_the_engine_kernels(monkeypatch):
    # chunks of 64 keys: the 130-token sequence folds 3 (the shipped 512 would fold one here)
    monkeypatch.setattr(attention_math, "KEY_CHUNK", 64)
    check_engine_agreement([1, 37, 130], 9, 3, 48, torch.float16, "cpu")


def test_bad_inputs_name_the_problem():
    q = torch.zeros(4, 5, 32)
    kv = torch.zeros(4, 2, 32)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        varlen_attention(q, kv, kv, cu, 4)
    with pytest.raises(ValueError, match="int32"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, cu.long(), 4)
    with pytest.raises(ValueError, match="share a dtype"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv.half(), cu, 4)
    # each returned uninitialized memory (a max error of 3e18) or read past the tensors
    with pytest.raises(ValueError, match="max_seqlen is 0 but there are tokens"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, cu, 0)
    with pytest.raises(ValueError, match="max_seqlen must be an integer from 0 to T=4"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, cu, 5)
    with pytest.raises(ValueError, match="max_seqlen must be an integer"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, cu, 2.5)
    with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, cu[None], 4)
    with pytest.raises(ValueError, match="scale must be a finite number"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, cu, 4, float("nan"))
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        varlen_attention(torch.zeros(4, 4, 32), kv, kv, [0, 4], 4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_matches_reference_and_engine(dtype):
    check([1, 37, 130], 9, 3, 48, dtype, "cuda")
    # a Qwen2.5-1.5B layer's heads over AZR-like lengths
    check([700, 1, 1500, 333], 12, 2, 128, dtype, "cuda")
    check_engine_agreement([700, 1, 1500, 333], 12, 2, 128, dtype, "cuda")
    # SmolLM2's heads: G = 3 padded to 4, so a 16-row decode tile is 4 token slots, one of them used
    check_engine_agreement([700, 1, 1500, 333, 2400, 64, 900], 9, 3, 64, dtype, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,head_dim,lengths", [
    (12, 2, 128, [700, 1, 1500, 333, 2400, 64, 900] * 8),  # qwen2.5-1.5b
    (9, 3, 64, [700, 1, 1500, 333, 2400, 64, 900] * 8),  # SmolLM2
    (28, 4, 128, [300, 1200, 2000] * 8),  # qwen2.5-7b
])
def test_decode_tiles_of_every_height_give_the_training_bits(heads, kv_heads, head_dim, lengths, dtype):
    """Exact decodes in 16-, 32- and 64-row programs, one or four a sequence, against the training
    forward, at the scale where a float row sum shows: with one, 16- and 32-row tiles differed
    from the 64-row ones in ~3 outputs per million (H100), so this test's 0.8M a dtype in 16- and
    32-row tiles (1.2M in all) catch it where check_engine_agreement's ~10K outputs mostly would
    not. The same comparison ran on the H100 as a development script: 0 of 2.45M differ. The
    16-row tiles of the qwen models' 128-wide heads run in 2 warps (paged_attention._prefill_warps),
    SmolLM2's 64-wide ones in 2 where the grid holds 4 programs an SM (here 56 x 3 x 4 = 672 at 4
    programs a sequence, on a GPU of up to 168 SMs) and in 4 otherwise, as do the others."""
    q, k, v, cu, _ = make(lengths, heads, kv_heads, head_dim, dtype, "cuda", seed=1)
    out = varlen_attention(q, k, v, cu, max(lengths))
    k_cache, v_cache, flat, starts, ctx = paged_cache(lengths, k, v, cu)
    last = (cu[1:] - 1).long()
    one_each = torch.arange(len(lengths) + 1, dtype=torch.int32, device="cuda")
    want = out[last]
    for rows in (16, 32, 64):
        for splits in (1, 4):
            got = paged_prefill_attention(q[last].contiguous(), k_cache, v_cache, flat, starts, one_each, ctx, 1,
                                          head_dim ** -0.5, rows=rows, splits=splits)
            differ = int((got != want).sum())
            assert differ == 0, f"{rows} rows, {splits} programs: {differ} of {got.numel()} outputs differ"


@pytest.mark.parametrize("dq,dkdv", [
    (dict(BLOCK_M=64, BLOCK_N=32), dict(BLOCK_M=32, BLOCK_N=64, SPLIT=3)),
    (dict(BLOCK_M=32, BLOCK_N=32), dict(BLOCK_M=16, BLOCK_N=128, SPLIT=2)),  # 2 does not divide 3 groups: gcd 1
])
def test_backward_tilings_agree(monkeypatch, dq, dkdv):
    """Every backward tiling the launcher may be tuned to: the masked (diagonal) and unmasked loop
    bounds at tiles of other sizes, and dK/dV summed over programs that split a KV head's query
    heads, against the reference."""
    from fastazr.kernels import varlen_attention as module
    monkeypatch.setattr(module, "_DQ", dict(module._DQ, **dq))
    monkeypatch.setattr(module, "_DKDV", dict(module._DKDV, **dkdv))
    check([1, 37, 130, 200], 9, 3, 48, torch.float16, "cpu")  # 16-bit inputs take _DQ and _DKDV


def test_backward_tiles_that_do_not_nest_are_refused(monkeypatch):
    from fastazr.kernels import varlen_attention as module
    monkeypatch.setattr(module, "_DQ", dict(module._DQ, BLOCK_M=32, BLOCK_N=64))
    q, k, v, cu, dout = make([5], 2, 1, 16, torch.float16, "cpu")
    q.requires_grad_()
    with pytest.raises(ValueError, match="tiles must nest"):
        varlen_attention(q, k, v, cu, 5).backward(dout)


@triton.jit
def _row_sum_kernel(p_ptr, out_ptr, KEYS: tl.constexpr, ROWS: tl.constexpr, FIXED: tl.constexpr):
    r = tl.arange(0, ROWS)
    p = tl.load(p_ptr + r[:, None] * KEYS + tl.arange(0, KEYS)[None, :])
    tl.store(out_ptr + r, attention_math.row_sum(p, FIXED))


def test_fixed_point_row_sum_rounds_each_probability_and_never_overflows():
    """row_sum's fixed point: each p becomes a count of 2^-24 units, rounded to nearest below p =
    1/2 (a truncating sum would undercount l by up to 64 units a tile, a bias every query pays)
    and by fp32's ties-to-even from 1/2 up, where p x 2^24 is already a whole number; 64 keys of
    p = 1 (2^30, the largest tile sum) stay exact in int32. Against float64 a tile's error is at
    most 2^-25 a key below 1/2 and 2^-24 from it, plus the final fp32 rounding."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    p = torch.rand(16, 64, generator=g, dtype=torch.float64) ** 8  # many tiny probabilities, as a peaked row has
    p[0] = 1.0
    p[1] = 0.5 * 2.0 ** -24  # a tie: rounds up to one unit
    p[2] = 0.49 * 2.0 ** -24  # rounds to zero
    p[3] = 0.5 + 2.0 ** -24  # an odd whole number of units: ties-to-even adds one
    p = p.float()
    out = torch.empty(16, dtype=torch.float32, device=device)
    _row_sum_kernel[(1,)](p.to(device), out, KEYS=64, ROWS=16, FIXED=True)
    out = out.cpu().double()
    units = (p * 2.0 ** 24 + 0.5).trunc().double().sum(dim=1)  # the rule, in fp32 as the kernel computes it
    assert torch.equal(out, (units / 2.0 ** 24).float().double())
    assert out[0] == 64.0 and out[1] == 64 * 2.0 ** -24 and out[2] == 0.0
    assert out[3] == 64 * (0.5 + 2 * 2.0 ** -24)
    exact = p.double().sum(dim=1)
    per_key = torch.where(p.double() < 0.5, 2.0 ** -25, 2.0 ** -24).sum(dim=1)
    assert ((out - exact).abs() <= per_key + exact * 2.0 ** -24).all()
