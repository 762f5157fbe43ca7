"""`torchrun --nproc-per-node 2 -m fastazr.train` on the CPU (gloo): two ranks end to end with the
embedded model, two ranks against one process and across a resume with a tiny random model, the
refusal to resume on another world size, and a rank that fails mid-step taking the other down
with its error instead of leaving it to hang."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from distributed_helpers import free_port, rank_env, subprocess_env
from fastazr.train import PHASES
from test_resume import TINY, VARYING, model_dir  # noqa: F401 - model_dir is a fixture
from test_train import REQUIRED

pytestmark = pytest.mark.slow

DRIVER = Path(__file__).with_name("distributed_driver.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
DEBUG = ["--distributed.check-buffers", "true", "--distributed.timeout-s", "120"]
"""Every step compares the ranks' buffers; a lost rank fails a collective in 2 minutes, not 30."""


def torchrun(*args: str, expect: int = 0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([*TORCHRUN, "-m", "fastazr.train", *args], env=subprocess_env(), cwd=cwd,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{proc.stderr[-4000:]}"
    return proc


def metrics(out: Path) -> dict[int, dict]:
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {m["step"]: {k: v for k, v in m.items() if not k.startswith(VARYING) and not k.startswith("time_mean/")
                        and not k.startswith("swap_mean/")} for m in lines}


def test_two_ranks_with_the_embedded_model_end_to_end(tmp_path):
    """The CPU preset's model and tiny batches: both ranks train, the buffers stay identical (the
    digest check stops the run otherwise), and rank 0 alone writes metrics, samples and the
    console, each step once."""
    out = tmp_path / "run"
    proc = torchrun("--preset", "cpu", "--steps", "2", "--out", str(out), "--azr.batch-size", "1",
                    "--azr.references", "1", "--azr.learnability-rollouts", "2", "--azr.propose-max-tokens", "48",
                    "--azr.solve-max-tokens", "24", "--run.progress", "off", *DEBUG, cwd=tmp_path)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        distributed = ["time/sync"] + [f"time_mean/{p}" for p in PHASES]
        missing = [k for k in REQUIRED + distributed if k not in m]
        assert not missing, missing
        assert all(math.isfinite(v) for v in m.values() if isinstance(v, (int, float)))
        assert m["time_mean/train"] <= m["time/train"]
        samples = (out / "samples" / f"step_{m['step']}.jsonl").read_text().splitlines()
        assert len([s for s in samples if json.loads(s)["trained"]]) == 6  # 3 task types x 2 roles x B = 1
    assert proc.stdout.count("step 1/2") == 1 and proc.stdout.count("step 2/2") == 1
    (checkpoint,) = (out / "checkpoints").iterdir()
    assert sorted(p.name for p in checkpoint.glob("optimizer.*")) == [
        "optimizer.rank00000-of-00002.safetensors", "optimizer.rank00001-of-00002.safetensors"]


def test_two_ranks_play_one_process_game_and_resume_exactly(model_dir, tmp_path):  # noqa: F811
    """Seeds come from global indices: two ranks generate one process's samples (the tiny model's
    rounding does not depend on the batch here) and train to its metrics up to fp32 order. A
    2-rank run stopped after 2 steps and resumed is the uninterrupted one bit for bit; another
    world size is refused with what to run."""
    args = [*TINY, "--model", str(model_dir), *DEBUG]
    alone = tmp_path / "alone"
    subprocess.run([sys.executable, "-m", "fastazr.train", *args, "--steps", "2", "--out", str(alone)],
                   env=subprocess_env(), check=True, capture_output=True, timeout=900)
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    torchrun(*args, "--steps", "4", "--out", str(full), "--run.checkpoint-every", "1")
    one, two = metrics(alone), metrics(full)
    assert "time/sync" not in (alone / "metrics.jsonl").read_text(), "one process: no data-parallel phase"
    for step in (1, 2):
        assert (alone / "samples" / f"step_{step}.jsonl").read_text() == (full / "samples" /
                                                                          f"step_{step}.jsonl").read_text()
        for key, value in one[step].items():
            if key != "micro_batches":  # each rank packs its own share
                assert two[step][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key

    torchrun(*args, "--steps", "2", "--out", str(resumed))
    torchrun("--resume", str(resumed), "--steps", "4")
    assert metrics(resumed) == two
    for name in ("optimizer.rank00000-of-00002.safetensors", "optimizer.rank00001-of-00002.safetensors",
                 "model/model.safetensors"):
        got, want = (load_file(run / "checkpoints" / "step_00000004" / name) for run in (resumed, full))
        assert all(got[k].equal(want[k]) for k in want), name

    proc = subprocess.run([sys.executable, "-m", "fastazr.train", "--resume", str(resumed), "--steps", "5"],
                          env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1 and "written by 2 ranks and this run has one process" in proc.stderr
    assert "resume it on 2 ranks" in proc.stderr


def test_a_rank_that_raises_mid_step_stops_every_rank_with_its_error(model_dir, tmp_path):  # noqa: F811
    """Rank 1 raises in step 2's solver generation while rank 0 is busy there for 10 minutes (in
    no collective, so nothing of gloo's tells it): rank 0 stops within seconds, with rank 1's
    error. Launched as torchrun's workers without its agent, so no agent kills rank 0 for us."""
    port, out = free_port(), tmp_path / "run"
    args = [sys.executable, str(DRIVER), "raise-in-solve-2-1,stall-in-solve-2-0", *TINY, "--model", str(model_dir),
            "--out", str(out), "--steps", "3", *DEBUG]
    started = time.monotonic()
    ranks = [subprocess.Popen(args, env=subprocess_env(**rank_env(rank, 2, port)), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    results = [rank.communicate(timeout=300) for rank in ranks]
    elapsed = time.monotonic() - started
    codes = [rank.returncode for rank in ranks]
    assert codes == [1, 1], (codes, results[0][1][-3000:], results[1][1][-3000:])
    assert "RuntimeError: injected failure on rank 1" in results[1][1]
    assert "fastazr: rank 1 failed: RuntimeError: injected failure on rank 1" in results[0][1], results[0][1][-3000:]
    assert elapsed < 120, f"the ranks took {elapsed:.0f} s to stop"
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
