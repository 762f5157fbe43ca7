"""Checkpoints on the GPU node: a `--preset gpu` run with the embedded model checkpoints and resumes;
an out-of-memory error forced by a KV cache that takes every free byte is survived as documented
(a checkpoint, a message naming the options, and a resume with a smaller cache that runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fastazr.runlog import checkpoint

pytestmark = pytest.mark.gpu

# the gpu preset's batch sizes, shorter responses: the test checks checkpoints, not learning
SHORT = ["--preset", "gpu", "--azr.propose-max-tokens", "256", "--azr.solve-max-tokens", "256", "--run.progress", "off"]


def train(*args: str, expect: int = 0, cwd=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastazr.train", *SHORT, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stderr[-4000:]}"
    return proc


def steps(out) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_gpu_preset_checkpoints_and_resumes(tmp_path):
    out = tmp_path / "run"
    train("--steps", "1", "--out", str(out), cwd=tmp_path)
    first = checkpoint.newest(checkpoint.checkpoint_root(out))
    assert first.name == "step_00000001" and checkpoint.verify(first) is None
    train("--resume", str(out), "--steps", "2", cwd=tmp_path)
    assert steps(out) == [1, 2]
    second = checkpoint.newest(checkpoint.checkpoint_root(out))
    state = json.loads((second / "state.json").read_text())
    assert second.name == "step_00000002" and state["optimizer"]["steps"] == 2, "the optimizer continued"
    from fastazr.model import load
    model, tokenizer = load(str(second / "model"), device="cuda")
    assert tokenizer is not None and model.config.num_layers == 30


def test_out_of_memory_in_generation_is_survived_as_documented(tmp_path):
    """A KV cache of 99.5% of the free memory leaves ~0.4 GB, and a 65,536-token prefill chunk needs
    more (SmolLM2's MLP alone: 65,536 x 1,536 x 2 x 2 bytes): generation runs out of memory."""
    out = tmp_path / "run"
    proc = train("--steps", "2", "--out", str(out), "--engine.kv-memory-fraction", "0.995",
                 "--engine.max-num-batched-tokens", "65536", expect=1, cwd=tmp_path)
    assert "out of memory in step 1" in proc.stderr and "--engine.kv-memory-fraction" in proc.stderr, proc.stderr[-3000:]
    assert "A checkpoint of step 0 was written" in proc.stderr
    assert checkpoint.newest(checkpoint.checkpoint_root(out)).name == "step_00000000"
    train("--resume", str(out), "--steps", "1", "--engine.kv-memory-fraction", "0.5",
          "--engine.max-num-batched-tokens", "8192", cwd=tmp_path)
    assert steps(out) == [1]


def test_a_kv_cache_that_cannot_be_allocated_names_the_option(tmp_path):
    proc = train("--steps", "1", "--out", str(tmp_path / "run"), "--engine.kv-memory-fraction", "1.0", expect=1,
                 cwd=tmp_path)
    assert "out of memory" in proc.stderr and "--engine.kv-memory-fraction" in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
