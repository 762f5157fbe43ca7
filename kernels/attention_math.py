"""The online-softmax step every attention kernel of fastazr takes: the engine's paged decode and
prefill kernels (paged_attention.py) and the training forward (varlen_attention.py).

Why one step, with an fp32-accurate P.V: the trainer's recomputation of a token's logprob must
be the engine's, and in bf16 a single differing bit anywhere grows over 30 layers into mean
|delta logprob| ~2e-2 (SmolLM2). Flash attention rounds the probabilities P to bf16 before the
P.V product, so its output depends on the running max a tiling happened to see: 61% of its
outputs are the fp32 result's rounding (bench_attention.py). Here P is split into a bf16 high part
and the bf16 remainder, two dots that carry 16 significant bits: 99.7% are. Kernels whose tiles take
the same keys in the same order (64-key tiles from key 0, in KEY_CHUNK chunks) then agree on every
bit; the split-K decode kernel, whose splits cut the keys elsewhere, differed in ~0.3% (before the
fixed-point sum below; not measured since). Cost: a second P.V dot, free in memory-bound decode,
~1.3x the training attention's time. fp32 inputs take a single full-precision ("ieee") dot instead.

With 16-bit inputs the row sum of P is taken in fixed point (row_sum), where addition is exact,
so l does not depend on the order in which a tile's warps reduce it. A float sum's order follows
the tile's layout: 16- and 32-row tiles (mma.sync) rounded l differently from the 64-row
warpgroup ones, which held the engine's exact decodes to 64-row programs holding one token's G
heads (4x the softmax work of 16 rows at G = 6). With the fixed-point sum, 16-, 32- and 64-row
decode programs gave the training forward's bits in every case tried (H100, bf16 and fp16,
qwen2.5-1.5b, SmolLM2 and qwen2.5-7b heads, 1 or 4 programs a sequence: 36 cases, 0 of 2.45M
outputs differ).

Keys are folded in chunks of KEY_CHUNK positions from position 0: each chunk's state starts
empty, and the chunks' states are merged in order (fold). A kernel may compute the chunks of one
query row in one program or in parallel programs whose states a second kernel folds: the bits
are the same. That is what lets the engine split a long context over the GPU at small batch and
still round like the trainer, which walks the chunks in one program. Cost to the trainer: a
second fp32 accumulator and one merge per chunk."""

import triton
import triton.language as tl

# Keys per chunk, a multiple of every kernel's 64-key tile. 512: the trainer's forward merges
# once per 8 key tiles; a decode of 2,000 tokens splits into 4 programs.
KEY_CHUNK = 512


@triton.jit
def empty_state(ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(m, l, acc) of rows that have seen no key."""
    return (tl.full([ROWS], float("-inf"), tl.float32), tl.zeros([ROWS], tl.float32),
            tl.zeros([ROWS, BLOCK_D], tl.float32))


@triton.jit
def row_sum(p, FIXED: tl.constexpr):
    """Sum over keys of probabilities p [R, N] in [0, 1]. FIXED sums them as integer multiples of
    2^-24: exact in int32 for N <= 64, so every reduction order gives the same bits. Each p is
    rounded to the nearest unit below 1/2 (fp32's x + 0.5 can round the float just below half a
    unit up: 2^-49 more error); from 1/2 up, p x 2^24 is already whole and x + 0.5 rounds its
    tie to even, so an odd count gains a unit. What it costs in accuracy: a key's p moves by at
    most 2^-25 (2^-24 from 1/2 up), against l >= 1 (the running max's own key contributes 1): at
    most n_keys x 2^-25 relative, 2^-10 at 32K keys were every tiny p to round the same way
    (keys ~17 nats below the max, all of them), ~sqrt(n_keys) x 2^-26 when the roundings
    scatter; the bf16 output's own rounding is up to 2^-8 of itself, as is a bf16 P's (flash
    attention's) of each p. What it costs in time: a multiply, add and convert a score; the
    training forward ran as fast (0.59-0.64 ms at 16K tokens of qwen2.5-1.5b heads on the H100),
    its forward + backward went 1.59 -> 1.70-1.76 ms (unexplained: the backward does not take
    the sum), the update 0.493 -> 0.489 MFU (bench_update.py, one run each)."""
    if FIXED:
        tl.static_assert(p.shape[1] <= 64, "64 keys x 2^24 = 2^30 < 2^31 (128 keys of p = 1 overflow)")
        return tl.sum((p * 16777216.0 + 0.5).to(tl.int32), axis=1).to(tl.float32) * (1.0 / 16777216.0)
    return tl.sum(p, axis=1)


@triton.jit
def softmax_step(q, k, v, visible, m, l, acc, qk_scale, PRECISION: tl.constexpr, SPLIT_P: tl.constexpr):
    """Fold keys k and values v [N, D] into the running state (m, l [R], acc [R, D], log2
    domain) of score rows q [R, D]; `visible` [R, N] masks scores; qk_scale includes log2(e)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    # a row that has seen only masked keys keeps m = -inf: subtract 0 so exp2 gives 0, not NaN
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m - m_safe)
    l = l * alpha + row_sum(p, SPLIT_P)
    acc = acc * alpha[:, None]
    p_high = p.to(v.dtype)
    acc = tl.dot(p_high, v, acc, input_precision=PRECISION)
    if SPLIT_P:
        acc = tl.dot((p - p_high.to(tl.float32)).to(v.dtype), v, acc, input_precision=PRECISION)
    return m_new, l, acc


@triton.jit
def fold(m, l, acc, m_chunk, l_chunk, acc_chunk):
    """The state (m, l [R], acc [R, D]) followed by a chunk's state. Folding a chunk into the
    empty state gives the chunk's state bit for bit, and folding a chunk of masked keys changes
    nothing, so every way of cutting a row's keys into the same chunks folds to the same bits."""
    m_new = tl.maximum(m, m_chunk)
    m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
    alpha = tl.exp2(m - m_safe)
    beta = tl.exp2(m_chunk - m_safe)
    return m_new, l * alpha + l_chunk * beta, acc * alpha[:, None] + acc_chunk * beta[:, None]


@triton.jit
def finish(m, l, acc):
    """(output [R, D] fp32, log2-sum-exp [R]) of a state; a row that saw no key gives zeros and
    -inf."""
    seen = l > 0.0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    return out, tl.where(seen, m + tl.log2(tl.where(seen, l, 1.0)), float("-inf"))
