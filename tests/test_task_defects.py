"""Regressions for issue 20 (2): task checks that crashed on model-written text, gave verdicts
that did not reproduce, or were bypassed. Each test uses the issue's exact input."""

import math
import signal

import pytest

from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor, ValueParseError, check_program, parse_value, same_value
from fastazr.tasks.executor import literal_arguments

HUGE_HEX = "0x" + "f" * 4000       # 4,817 decimal digits: past int's str conversion limit
HUGE_BINARY = "0b" + "1" * 15000   # 4,516 decimal digits
IDENTITY = "def f(x):\n    return x\n"


@pytest.fixture(scope="module")
def ex():
    with Sandbox(workers=4, timeout_s=2.0, memory_mb=512) as sb:
        yield TaskExecutor(sb, max_output_chars=10_000)


# ---- model text never raises out of fastazr.tasks ----

@pytest.mark.parametrize("text", [HUGE_HEX, HUGE_BINARY])
def test_huge_int_inputs_get_verdicts(ex, text):
    assert literal_arguments(text).startswith("0x")
    valid = ex.validate_proposals([("def f(x):\n    return x % 1000\n", text)])[0]
    assert valid.valid and valid.output == str(int(text, 0) % 1000)
    assert ex.check_abduction([("def f(x):\n    return x % 1000\n", valid.output, text)]) == [True]
    assert ex.check_induction([("def f(x):\n    return x % 1000\n", [(text, valid.output)])]) == [True]
    assert ex.run_programs([(IDENTITY, text)])[0].status == "error"  # its repr is the child's ValueError


def test_complex_past_float_range_is_no_value():
    with pytest.raises(ValueParseError):
        parse_value("1" + "0" * 400 + "+1j")


def test_deduction_against_a_huge_int_is_a_verdict():
    assert TaskExecutor.check_deduction([("1j", "1" + "0" * 400), ("1" + "0" * 400, "1j")]) == [False, False]


# ---- a valid proposal reproduces its output on every later run ----

@pytest.mark.parametrize("program", ["def f(s):\n    return ''.join(set(s))\n",
                                     "def f(s):\n    return next(iter({s, s[::-1]}))\n"])
def test_validated_outputs_reproduce_on_every_run(ex, program):
    inputs = [repr(a + b) for a in "axyz" for b in "bcdefg"]  # 24 inputs like 'ax'
    outcomes = ex.validate_proposals([(program, given) for given in inputs])
    valid = [(given, o.output) for given, o in zip(inputs, outcomes) if o.valid]
    assert valid, "a seed-independent share of the inputs validates"
    checks = [(program, output, given) for given, output in valid] * 3
    assert ex.check_abduction(checks) == [True] * len(checks)


def test_deterministic_sets_of_strings_validate(ex):
    program = "def f(x):\n    return {'apple', 'banana', 'cherry', 'date'}\n"
    outcomes = ex.validate_proposals([(program, str(i)) for i in range(20)])
    assert all(o.valid for o in outcomes), outcomes


# ---- an interrupted call leaves the pool serving the next call's jobs ----

def test_interrupted_call_does_not_shift_later_results(ex):
    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    slow = "def f(x):\n    n = 0\n    for i in range(10 ** 8):\n        n += 1\n    return 'OLD-%d' % x\n"
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            ex.run_programs([(slow, "0"), (slow, "1")])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    fast = "def f(x):\n    return 'NEW-%d' % x\n"
    for _ in range(3):
        assert [r.value for r in ex.run_programs([(fast, "0"), (fast, "1")])] == ["'NEW-0'", "'NEW-1'"]


# ---- induction: the proposer's own program passes its own task ----

def own_task(ex, program, inputs):
    """The held-out pairs as the self-play loop makes them: each input validated on its own."""
    outcomes = ex.validate_proposals([(program, given) for given in inputs])
    assert all(o.valid for o in outcomes), outcomes
    return [(given, o.output) for given, o in zip(inputs, outcomes)]


def test_induction_pairs_share_no_state(ex):
    program = "def f(x, seen=[]):\n    seen.append(x)\n    return len(seen)\n"
    pairs = own_task(ex, program, [str(i) for i in range(5)])
    assert [out for _, out in pairs] == ["1"] * 5
    assert ex.check_induction([(program, pairs)]) == [True]


