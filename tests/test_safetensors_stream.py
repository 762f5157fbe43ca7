"""The streamed safetensors writer: files that safetensors reads back bit for bit, at chunk sizes
that split tensors at odd places, casts done piece by piece, the CRC-32 and size it reports equal
to the file's, and element alignment kept. The GPU test drives the pinned two-buffer pipeline
with chunks far smaller than the tensors, so every slot is reused many times."""

from __future__ import annotations

import json
import struct
import zlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fastazr.model import safetensors_stream
from fastazr.model.safetensors_stream import PinnedStaging, write_safetensors


def tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    made = {"w.f16": torch.randn(7, 13, generator=g).half(), "w.f32": torch.randn(33, 17, generator=g),
            "w.bf16": torch.randn(5, 9, 3, generator=g).bfloat16(), "ids": torch.randint(-9, 9, (11,), generator=g),
            "mask": torch.rand(19, generator=g) > 0.5, "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4),
            "transposed": torch.randn(6, 10, generator=g).t()}
    return {k: v.to(device) for k, v in made.items()}


def check_file(path, written: dict, entry: dict, cast: torch.dtype | None = None) -> None:
    data = path.read_bytes()
    assert entry == {"bytes": len(data), "crc32": zlib.crc32(data)}, "the reported sums are the file's"
    loaded = load_file(path)
    assert loaded.keys() == written.keys()
    for name, tensor in written.items():
        want = tensor.cpu().to(cast) if cast is not None else tensor.cpu()
        assert loaded[name].dtype == want.dtype and loaded[name].shape == want.shape, name
        assert torch.equal(loaded[name], want), f"{name} differs after the round trip"
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert (8 + length) % 8 == 0, "the data must start 8-byte aligned"
    for name, info in header.items():
        if name != "__metadata__":
            assert info["data_offsets"][0] % loaded[name].element_size() == 0, f"{name} is not aligned to its element"


@pytest.mark.parametrize("chunk", [7, 1000, 64 * 2**20], ids=["7B", "1000B", "64MB"])
def test_round_trip_on_the_host_at_chunk_sizes_that_split_tensors(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(safetensors_stream, "CHUNK_BYTES", chunk)
    written = tensors()
    path = tmp_path / "t.safetensors"
    entry = write_safetensors(path, written, {"format": "pt"})
    check_file(path, written, entry)
    with safe_open(path, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_a_cast_is_done_piece_by_piece_and_equals_a_whole_cast(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors_stream, "CHUNK_BYTES", 10)  # 2 bf16 elements but 5 fp32 source bytes a piece
    written = {"a": torch.randn(37, 3), "b": torch.randn(1, 101)}
    path = tmp_path / "cast.safetensors"
    check_file(path, written, write_safetensors(path, written, dtype=torch.bfloat16), cast=torch.bfloat16)


def test_an_unsupported_dtype_names_the_tensor(tmp_path):
    with pytest.raises(ValueError, match="c64.*complex64"):
        write_safetensors(tmp_path / "x.safetensors", {"c64": torch.zeros(3, dtype=torch.complex64)})


def test_staging_buffers_are_for_gpus_only():
    with pytest.raises(ValueError, match="host tensors directly"):
        PinnedStaging(torch.device("cpu"))


@pytest.mark.gpu
def test_gpu_tensors_through_small_pinned_buffers(tmp_path):
    written = tensors("cuda")
    written["big"] = torch.randn(1001, 77, device="cuda")
    staging = PinnedStaging(torch.device("cuda", torch.cuda.current_device()), chunk_bytes=1000)
    path = tmp_path / "gpu.safetensors"
    check_file(path, written, write_safetensors(path, written, staging=staging))
    mixed = {**written, "host": torch.arange(10)}  # a host tensor after GPU chunks still in flight
    check_file(path, mixed, write_safetensors(path, mixed, staging=staging))
    floats = {k: v for k, v in written.items() if v.is_floating_point()}
    entry = write_safetensors(path, floats, dtype=torch.bfloat16, staging=staging)
    check_file(path, floats, entry, cast=torch.bfloat16)


@pytest.mark.gpu
def test_a_call_without_staging_writes_what_the_caller_just_computed(tmp_path):
    """Staging made for the call follows the caller's queued kernels: the copy stream would
    otherwise read 256 MB that a chain of kernels on the default stream is still writing."""
    x = torch.zeros(64 * 2**20, device="cuda")
    for _ in range(20):  # ~tens of ms of queued work ahead of the writer's first copy
        x.add_(1.0)
    path = tmp_path / "fresh.safetensors"
    write_safetensors(path, {"x": x})
    assert bool((load_file(path)["x"] == 20.0).all())
