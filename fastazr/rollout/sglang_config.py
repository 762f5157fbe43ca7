"""SGLangConfig: the knobs of the SGLang rollout backend (`--rollout sglang`, options
`--sglang.<field>`), checked when it is built, and the ServerArgs it starts sglang.Engine with."""

from __future__ import annotations

from dataclasses import dataclass

from .checks import flag, integer, real

SGLANG_VERSION = "0.5.23"
"""The release the backend is written and contract-tested against (setup.py's `sglang` extra pins it)."""


@dataclass
class SGLangConfig:
    mem_fraction_static: float = 0.85
    """Share of the GPU memory free when SGLang starts that its weights and KV pool take together
    (SGLang's --mem-fraction-static: pool = free after its weights - (1 - this) x free before). It
    starts at the first resume_memory(), once the optimizer state has left the GPU and torch's
    cache is emptied, so this is a share of the generation phase's free memory; the rest stays
    free for SGLang's activations and CUDA graphs and for the trainer's weight-push buckets. The
    pool is never re-sized: a trainer that holds more at a later resume than at the start makes
    resume_memory() fail (it says so before SGLang tries)."""

    bucket_bytes: int = 512 * 2**20
    """Bytes of one weight-push bucket: the HF-named tensors are copied into flat buckets of about
    this size (a larger tensor gets one of its own), each sent with one update_weights_from_tensor
    call. Larger buckets mean fewer round trips to SGLang's scheduler, more transient GPU memory."""

    tp_size: int = 1
    """GPUs SGLang shards the model over (tensor parallel), from base_gpu_id on; the trainer stays
    on its own one GPU and pushes full tensors, which each rank shards."""

    base_gpu_id: int | None = None
    """The first GPU SGLang uses; None: the trainer's GPU (colocated)."""

    context_length: int | None = None
    """Longest prompt + completion in tokens; default: the model's max_position_embeddings, which
    it may not exceed. Prompts at least this long finish 'prompt_too_long' without being sent;
    max_new_tokens is cut so a sequence ends 'length' there, as in the embedded engine."""

    max_running_requests: int | None = None
    """Most sequences SGLang decodes at once; None: SGLang's choice from its KV pool size."""

    cuda_graphs: bool = True
    """Let SGLang capture CUDA graphs for decoding (released and resumed with the KV cache)."""

    fp32_lm_head: bool = True
    """Compute SGLang's logits in fp32 (its enable_fp32_lm_head). Its default rounds them to bf16
    before the softmax, which moves a logit by up to |logit| x 2^-8 (0.04 at a logit of 10) and the
    logprob with it; the trainer recomputes logprobs from fp32 logits
    (fastazr.kernels.linear_logprobs)."""

    deterministic: bool = False
    """SGLang's enable_deterministic_inference: batch-invariant kernels and each sample drawn from
    its own seed (fastazr passes one per sample, from the request's SamplingParams.seed or the
    backend's seed stream), so a request gives the same completion whatever else is batched.
    Slower (SGLang switches to its PyTorch sampler). Off, SGLang samples from its own generator
    seeded with the run's seed, and request seeds are not honoured."""

    max_residual_gib: float = 3.0
    """release_memory() checks with NVML that SGLang gave its memory back before training
    allocates: it may keep at most this many GiB (its CUDA context, NCCL buffers, blocks torch
    caches in its process); more raises, naming what it still holds."""

    def __post_init__(self) -> None:
        self.mem_fraction_static = real("SGLangConfig.mem_fraction_static", self.mem_fraction_static)
        if not 0.0 < self.mem_fraction_static < 1.0:
            raise ValueError(f"--sglang.mem-fraction-static must be in (0, 1), got {self.mem_fraction_static}")
        self.bucket_bytes = integer("--sglang.bucket-bytes", self.bucket_bytes, 1,
                                    hint=" (bytes of one weight-push bucket; a larger tensor gets one of its own)")
        self.tp_size = integer("--sglang.tp-size", self.tp_size, 1)
        if self.base_gpu_id is not None:
            self.base_gpu_id = integer("--sglang.base-gpu-id", self.base_gpu_id, 0,
                                       hint=" (or None: the trainer's GPU)")
        if self.context_length is not None:
            self.context_length = integer("--sglang.context-length", self.context_length, 2, hint=" (or None)")
        if self.max_running_requests is not None:
            self.max_running_requests = integer("--sglang.max-running-requests", self.max_running_requests, 1,
                                                hint=" (or None: SGLang's choice)")
        self.cuda_graphs = flag("--sglang.cuda-graphs", self.cuda_graphs)
        self.fp32_lm_head = flag("--sglang.fp32-lm-head", self.fp32_lm_head)
        self.deterministic = flag("--sglang.deterministic", self.deterministic)
        self.max_residual_gib = real("--sglang.max-residual-gib", self.max_residual_gib)
        if self.max_residual_gib < 0:
            raise ValueError(f"--sglang.max-residual-gib must be >= 0, got {self.max_residual_gib}")


def server_args(config: SGLangConfig, model_dir: str, dtype: str, context_length: int, gpu_id: int,
                seed: int | None) -> dict:
    """sglang.Engine's keyword arguments (ServerArgs fields; the contract test checks each name).
    Token ids in and out (no tokenizer in SGLang), random weights at start (fastazr pushes the
    trainer's before the first generation), memory that release_memory_occupation can give back."""
    return dict(model_path=model_dir, dtype=dtype, skip_tokenizer_init=True, load_format="dummy",
                enable_memory_saver=True, mem_fraction_static=config.mem_fraction_static,
                context_length=context_length, random_seed=seed, tp_size=config.tp_size,
                base_gpu_id=gpu_id if config.base_gpu_id is None else config.base_gpu_id,
                max_running_requests=config.max_running_requests, disable_cuda_graph=not config.cuda_graphs,
                enable_fp32_lm_head=config.fp32_lm_head,
                enable_deterministic_inference=config.deterministic)
