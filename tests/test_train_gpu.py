"""Two steps of `python -m fastazr.train --preset gpu` with the embedded model, on the GPU node."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from test_train import REQUIRED

pytestmark = pytest.mark.gpu


def test_two_gpu_steps_with_the_embedded_model(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastazr.train", "--preset", "gpu", "--steps", "2", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for metrics in lines:
        assert not [k for k in REQUIRED + ["gpu_memory_gib"] if k not in metrics]
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float)))
        assert metrics["n/deduction/solve"] == 64  # the paper's B
