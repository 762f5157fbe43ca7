"""AZR operations: static validation, determinism, and the three answer checks, with values
compared after safe parsing."""

import math
import subprocess
import sys

import pytest

from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor, ValueParseError, check_program, parse_value, same_value
from fastazr.tasks.executor import literal_arguments
from fastazr.tasks.values import to_source


@pytest.fixture(scope="module")
def ex():
    with Sandbox(workers=2, timeout_s=2.0) as sb:
        yield TaskExecutor(sb, max_output_chars=200)


@pytest.mark.parametrize("source, reason", [
    ("", "empty"),
    ("def f(:\n", "does not parse"),
    ("def g(x):\n    return x\n", "no top-level definition of 'f'"),
    ("import os\ndef f(x):\n    return x\n", "module 'os', which is not allowed"),
    ("from subprocess import run\ndef f(x):\n    return x\n", "module 'subprocess', which is not allowed"),
    ("def f(x):\n    import random\n    return random.random()\n", "module 'random', which is not allowed"),
    ("import time\ndef f(x):\n    return x\n", "module 'time', which is not allowed"),
    ("def f(x):\n    return input()\n", "banned builtin input"),
    ("def f(x):\n    return eval(x)\n", "banned builtin eval"),
    ("def f(x):\n    return ().__class__.__bases__[0].__subclasses__()\n", "__subclasses__"),
    ("from . import x\ndef f(x):\n    return x\n", "relative import (from . import x)"),
])
def test_static_rejections(source, reason):
    check = check_program(source)
    assert not check.ok and reason in check.reason


def test_static_accepts_ordinary_programs():
    assert check_program("import math, collections\nfrom functools import reduce\ndef f(xs):\n    return reduce(max, xs)\n").ok
    assert check_program("class f:\n    pass\n").ok
    # names that would be banned builtins are fine as a function's own; getattr with a constant
    assert check_program("def f(input):\n    return input * 2\n").ok
    assert check_program("from __future__ import annotations\nimport collections.abc\nfrom math import pi\n"
                         "def f(x: 'list[int] | None') -> float:\n    return pi * isinstance(x, collections.abc.Sized)\n").ok
    assert check_program("class A:\n    v = 1\n    def __str__(self):\n        return 'a'\n    __repr__ = __str__\n"
                         "def f(x):\n    return getattr(A, 'v') + hasattr(A, 'w') + len(str(A()))\n").ok


def test_validate_proposals(ex):
    items = [
        ("def f(xs):\n    return sorted(xs, reverse=True)\n", "[3, 1, 2]"),
        ("def f(n):\n    return [str(i) for i in set(map(str, range(n)))]\n", "30"),  # hash-order dependent
        ("def f(x):\n    return object()\n", "1"),                                    # not a literal
        ("def f(x):\n    return 'y' * x\n", "500"),                                   # over max_output_chars
        ("def f(x):\n    return 1 / x\n", "0"),
        ("def f(x):\n    while True:\n        pass\n", "0"),
        ("import os\ndef f(x):\n    return x\n", "1"),
        ("def f(x):\n    return {'b': x, 'a': [x, (x,)]}\n", "float('nan')"),
        ("def f(x):\n    return x\n", "__import__('os').getpid()"),                    # input not literal
    ]
    out = ex.validate_proposals(items)
    assert out[0].valid and out[0].output == "[3, 2, 1]"
    assert not out[1].valid and "not deterministic" in out[1].reason
    assert not out[2].valid and "not a literal" in out[2].reason
    assert not out[3].valid and "exceeds 200" in out[3].reason
    assert not out[4].valid and "ZeroDivisionError" in out[4].reason
    assert not out[5].valid and out[5].reason.startswith("timeout")
    assert not out[6].valid and "not allowed" in out[6].reason
    assert out[7].valid and out[7].output == "{'b': nan, 'a': [nan, (nan,)]}"
    assert not out[8].valid and "not literal" in out[8].reason


def test_values_that_follow_the_hash_seed_are_rejected(ex):
    # the order of 16 strings in a set follows their hashes, so the hash seed
    outcomes = ex.validate_proposals([("def f(s):\n    return list({s + str(i) for i in range(16)})\n", "'ax'")] * 8)
    assert all(not o.valid and "not deterministic" in o.reason for o in outcomes)


def test_run_programs_computes_the_output(ex):
    r = ex.run_programs([("def f(a, b):\n    return a * b\n", "6, 7")])
    assert r[0].value == "42"


def test_deduction_compares_values_not_text():
    verdicts = TaskExecutor.check_deduction([
        ("[1, 2, 3]", "[1,2,3]"), ("{'a': 1, 'b': 2}", "{'b': 2, 'a': 1}"), ("(1,)", "[1]"),
        ("{1, 2}", "{2, 1}"), ("nan", "float('nan')"), ("1", "True"), ("'1'", "1"),
        ("[1, 2]", "__import__('os').system('true')"), ("3", "1 + 2"), ("set()", "set()"),
        ("(1+2j)", "(1+2j)"), ("-inf", "float('-inf')"), ("[1]", "not python"),
    ])
    assert verdicts == [True, True, False, True, True, True, False, False, False, True, True, True, False]


