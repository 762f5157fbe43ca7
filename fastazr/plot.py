"""Plots of a run: `python -m fastazr.plot OUT [--out DIR]` writes PNGs (default DIR: OUT/plots).

Reads OUT/metrics.jsonl and nothing else, so it works on a finished run, a running one and a
copied one. A metric missing from the file skips its series; a figure with no series left is not
written. training_curves.png is the overview: valid proposals, solver accuracy, rewards and the
time split of each step."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Agg through its canvas, not pyplot: no display, no global figure state
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

# The keys game_metrics writes (fastazr/azr/report.py), spelled out here because importing them
# from fastazr.azr would import torch.
TASKS = ("deduction", "abduction", "induction")
ROLES = ("propose", "solve")
ROLE_STYLES = {"propose": "-", "solve": "--"}
OVERVIEW = "training_curves.png"
MARKER_STEPS = 30
"""Runs of at most this many steps draw markers: a run of one or two steps is otherwise invisible."""


def read_metrics(path: Path) -> list[dict]:
    """One record per step, in step order. A line that is not a JSON object with an integer step is
    skipped: a running run's last line may be half written, and a run resumed after a crash
    appends after such a line. A step logged twice (a resumed run repeats the steps after its
    checkpoint) keeps its last record."""
    by_step = {}
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                by_step[step] = record
    return [by_step[k] for k in sorted(by_step)]


def _number(value) -> float | None:
    """value as a float where it is a number (bools are not); inf becomes NaN, a gap in the line,
    rather than stretching the axis to infinity."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else math.nan


def _series(records: list[dict], key: str) -> tuple[list, list] | None:
    points = [(r["step"], v) for r in records if (v := _number(r.get(key))) is not None]
    if not points:
        return None
    steps, values = zip(*points)
    return list(steps), list(values)


def _lines(ax, records: list[dict], prefix: str, per_role: bool) -> bool:
    """prefix/<task> (or prefix/<task>/<role>) per task: one colour a task, one line style a role."""
    drawn = False
    for colour, task in enumerate(TASKS):
        for role in ROLES if per_role else (None,):
            key = f"{prefix}/{task}/{role}" if role else f"{prefix}/{task}"
            xy = _series(records, key)
            if xy:
                ax.plot(*xy, color=f"C{colour}", linestyle=ROLE_STYLES.get(role, "-"),
                        marker="o" if len(xy[0]) <= MARKER_STEPS else None, markersize=3,
                        label=f"{task} {role}" if role else task)
                drawn = True
    return drawn


def _rates(prefix: str) -> Callable:
    def draw(ax, records):
        ax.set_ylim(-0.02, 1.02)
        return _lines(ax, records, prefix, per_role=False)
    return draw


def _edges(steps: list[int]) -> list[float]:
    """Bar edges halfway between steps, so each step's bar meets its neighbours' (steps may skip)."""
    if len(steps) == 1:
        return [steps[0] - 0.5, steps[0] + 0.5]
    mids = [(a + b) / 2 for a, b in zip(steps, steps[1:])]
    return [2 * steps[0] - mids[0], *mids, 2 * steps[-1] - mids[-1]]


def _time_split(ax, records: list[dict]) -> bool:
    """Stacked bars of time/<phase>, with time/step over them: the gap is time no phase counted.
    Phases are every time/ key in the file, in first-seen order (train.py's PHASES order), so a
    phase added later needs no change here. A phase is one stairs artist rather than a bar per
    step: ax.bar takes tens of seconds on a few thousand steps."""
    phases = list(dict.fromkeys(k for r in records for k in r if k.startswith("time/") and k != "time/step"))
    edges = _edges([r["step"] for r in records])
    bottom = [0.0] * len(records)
    for colour, key in enumerate(phases):
        heights = [v if (v := _number(r.get(key))) is not None and not math.isnan(v) else 0.0 for r in records]
        top = [b + h for b, h in zip(bottom, heights)]
        ax.stairs(top, edges, baseline=bottom, fill=True, color=f"C{colour % 10}", label=key[5:])
        bottom = top
    total = _series(records, "time/step")
    if total:
        ax.plot(*total, color="black", linewidth=1, label="step")
    return bool(phases or total)


