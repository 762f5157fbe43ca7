"""The SGLang rollout backend (`--rollout sglang`): generation by sglang.Engine, SGLang's offline
engine, on the trainer's GPU, its memory given back while the policy trains and the trainer's
weights pushed into it after every update, all driven from the training process.

SGLang keeps its own copy of the weights, so unlike the embedded engine it has something to
release besides the KV cache, and something to refresh after an update. Per step, through
ColocatedMemory (fastazr/update/memory.py):

    to_training:    release_memory()   release_memory_occupation(kv_cache, weights, cuda_graph)
                                       once generate() has returned (SGLang asserts it is idle);
                                       NVML: SGLang's share of the GPU must have come back
    (update)
    to_generation:  resume_memory()    torch.cuda.empty_cache() (SGLang cannot use the trainer's
                                       cached blocks), a free-memory check, resume weights
                    weights_updated()  begin_weight_update, one update_weights_from_tensor per
                                       bucket (flush_cache with the last), end_weight_update,
                                       empty_cache again, resume kv_cache and cuda_graph

Released weights come back as garbage (no CPU backup), so every resume needs a push: generate()
pushes itself if weights_updated() has not. Outside that cycle, weights_updated() on a resident
engine (a checkpoint loaded) pushes with the KV cache in place.

SGLang sizes its KV pool once, from the memory free when it starts, and resume re-maps the same
amount: it starts at the first resume_memory() (or generate()), which ColocatedMemory calls once
the optimizer state has left the GPU, so the pool fits the generation phase's free memory
(SGLangConfig.mem_fraction_static says how much of it)."""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from fastazr.model import Decoder, Tokenizer

from .backend import RolloutBackend
from .checks import config_and_seed, within_positions
from .request import Completion, Request, check_requests
from .sglang_config import SGLangConfig, server_args
from .sglang_requests import build_batch, finish_completion
from .sglang_runtime import SGLangRuntime
from .sglang_weights import pack, plan_buckets

SGLANG_CONSTANTS = {"GPU_MEMORY_TYPE_KV_CACHE": "kv_cache", "GPU_MEMORY_TYPE_WEIGHTS": "weights",
                    "GPU_MEMORY_TYPE_CUDA_GRAPH": "cuda_graph"}
"""sglang.srt.constants' memory-saver tags, copied so that importing fastazr needs no sglang (the
contract test checks them against the pinned release)."""
KV_CACHE, WEIGHTS, CUDA_GRAPH = (SGLANG_CONSTANTS[k] for k in SGLANG_CONSTANTS)
LOAD_FORMAT = "flattened_bucket"

# What SGLang holds, between the calls of the cycle above.
UNSTARTED = "unstarted"
RELEASED = "released"
"""Nothing: everything the memory saver tracks is given back."""
WEIGHTS_ONLY = "weights"
"""Weight memory resumed, its contents undefined; no KV cache."""
STALE = "stale"
"""Everything resident, the weights SGLang's random ones (just started)."""
READY = "ready"


