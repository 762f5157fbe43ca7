"""One forward step of the decoder over the scheduled slices, attending through the paged cache.

The runner reads the model's own parameter tensors (the ones the optimizer updates), layer by
layer: no copy of the weights exists. Each step writes the new tokens' keys and values into
their cache slots, attends, and returns the final-normed hidden state of the last token of each
slice that samples: the sampler projects it (on CUDA inside its own GEMM, sampler.py).

Step metadata (token ids, positions, cache slots, context lengths, ragged block tables) is
packed on the host into one int32 array and reaches the device in one copy. A negative token id
-1 - j stands for the j-th token sampled by the previous step, which the host has not read back
yet (see engine.py); it is taken from that step's output on the device. On CUDA the attention is
fastazr.kernels.paged_attention. With EngineConfig.exact_logprobs (the default) every slice goes
to the varlen prefill kernel, whose tiles and key chunks are the trainer's attention's (decodes,
in a round or beside prefill chunks, spread each sequence's chunks over programs and fold them
in order), so a decoded token's attention is the trainer's bit for bit, and every projection
runs at a row count whose cuBLAS kernel gives the trainer's bits (gemm_rows.py), or through
a Triton GEMM that gives them (kernels/decode_linear.py: a small model's decode batches;
kernels/swiglu_linear.py, gate_up with SwiGLU fused: decode batches and steps of thousands of
tokens); without it the leading one-token slices (decodes) take the faster split-K decode
kernel. A step of decodes only (decode()) runs its passes from a static metadata buffer that
the device advances between them in one launch (kernels/decode_advance.py), each pass replaying
the CUDA graph captured for its batch-size bucket; placeholders are resolved once a round. In
exact mode a pass's rotary and cache write run inside the attention's launch, which reads each
row's cos and sin from a table of every position (paged_decode_rope_attention); in inexact mode
the pass gathers them from that table. On CPU the attention is cpu_attention.py: every decode
row of a pass at once, block tables and masks built once a step (or a pass) for all layers."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from fastazr.kernels import attention_math
from fastazr.kernels.decode_advance import advance_decode
from fastazr.kernels.decode_advance_reference import META_ROWS
from fastazr.kernels.decode_linear import decode_linear, decode_linear_rows
from fastazr.kernels.layer_fusions import add_rms_norm, rope_to_cache, swiglu_fused
from fastazr.kernels.paged_attention import (decode_rows, decode_splits, paged_decode_attention,
                                            paged_decode_rope_attention, paged_prefill_attention)
from fastazr.kernels.swiglu_linear import swiglu_linear
from fastazr.model import Decoder
from fastazr.model.layers import rms_norm

from .config import EngineConfig
from .cpu_attention import StepAttention, context_mask, decode_attention, padded_tables
from .gemm_rows import GemmRows, probe_operands
from .kv_cache import KVCache
from .scheduler import Work
from .staging import Staging


def fused_mlp(rows: int, gate_up_weight: torch.Tensor) -> bool:
    """Whether a step of `rows` tokens runs gate_up with SwiGLU in its epilogue
    (kernels/swiglu_linear.py) rather than a GEMM then the SwiGLU kernel: the same bits either
    way. H100, graph replays, us, GEMM + SwiGLU kernel vs fused: qwen2.5-1.5b (I = 8,960) 16 rows
    24.7 vs 21.2, 64 rows 26.4 vs 22.7, 256 rows 31.5 vs 37.3, 1,024 98.5 vs 98.8, 2,048 196 vs
    176, 8,192 745-802 vs 677-754 (two machines); SmolLM2-135M (I = 1,536) 16 rows 4.6 vs 3.3,
    64 rows 5.3 vs 3.8 (4.4 with decode_linear for the GEMM), 256 rows 6.0 vs 4.8. Decode sizes
    only for 16-bit weights: fp32's were not measured."""
    if rows >= 2048:
        return True
    small = rows <= 64 or (rows <= 256 and gate_up_weight.numel() <= 2 << 20)
    return small and gate_up_weight.dtype in (torch.float16, torch.bfloat16)


