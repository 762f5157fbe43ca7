"""Safetensors files streamed from wherever the tensors live, summed as they are written.

safetensors' own save_file wants every tensor on the host first, so a GPU state takes a
`.to("cpu")` into pageable memory: the driver copies that through its own bounce buffer,
synchronously, at a few GB/s, and on the H100 a 21.6 GB checkpoint written that way beside the
engine made a 1.13 s generation take 15.4 s. Here a GPU tensor crosses in 64 MB chunks into two
pinned buffers on a side stream: one chunk moves on the copy engine (no SM time, ~25 GB/s) while
the previous one is summed and written, so a file of any size needs 128 MB of pinned memory, and
the caller gets the file's CRC-32 from the bytes written instead of reading the file again.

The format is safetensors (an 8-byte little-endian header length, a JSON header of dtype, shape
and byte range per tensor padded with spaces to 8 bytes, then the data), which safetensors,
transformers, vLLM and SGLang read. Tensors are laid out largest element first, so each one
starts aligned to its element size, as safetensors itself does."""

from __future__ import annotations

import json
import os
import struct
import zlib
from collections import deque
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

CHUNK_BYTES = 64 * 2**20
_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


class PinnedStaging:
    """Two pinned chunk buffers and a copy stream on one GPU, reused by every file written through
    them. The copy stream runs unordered with the others: a writer passes wait() the event of the
    work that produced its tensors (a background writer, the update's last writes), or uses
    after_current_work()."""

    def __init__(self, device: torch.device, chunk_bytes: int = CHUNK_BYTES):
        if device.type != "cuda":
            raise ValueError(f"PinnedStaging stages GPU tensors, not {device.type} ones: write host tensors directly")
        if chunk_bytes < 16:
            raise ValueError(f"PinnedStaging's chunk_bytes must be at least 16 (one element of any dtype), got "
                             f"{chunk_bytes}")
        device = torch.device("cuda", torch.cuda.current_device() if device.index is None else device.index)
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(chunk_bytes, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.copied = [torch.cuda.Event() for _ in range(2)]

    @property
    def chunk_bytes(self) -> int:
        return self.buffers[0].numel()

    def wait(self, event: torch.cuda.Event) -> None:
        self.stream.wait_event(event)

    @classmethod
    def after_current_work(cls, device: torch.device) -> PinnedStaging:
        """Staging whose copies follow everything queued so far on this thread's stream: for a
        caller that writes tensors it has just computed, on its own thread."""
        staging = cls(device)
        staging.stream.wait_stream(torch.cuda.current_stream(staging.device))
        return staging


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None,
                      dtype: torch.dtype | None = None, staging: PinnedStaging | None = None) -> dict:
    """Write `tensors` (cast to `dtype` when given, chunk by chunk) to a safetensors file; returns
    {"bytes": size, "crc32": CRC-32 of the file}. GPU tensors go through `staging` (when None, one
    made for the call, ordered after this thread's queued work). The tensors must not change until
    the call returns."""
    entries = []
    for name, tensor in tensors.items():
        out_dtype = dtype or tensor.dtype
        if out_dtype not in _NAMES:
            raise ValueError(f"write_safetensors: {name} has dtype {out_dtype}, which has no safetensors name here "
                             f"(supported: {', '.join(str(d) for d in _NAMES)})")
        entries.append((name, tensor.detach(), out_dtype))
    entries.sort(key=lambda e: -e[2].itemsize)  # stable: same-size tensors keep their order
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, tensor, out_dtype in entries:
        nbytes = tensor.numel() * out_dtype.itemsize
        header[name] = {"dtype": _NAMES[out_dtype], "shape": list(tensor.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    if staging is None and any(t.device.type == "cuda" for _, t, _ in entries):
        staging = PinnedStaging.after_current_work(next(t.device for _, t, _ in entries if t.device.type == "cuda"))
    crc = zlib.crc32(prefix)
    with open(path, "wb") as f:
        f.write(prefix)
        for chunk in _host_chunks(entries, staging):
            crc = zlib.crc32(chunk, crc)  # zlib and the file write release the GIL: generation keeps running
            f.write(chunk)
    return {"bytes": len(prefix) + offset, "crc32": crc}


def _pieces(tensor: torch.Tensor, dtype: torch.dtype, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """The tensor as uint8 pieces of at most chunk_bytes, cast piece by piece: a cast allocates
    one chunk, not the tensor (the fp32 embedding of a 1.5B model cast to bf16 is 0.5 GB); only
    a non-contiguous tensor is copied whole first (model weights and optimizer state are not)."""
    flat = tensor.reshape(-1)
    step = max(1, chunk_bytes // max(dtype.itemsize, tensor.dtype.itemsize))
    for start in range(0, flat.numel(), step):
        yield flat[start:start + step].to(dtype).contiguous().view(torch.uint8)


def _host_chunks(entries: list, staging: PinnedStaging | None) -> Iterator[memoryview]:
    """The entries' bytes in order, as host memory valid until the next chunk is asked for."""
    chunk_bytes = staging.chunk_bytes if staging is not None else CHUNK_BYTES
    in_flight: deque[tuple[int, int]] = deque()
    issued = 0
    for _, tensor, dtype in entries:
        if tensor.device.type != "cuda":
            while in_flight:
                yield _drain(staging, *in_flight.popleft())
            for piece in _pieces(tensor, dtype, chunk_bytes):
                yield memoryview(piece.numpy())
            continue
        if tensor.device != staging.device:
            raise ValueError(f"write_safetensors: a tensor on {tensor.device} with staging buffers of {staging.device}")
        pieces = _pieces(tensor, dtype, chunk_bytes)
        while True:
            if len(in_flight) == len(staging.buffers):
                yield _drain(staging, *in_flight.popleft())
            with torch.cuda.stream(staging.stream):  # the slicing, casts and copies, never the caller's code
                piece = next(pieces, None)
                if piece is None:
                    break
                slot = issued % len(staging.buffers)
                staging.buffers[slot][:piece.numel()].copy_(piece, non_blocking=True)
                staging.copied[slot].record(staging.stream)
            in_flight.append((slot, piece.numel()))
            issued += 1
    while in_flight:
        yield _drain(staging, *in_flight.popleft())


def _drain(staging: PinnedStaging, slot: int, nbytes: int) -> memoryview:
    staging.copied[slot].synchronize()
    return memoryview(staging.buffers[slot][:nbytes].numpy())
