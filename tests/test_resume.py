"""Stopping and resuming `python -m fastazr.train` on the CPU with the embedded model: a run
stopped or killed anywhere continues from its newest good checkpoint and then computes what an
uninterrupted run computes, bit for bit (the CPU path is deterministic: fixed seeds, fp32, one
thread pool, the same batch composition each time).

Each run is a subprocess of tests/resume_driver.py, which can stop it at a point the test
chooses: a SIGKILL in the middle of a checkpoint write, a SIGINT inside a phase, an out-of-memory
error inside generation."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("resume_driver.py")
# A 2-layer random model with the embedded tokenizer: ~1 s a step on 2 cores. It writes noise, so
# every answer is malformed and every advantage 0; the entropy bonus makes the loss nonzero, so
# every update moves every weight and a resumed run that drifted by one bit shows.
MODEL = dict(architecture="llama", vocab_size=49152, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
             num_kv_heads=2, max_position_embeddings=2048)
TINY = ["--preset", "cpu", "--seed", "3", "--azr.batch-size", "2", "--azr.references", "1",
        "--azr.learnability-rollouts", "2", "--azr.propose-max-tokens", "24", "--azr.solve-max-tokens", "16",
        "--update.lr", "1e-3", "--update.entropy-coef", "0.01", "--run.progress", "off"]
VARYING = ("time/", "swap/", "host_memory_gib", "tokens_per_s")
"""Metrics that measure the machine, not the run."""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    from fastazr.model import Decoder, ModelConfig, Tokenizer, save_hf
    from fastazr.model.embedded import default_model_path
    from fastazr.model.gguf_file import GGUFFile

    path = default_model_path()
    tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata, str(path))
    torch.manual_seed(0)
    model = Decoder(ModelConfig(**MODEL, eos_token_ids=tokenizer.stop_token_ids), dtype=torch.float32)
    model.init_weights(0)
    return save_hf(model, tmp_path_factory.mktemp("tiny") / "model", tokenizer)


def train(out: Path, *args: str, model: Path | None = None, fault: str = "none",
          expect: int = 0) -> subprocess.CompletedProcess:
    """A run of the driver; a resumed run takes its model from the run's config.toml."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    chosen = ["--model", str(model)] if model is not None else []
    proc = subprocess.run([sys.executable, str(DRIVER), fault, *TINY, *chosen, "--out", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stderr[-4000:]}"
    return proc


def metrics(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if not k.startswith(VARYING)} for m in lines}


def final_state(out: Path):
    (newest,) = sorted((out / "checkpoints").glob("step_*"))[-1:]
    return tensors_of(newest), json.loads((newest / "state.json").read_text())


def tensors_of(directory: Path) -> dict:
    """The optimizer's moments and the model's weights (for an fp32 model, also its master)."""
    return {**load_file(directory / "optimizer.safetensors"),
            **{f"model.{k}": v for k, v in load_file(directory / "model" / "model.safetensors").items()}}


def assert_same_run(resumed: Path, reference: Path, steps: range) -> None:
    got, want = metrics(resumed), metrics(reference)
    assert sorted(got) == sorted(want), "one metrics line per step, none twice"
    for step in steps:
        assert got[step] == want[step], f"step {step} differs after resuming"
    (tensors, state), (ref_tensors, ref_state) = final_state(resumed), final_state(reference)
    assert state["step"] == ref_state["step"]
    assert state["buffers"] == ref_state["buffers"]
    assert any(name.startswith("model.") for name in ref_tensors)
    for name, tensor in ref_tensors.items():
        assert tensors[name].equal(tensor), f"{name} differs after resuming"


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model_dir) -> Path:
    out = tmp_path_factory.mktemp("reference") / "run"
    train(out, "--steps", "4", "--run.checkpoint-every", "1", model=model_dir)
    m = metrics(out)
    assert sorted(m) == [1, 2, 3, 4]
    assert all(abs(v["loss"]) > 0 and v["skipped_steps"] == 0 for v in m.values()), \
        "every reference step must train (no update would make equality trivial)"
    assert all(math.isfinite(v) for step in m.values() for v in step.values() if isinstance(v, float))
    return out


def test_stopped_after_two_steps_and_resumed_equals_uninterrupted(reference, model_dir, tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "2", model=model_dir)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000002"]
    train(out, "--resume", str(out), "--steps", "4")
    assert_same_run(out, reference, range(3, 5))
    assert (out / "checkpoints" / "step_00000004" / "model" / "config.json").is_file()


def test_killed_during_a_checkpoint_write_resumes_from_the_previous_one(reference, model_dir, tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "4", "--run.checkpoint-every", "1", model=model_dir, fault="kill-in-checkpoint-2", expect=-signal.SIGKILL)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert "step_00000001" in names and "step_00000002" not in names, names
    assert any(n.startswith(".step_00000002.partial") for n in names), "the killed write left its partial directory"
    proc = train(out, "--resume", str(out), "--steps", "4")
    assert "resumed from" in proc.stderr and "step_00000001" in proc.stderr
    assert_same_run(out, reference, range(2, 5))
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], "dead partials are cleared"