class SGLangBackend(RolloutBackend):
    def __init__(self, model: Decoder, tokenizer: Tokenizer | None = None, config: SGLangConfig | None = None,
                 seed: int | None = None, runtime: SGLangRuntime | None = None):
        """`seed` seeds the stream of unseeded requests' seeds (as Engine's) and SGLang's own
        generator; None takes them from the OS. `runtime`: where SGLang and the GPU are reached
        (the tests pass a recording stand-in); default SGLangRuntime(model.device)."""
        if not isinstance(model, Decoder):
            raise TypeError(f"SGLangBackend's model must be a fastazr Decoder, got {type(model).__name__}")
        config, seed = config_and_seed("SGLangBackend", config, SGLangConfig, seed)
        within_positions("--sglang.context-length", config.context_length, model.config.max_position_embeddings)
        self.model, self.tokenizer, self.config, self.seed = model, tokenizer, config, seed
        self.runtime = runtime or SGLangRuntime(model.device)
        self.context_length = config.context_length or model.config.max_position_embeddings
        self.eos_ids = set(model.config.eos_token_ids)
        if tokenizer is not None:
            self.eos_ids.update(tokenizer.stop_token_ids)
        self._seeds = random.Random(seed)
        self.engine = None
        self.state = UNSTARTED
        self._model_dir: Path | None = None
        self._others = 0
        """GPU bytes NVML counts that are not SGLang's, besides this process's torch cache (the
        trainer's CUDA context, other processes): measured just before SGLang starts."""
        self._released = 0
        self.stats: dict[str, float] = {}
        """Of the last push: push_bytes, push_seconds, buckets; of the last release: held_bytes
        (SGLang's, before), residual_bytes (after), released_bytes."""

    # memory phases

    def release_memory(self) -> None:
        """SGLang's KV cache, weights and CUDA graphs (what is resident of them), then the NVML
        check that the memory came back. Nothing before SGLang starts."""
        if self.state in (UNSTARTED, RELEASED):
            return
        held = self._sglang_bytes()
        tags = [WEIGHTS] if self.state == WEIGHTS_ONLY else [KV_CACHE, WEIGHTS, CUDA_GRAPH]
        self.engine.release_memory_occupation(tags=tags)
        self.state = RELEASED
        residual = self._sglang_bytes()
        self._released = max(held - residual, 0)
        self.stats.update(held_bytes=held, residual_bytes=residual, released_bytes=self._released)
        limit = self.config.max_residual_gib * 2**30
        if residual > limit:
            raise RuntimeError(f"SGLang still holds {residual / 2**30:.2f} GiB of the GPU after releasing its memory "
                               f"(it held {held / 2**30:.2f} GiB; NVML's used memory less this process's torch "
                               f"cache and what was there before SGLang started): training would not get the "
                               f"memory it counts on. Raise --sglang.max-residual-gib if that much is expected.")

    def resume_memory(self) -> None:
        """The first time, start SGLang (its KV pool sized from the memory free now); after a
        release, the weights' memory only: weights_updated() or generate() pushes the weights,
        then resumes the KV cache and graphs."""
        if self.state == UNSTARTED:
            self._start()
            return
        if self.state != RELEASED:
            return
        self.runtime.empty_cache()
        free = self.runtime.free_bytes()
        if free < self._released:
            raise RuntimeError(f"SGLang needs {self._released / 2**30:.2f} GiB back to resume and {free / 2**30:.2f} "
                               "GiB are free: the trainer holds more than when SGLang started. Lower "
                               "--sglang.mem-fraction-static (SGLang sizes its KV pool once, at its start)")
        self.engine.resume_memory_occupation(tags=[WEIGHTS])
        self.state = WEIGHTS_ONLY

    def weights_updated(self) -> None:
        """Push the trainer's weights into SGLang; while released nothing (a resume needs a push anyway)."""
        if self.state in (STALE, READY, WEIGHTS_ONLY):
            self._sync_weights()

    def seed_state(self) -> tuple:
        """The generator of unseeded requests' seeds, for checkpoints (set_seed_state restores it).
        It restores which seeds requests get, not SGLang's samples: those follow the seeds only
        with --sglang.deterministic, and never match the embedded engine's sample streams."""
        return self._seeds.getstate()

    def set_seed_state(self, state: tuple) -> None:
        self._seeds.setstate(state)

    def close(self) -> None:
        """Stop SGLang. Its Engine.shutdown() kills every child process of this process (SGLang
        0.5.23: kill_process_tree(os.getpid(), include_parent=False)): close other subprocess
        owners (the sandbox) first."""
        if self.engine is not None:
            self.engine.shutdown()
            self.engine, self.state = None, UNSTARTED
        if self._model_dir is not None:
            shutil.rmtree(self._model_dir, ignore_errors=True)
            self._model_dir = None

    def _start(self) -> None:
        directory = Path(tempfile.mkdtemp(prefix="fastazr-sglang-"))
        try:
            dtype = str(self.model.dtype).removeprefix("torch.")
            # SGLang reads the architecture from config.json; load_format "dummy" reads no weights
            (directory / "config.json").write_text(json.dumps(self.model.config.to_hf(dtype), indent=2))
            self.runtime.empty_cache()
            self._others = self.runtime.used_bytes() - self.runtime.reserved_bytes()
            self.engine = self.runtime.start(server_args(self.config, str(directory), dtype, self.context_length,
                                                         self.runtime.gpu_id, self.seed))
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        self._model_dir, self.state = directory, STALE

    def _sglang_bytes(self) -> int:
        return self.runtime.used_bytes() - self.runtime.reserved_bytes() - self._others

    def _sync_weights(self) -> None:
        """Push the trainer's weights; from WEIGHTS_ONLY, then resume the KV cache and graphs too."""
        started = time.perf_counter()
        buckets = plan_buckets(self.model, self.config.bucket_bytes)
        _succeeded("begin_weight_update", self.engine.begin_weight_update())
        for k, bucket in enumerate(buckets):
            staging = self.runtime.staging(bucket.nbytes)
            flat = pack(bucket, staging)
            self.runtime.synchronize()  # SGLang's process reads the bucket on its own stream
            payloads = self.runtime.bucket_payload(flat, bucket.entries, self.config.tp_size)
            _succeeded("update_weights_from_tensor", self.engine.update_weights_from_tensor(
                payloads, load_format=LOAD_FORMAT, flush_cache=k == len(buckets) - 1))
            # Dropped only now that SGLang has acknowledged the load: until then it reads them.
            # Torch keeps a shared block out of reuse until SGLang's process has let go of it.
            del staging, flat, payloads
        _succeeded("end_weight_update", self.engine.end_weight_update())
        self.stats.update(push_bytes=sum(b.nbytes for b in buckets), push_seconds=time.perf_counter() - started,
                          buckets=len(buckets))
        if self.state == WEIGHTS_ONLY:
            self.runtime.empty_cache()  # the buckets' blocks, before the KV cache takes the memory back
            self.engine.resume_memory_occupation(tags=[KV_CACHE, CUDA_GRAPH])
        self.state = READY

    # generation

    def generate(self, requests: list[Request], progress=None) -> list[list[Completion]]:
        """See RolloutBackend.generate. `progress(n)` is called once, with every completion token,
        when SGLang has returned them all. Starts SGLang on first use."""
        if progress is not None and not callable(progress):
            raise TypeError(f"SGLangBackend.generate()'s progress must be a callable taking a token count "
                            f"(a bar's update method), got {type(progress).__name__}")
        if self.state == RELEASED:
            raise RuntimeError("SGLangBackend.generate() after release_memory(): call resume_memory() first")
        check_requests(requests, self.model.config.vocab_size, "SGLangBackend.generate()")
        if any(r.params.stop_strings for r in requests) and self.tokenizer is None:
            raise ValueError("SamplingParams.stop_strings needs a tokenizer: pass one to SGLangBackend(...)")
        if self.state == UNSTARTED:
            self._start()
        if self.state != READY:
            self._sync_weights()
        batch = build_batch(requests, self.context_length, self.eos_ids, lambda: self._seeds.getrandbits(62))
        outputs = []
        if batch.input_ids:
            outputs = self.engine.generate(input_ids=batch.input_ids, sampling_params=batch.sampling,
                                           return_logprob=True)
        if len(outputs) != len(batch.input_ids):
            raise RuntimeError(f"SGLang returned {len(outputs)} outputs for {len(batch.input_ids)} inputs")
        results: list[list[Completion | None]] = [[None] * r.n for r in requests]
        for (i, j), output in zip(batch.slots, outputs):
            results[i][j] = finish_completion(requests[i], output, self.eos_ids, self.tokenizer)
        for i in batch.too_long:
            results[i] = [Completion(list(requests[i].prompt_ids), [], [], "prompt_too_long")
                          for _ in range(requests[i].n)]
        generated = sum(len(c.completion_ids) for group in results for c in group)
        if progress is not None and generated:
            progress(generated)
        return results


def _succeeded(call: str, result) -> None:
    """SGLang's weight-update calls answer (success, message) and leave failing to the caller."""
    success, message = result
    if not success:
        raise RuntimeError(f"SGLang's {call} failed: {message}")
