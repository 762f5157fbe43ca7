"""Board: a run's metrics, and a few of each step's tasks and answers, as TensorBoard event files.

Scalars are tagged with the metric's own key (valid_rate/deduction, time/train, ...), so the
dashboard and metrics.jsonl use the same names. Text goes to samples/<task>/<role>: markdown
whose model-written parts all sit in code blocks they cannot close (see _block)."""

from __future__ import annotations

import numbers
import re
from collections import Counter
from dataclasses import asdict

from torch.utils.tensorboard import SummaryWriter

from fastazr.azr.tasks import GROUPS, InductionTask, Sample, Triplet

FIELD_CHARS = 2000
"""Longest text shown per field; the rest is cut (samples/step_<n>.jsonl keeps all of it)."""

FIELDS = ("program", "message", "input", "inputs", "output", "shown", "hidden", "pairs", "answer")
"""What a sample's details may hold about its task and answer, in the order shown."""

# Python-Markdown (TensorBoard's renderer) uses STX/ETX as its own placeholders and TensorBoard
# drops NUL: shown as U+FFFD instead, like every other control character but tab and newline.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


class Board:
    """Writes to log_dir (the run's OUT/tb) each step's numeric metrics and, per (task type, role),
    up to samples_per_task samples as one markdown text summary."""

    def __init__(self, log_dir, samples_per_task: int = 3, purge_step: int | None = None):
        """purge_step: a resumed run's first step; TensorBoard hides the events at and after it
        that the interrupted run wrote, which the resumed run writes again."""
        self.samples_per_task = samples_per_task
        # 30 s rather than the default 120 s: a dashboard open on a live run trails it less
        self.writer = SummaryWriter(log_dir=str(log_dir), flush_secs=30, purge_step=purge_step)

    def step(self, step: int, metrics: dict, samples: list[Sample] | None = None) -> None:
        for key, value in metrics.items():
            # "step" is the x axis, not a series; bools are flags, not quantities. NaN and inf are
            # written as they are: a diverged loss should show at its step, not vanish.
            if key != "step" and isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(key, float(value), step)
        for task, role in GROUPS:
            # learnability rollouts (not trained) would crowd out the solver answers the step trained on
            group = [s for s in samples or () if s.task == task and s.role == role and s.trained]
            shown = _pick(group, self.samples_per_task)
            if shown:
                text = "\n\n---\n\n".join(_sample_markdown(k, s) for k, s in enumerate(shown, 1))
                self.writer.add_text(f"samples/{task}/{role}", text, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def _pick(group: list[Sample], n: int) -> list[Sample]:
    """Up to n samples, taking each status in turn (the first valid, the first invalid, ..., then
    the second of each): a step whose proposals are mostly malformed still shows its valid one."""
    seen: Counter[str] = Counter()
    ranks = []
    for s in group:
        ranks.append(seen[s.status])
        seen[s.status] += 1
    order = sorted(range(len(group)), key=ranks.__getitem__)
    return [group[k] for k in order[:n]]


def _sample_markdown(number: int, s: Sample) -> str:
    parts = [f"**{number}.** {s.status or 'unjudged'} · reward {s.reward:+.3f} · advantage {s.advantage:+.3f} · "
             f"{len(s.completion_ids)} tokens ({s.finish_reason})"]
    fields = [("reason", s.reason)] if s.reason else []
    fields += _fields(s)
    for label, value in fields:
        parts += [f"*{label}*", _block(_text(value))]
    return "\n\n".join(parts)


def _fields(s: Sample) -> list[tuple[str, object]]:
    """The task and the model's part in it: a solver's task is the buffer item it was given, a
    proposal's is what its response parsed to. The raw response where parsing failed."""
    known = dict(s.details)
    item = known.get("item")
    if s.role == "solve" and isinstance(item, (Triplet, InductionTask)):
        known = {**asdict(item), **known}
    fields = [(k, known[k]) for k in FIELDS if known.get(k)]
    if s.status == "malformed" or not fields:
        fields.append(("response", s.text))
    return fields


def _text(value) -> str:
    """A field as lines: lists one item a line, (input, output) pairs as 'input -> output'."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n".join(" -> ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v) for v in value)
    return str(value)


def _block(text: str) -> str:
    """text as a fenced code block it cannot close early: the fence is longer than any run of
    backticks inside (Python-Markdown closes a block only on the same fence, CommonMark on one at
    least as long). Cut to FIELD_CHARS; lone surrogates, which UTF-8 cannot encode (the writer
    would raise), become backslash escapes."""
    cut = len(text) - FIELD_CHARS
    # Markdown turns \r into a line break: done here so the shown lines are the rendered ones
    text = text[:FIELD_CHARS].replace("\r\n", "\n").replace("\r", "\n")
    text = _CONTROL.sub("\ufffd", text).encode("utf-8", "backslashreplace").decode("utf-8")
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    block = f"{fence}\n{text}\n{fence}"
    return block + (f"\n\n*… {cut:,} more characters*" if cut > 0 else "")