def test_sigint_inside_a_step_checkpoints_the_step_before_and_resumes(reference, model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(out, "--steps", "4", "--run.checkpoint-every", "0", model=model_dir, fault="sigint-in-validate-2",
                 expect=128 + signal.SIGINT)
    assert "stopped after step 1" in proc.stderr
    assert sorted(metrics(out)) == [1]
    train(out, "--resume", str(out), "--steps", "3")
    assert_same_run_prefix(out, reference, 3)


def test_out_of_memory_in_generation_checkpoints_and_names_the_options(reference, model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(out, "--steps", "4", "--run.checkpoint-every", "0", model=model_dir, fault="oom-in-solve-2", expect=1)
    assert "out of memory in step 2" in proc.stderr and "--engine.kv-memory-fraction" in proc.stderr
    assert "A checkpoint of step 1 was written" in proc.stderr
    train(out, "--resume", str(out), "--steps", "3")
    assert_same_run_prefix(out, reference, 3)


def test_a_time_budget_ends_the_run_checkpointed_before_a_step_that_would_not_fit(reference, model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(out, "--steps", "4", "--run.checkpoint-every", "0", "--run.max-minutes", "600", model=model_dir,
                 fault="long-step-2")
    assert "--run.max-minutes 600 reached after step 2" in proc.stderr, proc.stderr[-2000:]
    assert sorted(metrics(out)) == [1, 2]
    train(out, "--resume", str(out), "--steps", "4")
    assert_same_run(out, reference, range(3, 5))


def assert_same_run_prefix(resumed: Path, reference: Path, last: int) -> None:
    got, want = metrics(resumed), metrics(reference)
    assert sorted(got) == list(range(1, last + 1))
    for step in range(1, last + 1):
        assert got[step] == want[step], f"step {step} differs after resuming"
    tensors, _ = final_state(resumed)
    for name, tensor in tensors_of(reference / "checkpoints" / f"step_{last:08d}").items():
        assert tensors[name].equal(tensor), f"{name} differs after resuming"


def test_a_run_directory_is_never_overwritten_by_a_new_run(reference, model_dir):
    proc = train(reference, "--steps", "1", model=model_dir, expect=1)
    assert "already holds a run" in proc.stderr and "--resume" in proc.stderr


def test_a_damaged_newest_checkpoint_is_replaced_and_the_run_still_matches(reference, tmp_path):
    import shutil
    out = tmp_path / "run"
    shutil.copytree(reference, out, ignore=shutil.ignore_patterns(".lock"))
    damaged = out / "checkpoints" / "step_00000004" / "optimizer.safetensors"
    data = bytearray(damaged.read_bytes())
    data[-1] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in
                                               (out / "metrics.jsonl").read_text().splitlines()[:3]))
    proc = train(out, "--resume", str(out), "--steps", "4", "--run.checkpoint-keep", "1")
    assert "step_00000004 is unusable" in proc.stderr and "resumed from" in proc.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000004"]
    assert_same_run(out, reference, range(4, 5))


def test_resuming_refuses_what_would_lose_a_run(reference, model_dir, tmp_path):
    other = tmp_path / "other"
    train(other, "--steps", "1", model=model_dir)
    proc = train(other, "--resume", str(reference), "--steps", "5", expect=1)
    assert "already holds a run" in proc.stderr
    before = (reference / "config.toml").read_text()
    proc = train(reference, "--resume", str(reference), "--steps", "3", expect=1)
    assert "is at step 4 and --steps is 3" in proc.stderr
    assert (reference / "config.toml").read_text() == before, "a refused resume leaves the run's files alone"


def test_a_run_directory_takes_one_trainer_at_a_time(tmp_path):
    from fastazr.runlog.checkpoint import CheckpointError
    from fastazr.train import hold_run_lock

    first = hold_run_lock(tmp_path)
    with pytest.raises(CheckpointError, match="another process is training into"):
        hold_run_lock(tmp_path)
    first.close()
    hold_run_lock(tmp_path).close()


def test_evaluation_during_training_is_logged_with_the_step(model_dir, tmp_path):
    out = tmp_path / "run"
    train(out, "--steps", "2", "--run.eval-every", "2", "--run.eval-limit", "3", "--run.eval-max-tokens", "8",
          model=model_dir)
    lines = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert not [k for k in lines[1] if k.startswith("eval/")], "step 1 is not a multiple of 2"
    scores = {k: v for k, v in lines[2].items() if k.startswith("eval/")}
    assert {"eval/humaneval/trainer/greedy_pass@1", "eval/humaneval/plain/greedy_pass@1",
            "eval/output_prediction/trainer", "eval/input_prediction/plain"} <= set(scores)
    assert all(0 <= v <= 1 for v in scores.values()) and lines[2]["time/eval"] > 0
    records = [json.loads(x) for x in (out / "eval" / "step_2.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["bench"] == "humaneval"]) == 6


def test_a_full_disk_during_a_background_checkpoint_is_reported_and_the_run_goes_on(reference, model_dir, tmp_path):
    out = tmp_path / "run"
    proc = train(out, "--steps", "4", "--run.checkpoint-every", "1", model=model_dir, fault="enospc-in-checkpoint-2")
    assert "writing checkpoint" in proc.stderr and "No space left on device" in proc.stderr
    assert "previous checkpoints are intact" in proc.stderr
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["step_00000003", "step_00000004"], names
    assert_same_run(out, reference, range(1, 5))


def test_out_of_memory_in_an_evaluation_skips_it_and_training_goes_on(reference, model_dir, tmp_path):
    """The evaluation runs after the update: a checkpoint written then would pair the step before's
    boundary with this step's weights. It is skipped instead, and the run matches the reference."""
    out = tmp_path / "run"
    proc = train(out, "--steps", "4", "--run.checkpoint-every", "1", "--run.eval-every", "2", "--run.eval-limit", "2",
                 "--run.eval-max-tokens", "4", model=model_dir, fault="oom-in-eval-2")
    assert "evaluation at step 2 ran out of memory" in proc.stderr
    lines = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert not [k for k in lines[2] if k.startswith("eval/")] and [k for k in lines[4] if k.startswith("eval/")]
    tensors, state = final_state(out)
    ref_tensors, ref_state = final_state(reference)
    assert state["step"] == 4 and all(tensors[k].equal(v) for k, v in ref_tensors.items())
