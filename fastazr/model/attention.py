"""Causal attention over packed variable-length sequences, through the best kernel a machine has.

Backends, best first:
- 'fastazr': fastazr.kernels.varlen_attention (Triton; CUDA). First because it computes what the
  rollout engine's attention kernels compute, to the last bit, which keeps the trainer's
  logprobs the engine's (SmolLM2, bf16: flash attention's rounding alone moved them by ~2e-2);
  it is ~1.4x slower than torch_varlen forward and backward (MFU 0.415 vs 0.441 on a 1.5B update).
- 'flash_attn': flash-attn's flash_attn_varlen_func (optional extra; CUDA, fp16/bf16).
- 'torch_varlen': torch.nn.attention.varlen.varlen_attn, torch's own FlashAttention over
  cu_seqlens (CUDA, fp16/bf16; torch >= 2.9).
- 'sdpa': scaled_dot_product_attention one sequence at a time with is_causal, any device and
  dtype: the CPU path. A block-diagonal mask over the packed batch would make attention
  quadratic in the batch's tokens, not each sequence's: on CPU the math kernel then keeps the
  T x T scores of every layer for backward (2,860 packed tokens of SmolLM2: 8.8 GB, ~10x the
  time), where is_causal takes torch's flash kernel, linear in memory.

The choice is made once per (device, dtype), logged, and can be forced by name."""

from __future__ import annotations

import functools
import importlib.util
import inspect
import logging

import torch
import torch.nn.functional as F

from .errors import ModelError

log = logging.getLogger(__name__)

BACKENDS = ("fastazr", "flash_attn", "torch_varlen", "sdpa")


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `backend` cannot run on this device and dtype, or None when it can."""
    if backend not in BACKENDS:
        return f"unknown attention backend {backend!r} (choose from {', '.join(BACKENDS)} or 'auto')"
    if backend == "sdpa":
        return None
    if device.type != "cuda":
        return f"{backend} needs a CUDA device, the model is on {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return f"{backend} needs an Ampere or newer GPU"
    if backend == "fastazr":
        return None if _triton_installed() else "Triton is not installed (pip install triton)"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{backend} needs fp16 or bf16, the model is {dtype}"
    if backend == "flash_attn" and _flash_attn_varlen() is None:
        return "flash-attn is not installed (pip install flash-attn)"
    if backend == "torch_varlen" and _torch_varlen() is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen (needs >= 2.9)"
    return None


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b, device, dtype) is None]


@functools.lru_cache(maxsize=None)
def _choose(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    if requested != "auto":
        reason = unavailable_reason(requested, device, dtype)
        if reason:
            raise ModelError(f"attention backend {requested!r} cannot run here: {reason}; "
                             "pass attention='auto' to pick the best available one")
        chosen = requested
    else:
        chosen = available_backends(device, dtype)[0]
    log.info("attention backend for %s %s: %s (available: %s)", device, dtype, chosen,
             ", ".join(available_backends(device, dtype)))
    return chosen


def choose_backend(requested: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend to use: `requested` if it can run here, the best available for 'auto'."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _choose(requested, device, dtype)


@functools.lru_cache(maxsize=None)
def _varlen_signature() -> frozenset[str]:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def varlen_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            max_seqlen: int, backend: str) -> torch.Tensor:
    """q [T, Hq, D], k and v [T, Hkv, D] of sequences packed back to back (cu_seqlens int32
    [B + 1]) -> [T, Hq, D]; each token attends to itself and earlier tokens of its sequence."""
    groups = q.shape[1] // k.shape[1]
    if backend == "fastazr":
        # imported here: the model must load where Triton is not installed
        from fastazr.kernels.varlen_attention import varlen_attention
        return varlen_attention(q, k, v, cu_seqlens, max_seqlen)
    if backend == "flash_attn":
        return _flash_attn_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    if backend == "torch_varlen":
        params = _varlen_signature()
        kwargs = {}
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        if "window_size" in params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        return _torch_varlen()(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)
    bounds = cu_seqlens.tolist()
    outs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        qs = q[start:stop].transpose(0, 1)
        ks, vs = (_repeat_kv(t[start:stop], groups).transpose(0, 1) for t in (k, v))
        outs.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    return torch.cat(outs) if outs else q.new_empty(q.shape)
