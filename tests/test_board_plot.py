"""The run's views of its metrics: TensorBoard event files (fastazr.runlog.board) that read back
through TensorBoard's own reader and renderer, hostile model text included, and the PNGs of
`python -m fastazr.plot` from a metrics.jsonl like a real run's, half-written last line included."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.util.tensor_util import make_ndarray

from fastazr.azr.tasks import GROUPS, TASK_TYPES, InductionTask, Sample, Triplet
from fastazr.plot import main, plot_run, read_metrics
from fastazr.runlog.board import FIELD_CHARS, Board

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n"
PLOTS = {"valid_rate.png", "accuracy.png", "reward.png", "response_tokens.png", "time_split.png",
         "training_curves.png"}
PHASES = ("generate_propose", "sandbox_validate", "generate_solve", "sandbox_check", "train", "swap", "other")
HOSTILE = ("````\n```\n# ESCAPED heading\n<script>alert('ESCAPED')</script>\n~~~\n| ESCAPED | table |\n"
           "\r```\n\x00\x02\x03 \ud800 \u202e\U0001f600 **ESCAPED**\n" + "x" * 3 * FIELD_CHARS)


def metrics_record(step: int) -> dict:
    """One step's metrics with train.py's keys and plausible values."""
    m: dict = {"step": step}
    for k, task in enumerate(TASK_TYPES):
        m[f"valid_rate/{task}"] = min(1.0, 0.1 * step + 0.05 * k)
        m[f"accuracy/{task}"] = min(1.0, 0.08 * step)
        m[f"learnability/{task}"] = 0.3
        m[f"buffer_size/{task}"] = 4 + step
    for task, role in GROUPS:
        m[f"n/{task}/{role}"] = 2
        m[f"reward/{task}/{role}"] = -1.0 + 0.2 * step
        m[f"advantage_std/{task}/{role}"] = 0.5
        m[f"response_tokens/{task}/{role}"] = 160.0 - step
    m.update({f"time/{p}": 0.5 + k for k, p in enumerate(PHASES)})
    m.update({"time/step": 30.0, "tokens_per_s": 49.7, "gpu_memory_gib": 0.0, "loss": 0.01 * step,
              "loss_tokens": 1393 + step})
    return m


def write_run(run: Path, steps: int = 6, drop: tuple[str, ...] = ()) -> Path:
    """A run directory whose metrics.jsonl ends in a half-written line, as a running run's can."""
    run.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({k: v for k, v in metrics_record(s).items() if not k.startswith(drop)})
             for s in range(1, steps + 1)]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n" + lines[-1][:40])
    return run


def sample(task: str, role: str, status: str, text: str = "", reason: str = "", trained: bool = True,
           **details) -> Sample:
    return Sample(task, role, [1, 2], [3] * 7, [0.0] * 7, text, "eos", status=status, reason=reason, reward=0.5,
                  advantage=-0.25, trained=trained, details=details)


