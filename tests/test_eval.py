"""The evaluation pass end to end: Evaluator over scripted backends (an oracle that answers every
prompt right in the format it was asked in, and one that answers everything wrong), and
`python -m fastazr.eval` with the embedded model on a 10-problem subset."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from fastazr.eval.evaluate import EvalConfig, Evaluator
from fastazr.eval.humaneval import eval_sandbox_config
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor
from test_azr import CharTokenizer, ScriptedPolicy

LIMIT = 12


class Oracle(ScriptedPolicy):
    """Answers from the problems and tasks themselves, found by their text in the prompt; wrong=True
    answers with a well-formed wrong value, program or input instead."""

    def __init__(self, problems, tasks, wrong: bool = False):
        super().__init__(lambda prompt, sample: self.answer(prompt))
        self.problems, self.tasks, self.wrong = problems, tasks, wrong

    def answer(self, prompt: str) -> str:
        trainer = "<answer>" in prompt
        for task in self.tasks:
            if task.program in prompt and (task.input in prompt or task.output in prompt):
                kind = "input" if ("Find an input" in prompt or "Find arguments" in prompt) else "output"
                value = task.input if kind == "input" else task.output
                if self.wrong:
                    value = "'not it'" if value != "'not it'" else "0"
                return (f"<think>easy</think><answer>```{kind}\n{value}\n```</answer>" if trainer
                        else f"```python\n{value}\n```")
        for p in self.problems:
            if p.prompt.strip() in prompt:
                body = "    return None\n" if self.wrong else p.canonical_solution
                code = p.prompt + body
                return f"<think>...</think><answer>```python\n{code}\n```</answer>" if trainer else f"```python\n{code}\n```"
        raise AssertionError(f"the oracle met a prompt it does not know: {prompt[:300]}")


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(config=eval_sandbox_config(2)) as sb:
        yield sb


@pytest.mark.parametrize("wrong", [False, True])
def test_an_oracle_scores_everything_and_a_wrong_solver_nothing(sandbox, wrong):
    config = EvalConfig(limit=LIMIT, samples=3, max_tokens=64)
    evaluator = Evaluator(None, CharTokenizer(), sandbox, TaskExecutor(sandbox), config)
    evaluator.backend = oracle = Oracle(evaluator.problems, evaluator.tasks, wrong)
    assert len(evaluator.problems) == LIMIT and len(evaluator.tasks) >= LIMIT - 2
    metrics, records = evaluator.run()
    formats = ("trainer", "prefill", "plain")
    expected = {f"humaneval/{f}/{m}" for f in formats for m in ("greedy_pass@1", "pass@1", "pass@3")}
    expected |= {f"{b}/{f}" for b in ("output_prediction", "input_prediction") for f in formats}
    assert set(metrics) == expected
    assert all(v == (0.0 if wrong else 1.0) for v in metrics.values()), metrics
    assert len(oracle.requests) == 2, "one generate() call per benchmark"
    responses = 3 * LIMIT * (1 + 3) + 3 * 2 * len(evaluator.tasks)
    assert len(records) == responses and all(r["correct"] is (not wrong) for r in records)


def test_evaluation_config_is_checked():
    for bad in (dict(benches="humaneval,mmlu"), dict(formats=()), dict(samples=0), dict(limit=0),
                dict(temperature=float("nan")), dict(max_tokens=True)):
        with pytest.raises(ValueError, match="EvalConfig"):
            EvalConfig(**bad)
    assert EvalConfig(benches="reasoning").benches == ("reasoning",)


@pytest.mark.parametrize("argv,message", [
    (["--out", "{tmp}"], "is a directory"),
    (["--out", "{tmp}/file.txt/eval.json"], "cannot be written"),
    (["--bench", "mmlu"], "--bench takes some of"),
    (["--max-tokens", "0"], "--max-tokens must be an integer >= 1"),
    (["--prompt-format", "plain", "--samples", "0"], "--samples must be"),
])
def test_eval_command_refuses_bad_flags_before_loading_anything(tmp_path, capsys, argv, message):
    """An unwritable --out was found after the whole evaluation (hours at full size), and the
    errors named fields (--benches, --max_tokens) rather than the flags that set them."""
    from fastazr.eval.__main__ import main
    (tmp_path / "file.txt").write_text("")
    assert main([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "EvalConfig" not in err, err


@pytest.mark.slow
def test_eval_command_with_the_embedded_model_on_ten_problems(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "fastazr.eval", "--model", "default", "--limit", "10", "--max-tokens",
                           "48", "--workers", "2", "--out", str(out)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"humaneval/trainer/greedy_pass@1", "humaneval/plain/greedy_pass@1", "output_prediction/trainer",
            "input_prediction/plain"} <= set(result["metrics"])
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in result["metrics"].values())
    assert len([r for r in result["records"] if r["bench"] == "humaneval"]) == 30, "10 problems, 3 formats"
    assert "greedy_pass@1" in proc.stdout


def test_plain_answers_are_the_last_fenced_block_and_trainer_prompts_follow_the_template():
    from fastazr.eval import prompts

    traced = "Tracing:\n```python\nf(3)\n```\nResult:\n```\n5\n```\n"
    assert prompts.answer("deduction", traced, "plain") == "5"
    assert prompts.answer("deduction", "```python\n7\n```\n```python\n   \n```", "plain") == "7"
    assert prompts.answer("deduction", "it is 9", "plain") == "it is 9"
    assert prompts.answer("deduction", "<think>x</think><answer>5</answer>", "trainer") == "5"
    tok = CharTokenizer()
    plain = "".join(map(chr, prompts.encode("q", "trainer", tok, "plain")))
    chat = "".join(map(chr, prompts.encode("q", "trainer", tok, "chat")))
    assert plain.endswith("Assistant: <think>") and chat.startswith("<user>")
