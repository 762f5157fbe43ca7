"""What the SGLang backend touches outside its own logic: the sglang package (imported on first
use, so importing fastazr never needs it), CUDA IPC payloads, torch's allocator and NVML. The
backend (sglang_backend.py) only calls this and the engine it returns, so its logic runs against a
recording stand-in in the CPU tests (tests/test_sglang_backend.py)."""

from __future__ import annotations

import gc
import os

import torch

from .sglang_config import SGLANG_VERSION
from .sglang_weights import Entry

INSTALL_HINT = 'pip install "fastazr[sglang]"'
ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"
"""Set true, SGLang returns logprobs of the logits before the temperature (sampler.py), which are
not Completion.logprobs: the backend refuses to start."""


def _expandable_segments() -> bool:
    conf = ",".join(os.environ.get(k, "") for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"))
    return "expandable_segments:true" in conf.replace(" ", "").lower()


def start_engine(server_args: dict):
    """sglang.Engine(**server_args): its scheduler starts as a child process with its own CUDA
    context, loads the model and sizes its KV pool from the memory free now."""
    if os.environ.get(ORIGINAL_LOGPROB_ENV, "false").lower() in ("true", "1"):
        raise RuntimeError(f"{ORIGINAL_LOGPROB_ENV} is set: SGLang would return logprobs before the temperature, "
                           "while the trainer scores them after it; unset it")
    try:
        from sglang.srt.entrypoints.engine import Engine
    except ImportError as exc:
        raise ImportError(f"--rollout sglang needs SGLang {SGLANG_VERSION}, which is not importable ({exc}): "
                          f"{INSTALL_HINT}") from exc
    return Engine(**server_args)


class SGLangRuntime:
    def __init__(self, device: torch.device):
        if device.type != "cuda":
            raise ValueError(f"--rollout sglang runs on a CUDA GPU and the model is on {device}: pass --device cuda "
                             "(or --rollout embedded, which also runs on the CPU)")
        self.device = device
        self.gpu_id = device.index if device.index is not None else torch.cuda.current_device()
        """The trainer's GPU, SGLang's default base_gpu_id (both count the same CUDA_VISIBLE_DEVICES)."""

    def start(self, server_args: dict):
        return start_engine(server_args)

    def bucket_payload(self, flat: torch.Tensor, entries: list[Entry], tp_size: int) -> list[bytes]:
        """update_weights_from_tensor's payloads for one bucket in load_format "flattened_bucket":
        one serialized {flattened_tensor, metadata} per TP rank (each rank opens only its own
        copy, so the CUDA IPC reference counts of the bucket drop cleanly)."""
        from sglang.srt.utils.common import MultiprocessingSerializer
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

        # the handles then name the GPU by UUID, which the scheduler maps to its own device index
        monkey_patch_torch_reductions()
        metadata = [FlattenedTensorMetadata(name=e.name, shape=e.tensor.shape, dtype=e.tensor.dtype,
                                            start_idx=e.start, end_idx=e.end, numel=e.end - e.start)
                    for e in entries]
        payload = {"flattened_tensor": flat, "metadata": metadata}
        return [MultiprocessingSerializer.serialize(payload) for _ in range(tp_size)]

    def staging(self, nbytes: int) -> torch.Tensor:
        """nbytes of GPU memory SGLang's process can open through CUDA IPC: a block from plain
        cudaMalloc. With PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True torch maps memory with
        cuMem* calls, whose blocks CUDA IPC cannot share, so the setting is off for this one
        allocation."""
        expandable = _expandable_segments()
        if expandable:
            torch.cuda.memory._set_allocator_settings("expandable_segments:False")
        try:
            return torch.empty(nbytes, dtype=torch.uint8, device=self.device)
        finally:
            if expandable:
                torch.cuda.memory._set_allocator_settings("expandable_segments:True")

    def synchronize(self) -> None:
        torch.cuda.synchronize(self.device)

    def empty_cache(self) -> None:
        """Give the trainer's cached blocks back to the driver: SGLang's process cannot see them
        as free. Blocks SGLang opened through IPC come back once it has let go of them."""
        gc.collect()
        torch.cuda.ipc_collect()
        torch.cuda.empty_cache()

    def used_bytes(self) -> int:
        """The GPU's used memory as NVML counts it, every process's included."""
        return torch.cuda.device_memory_used(self.device)

    def reserved_bytes(self) -> int:
        """What this process's torch allocator holds."""
        return torch.cuda.memory_reserved(self.device)

    def free_bytes(self) -> int:
        return torch.cuda.mem_get_info(self.device)[0]