def accumulator(log_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def texts(events: EventAccumulator, tag: str) -> list[tuple[int, str]]:
    """(step, markdown) of a text tag; torch's add_text suffixes the tag with /text_summary."""
    return [(e.step, make_ndarray(e.tensor_proto).item().decode()) for e in events.Tensors(f"{tag}/text_summary")]


def test_board_scalars_read_back(tmp_path):
    board = Board(tmp_path / "tb")
    steps = {1: metrics_record(1), 2: {**metrics_record(2), "loss": math.nan, "grad_norm": math.inf}}
    for step, metrics in steps.items():
        board.step(step, {**metrics, "skipped": True, "note": "text"})
    board.close()
    events = accumulator(tmp_path / "tb")
    expected = {k for m in steps.values() for k in m} - {"step"}  # no bools, no strings, step is the x axis
    assert set(events.Tags()["scalars"]) == expected
    for tag in expected:
        read = {e.step: e.value for e in events.Scalars(tag)}
        assert read.keys() == {s for s, m in steps.items() if tag in m}, tag
        for step, value in read.items():
            want = steps[step][tag]
            assert value == pytest.approx(want, rel=1e-6) or (math.isnan(want) and math.isnan(value)), tag
    assert events.Scalars("grad_norm")[0].value == math.inf
    assert events.Tags()["tensors"] == []  # no samples, no text


def test_board_text_summaries(tmp_path):
    triplet = Triplet("def f(a):\n    return a[::-1]", "[1, 2]", "[2, 1]", step=1)
    induction = InductionTask("def f(x):\n    return x * 2", "doubles it", (("1", "2"),), (("3", "6"),))
    samples = [
        sample("deduction", "propose", "malformed", "no answer block here", reason="no <answer> block"),
        sample("deduction", "propose", "malformed", "still none"),
        sample("deduction", "propose", "valid", program=triplet.program, inputs=["[1, 2]"], output="[2, 1]"),
        sample("deduction", "solve", "correct", item=triplet, answer="[2, 1]"),
        sample("deduction", "solve", "wrong", trained=False, item=triplet, answer="LEARNABILITY"),
        sample("induction", "propose", "invalid", item=induction.program, program=induction.program,
               inputs=["1", "3"], pairs=[("1", "2")], reason="1 distinct inputs ran, 2 needed"),
        sample("induction", "solve", "malformed", "a rambling answer", item=induction),
    ]
    board = Board(tmp_path / "tb", samples_per_task=2)
    board.step(3, {"step": 3}, samples)
    board.close()
    events = accumulator(tmp_path / "tb")
    assert {t.removesuffix("/text_summary") for t in events.Tags()["tensors"]} == {
        "samples/deduction/propose", "samples/deduction/solve", "samples/induction/propose", "samples/induction/solve"}
    [(step, proposals)] = texts(events, "samples/deduction/propose")
    # two of three, one of each status first: the valid proposal is shown though it came last
    assert step == 3 and "**2.** valid" in proposals and "**3.**" not in proposals
    assert "no <answer> block" in proposals and "return a[::-1]" in proposals
    assert "reward +0.500" in proposals and "advantage -0.250" in proposals
    [(_, solves)] = texts(events, "samples/deduction/solve")
    assert "**1.** correct" in solves and "[1, 2]" in solves and "*answer*" in solves
    assert "LEARNABILITY" not in solves  # learnability rollouts are not shown
    [(_, induction_solve)] = texts(events, "samples/induction/solve")
    assert "doubles it" in induction_solve and "1 -> 2" in induction_solve and "a rambling answer" in induction_solve
    [(_, induction_propose)] = texts(events, "samples/induction/propose")
    assert "1 distinct inputs ran" in induction_propose and "*pairs*" in induction_propose


def test_board_survives_hostile_text(tmp_path):
    """Model text with backtick fences, markdown, HTML, control characters, a lone surrogate and
    far too many characters writes, and renders (through TensorBoard's own markdown path) with
    all of it inside code blocks."""
    with warnings.catch_warnings():  # its vendored bleach: "html5lib's sanitizer is deprecated", not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        from tensorboard.plugins.text.text_plugin import text_array_to_html
    samples = [sample("abduction", "propose", "malformed", HOSTILE, reason=HOSTILE[:80]),
               sample("abduction", "propose", "invalid", program=HOSTILE, inputs=[HOSTILE, "1"], reason="``` ESCAPED"),
               sample("abduction", "solve", "wrong", item=Triplet(HOSTILE, HOSTILE, "1"), answer=HOSTILE)]
    board = Board(tmp_path / "tb")
    board.step(1, {"step": 1}, samples)
    board.step(2, {"step": 2}, samples)
    board.flush()
    board.close()
    events = accumulator(tmp_path / "tb")
    for tag in ("samples/abduction/propose", "samples/abduction/solve"):
        documents = texts(events, tag)
        assert [step for step, _ in documents] == [1, 2]
        markdown = documents[0][1]
        assert len(markdown) < 8 * FIELD_CHARS + 2000  # every field cut to FIELD_CHARS
        assert "more characters" in markdown and "\\ud800" in markdown and "\x00" not in markdown
        tensor = next(e.tensor_proto for e in events.Tensors(f"{tag}/text_summary"))
        html = text_array_to_html(make_ndarray(tensor), enable_markdown=True)
        outside = re.sub(r"<pre><code>.*?</code></pre>", "", html, flags=re.S)
        assert "<pre><code>" in html and "ESCAPED" not in outside and "<script" not in html and "<h1" not in html


def test_read_metrics_skips_broken_lines(tmp_path):
    lines = [json.dumps({"step": 1, "loss": 1.0}), '{"step": 2, "lo', json.dumps({"step": 2, "loss": 2.0}),
             json.dumps({"step": 1, "loss": 1.5}), "[1, 2]", json.dumps({"step": True}),
             json.dumps({"step": 3, "loss": math.nan}),
             '{"step": 4, "loss": 0.']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))
    records = read_metrics(tmp_path / "metrics.jsonl")
    # the resumed run's step 1 replaces the first; broken and step-less lines are skipped
    assert [(r["step"], r["loss"]) for r in records[:2]] == [(1, 1.5), (2, 2.0)]
    assert records[2]["step"] == 3 and math.isnan(records[2]["loss"]) and len(records) == 3