def test_induction_pairs_each_get_the_full_time_limit(ex):
    loop = "def f(n):\n    t = 0\n    for i in range(n):\n        t += i\n    return t % 7\n"
    probe = ex.run_programs([(loop, "1000000")])[0]
    n = int(1_000_000 * 0.47 / probe.duration_s)  # ~0.47 s a pair: 5 pairs pass one 2 s timeout
    pairs = own_task(ex, loop, [str(n + i) for i in range(5)])
    assert ex.check_induction([(loop, pairs)]) == [True]


def test_induction_pairs_each_get_the_full_memory_limit(ex):
    program = "kept = []\ndef f(x):\n    kept.append(bytearray(150 << 20))\n    return x\n"  # 5 x 150 MB vs 512
    pairs = own_task(ex, program, [str(i) for i in range(5)])
    assert ex.check_induction([(program, pairs)]) == [True]


def test_induction_outputs_are_not_escaped_twice(ex):
    program = "def f(x):\n    return '\\\\' * 4994 + str(x)\n"  # a repr of 9,991 chars
    pairs = own_task(ex, program, [str(i) for i in range(10)])
    assert len(pairs[0][1]) == 9991
    assert ex.check_induction([(program, pairs)]) == [True]


# ---- static checks: each route of the issue and its class ----

@pytest.mark.parametrize("source, reason", [
    ("e = eval\ndef f(x):\n    return e('x')\n", "banned builtin eval"),
    ("def f(x):\n    return [exec][0]('y = 1')\n", "banned builtin exec"),
    ("g = globals\ndef f(x):\n    return x\n", "banned builtin globals"),
    ("b = breakpoint\ndef f(x):\n    return x\n", "banned builtin breakpoint"),
    ("if 0:\n    eval = len\ndef f(x):\n    return eval('x')\n", "banned builtin eval"),
    ("def f(x):\n    return __loader__.load_module('posix').getpid()\n", "banned builtin __loader__"),
    ("def f(x):\n    return print.__self__\n", "__self__"),
    ("def f(x):\n    return print.__self__.__import__('os')\n", "banned attribute"),
    ("def f(x):\n    return getattr(f, '__glob' + 'als__')\n", "computed attribute name"),
    ("def f(x):\n    return getattr(().__class__.__base__, '__subclasses__')\n", "'__subclasses__'"),
    ("g = getattr\ndef f(x):\n    return g(f, 'x')\n", "getattr as a value"),
    ("import _random\ndef f(x):\n    return x\n", "module '_random'"),
    ("import posixpath\ndef f(x):\n    return x\n", "module 'posixpath'"),
    ("import _strptime\ndef f(x):\n    return x\n", "module '_strptime'"),
    ("import _io\ndef f(x):\n    return x\n", "module '_io'"),
    ("import _imp\ndef f(x):\n    return x\n", "module '_imp'"),
    ("import _posixsubprocess\ndef f(x):\n    return x\n", "module '_posixsubprocess'"),
    ("import dataclasses\ndef f(x):\n    return dataclasses.sys.modules\n", "module sys through dataclasses.sys"),
    ("import typing\ndef f(x):\n    return typing.sys.modules\n", "module sys through typing.sys"),
    ("from typing import sys\ndef f(x):\n    return x\n", "module sys through typing.sys"),
    ("import statistics\ndef f(x):\n    return statistics.random.random()\n", "module random"),
    ("import enum\ndef f(x):\n    return enum.bltns.eval('1')\n", "module builtins"),
    ("import collections\ndef f(x):\n    return collections._sys\n", "private name collections._sys"),
    ("import dataclasses as d\nm = d\ndef f(x):\n    return m.sys\n", "module d as a value"),
    ("from json import tool\ndef f(x):\n    return x\n", "json has no attribute 'tool'"),
    ("import statistics\ndef f(x):\n    return statistics.NormalDist().samples(1)[0] > 0\n", "samples"),
    ("from typing import get_type_hints\ndef f(x):\n    return x\n", "get_type_hints"),
    ("import functools\n@functools.singledispatch\ndef g(x):\n    return 0\n@g.register\n"
     "def h(x: \"__import__('os').getpid()\"):\n    return 1\ndef f(x):\n    return g(x)\n", "string annotation"),
    ("from . import x\ndef f(x):\n    return x\n", "relative import (from . import x): import modules by absolute name"),
    # memory addresses: two children of one zygote share them, another worker's differ
    ("def f(a):\n    return (id(a) >> 28) % 2\n", "banned builtin id: it reads memory addresses"),
    ("def f(a):\n    return hash(object()) % 2\n", "banned builtin hash"),
    ("h = hash\ndef f(a):\n    return h(a)\n", "banned builtin hash"),
    ("def f(a):\n    return object().__hash__() % 2\n", "banned attribute __hash__"),
    ("import array\ndef f(a):\n    return array.array('i', [a]).buffer_info()[0] % 2\n", "banned attribute buffer_info"),
])
def test_static_check_closes_the_route(source, reason):
    check = check_program(source)
    assert not check.ok and reason in check.reason, check