def test_abduction(ex):
    program = "def f(a, b):\n    return sorted(a)[b]\n"
    verdicts = ex.check_abduction([(program, "3", "[5, 3, 9], 0"), (program, "3", "[4, 9], 0"),
                                   (program, "3", "[3], 7"), (program, "3", "not valid python(")])
    assert verdicts == [True, False, False, False]


def test_abduction_answers_must_be_literals(ex):
    """An expression answer could build an object whose repr imitates the gold output."""
    program = "def f(x):\n    return x * 2\n"
    imitation = "type('R', (), {'__mul__': lambda self, k: self, '__repr__': lambda self: '4'})()"
    assert ex.check_abduction([(program, "4", imitation), (program, "4", "2"), (program, "4", "1 + 1")]) == \
        [False, True, False]


def test_induction(ex):
    pairs = [("1, 2", "3"), ("'a', 'b'", "'ab'"), ("[1], [2]", "[1, 2]")]
    verdicts = ex.check_induction([
        ("def f(a, b):\n    return a + b\n", pairs),
        ("def f(a, b):\n    return b + a\n", pairs),                     # wrong on two pairs
        ("def f(a, b):\n    if a == 1:\n        raise ValueError\n    return a + b\n", pairs),
        ("import os\ndef f(a, b):\n    return a + b\n", pairs),         # fails static checks
        ("def f(a, b):\n    while True:\n        pass\n", pairs[:1]),           # each pair has its own timeout
        ("def f(a, b):\n    return a + b\n", []),
        ("def f():\n    return 1\n", [("", "1")]),
    ])
    assert verdicts == [True, False, False, False, False, False, True]


def test_induction_pairs_as_self_play_stores_them(ex):
    """SelfPlay stores an induction input as literal_arguments rebuilt it (complex(1.0, 2.0) for
    1+2j), and the check parses that text again: the proposer's own program must pass."""
    program = "def f(z):\n    return z * 2\n"
    given = ["1+2j", "(2-1j)", "[3j, float('nan')]"]
    outputs = ex.validate_proposals([(program, g) for g in given])
    assert all(o.valid for o in outputs), [o.reason for o in outputs]
    pairs = [(literal_arguments(g), o.output) for g, o in zip(given, outputs)]
    assert ex.check_induction([(program, pairs), ("def f(z):\n    return z * 3\n", pairs)]) == [True, False]


@pytest.mark.parametrize("text, value", [
    ("1", 1), ("-2.5", -2.5), ("'x'", "x"), ("b'\\x00'", b"\x00"), ("None", None), ("True", True),
    ("(1, [2, {3: 'a'}])", (1, [2, {3: "a"}])), ("set()", set()), ("frozenset({1, 2})", frozenset({1, 2})),
    ("{1, 2}", {1, 2}), ("(-0-1j)", complex(-0.0, -1.0)), ("inf", math.inf), ("-inf", -math.inf),
])
def test_parse_value(text, value):
    assert same_value(parse_value(text), value)


@pytest.mark.parametrize("text", ["x", "f(1)", "<Foo object at 0x7f>", "1 + 2", "[1, *a]", "{**a}",
                                  "lambda: 1", "'a' * 10", "...", "[" * 200 + "]" * 200, "set([[]])",
                                  "__import__('os')"])
def test_parse_value_rejects_non_literals(text):
    with pytest.raises(ValueParseError):
        parse_value(text)


@pytest.mark.parametrize("value", [float("nan"), [float("-inf"), {1: complex(float("nan"), 2)}], set(), frozenset(),
                                   (1,), frozenset({(1, 2)}), {"a": {b"x", None}}, complex(1, -0.0)])
def test_to_source_round_trips(value):
    assert same_value(eval(to_source(value)), value)  # test code evaluating its own rendering
    # and through the parser, as a stored induction input is parsed again when an answer is checked
    assert same_value(parse_value(to_source(value)), value)
    assert literal_arguments(to_source(value)) is not None


def test_same_value_is_strict_about_containers():
    assert same_value([1, 2], [1, 2]) and not same_value([1, 2], (1, 2))
    assert not same_value({1}, frozenset({1})) and same_value(float("nan"), float("nan"))
    assert same_value({"a": [math.nan]}, {"a": [math.nan]}) and not same_value({"a": 1}, {"b": 1})


def test_model_text_prints_no_syntax_warnings():
    """The compiler warns about text like 1if 1else 2 or `x is 3`; for model-written answers and
    programs that was two lines of the trainer's stderr each. A user's own code still warns."""
    code = ("from fastazr.tasks import check_program, parse_value, ValueParseError\n"
            "from fastazr.azr.buffers import normalized_program\n"
            "for i in range(3):\n"
            "    try:\n        parse_value(f'{i}if 1else 2')\n    except ValueParseError:\n        pass\n"
            "    check_program(f'def f(x):\\n    return x is {i}\\n')\n"
            "    normalized_program(f'def f(x):\\n    return x is ({i}, 1)\\n')\n"
            "import ast\nast.parse('1if 1else 2', mode='eval')\n")
    run = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    warned = [line for line in run.stderr.splitlines() if "SyntaxWarning" in line]
    assert warned and all(line.startswith("<unknown>:1:") for line in warned), run.stderr
