"""EngineConfig: every knob of the embedded rollout engine, checked when it is built."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import flag, integer, real


@dataclass
class EngineConfig:
    block_size: int = 16
    """Tokens per KV-cache block. Prefix sharing works at this granularity: a shared prompt
    shares its full blocks, and the last partial block is recomputed (at most block_size - 1
    tokens per sample)."""

    kv_memory_fraction: float = 0.85
    """On CUDA, the share of the GPU's free memory (measured when the cache is created) that
    the KV cache takes; the rest is left for activations and the sampler."""

    kv_cache_bytes: int | None = None
    """Fixed KV-cache size in bytes; overrides kv_memory_fraction. The default on CPU is 256 MiB."""

    max_num_seqs: int = 256
    """Most sequences in one forward step (decoding and prefilling together)."""

    max_num_batched_tokens: int = 8192
    """Token budget of one forward step: decode tokens first, then prefill chunks. A prompt
    longer than this is prefilled over several steps (chunked prefill) while others decode."""

    prefix_sharing: bool = True
    """Reuse the KV blocks of identical prompt prefixes (the n samples of one prompt, a shared
    system prompt) instead of recomputing them."""

    max_model_len: int | None = None
    """Longest prompt + completion in tokens; default: the model's max_position_embeddings, which
    it may not exceed (the model has no trained positions past it: Engine refuses more). A
    sequence that reaches it finishes with reason 'length'."""

    cuda_graphs: bool = True
    """On CUDA, replay decode steps from CUDA graphs captured per batch-size bucket (1, 2, 4, 8,
    then multiples of 16 up to max_num_seqs), captured the first time each size runs. Saves the
    launch overhead of ~10 kernels a layer: most of a small model's decode step. Graphs are
    dropped by release_memory() and read the weights in place, so updates must be in place."""

    decode_steps: int = 8
    """When a step is decodes only, run up to this many forward passes on the device per host
    round trip: each pass feeds its sampled tokens to the next, advancing positions and cache
    slots there, and the host reads the tokens back and checks stops once. The host's
    scheduling and bookkeeping (~2.9 ms a round trip at 256 sequences on the H100 node's CPU)
    is then paid once per decode_steps tokens: a 1-layer qwen2.5-1.5b, where the host is the
    bound, decodes in 1.06 ms a pass at 8 against 2.90 ms at 1. A full 1.5B pass (3.9 ms of GPU
    time at batch 256) hides the host either way, a faster pass no longer would. Costs: a
    sequence that stops mid-round computes the round's remaining tokens (dropped), and its slot
    is refilled up to 2 x decode_steps tokens later. 1 turns it off."""

    exact_logprobs: bool = True
    """On CUDA, decode tokens through the prefill kernel's key tiles and chunks, those of the
    trainer's attention (fastazr.kernels.varlen_attention), in 16-row programs for 16-bit models
    (paged_attention.decode_rows), so the engine's logprobs are the trainer's recomputation to
    fp32 rounding (SmolLM2, bf16: mean |delta| 1.8e-5, max 4.6e-5). Long contexts at small
    batch still fill the GPU: each sequence's chunks of KEY_CHUNK keys go to parallel programs
    and are folded in order. False takes the split-K decode kernel, whose splits cut the keys
    elsewhere (with 64-row exact tiles it differed from the trainer's in ~0.3% of attention
    outputs' last bit, which 30 bf16 layers grew into mean |delta| 1.9e-2, max 0.3); on the H100
    it ran bench_rollout.py's AZR mix 4% faster than exact mode (41,257 against 39,666 tokens/s,
    the same run)."""

    sample_in_lm_head: bool = True
    """On CUDA, sample the rows without top-k / top-p inside the lm_head GEMM's epilogue
    (fastazr.kernels.sampling.linear_gumbel_sample): their fp32 logits, 155 MB at 256 x 151,936,
    are never written and read back. H100, 256 rows of qwen2.5-1.5b: 362 us against 413 for
    cuBLAS's fp32 GEMM + the sampler over its logits (gumbel_sample), the same tokens; 1.0-1.4%
    more tokens/s on the uniform benchmark. False takes that two-kernel path. Same tokens
    because Triton and cuBLAS GEMMs without split-K give the same bits (checked at every tile
    shape tried, and by tests/test_rollout_gpu.py on the engine)."""

    def __post_init__(self) -> None:
        self.block_size = integer("EngineConfig.block_size", self.block_size, 1)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        self.kv_memory_fraction = real("EngineConfig.kv_memory_fraction", self.kv_memory_fraction)
        if not 0.0 < self.kv_memory_fraction <= 1.0:
            raise ValueError(f"EngineConfig.kv_memory_fraction must be in (0, 1], got {self.kv_memory_fraction}")
        if self.kv_cache_bytes is not None:
            self.kv_cache_bytes = integer("EngineConfig.kv_cache_bytes", self.kv_cache_bytes, 1, hint=" (or None)")
        self.max_num_seqs = integer("EngineConfig.max_num_seqs", self.max_num_seqs, 1)
        self.max_num_batched_tokens = integer(
            "EngineConfig.max_num_batched_tokens", self.max_num_batched_tokens, self.max_num_seqs,
            hint=f": at least max_num_seqs ({self.max_num_seqs}), every running sequence decodes one token a step")
        self.prefix_sharing = flag("EngineConfig.prefix_sharing", self.prefix_sharing)
        if self.max_model_len is not None:
            self.max_model_len = integer("EngineConfig.max_model_len", self.max_model_len, 2, hint=" (or None)")
        self.cuda_graphs = flag("EngineConfig.cuda_graphs", self.cuda_graphs)
        self.decode_steps = integer("EngineConfig.decode_steps", self.decode_steps, 1,
                                    hint=" (1 = a host round trip per token)")
        self.exact_logprobs = flag("EngineConfig.exact_logprobs", self.exact_logprobs)
        self.sample_in_lm_head = flag("EngineConfig.sample_in_lm_head", self.sample_in_lm_head)
