"""Progress bars: the engine's and the sandbox's progress callbacks count exactly what they
report (completion tokens, jobs) without changing a result, and progress_bar shows a tqdm bar
on stderr only when asked to (or, in 'auto', when stdout is a terminal). CPU only."""
from __future__ import annotations

import io
import sys

import pytest
from tqdm import tqdm

from fastazr.rollout import Request, SamplingParams
from fastazr.runlog.progress import NullBar, progress_bar
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor
from test_rollout import SMALL_CACHE, engine, ids, naive_greedy, prompts, requests_mix, tiny_model


class Counter:
    def __init__(self):
        self.calls: list[int] = []

    def __call__(self, n: int) -> None:
        self.calls.append(n)


def stopping_requests(model) -> list[Request]:
    """Sampled, greedy and multi-sample requests, plus some that stop on a token of their own
    free run: the count must follow the stop-trimmed completions, not the tokens computed."""
    batch = requests_mix(seed=12)
    for i, prompt in enumerate(prompts(4, seed=13)):
        free_run, _ = naive_greedy(model, prompt, 9)
        batch.append(Request(prompt, SamplingParams(temperature=0.0, max_new_tokens=9,
                                                    stop_token_ids=(free_run[2 + i],), ignore_eos=True)))
    return batch


@pytest.mark.parametrize("overrides", [dict(), dict(decode_steps=4),
                                       dict(decode_steps=4, kv_cache_bytes=SMALL_CACHE // 32 * 12)],
                         ids=["one_pass", "decode_rounds", "preempting"])
def test_engine_progress_counts_every_completion_token_once_per_step(overrides):
    model = tiny_model()
    batch = stopping_requests(model)
    quiet = engine(model, **overrides).generate(batch)
    counter = Counter()
    eng = engine(model, **overrides)
    counted = eng.generate(batch, progress=counter)
    assert ids(counted) == ids(quiet)
    assert [[c.logprobs for c in g] for g in counted] == [[c.logprobs for c in g] for g in quiet]
    assert any(c.finish_reason == "stop_token" for g in counted for c in g)
    assert sum(counter.calls) == sum(len(c.completion_ids) for g in counted for c in g)
    # at most one call per step, never one per token of each sequence
    assert 0 < len(counter.calls) <= eng.stats["steps"]
    assert all(n > 0 for n in counter.calls)
    if "kv_cache_bytes" in overrides:
        assert eng.stats["preemptions"] > 0


def test_engine_progress_takes_a_bar_update_and_refuses_anything_else():
    model = tiny_model()
    eng = engine(model)
    request = Request(prompts(1)[0], SamplingParams(temperature=0.0, max_new_tokens=5, ignore_eos=True))
    bar = tqdm(file=io.StringIO(), unit="tok")
    (completion,), = eng.generate([request], progress=bar.update)
    bar.close()
    assert bar.n == len(completion.completion_ids) == 5
    with pytest.raises(TypeError, match="progress must be a callable"):
        eng.generate([request], progress=5)


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=512) as box:
        yield box


def test_sandbox_progress_totals_equal_the_job_count(sb):
    counter = Counter()
    calls = [("def f(x):\n    return x * 2\n", "f", str(i)) for i in range(150)]
    calls.append(("x = 1\n" * 200_000, "f", ""))  # past max_program_chars: refused unrun, counted too
    results = sb.call_many(calls, groups=[i % 2 for i in range(len(calls))], progress=counter)
    assert [r.value for r in results[:150]] == [str(2 * i) for i in range(150)]
    assert results[150].status == "error"
    assert sum(counter.calls) == len(calls)
    assert len(counter.calls) < len(calls)  # per zygote reply, not per job

    counter = Counter()
    printed = sb.exec_many([f"print({i})" for i in range(20)], progress=counter)
    assert [r.stdout for r in printed] == [f"{i}\n" for i in range(20)]
    assert sum(counter.calls) == 20
    with pytest.raises(TypeError, match="progress must be a callable"):
        sb.exec_many(["pass"], progress="bar")


def test_executor_progress_totals_match_what_the_caller_expects(sb):
    executor = TaskExecutor(sb)
    program = "def f(x):\n    return x + 1\n"
    items = [(program, "1"), (program, "2"), (program, "not literal"), ("def g():\n    pass\n", "1")]
    counter = Counter()
    outcomes = executor.validate_proposals(items, progress=counter)
    assert [o.valid for o in outcomes] == [True, True, False, False]
    assert sum(counter.calls) == 2 * len(items)

    abduction = [(program, "3", "2"), (program, "3", "1"), (program, "3", "open('x')")]
    induction = [(program, [("1", "2"), ("5", "6")]), ("nonsense(", [("1", "2"), ("2", "3"), ("3", "4")]),
                 (program, [])]
    counter = Counter()
    verdicts = executor.check_answers([("1", "1")], abduction, induction, progress=counter)
    assert verdicts == ([True], [True, False, False], [True, False, False])
    assert sum(counter.calls) == executor.check_jobs(abduction, induction) == 3 + 5


def test_a_self_play_step_shows_a_bar_per_phase_and_plays_the_same(sb, monkeypatch):
    from fastazr.azr import AZRConfig, SelfPlay
    from test_azr import CharTokenizer, ScriptedPolicy, proposer_script, solver_script

    def policy(prompt, i):
        return proposer_script(prompt, i) if "Design a new" in prompt or "different inputs" in prompt \
            else solver_script(prompt, i)

    def step(mode: str) -> tuple[list, str]:
        err = io.StringIO()
        monkeypatch.setattr(sys, "stderr", err)
        config = AZRConfig(batch_size=2, references=2, induction_inputs=4, induction_min_pairs=2,
                           learnability_rollouts=4)
        g = SelfPlay(config, ScriptedPolicy(policy), TaskExecutor(sb), CharTokenizer(), seed=7, progress_mode=mode)
        proposals = g.generate(g.proposer_prompts(3), 3, 0)
        g.validate(proposals, 3)
        solves = g.generate(g.solver_prompts(proposals, 3), 3, 1)
        g.check(solves)
        return [(s.text, s.status) for s in proposals + solves], err.getvalue()

    quiet, nothing = step("off")
    shown, bars = step("on")
    assert shown == quiet and nothing == ""
    for name, unit in (("propose", "tok"), ("validate", "job"), ("solve", "tok"), ("check", "job")):
        assert f"{name}: " in bars and f"{unit}/s" in bars, (name, bars)
    with pytest.raises(ValueError, match="progress mode must be one of"):
        SelfPlay(AZRConfig(), ScriptedPolicy(policy), TaskExecutor(sb), CharTokenizer(), seed=7, progress_mode="tty")


class FakeStdout(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_is_quiet_when_stdout_is_no_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stdout", FakeStdout(False))
    bar = progress_bar("propose", unit="tok", mode="auto")
    assert isinstance(bar, NullBar)
    with bar:
        bar.update(3)
    assert isinstance(progress_bar("check", 10, "job", mode="off"), NullBar)

    monkeypatch.setattr(sys, "stdout", FakeStdout(True))
    bar = progress_bar("propose", unit="tok", mode="auto")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setattr(sys, "stdout", None)  # pythonw, or a closed console
    assert isinstance(progress_bar("propose", mode="auto"), NullBar)


def test_on_writes_a_tqdm_bar_to_stderr(monkeypatch):
    out, err = FakeStdout(False), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    with progress_bar("validate", 40, "job", mode="on") as bar:
        assert isinstance(bar, tqdm)
        bar.update(40)
    assert out.getvalue() == ""
    assert "validate" in err.getvalue() and "/40" in err.getvalue() and "job/s" in err.getvalue()


def test_bad_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"one of \('auto', 'on', 'off'\), got 'yes'"):
        progress_bar("propose", mode="yes")
