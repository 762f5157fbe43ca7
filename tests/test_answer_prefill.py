"""--azr.answer-prefill: every response starts inside its <answer> block. The prompt ends with the
prefill (it is prompt, not trained), the parser reads it back in front of the completion, an
answer block the model leaves open is closed at its end, and a whole step with a policy that
only writes continuations gives valid tasks and right answers. Also the evaluation's 'prefill'
format, which reads responses the same way."""

from __future__ import annotations

import pytest
from test_azr import CharTokenizer, game

from fastazr.azr import parsing, prompts
from fastazr.azr.config import AZRConfig
from fastazr.eval import prompts as eval_prompts
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor


@pytest.fixture(scope="module")
def executor():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=512) as sb:
        yield TaskExecutor(sb)


def test_prefilled_text_closes_an_open_answer_and_leaves_a_closed_one():
    start = prompts.prefill("deduction", "solve")
    assert start == "<answer>\n```output\n"
    assert prompts.prefilled(start, "3\n```\n</answer>") == start + "3\n```\n</answer>"
    assert prompts.prefilled(start, "3\n```\nmore text") == start + "3\n```\nmore text</answer>"
    assert prompts.prefilled("", "free text") == "free text", "no prefill: the text is the completion"
    for completion in ("3\n```", "3\n</answer>", "3", "3\n```\n</answer> then <answer>junk"):
        parsed = parsing.solver_answer("deduction", prompts.prefilled(start, completion))
        assert parsed.ok and parsed.first("output") == "3", completion
    assert prompts.prefilled(start, "3\n</answer>tail") == start + "3\n\n```</answer>tail"
    empty = parsing.solver_answer("deduction", prompts.prefilled(start, ""))
    assert not empty.ok, "an empty completion is no answer"


def test_each_task_and_role_opens_the_block_it_must_write_first():
    assert prompts.prefill("deduction", "propose").endswith("```python\ndef f(")
    assert prompts.prefill("abduction", "propose").endswith("```python\ndef f(")
    assert prompts.prefill("induction", "propose").endswith("```input\n")
    assert prompts.prefill("abduction", "solve").endswith("```input\n")
    assert prompts.prefill("induction", "solve").endswith("```python\ndef f(")


def test_prompts_end_with_the_prefill_in_both_templates():
    tok = CharTokenizer()
    start = prompts.prefill("deduction", "solve")
    chat = "".join(map(chr, prompts.wrap("task", "chat", tok, start)))
    assert chat == "<user>task<assistant>" + start
    plain = "".join(map(chr, prompts.wrap("task", "plain", tok, start)))
    assert plain.endswith("Assistant: " + start) and "<think>" not in plain
    assert "".join(map(chr, prompts.wrap("task", "plain", tok))).endswith("Assistant: <think>")


def continuation(prompt: str, i: int) -> str:
    """A policy that writes only what follows the prefill (and never closes the answer)."""
    if prompt.endswith("```python\ndef f(") and "Design a new Python coding task" in prompt:
        return "xs):\n    return sorted(xs)[::-1]\n```\n```input\n[3, 1, 2]\n```"
    if prompt.endswith("```input\n") and "different inputs" in prompt:
        return "'ab'\n```\n```input\n[1, 2]\n```\n```message\nechoes its input\n```"
    if prompt.endswith("```output\n"):
        return "[3, 2, 1]\n```\n"
    if prompt.endswith("```input\n"):
        return "[1, 3, 2]\n```"
    if prompt.endswith("```python\ndef f("):
        return "a):\n    return a\n```"
    return "unexpected prompt"


def test_a_whole_step_where_the_policy_writes_only_continuations(executor):
    g = game(continuation, executor, answer_prefill=True, induction_min_pairs=2)
    proposals = g.generate(g.proposer_prompts(1), 1, 0)
    for s in proposals:
        assert s.text.startswith(prompts.prefill(s.task, "propose")) and s.text.endswith("</answer>")
    g.validate(proposals, 1)
    assert [s.status for s in proposals] == ["valid", "duplicate"] * 3, [s.reason for s in proposals]
    solves = g.generate(g.solver_prompts(proposals, 1), 1, 1)
    g.check(solves)
    trained = [s for s in solves if s.trained]
    # each type's first solve is this step's new task; the second is drawn from the buffer (the
    # identity seed, whose answer this policy does not know, except induction's identity)
    assert [(s.task, s.status) for s in trained] == [("deduction", "correct"), ("deduction", "wrong"),
                                                      ("abduction", "correct"), ("abduction", "wrong"),
                                                      ("induction", "correct"), ("induction", "correct")]


def test_without_the_option_prompts_carry_no_prefill(executor):
    g = game(continuation, executor)
    proposals = g.generate(g.proposer_prompts(1), 1, 0)
    assert all(not s.text.startswith("<answer>") for s in proposals)
    assert all(s.text == "unexpected prompt" for s in proposals)


def test_the_option_takes_only_booleans():
    with pytest.raises(ValueError, match="answer_prefill takes true or false"):
        AZRConfig(answer_prefill="yes")


def test_the_evaluation_prefill_format_reads_answers_like_the_trainer():
    start = eval_prompts.start("deduction", "prefill")
    assert start == prompts.prefill("deduction", "solve") and eval_prompts.start("deduction", "trainer") == ""
    assert eval_prompts.answer("deduction", prompts.prefilled(start, "'x'\n```"), "prefill") == "'x'"
    assert eval_prompts.start("humaneval", "prefill") == "<answer>\n```python\n"


def test_training_evaluates_the_format_it_trains_in():
    from fastazr.train import eval_formats

    assert eval_formats(AZRConfig()) == ("trainer", "plain")
    assert eval_formats(AZRConfig(answer_prefill=True)) == ("prefill", "plain")
