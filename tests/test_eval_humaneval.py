"""HumanEval scoring: loading the problems, reading programs out of responses, verdicts from the
sandbox (every canonical solution passes, wrong and cheating programs fail) and pass@k."""

import ast
import math
import os
from dataclasses import replace

import pytest

from fastazr.eval import (Problem, check_programs, eval_sandbox_config, extract_program, load_humaneval, pass_at_k,
                          score)
from fastazr.sandbox import Sandbox, SandboxConfig


@pytest.fixture(scope="module")
def problems():
    return load_humaneval()


@pytest.fixture(scope="module")
def sb():
    with Sandbox(config=eval_sandbox_config(2)) as box:
        yield box


def entry_function(problem: Problem) -> str:
    """The canonical entry-point function alone: no imports, no helpers from the prompt."""
    source = problem.prompt + problem.canonical_solution
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == problem.entry_point)
    return ast.get_source_segment(source, node)


def stub(problem: Problem, body: str) -> str:
    return f"```python\ndef {problem.entry_point}(*args, **kwargs):\n    {body}\n```"


# ---- problems ----

def test_load_humaneval_in_task_order(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert problems[0].entry_point == "has_close_elements" and "def check(candidate)" in problems[0].test
    assert [p.task_id for p in load_humaneval(3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]


@pytest.mark.parametrize("limit", [0, -1, 2.0, "5", True])
def test_load_humaneval_rejects_bad_limits(limit):
    with pytest.raises(ValueError, match="limit must be an int >= 1"):
        load_humaneval(limit)


# ---- verdicts ----

def test_every_canonical_solution_passes_in_each_response_shape(problems, sb):
    """Three samples per problem in one batch: the full program as a plain response, the entry
    function alone in the trainer's format (imports and helpers must come from the prompt), and
    the bare body a completion model writes."""
    programs = [[extract_program(p, f"Here it is:\n```python\n{p.prompt}{p.canonical_solution}```\n"),
                 extract_program(p, f"<think>\n```python\ndef {p.entry_point}():\n    pass\n```\n</think>\n"
                                    f"<answer>\n```python\n{entry_function(p)}\n```\n</answer>"),
                 extract_program(p, p.canonical_solution)]
                for p in problems]
    assert all(program is not None for row in programs for program in row)
    results = check_programs(sb, problems, programs)
    assert [p.task_id for p, row in zip(problems, results) if not all(row)] == []
    assert score(results, (1, 3)) == {"pass@1": 1.0, "pass@3": 1.0}


# An answer that makes every comparison true and every arithmetic result itself.
LIAR = '''
class Liar:
    def __eq__(self, other): return True
    def __ne__(self, other): return False
    __lt__ = __le__ = __gt__ = __ge__ = __eq__
    def __bool__(self): return True
    def __hash__(self): return 0
    def __len__(self): return 0
    def __iter__(self): return iter(())
for op in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "abs", "neg", "round", "getitem",
           "radd", "rsub", "rmul", "rtruediv"):
    setattr(Liar, f"__{op}__", lambda self, *args: self)
'''


def test_wrong_solvers_score_zero(problems, sb):
    programs = [[extract_program(p, stub(p, "return None")),
                 extract_program(p, stub(p, "raise ValueError('no idea')")),
                 extract_program(p, f"```python\n{LIAR}\ndef {p.entry_point}(*args, **kwargs):\n    return Liar()\n```")]
                for p in problems]
    results = check_programs(sb, problems, programs)
    assert [p.task_id for p, row in zip(problems, results) if any(row)] == []
    assert score(results, (1, 3)) == {"pass@1": 0.0, "pass@3": 0.0}


def test_the_liar_fools_a_naive_harness(problems, sb):
    """The control for the test above: program + test + check() in one namespace, as the
    reference harness runs them, passes the liar."""
    sources = [f"{p.prompt}\n{LIAR}\ndef {p.entry_point}(*args, **kwargs):\n    return Liar()\n\n{p.test}\n"
               f"check({p.entry_point})\nprint('passed')\n" for p in problems[:10]]
    assert sum(r.ok and r.stdout == "passed\n" for r in sb.exec_many(sources)) >= 8


def escape_attempts(problem: Problem) -> dict[str, str]:
    """Programs for HumanEval/2 (truncate_number) that are wrong or try to pass without being
    right, by name; 'correct' is the control."""
    right = f"{problem.prompt}    return number % 1.0\n"
    wrong = f"{problem.prompt}    return 0.5\n"  # passes the first assert only
    return {
        "correct": right,
        "shell": f"import os\nos.system('touch /tmp/fastazr-eval-escape')\n{right}",
        "sys.exit before tests": f"import sys\n{wrong}sys.exit(0)\n",
        "exit builtin": f"{wrong}exit(0)\n",
        "os._exit before tests": f"import os\n{wrong}os._exit(0)\n",
        "os._exit in the candidate": f"import os\n{problem.prompt}    os._exit(0)\n",
        "SystemExit in the candidate": f"{problem.prompt}    raise SystemExit(0)\n",
        "own check": f"{wrong}def check(candidate):\n    pass\ncheck = lambda c: None\n",
        "fake output": f"{wrong}print('passed'); print('ok'); print(True)\n",
        # a well-formed "ok" frame on the child's result channel, then exit: a frame is believed,
        # but its value is not this job's token
        "forged result": f"import os, sys\n{wrong}sys.modules['fastazr._sandbox'].send_result(3, 0, 'True', '')\n"
                         "os._exit(0)\n",
        "global abs": f"{wrong}abs = lambda x: 0\n",
        "patched builtins.abs": f"import builtins\nbuiltins.abs = lambda x: 0\n{wrong}",
        "float subclass": f"class F(float):\n    def __eq__(self, o): return True\n    def __sub__(self, o): return F(0)\n"
                          f"{problem.prompt}    return F(0.0)\n",
        "liar": f"{LIAR}{problem.prompt}    return Liar()\n",
        "infinite loop": f"while True:\n    pass\n{right}",
        "memory bomb": f"x = bytearray(8 << 30)\n{right}",
        "syntax error": f"{problem.prompt}    return number %% 1\n",
    }


def test_escapes_and_cheats_fail(problems, sb):
    problem = problems[2]
    attempts = escape_attempts(problem)
    [verdicts] = check_programs(sb, [problem], [list(attempts.values()) + [None]], timeout_s=1.0)
    names = [*attempts, "no program"]
    assert dict(zip(names, verdicts)) == {name: name == "correct" for name in names}
    assert not os.path.exists("/tmp/fastazr-eval-escape")


def test_eval_sandbox_config_only_adds_preloads():
    config, default = eval_sandbox_config(3), SandboxConfig()
    assert config.workers == 3 and config.preload == (*default.preload, "hashlib")
    assert replace(config, workers=default.workers, preload=default.preload) == default


def test_check_programs_validates_its_inputs(problems, sb):
    with pytest.raises(ValueError, match="one list of samples per problem"):
        check_programs(sb, problems[:2], [["x"]])
    with pytest.raises(ValueError, match="timeout_s"):
        check_programs(sb, problems[:1], [["x"]], timeout_s=0)
    with pytest.raises(TypeError, match=r"programs\[0\]\[0\] must be str or None"):
        check_programs(sb, problems[:1], [[b"x"]])
    with pytest.raises(TypeError, match="Sandbox"):
        check_programs(None, problems[:1], [["x"]])
    assert check_programs(sb, problems[:2], [[], [None]]) == [[], [False]]


# ---- pass@k ----

@pytest.mark.parametrize("n", [1, 2, 5, 10, 20])
def test_pass_at_k_is_the_unbiased_estimator(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            expected = 1 - math.comb(n - c, k) / math.comb(n, k)
            assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12), (n, c, k)


def test_pass_at_k_edges():
    assert pass_at_k(10, 0, 1) == 0.0 and pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 10, 1) == 1.0 and pass_at_k(10, 10, 10) == 1.0
    assert pass_at_k(10, 8, 3) == 1.0  # n - c < k: every draw of 3 holds a pass
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(1000, 1, 1) == pytest.approx(0.001)


@pytest.mark.parametrize("n, c, k, message", [
    (5, 6, 1, "c .* between 0 and n=5"), (5, -1, 1, "c .* between 0 and n=5"),
    (5, 2, 0, "k must be between 1 and n=5"), (5, 2, 6, "k must be between 1 and n=5"),
    (5.0, 2, 1, "n must be an int"), (5, True, 1, "c must be an int")])
def test_pass_at_k_rejects_impossible_counts(n, c, k, message):
    with pytest.raises(ValueError, match=message):
        pass_at_k(n, c, k)


def test_score_averages_over_problems():
    results = [[True, False, False, False], [True, True, True, True], [False] * 4]
    scores = score(results, (1, 2, 5))
    assert scores == {"pass@1": pytest.approx((0.25 + 1 + 0) / 3), "pass@2": pytest.approx((0.5 + 1 + 0) / 3)}
    assert score([[True], [False]]) == {"pass@1": 0.5}
    with pytest.raises(ValueError, match="exceeds the 4 samples"):
        score(results, (5,))
    with pytest.raises(ValueError, match="at least one problem"):
        score([], (1,))
    with pytest.raises(ValueError, match="non-empty list"):
        score([[True], []], (1,))
    with pytest.raises(ValueError, match="ints >= 1"):
        score(results, (0,))


# ---- reading responses ----

def test_trainer_format_uses_the_last_answer(problems):
    p = problems[2]
    body = "def truncate_number(number: float) -> float:\n    return number % 1.0"
    text = (f"<think>A draft:\n```python\ndef truncate_number(number):\n    return 0\n```\n</think>\n"
            f"<answer>```python\ndef truncate_number(number):\n    return 1\n```</answer>\n"
            f"<answer>\n```python\n{body}\n```\n</answer>")
    assert extract_program(p, text) == body
    nested = f"<answer>ignored <answer>\n```python\n{body}\n```\n</answer></answer>"
    assert extract_program(p, nested) == body
    assert extract_program(p, f"<answer>\n{body}\n</answer>") == body  # no fence: the answer is the code


def test_plain_format(problems):
    p = problems[2]
    body = "def truncate_number(number: float) -> float:\n    return number % 1.0"
    assert extract_program(p, f"Sure!\n```python\n{body}\n```\nThis uses modulo.") == body
    # the block that defines the entry point wins over a later usage example
    text = f"```python\n{body}\n```\nUsage:\n```python\nprint(truncate_number(3.5))\n```"
    assert extract_program(p, text) == body
    assert extract_program(p, f"```\n{body}\n```") == body  # untagged fence
    assert extract_program(p, body) == body  # raw code


def test_missing_imports_and_helpers_come_from_the_prompt(problems):
    p0 = problems[0]
    program = extract_program(p0, f"```python\n{entry_function(p0)}\n```")
    assert program.startswith("from typing import List\n") and program.count("def has_close_elements") == 1
    with_import = f"from typing import List, Tuple\n{entry_function(p0)}"
    assert extract_program(p0, f"```python\n{with_import}\n```") == with_import
    p10 = problems[10]  # make_palindrome calls the prompt's is_palindrome
    program = extract_program(p10, f"```python\n{entry_function(p10)}\n```")
    assert program.startswith("def is_palindrome(") and "def make_palindrome(" in program


def test_a_body_gets_the_prompt(problems):
    p = problems[2]
    assert extract_program(p, "    return number % 1.0\n") == p.prompt + "    return number % 1.0\n"
    assert extract_program(p, "```python\n    return number % 1.0\n```") == p.prompt + "    return number % 1.0\n"


@pytest.mark.parametrize("text", [
    "", "   \n", None, 42, "I don't know.", "<answer></answer>", "<answer>\n```python\ndef f(:\n```\n</answer>",
    "<answer>\n```python\ndef truncate_number(x):\n    return x % 1\n",  # never closed
    "</answer> stray", "```python\ndef truncate_number(x):\n    return x % 1\n",  # unclosed fence
    "```python\ndef other(x):\n    return x\n```", "return number % 1.0", "    return (\n",
    "(" * 100_000, "x" * 50_000, "\x00def truncate_number(x): pass",
])
def test_unusable_responses_give_none(problems, text):
    assert extract_program(problems[2], text) is None


def test_extract_program_rejects_a_non_problem():
    with pytest.raises(TypeError, match="Problem"):
        extract_program({"prompt": ""}, "x")


def test_a_main_block_in_a_right_program_does_not_run(problems, sb):
    """Instruct models often end with a demo under `if __name__ == "__main__":`; the reference
    harness never runs it, and a doctest.testmod() or sys.exit() there made a right program fail."""
    p = problems[2]
    demos = ["    import sys\n    sys.exit(0)\n", "    import doctest\n    doctest.testmod()\n", "    input()\n"]
    programs = [[p.prompt + p.canonical_solution + "\n\nif __name__ == '__main__':\n" + demo] for demo in demos]
    assert check_programs(sb, [p] * len(demos), programs) == [[True]] * len(demos)