def check_pngs(paths, directory: Path, names=PLOTS) -> None:
    assert {Path(p).name for p in paths} == names
    for p in paths:
        assert Path(p).parent == directory and Path(p).stat().st_size > 1000 and Path(p).read_bytes()[:8] == PNG


def test_plot_run(tmp_path):
    run = write_run(tmp_path / "run", drop=("accuracy/induction", "time/swap"))
    check_pngs(plot_run(run, tmp_path / "png"), tmp_path / "png")
    # every series of a figure missing: that figure is skipped, the overview says "no data" instead
    run = write_run(tmp_path / "partial", steps=1, drop=("response_tokens/", "valid_rate/"))
    check_pngs(plot_run(run), run / "plots", PLOTS - {"response_tokens.png", "valid_rate.png"})


def test_plot_command(tmp_path):
    run = write_run(tmp_path / "run")
    done = subprocess.run([sys.executable, "-m", "fastazr.plot", str(run)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    check_pngs(done.stdout.split(), run / "plots")


@pytest.mark.parametrize("setup, message", [
    (lambda d: d / "missing", "is not a directory"),
    (lambda d: d, "has no metrics.jsonl"),
])
def test_plot_command_rejects_a_directory_without_metrics(tmp_path, capsys, setup, message):
    with pytest.raises(SystemExit) as exited:
        main([str(setup(tmp_path))])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "python -m fastazr.train --out" in err


@pytest.mark.parametrize("content", ["", '{"step": 1, "valid_rate/deduction": 0.'])
def test_plot_command_without_metrics(tmp_path, capsys, content):
    (tmp_path / "metrics.jsonl").write_text(content)
    assert main([str(tmp_path)]) == 2
    assert "no complete metrics line" in capsys.readouterr().err
    assert not (tmp_path / "plots").exists()


def test_plot_command_exit_status(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastazr.plot", str(tmp_path / "missing")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "metrics.jsonl" in done.stderr and done.stdout == ""


def test_plot_draws_the_evaluations_of_the_steps_that_had_them(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    records = [metrics_record(s) for s in range(1, 7)]
    for r in records[1::2]:  # --run.eval-every 2
        r.update({"eval/humaneval/trainer/greedy_pass@1": 0.05 * r["step"], "eval/output_prediction/plain": 0.2})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    check_pngs(plot_run(run), run / "plots", PLOTS | {"eval.png"})