def _evaluations(ax, records: list[dict]) -> bool:
    """Every eval/ score (--run.eval-every): HumanEval pass rates, output and input prediction, a
    line each, at the steps that were evaluated."""
    keys = list(dict.fromkeys(k for r in records for k in r if k.startswith("eval/")))
    ax.set_ylim(-0.02, 1.02)
    for colour, key in enumerate(keys):
        xy = _series(records, key)
        if xy:
            ax.plot(*xy, color=f"C{colour % 10}", marker="o", markersize=3, label=key[5:])
    return bool(keys)


@dataclass(frozen=True)
class Panel:
    file: str
    title: str
    ylabel: str
    draw: Callable
    """draw(ax, records) -> whether any series was there to draw."""


PANELS = (
    Panel("valid_rate.png", "Valid proposals", "share of proposals", _rates("valid_rate")),
    Panel("accuracy.png", "Solver accuracy", "share correct", _rates("accuracy")),
    Panel("reward.png", "Mean reward", "reward", lambda ax, r: _lines(ax, r, "reward", per_role=True)),
    Panel("response_tokens.png", "Response length", "tokens",
          lambda ax, r: _lines(ax, r, "response_tokens", per_role=True)),
    Panel("time_split.png", "Time per step by phase", "seconds", _time_split),
    Panel("eval.png", "Evaluation (HumanEval, code reasoning)", "score", _evaluations),
)
OVERVIEW_PANELS = ("valid_rate.png", "accuracy.png", "reward.png", "time_split.png")


def _draw(ax, panel: Panel, records: list[dict]) -> bool:
    drawn = panel.draw(ax, records)
    ax.set_title(panel.title)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if drawn:
        # beside the axes: inside, it would cover the top of the curves and the time stack
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1))
    else:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="grey")
    return drawn


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def plot_run(run_dir, out_dir=None) -> list[Path]:
    """Writes the PNGs of run_dir's metrics.jsonl to out_dir (default run_dir/plots) and returns
    their paths. Raises FileNotFoundError without metrics.jsonl, ValueError when it holds no
    complete record or none of the plotted metrics."""
    metrics = Path(run_dir) / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics} not found: pass the directory `python -m fastazr.train --out` wrote")
    records = read_metrics(metrics)
    if not records:
        raise ValueError(f"{metrics} holds no complete metrics line yet (a run writes one per finished step)")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for panel in PANELS:
        fig = Figure(figsize=(8, 4.5), layout="constrained")
        if _draw(fig.add_subplot(), panel, records):
            written.append(_save(fig, out / panel.file))
    if not written:
        raise ValueError(f"{metrics} holds none of the plotted metrics (valid_rate/, accuracy/, reward/, "
                         f"response_tokens/, time/)")
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    fig.suptitle(f"{Path(run_dir).resolve().name}: steps {records[0]['step']}-{records[-1]['step']}")
    by_file = {p.file: p for p in PANELS}
    for ax, name in zip(fig.subplots(2, 2).flat, OVERVIEW_PANELS):
        _draw(ax, by_file[name], records)
    written.append(_save(fig, out / OVERVIEW))
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastazr.plot", description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run's directory: the --out of python -m fastazr.train, "
                                               "holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: RUN/plots)")
    args = parser.parse_args(argv)
    hint = "pass the directory a `python -m fastazr.train --out DIR` run wrote (it holds metrics.jsonl)"
    if not args.run.is_dir():
        parser.error(f"{args.run} is not a directory: {hint}")
    if not (args.run / "metrics.jsonl").is_file():
        parser.error(f"{args.run} has no metrics.jsonl: {hint}")
    try:
        paths = plot_run(args.run, args.out)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