def test_deeply_nested_scopes_are_checked_without_recursion(ex):
    deep = "def f(a):\n    return (" + "lambda: " * 990 + "a)" + "()" * 990 + "\n"  # 10K chars; Python runs it
    assert check_program(deep).ok
    valid = ex.validate_proposals([(deep, "1")])[0]
    assert valid.valid and valid.output == "1"
    assert ex.check_induction([(deep, [("1", "1"), ("'x'", "'x'")])]) == [True]
    assert not check_program(deep.replace("a)", "eval('a'))")).ok


def test_names_as_function_locals_are_not_the_address_builtins():
    assert check_program("def f(id):\n    hash = id * 2\n    return hash\n").ok


@pytest.mark.parametrize("program", [
    "import _strptime\ndef f(x):\n    return x + int(_strptime.time.time()) // 60 % 2\n",
    "def f(x):\n    return x + int(print.__self__.__import__('time').time()) // 60 % 2\n",
    "t = eval\ndef f(x):\n    return x + int(t(\"__import__('time')\").time()) // 60 % 2\n",
    "import _random\ndef f(x):\n    return _random.Random().random() < 0.5\n",
    "def f(x):\n    return getattr(f, '__glob' + 'als__')['__builtins__'].__import__('_random').Random().random() < 0.5\n",
])
def test_clock_and_randomness_do_not_validate(ex, program):
    assert not any(o.valid for o in ex.validate_proposals([(program, "1")] * 8))


# ---- minor ----

@pytest.mark.parametrize("answer", ["1 # c", "1,", "1  # c,)"])
def test_abduction_reads_answers_as_deduction_does(ex, answer):
    assert ex.check_abduction([(IDENTITY, "1", answer)]) == [True]
    assert TaskExecutor.check_deduction([("1", answer.rstrip(","))]) == [True]


@pytest.mark.parametrize("a, b", [("{nan: 1}", "{float('nan'): 1}"), ("{(nan, 1)}", "{(float('nan'), 1)}"),
                                  ("{(nan, (nan,)): [nan]}", "{(float('nan'), (nan,)): [float('nan')]}"),
                                  ("{nan+1j}", "{(nan+1j)}")])
def test_nan_equals_nan_inside_dicts_and_sets(a, b):
    assert same_value(parse_value(a), parse_value(b))
    assert TaskExecutor.check_deduction([(a, b)]) == [True]


@pytest.mark.parametrize("text, value", [("(1+nanj)", complex(1, math.nan)), ("infj", complex(0, math.inf)),
                                         ("-infj", complex(0, -math.inf)), ("(inf+infj)", complex(math.inf, math.inf)),
                                         ("(nan-infj)", complex(math.nan, -math.inf))])
def test_complex_reprs_with_non_finite_parts_read_back(text, value):
    assert repr(value) == text and same_value(parse_value(text), value)


def test_programs_returning_non_finite_complex_validate(ex):
    program = "def f(a):\n    return complex(1, a)\n"
    outcomes = ex.validate_proposals([(program, "float('nan')"), (program, "float('inf')")])
    assert [(o.valid, o.output) for o in outcomes] == [(True, "(1+nanj)"), (True, "(1+infj)")]
    assert TaskExecutor.check_deduction([("(1+nanj)", "(1+nanj)"), ("(1+infj)", "(1+infj)")]) == [True, True]
    assert ex.check_abduction([(program, "(1+nanj)", "nan")]) == [True]


def test_run_programs_checks_inputs_and_caps_outputs(ex):
    out = ex.run_programs([(IDENTITY, "__import__('os').getpid()"), ("def f(n):\n    return 'y' * n\n", "20000"),
                           ("def f(x):\n    return object()\n", "1"), (IDENTITY, "[1, 2],")])
    assert out[0].status == "error" and "not literal values" in out[0].error
    assert out[1].status == "output_limit" and out[1].value is None and "max_output_chars=10000" in out[1].error
    assert out[2].status == "error" and "not a literal value" in out[2].error
    assert out[3].status == "ok" and out[3].value == "[1, 2]"
