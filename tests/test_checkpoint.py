"""Checkpoint directories: atomic writes, verification, fallback to the previous checkpoint, pruning,
failed writes that leave the previous checkpoints intact, and the run state's pieces (buffers,
RNG states) surviving their round trip."""

from __future__ import annotations

import errno
import json
import random
import zlib

import numpy as np
import pytest
import torch

from fastazr.azr.buffers import TaskBuffers
from fastazr.azr.tasks import InductionTask, Triplet
from fastazr.runlog import checkpoint
from fastazr.runlog.checkpoint import CheckpointError
from fastazr.runlog.run_state import rng_state, set_rng_state, truncate_run_files


def fill_with(payload: bytes):
    def fill(directory):
        (directory / "sub").mkdir()
        (directory / "sub" / "blob.bin").write_bytes(payload)
        (directory / "state.json").write_text(json.dumps({"payload": len(payload)}))
    return fill


def test_write_then_verify_and_newest(tmp_path):
    root = tmp_path / "checkpoints"
    first = checkpoint.write(root, 1, fill_with(b"a" * 1000))
    second = checkpoint.write(root, 2, fill_with(b"b" * 1000))
    assert checkpoint.verify(first) is None and checkpoint.verify(second) is None
    assert checkpoint.newest(root) == second
    assert not [p for p in root.iterdir() if p.name.startswith(".")], "no staging directory may remain"


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "garbage_manifest", "files_list",
                                    "files_null", "entry_int", "entry_without_bytes", "crc_string"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, damage, caplog):
    root = tmp_path / "checkpoints"
    good = checkpoint.write(root, 1, fill_with(b"a" * 4096))
    bad = checkpoint.write(root, 2, fill_with(b"b" * 4096))
    blob = bad / "sub" / "blob.bin"
    if damage == "truncate":
        blob.write_bytes(blob.read_bytes()[:100])
    elif damage == "flip":
        data = bytearray(blob.read_bytes())
        data[2000] ^= 0x01  # one bit: same size, so only the CRC can tell
        blob.write_bytes(bytes(data))
    elif damage == "delete":
        blob.unlink()
    elif damage == "manifest":
        (bad / checkpoint.MANIFEST).unlink()
    elif damage == "garbage_manifest":
        (bad / checkpoint.MANIFEST).write_text("{not json")
    else:  # valid JSON of another shape
        manifest = json.loads((bad / checkpoint.MANIFEST).read_text())
        entry = manifest["files"]["sub/blob.bin"]
        manifest["files"] = {"files_list": list(manifest["files"]), "files_null": None,
                             "entry_int": {"sub/blob.bin": 7}, "entry_without_bytes": {"sub/blob.bin": {"crc32": 1}},
                             "crc_string": {"sub/blob.bin": {**entry, "crc32": str(entry["crc32"])}}}[damage]
        (bad / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    assert checkpoint.verify(bad) is not None
    with caplog.at_level("WARNING"):
        assert checkpoint.newest(root) == good
    assert "step_00000002" in caplog.text and "unusable" in caplog.text


def test_no_usable_checkpoint_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.newest(tmp_path / "checkpoints")
    bad = checkpoint.write(tmp_path / "checkpoints", 1, fill_with(b"x"))
    (bad / "state.json").write_text("changed")
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        checkpoint.newest(tmp_path / "checkpoints")


def test_a_failed_write_leaves_the_previous_checkpoints_intact(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = checkpoint.write(root, 1, fill_with(b"a" * 100))
    real_fsync = checkpoint.os.fsync
    calls = {"n": 0}

    def full_disk(fd):
        calls["n"] += 1
        if calls["n"] == 2:  # mid-way through the second checkpoint's files
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoints are intact"):
        checkpoint.write(root, 2, fill_with(b"b" * 100))
    monkeypatch.undo()
    assert [p.name for p in root.iterdir()] == [good.name], "the partial directory is removed"
    assert checkpoint.newest(root) == good


def test_a_fill_that_fails_leaves_nothing_behind(tmp_path):
    root = tmp_path / "checkpoints"

    def broken(directory):
        (directory / "half").write_bytes(b"x" * 10)
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(CheckpointError, match="Permission denied"):
        checkpoint.write(root, 3, broken)
    assert list(root.iterdir()) == []


def test_prune_keeps_the_newest_complete_ones_and_clears_dead_partials(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 5):
        checkpoint.write(root, step, fill_with(bytes([step]) * 10))
    (root / ".step_00000009.partial-999999999").mkdir()  # a writer that died (no such pid)
    checkpoint.prune(root, keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003", "step_00000004"]


def test_buffers_round_trip_keeps_order_and_deduplication():
    buffers = TaskBuffers(capacity=3)
    for k in range(4):
        buffers["deduction"].add(Triplet(f"def f(a):\n    return a + {k}", str(k), str(2 * k), step=k))
    buffers["induction"].add(InductionTask("def f(a):\n    return -a", "negates", (("1", "-1"),), (("2", "-2"),), 5))
    state = json.loads(json.dumps(TaskBuffers.state(buffers.snapshot())))
    restored = TaskBuffers(capacity=3)
    restored.load_state(state)
    for task in ("deduction", "abduction", "induction"):
        assert restored[task].items() == buffers[task].items()
    again = Triplet("def f(a):\n    return a + 3  # same program", "3", "6")
    assert not restored["deduction"].add(again), "deduplication keys are rebuilt"


def test_rng_states_round_trip_through_json():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_truncate_run_files_drops_later_steps_and_partial_lines(tmp_path):
    (tmp_path / "samples").mkdir()
    lines = [json.dumps({"step": s, "x": s}) for s in (1, 2, 3)] + ['{"step": 4, "x"']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    for s in (1, 2, 3):
        (tmp_path / "samples" / f"step_{s}.jsonl").write_text("{}")
    truncate_run_files(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step_1.jsonl", "step_2.jsonl"]


def test_sums_a_writer_reports_must_be_of_the_file_on_disk(tmp_path):
    """A writer's precomputed size and CRC-32 are taken without reading the file back: a size that
    differs from the file's means the file is not what was summed, and the checkpoint fails
    rather than a manifest vouching for it."""
    root = tmp_path / "checkpoints"

    def fill(directory):
        (directory / "blob.bin").write_bytes(b"x" * 10)
        return {"blob.bin": {"bytes": 12, "crc32": 0}}

    with pytest.raises(CheckpointError, match="blob.bin has 10 bytes on disk, its writer wrote 12"):
        checkpoint.write(root, 1, fill)
    assert checkpoint.listed(root) == [] and not list(root.iterdir()), "nothing of the failed write remains"

    def honest(directory):
        (directory / "blob.bin").write_bytes(b"x" * 10)
        return {"blob.bin": {"bytes": 10, "crc32": zlib.crc32(b"x" * 10)}}

    assert checkpoint.verify(checkpoint.write(root, 2, honest)) is None