def unfused_rows(gate_up_weight: torch.Tensor, candidates: list[int], reference_rows: int = 2048) -> set[int]:
    """The candidate row counts that fused_mlp would fuse but where swiglu_linear does not give
    the trainer's bits: a 2,048-row F.linear then the SwiGLU kernel, on random data of the
    weight's shape (the bits depend on shapes and tiles, not values; a few ms once per engine).
    None of the shapes and counts measured disagreed; this guards the exactness claim on GPUs
    and libraries where cuBLAS's large-batch kernel might sum otherwise. A row count between two
    candidates (an eager step's) takes the tiles of a checked one (swiglu_linear_tiles)."""
    x, w, _ = probe_operands(gate_up_weight, None, reference_rows)
    want = swiglu_fused(F.linear(x, w))
    return {rows for rows in candidates if rows < reference_rows and fused_mlp(rows, gate_up_weight)
            and not torch.equal(swiglu_linear(x[:rows], w), want[:rows])}


def aligned_offsets(lengths: list[int]) -> tuple[list[int], int]:
    """Where int32 arrays of these lengths start when packed back to back, each at a multiple of
    4 elements (16 bytes), and the packed length. Triton compiles a kernel once per pattern of
    which pointer arguments are 16-byte aligned: packed tightly, a step's metadata views started
    at offsets that follow its token and sequence counts, so a step could meet a new pattern and
    wait for a compile of the attention kernel (docs/rollout.md, "The TTFT outlier"). Cost: at
    most 3 padding elements a part."""
    offsets, total = [], 0
    for length in lengths:
        offsets.append(total)
        total += -(-length // 4) * 4
    return offsets, total


def graph_buckets(max_rows: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_rows (and max_rows): a batch pads at most
    15 rows."""
    sizes = [s for s in (1, 2, 4, 8) if s < max_rows] + list(range(16, max_rows, 16))
    return sizes + [max_rows]


def _fp32_lm_head_supported(device: torch.device) -> bool:
    """torch.mm(..., out_dtype=float32) keeps bf16 logits' fp32 accumulator (what the trainer's
    logprob kernel sees) instead of rounding it to bf16 (±0.04 at a logit of 20)."""
    try:
        a = torch.zeros(2, 2, device=device, dtype=torch.bfloat16)
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A projection without the trainer's bits to keep (exact_logprobs off): decode_linear at the
    row counts decode_linear_rows gives it, cuBLAS elsewhere."""
    if x.shape[0] <= decode_linear_rows(weight):
        return decode_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def _resolve_ids(ids: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    if previous is None or previous.numel() == 0:  # a step of prefill chunks only sampled nothing
        return ids
    return torch.where(ids < 0, previous[(-1 - ids).clamp(min=0)], ids)


class Runner:
    def __init__(self, model: Decoder, config: EngineConfig, staging: Staging):
        self.model, self.config, self.staging = model, config, staging
        c = model.config
        self.scale = c.head_dim ** -0.5
        self.kernels = model.device.type == "cuda"
        self.fp32_lm_head = self.kernels and model.dtype != torch.float32 and _fp32_lm_head_supported(model.device)
        self.num_sms = torch.cuda.get_device_properties(model.device).multi_processor_count if self.kernels else 1
        self.buckets = graph_buckets(config.max_num_seqs)
        self.graphs: dict[tuple[int, int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        """(bucket, splits, state chunks) -> graph and its output"""
        self._meta: torch.Tensor | None = None
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pool = None
        self._side_stream: torch.cuda.Stream | None = None
        self.linear = _linear if self.kernels else F.linear
        self.unfused: set[int] = set()
        """decode batch sizes that keep gate_up and SwiGLU apart (unfused_rows)"""
        # exact mode: every projection at a row count that gives the trainer's bits (gemm_rows.py),
        # through decode_linear or fused with SwiGLU where that is faster and gives them too
        if self.kernels and config.exact_logprobs:
            candidates = self.buckets + [384, 512, 768, 1024, 1536]
            self.linear = GemmRows(candidates, fast=decode_linear, fast_rows=decode_linear_rows)
            first = model.layers[0]
            for weight, bias in ((first.attn.qkv_weight, first.attn.qkv_bias), (first.attn.o_weight, first.attn.o_bias),
                                 (first.mlp.gate_up_weight, None), (first.mlp.down_weight, None)):
                self.linear.learn(weight, bias)
            self.unfused = unfused_rows(first.mlp.gate_up_weight, candidates)

    def reset(self) -> None:
        """Drop the CUDA graphs: they hold the KV cache's addresses (call before freeing it)."""
        self.graphs.clear()
        self._meta = self._rotary = self._pool = None

    # host side

    def _upload(self, packed: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        return self.staging.upload(packed.astype(np.int32, copy=False), out)

    def _upload_parts(self, parts: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """int32 arrays on the device in one copy, as views that each start on a 16-byte boundary
        (aligned_offsets)."""
        offsets, total = aligned_offsets([len(v) for v in parts.values()])
        packed = np.zeros(total, np.int32)
        for start, values in zip(offsets, parts.values()):
            packed[start:start + len(values)] = values
        meta = self._upload(packed)
        return {name: meta[start:start + len(values)] for (name, values), start in zip(parts.items(), offsets)}

    def _index(self, work: list[Work]) -> dict[str, np.ndarray]:
        bs = self.config.block_size
        ids, flat, table_starts = [], [], []
        for w in work:
            ids.extend(w.seq.tokens[w.start:w.start + w.count])
            table_starts.append(len(flat))
            flat.extend(w.seq.blocks)
        starts = np.fromiter((w.start for w in work), np.int64, len(work))
        counts = np.fromiter((w.count for w in work), np.int64, len(work))
        cu = np.zeros(len(work) + 1, np.int64)
        np.cumsum(counts, out=cu[1:])
        positions = np.arange(cu[-1]) - np.repeat(cu[:-1] - starts, counts)
        flat = np.asarray(flat, np.int64)
        table_starts = np.asarray(table_starts, np.int64)
        slots = flat[np.repeat(table_starts, counts) + positions // bs] * bs + positions % bs
        return dict(ids=np.asarray(ids, np.int64), positions=positions, slots=slots, context=starts + counts,
                    table_starts=table_starts, cu=cu, flat=flat)

    # device side

    def _layers(self, ids, positions, slots, cache: KVCache, attend, previous=None, rotary=None) -> torch.Tensor:
        """Final-normed hidden states [T, H]. `rotary`: cos and sin of `positions` when the
        caller has them (decode passes gather them from a table, or in exact mode pass the
        table whole to the attention)."""
        model, c = self.model, self.model.config
        hidden = F.embedding(_resolve_ids(ids, previous), model.embed_tokens)
        cos, sin = model.rotary(positions) if rotary is None else rotary
        if self.kernels:
            return self._fused_layers(hidden, cos, sin, slots, cache, attend)
        slots = slots.long()  # index_copy_ takes int64 only; the decode buffer is int32
        for index, layer in enumerate(model.layers):
            q, k, v = layer.attn.qkv(rms_norm(hidden, layer.input_norm, c.rms_norm_eps), cos, sin)
            k_cache, v_cache = cache.k[index], cache.v[index]
            k_cache.view(-1, c.num_kv_heads, c.head_dim).index_copy_(0, slots, k)
            v_cache.view(-1, c.num_kv_heads, c.head_dim).index_copy_(0, slots, v)
            hidden = hidden + layer.attn.output(attend(q, k_cache, v_cache))
            hidden = hidden + layer.mlp(rms_norm(hidden, layer.post_attention_norm, c.rms_norm_eps))
        return rms_norm(hidden, model.norm, c.rms_norm_eps)

    def _fused_layers(self, hidden, cos, sin, slots, cache: KVCache, attend) -> torch.Tensor:
        # The same layer as above with its elementwise ops fused (kernels/layer_fusions.py):
        # each residual add rides in the next RMSNorm, which updates `hidden` in place, and
        # attend(qkv, cos, sin, slots, k_cache, v_cache) rotates, writes the new keys and values
        # to the cache and attends (_rope, or inside the exact decode's attention).
        model, c = self.model, self.model.config
        eps = c.rms_norm_eps
        normed = add_rms_norm(hidden, model.layers[0].input_norm, eps)
        for index, layer in enumerate(model.layers):
            attn, mlp = layer.attn, layer.mlp
            qkv = self.linear(normed, attn.qkv_weight, attn.qkv_bias)
            attended = attend(qkv, cos, sin, slots, cache.k[index], cache.v[index]).flatten(1)
            normed = add_rms_norm(hidden, layer.post_attention_norm, eps,
                                  residual=self.linear(attended, attn.o_weight, attn.o_bias))
            if fused_mlp(normed.shape[0], mlp.gate_up_weight) and normed.shape[0] not in self.unfused:
                activated = swiglu_linear(normed, mlp.gate_up_weight)
            else:
                activated = swiglu_fused(self.linear(normed, mlp.gate_up_weight))
            delta = self.linear(activated, mlp.down_weight)
            following = model.layers[index + 1].input_norm if index + 1 < len(model.layers) else model.norm
            normed = add_rms_norm(hidden, following, eps, residual=delta)
        return normed

    def _rope(self, qkv, cos, sin, slots, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Rotated q [T, Hq, D] of a step's qkv rows; their rotated keys and values to the cache."""
        c = self.model.config
        return rope_to_cache(qkv, cos, sin, slots, k_cache, v_cache, c.num_heads, c.num_kv_heads)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        """fp32 logits [S, V] of final-normed hidden states [S, H]."""
        weight = self.model.lm_head_weight
        if self.fp32_lm_head:
            return torch.mm(normed, weight.t(), out_dtype=torch.float32)
        return F.linear(normed, weight).float()

    @torch.no_grad()
    def forward(self, work: list[Work], cache: KVCache, previous: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states [S, H] of the slices that sample, in work order, for a step
        with prefill chunks (decode-only steps: decode()). `previous`: the tokens the last step
        sampled, which placeholder ids refer to."""
        index = self._index(work)
        last = (index["cu"][1:] - 1)[[w.samples for w in work]]
        if not self.kernels:
            device = self.model.device
            attend = StepAttention([w.count for w in work], index["context"].tolist(), [w.seq.blocks for w in work],
                                   self.config.block_size, self.scale, device)
            hidden = self._layers(torch.from_numpy(index["ids"]).to(device), torch.from_numpy(index["positions"]).to(device),
                                  torch.from_numpy(index["slots"]).to(device), cache, attend, previous)
            return hidden[torch.from_numpy(last).to(device)]
        return self._eager_kernels(work, index, last, cache, previous)

    def _eager_kernels(self, work: list[Work], index: dict[str, np.ndarray], last: np.ndarray,
                       cache: KVCache, previous: torch.Tensor | None) -> torch.Tensor:
        # Leading one-token slices (decodes) and the prefill chunks behind them attend in two
        # launches: the prefill kernel's rows index q by the step's own cu_seqlens.
        decodes = next((i for i, w in enumerate(work) if w.count != 1), len(work))
        cu, context, starts = index["cu"], index["context"], index["table_starts"]
        views = self._upload_parts(dict(
            ids=index["ids"], positions=index["positions"], slots=index["slots"], last=last, flat=index["flat"],
            decode_context=context[:decodes], decode_starts=starts[:decodes], decode_cu=cu[:decodes + 1],
            prefill_context=context[decodes:], prefill_starts=starts[decodes:], prefill_cu=cu[decodes:]))
        last_t = views["last"].long()
        max_q = int(np.diff(cu[decodes:]).max(initial=1))
        # Exact decodes take the trainer's tiles in decode_rows() programs and, once a context spans
        # several key chunks, spread them over programs as a decode round does (the same bits).
        # In the prefill's launch they took 128-row tiles holding one token's heads (8 rows for
        # qwen2.5-1.5b) and one program a sequence, however long its context.
        longest = int(context[:decodes].max(initial=1))
        splits = self._splits(decodes, longest)[0] if decodes else 1

        def attend(qkv, cos, sin, slots, k_cache, v_cache):
            q = self._rope(qkv, cos, sin, slots, k_cache, v_cache)
            out = torch.empty_like(q)
            if decodes and self.config.exact_logprobs:
                paged_prefill_attention(q[:decodes], k_cache, v_cache, views["flat"], views["decode_starts"],
                                        views["decode_cu"], views["decode_context"], 1, self.scale,
                                        out=out[:decodes], rows=decode_rows(q.dtype), splits=splits,
                                        max_context=longest)
            elif decodes:
                paged_decode_attention(q[:decodes], k_cache, v_cache, views["flat"], views["decode_starts"],
                                       views["decode_context"], self.scale,
                                       decode_splits(decodes, cache.k.shape[3], self.num_sms), out=out[:decodes])
            if decodes < len(work):
                paged_prefill_attention(q, k_cache, v_cache, views["flat"], views["prefill_starts"],
                                        views["prefill_cu"], views["prefill_context"], max_q, self.scale, out=out)
            return out

        hidden = self._layers(views["ids"], views["positions"], views["slots"], cache, attend, previous)
        return hidden[last_t]

    # decode-only steps

    @property
    def _max_len(self) -> int:
        return self.config.max_model_len or self.model.config.max_position_embeddings

    def _decode_layout(self) -> tuple[int, int]:
        """(rows, table capacity) of the static metadata buffer: ids, positions, slots, context
        lengths, table starts and last positions of `rows` rows, then every row's blocks at the
        longest length."""
        rows = self.buckets[-1]
        return rows, rows * -(-self._max_len // self.config.block_size)

    def _splits(self, bucket: int, longest: int) -> tuple[int, int]:
        """(programs each sequence's key chunks spread over, chunks of state each sequence keeps)
        for a decode round whose longest context is `longest`, in exact mode. At least 4
        programs (more while a program a sequence and KV head would leave SMs idle), at large
        batches too, where the programs of long contexts outlast the rest of the grid; never more
        than the context has chunks. H100, one qwen2.5-1.5b layer, us, 1 / 2 / 4 programs a sequence
        (CUDA-graph replays, the same bits each; measured in 64-row tiles, not re-tuned for today's
        16, where 1 -> 4 programs still took 76.7 -> 41.3 us at 56 x 1-2,400): 256 x 300-2,400
        tokens 192 / 172 / 163, 128 x 300-2,400 107 / 99 / 84, 256 x 600-1,200 111 / 109 / 108, 128
        x 600-1,200 61 / 63 / 58; SmolLM2, 256 x 300-1,500: 119 / 94 / 92. Both are powers of two,
        and a graph is captured per pair (again after every release_memory()): the state (130 fp32 a
        row, head and chunk) holds at least 8 chunks, so contexts up to 4K keys take one or two
        graphs a bucket, and more only for longer ones, not max_model_len's worth (qwen2.5-1.5b, 256
        rows: 13 MB; at its 32K positions it would be 100 MB)."""
        kv_heads = self.model.config.num_kv_heads
        chunks = -(-longest // attention_math.KEY_CHUNK)
        if not (self.kernels and self.config.exact_logprobs) or chunks <= 1:
            return 1, 0
        fit = 1 << (chunks - 1).bit_length()
        return min(max(4, decode_splits(bucket, kv_heads, self.num_sms)), fit), max(8, fit)

    def _rows(self, bucket: int) -> list[torch.Tensor]:
        rows, _ = self._decode_layout()
        return [self._meta[i * rows:i * rows + bucket] for i in range(META_ROWS)]

    @torch.no_grad()
    def decode(self, work: list[Work], cache: KVCache, previous: torch.Tensor | None,
               sample: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """A step of one-token slices that all sample: max(w.steps) forward passes, each taking
        `sample(hidden, pass)`'s tokens (hidden: the rows' final-normed states) as its next
        input, with no host round trip between them. A row stops advancing after its own `steps`
        passes (later passes recompute its last position, writing to the scratch slot, and their
        tokens are not its). On CUDA a pass replays the graph captured for its batch-size bucket.
        Returns tokens and logprobs [passes, len(work)]."""
        n = len(work)
        graphs = self.kernels and self.config.cuda_graphs
        bucket = next(b for b in self.buckets if b >= n) if graphs else n
        self._pack(work, cache, previous)
        # CPU: every row's blocks up to its last pass's context, padded (the mask follows each pass)
        tables = None if self.kernels else padded_tables([w.seq.blocks for w in work],
                                                         [w.start + w.steps for w in work], self.config.block_size,
                                                         self.model.device)
        plan = self._splits(bucket, max(w.start + w.steps for w in work))
        tokens, logprobs = [], []
        for i in range(max(w.steps for w in work)):
            if i:
                self._advance(bucket, cache, tokens[-1])
            if graphs:
                key = (bucket, *plan)
                if key not in self.graphs:
                    self.graphs[key] = self._capture(bucket, plan, cache)
                graph, hidden = self.graphs[key]
                graph.replay()
            else:
                hidden = self._decode_body(bucket, plan, cache, tables)
            token, logprob = sample(hidden[:n], i)
            tokens.append(token)
            logprobs.append(logprob)
        return torch.stack(tokens), torch.stack(logprobs)

    def _pack(self, work: list[Work], cache: KVCache, previous: torch.Tensor | None) -> None:
        rows, capacity = self._decode_layout()
        n = len(work)
        if self._meta is None:
            device = self.model.device
            self._meta = torch.zeros(META_ROWS * rows + capacity, dtype=torch.int32, device=device)
            # cos and sin of every position, the rotary's bits (elementwise in the position): a
            # pass reads its rows' (exact mode: in the attention; else gathered once a pass)
            # instead of computing them in ~7 launches. qwen2.5 (32K positions, head_dim 128,
            # bf16): 16 MB; SmolLM2 (8K, 64): 2 MB.
            self._rotary = self.model.rotary(torch.arange(self._max_len, device=device))
        bs = self.config.block_size
        seqs = [w.seq for w in work]
        positions = [w.start for w in work]
        table_lengths = [len(seq.blocks) for seq in seqs]
        if sum(table_lengths) > capacity:
            raise RuntimeError(f"{sum(table_lengths)} block-table entries overflow the decode buffer's {capacity}: a bug")
        # padding rows (to the graph's bucket) write to the scratch block and never advance
        packed = np.zeros((META_ROWS, rows), np.int64)
        packed[2] = cache.scratch_slot
        packed[0, :n] = [seq.tokens[p] for seq, p in zip(seqs, positions)]
        packed[1, :n] = positions
        packed[2, :n] = [seq.blocks[p // bs] * bs + p % bs for seq, p in zip(seqs, positions)]
        packed[3, :n] = packed[1, :n] + 1
        np.cumsum(table_lengths[:-1], out=packed[4, 1:n])
        packed[5, :n] = packed[1, :n] + np.fromiter((w.steps - 1 for w in work), np.int64, n)
        flat = np.fromiter(itertools.chain.from_iterable(seq.blocks for seq in seqs), np.int64, sum(table_lengths))
        self._upload(np.concatenate([packed.reshape(-1), flat]), self._meta)
        # placeholders for the tokens the previous step sampled, resolved once a round: the
        # passes after the first take the tokens their own round sampled (_advance)
        ids = self._meta[:n]
        if previous is not None and previous.numel():
            ids.copy_(_resolve_ids(ids, previous))

    def _advance(self, bucket: int, cache: KVCache, sampled: torch.Tensor) -> None:
        """The next pass's metadata, on the device: a row short of its last position moves one
        token on, with the token just sampled as its input; the others stay and write to scratch."""
        rows, _ = self._decode_layout()
        advance_decode(self._meta, rows, bucket, sampled, self.config.block_size, cache.scratch_slot)

    def _decode_body(self, bucket: int, plan: tuple[int, int], cache: KVCache,
                     tables: torch.Tensor | None = None) -> torch.Tensor:
        rows, _ = self._decode_layout()
        ids, positions, slots, context, starts, _ = self._rows(bucket)
        flat = self._meta[META_ROWS * rows:]
        # inexact and CPU passes gather their rows' cos and sin once a pass; the exact attention
        # reads each row's from the tables (rotary set in its branch): no gather launches
        rotary = None
        if not self.kernels:
            mask = context_mask(context, tables.shape[1] * self.config.block_size)

            def attend(q, k_cache, v_cache):
                return decode_attention(q, k_cache, v_cache, tables, mask, self.scale)
        elif self.config.exact_logprobs:
            # the rotary and the cache write ride in the attention's launch, the same bits
            # (paged_decode_rope_attention): a launch a layer fewer of a SmolLM2 pass's ~240
            rotary = self._rotary

            def attend(qkv, cos, sin, slots, k_cache, v_cache):
                return paged_decode_rope_attention(qkv, cos, sin, slots, k_cache, v_cache, flat, starts, context,
                                                   self.model.config.num_heads, self.scale,
                                                   rows=decode_rows(qkv.dtype), splits=plan[0],
                                                   max_context=max(1, plan[1]) * attention_math.KEY_CHUNK)
        else:
            def attend(qkv, cos, sin, slots, k_cache, v_cache):
                q = self._rope(qkv, cos, sin, slots, k_cache, v_cache)
                return paged_decode_attention(q, k_cache, v_cache, flat, starts, context, self.scale,
                                              decode_splits(bucket, cache.k.shape[3], self.num_sms))

        if rotary is None:
            rotary = tuple(table.index_select(0, positions) for table in self._rotary)
        return self._layers(ids, positions, slots, cache, attend, rotary=rotary)

    def _capture(self, bucket: int, plan: tuple[int, int], cache: KVCache) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # A warm-up run on a side stream compiles the Triton kernels and settles the allocator
        # (capture must not compile); it computes the current pass's real rows, harmlessly.
        # One side stream for the runner's life: cuBLAS keeps a 32 MiB workspace per stream it
        # has seen, so a fresh stream per capture would leak one every release/resume cycle.
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(self.model.device)
        stream = self._side_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._decode_body(bucket, plan, cache)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            hidden = self._decode_body(bucket, plan, cache)
        return graph, hidden
