"""Code reasoning built from HumanEval, as in CRUXEval: output prediction (program + input ->
output, the AZR solver's deduction) and input prediction (program + output -> an input, its
abduction).

A task's program is the problem's prompt and canonical solution, a complete definition of the
entry point, followed by `f = <entry_point>` (HumanEval/106's entry point is `f` already): AZR's
programs are called as `f`, and so TaskExecutor runs, validates and checks these programs as it
does self-play's, unchanged. Inputs are the literal argument lists of the `candidate(...)` calls
in the problem's own test; outputs are what the sandbox returns for them, never the test's
expected values. Building runs one validate_proposals batch: the static checks, then every
input twice at two hash seeds, so a task's output is deterministic (an output that follows set
order is not a task) and reproduces on every later run.

Answers are checked as values WITH their types, stricter than self-play's checks: same_value
(fastazr.tasks.values) keeps Python's 1 == 1.0 == True, and a model that predicts `1` where the
function returns `True` has not predicted its output. The comparison here tags every value with
its type before same_value compares it (NaN still equals NaN; list vs tuple and set vs frozenset
already differ); same_value itself is unchanged. Output predictions go through
TaskExecutor.check_answers' deduction check and then the typed comparison. Input predictions go
through its abduction check, on a variant of the program whose `f` returns the type-tagged value
against the tagged gold output: the same planning (the answer must be literal values, rebuilt
before it reaches a child), one sandbox job per answer, and a typed verdict. Every check is
total: None, malformed, huge or non-literal answer text is False, never an exception."""

from __future__ import annotations

import ast
from dataclasses import dataclass

from fastazr.tasks.executor import ENTRY, TaskExecutor, literal_arguments
from fastazr.tasks.values import ValueParseError, parse_value, same_value, to_source

# The name of the parameter HumanEval's check(candidate) calls the solution by.
CANDIDATE = "candidate"


@dataclass(frozen=True)
class ReasoningTask:
    """One output/input prediction task: f(*input) == output, all as Python source / repr text."""

    task_id: str
    """The HumanEval problem's id ("HumanEval/0"); the tasks of one problem differ in `index`."""
    program: str
    """The prompt and canonical solution, then `f = <entry_point>`: what the sandbox runs and the
    model reads. Pass it as Triplet.program for AZR's prompts."""
    entry_point: str
    input: str
    """Argument source, literal values only ("[3, 1], 'a'"), as fastazr.tasks rebuilds it."""
    output: str
    """repr of the canonical solution's value on the input, as the sandbox returned it."""
    index: int = 0
    """Which of the problem's tasks: its n-th usable test input."""


def task_program(prompt: str, canonical_solution: str, entry_point: str) -> str:
    """The problem's complete function, callable as `f`, without docstrings: HumanEval's hold
    example calls with their results, and a third of the input-prediction tasks (48 of 159) were
    solved by copying one. CRUXEval's functions have none either."""
    program = _without_docstrings(prompt + canonical_solution)
    if entry_point != ENTRY:
        program = program.rstrip() + f"\n\n\n{ENTRY} = {entry_point}\n"
    return program


def _without_docstrings(source: str) -> str:
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Module)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree) + "\n"


def candidate_inputs(test: str, max_chars: int = 300) -> list[str]:
    """The argument lists of the `candidate(...)` calls in assert statements of a HumanEval test,
    in source order, without repeats: only calls whose every argument is a literal
    (ast.literal_eval) and whose argument source, rebuilt by literal_arguments, has at most
    max_chars characters."""
    try:
        tree = ast.parse(test)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    calls = []
    for statement in ast.walk(tree):
        if not isinstance(statement, ast.Assert):
            continue
        for node in ast.walk(statement):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == CANDIDATE:
                calls.append(node)
    calls.sort(key=lambda n: (n.lineno, n.col_offset))
    found: list[str] = []
    for call in calls:
        if call.keywords or any(isinstance(a, ast.Starred) for a in call.args):
            continue
        sources = []
        for arg in call.args:
            try:
                ast.literal_eval(arg)
            except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
                break
            sources.append(ast.unparse(arg))
        else:
            given = literal_arguments(", ".join(sources))
            if given is not None and len(given) <= max_chars and given not in found:
                found.append(given)
    return found


def build_reasoning_tasks(problems, executor: TaskExecutor, per_problem: int = 1, max_chars: int = 300,
                          prefer_unseen: bool = False) -> list[ReasoningTask]:
    """Up to per_problem tasks for each problem (anything with task_id, prompt, entry_point,
    canonical_solution and test), in problem order: its first test inputs (candidate_inputs) on
    which the canonical program passes validate_proposals (static checks, a literal output, the same
    value at both hash seeds) with an output of at most max_chars characters. All inputs of all
    problems run in one sandbox batch. A problem with no such input gives no task: of HumanEval's
    164, /32, /38 and /50 test only on computed inputs, /160 and /162 fail the static checks
    (eval, hashlib); the other 159 give tasks.

    Most first test inputs are docstring examples: the program the model reads shows them, and
    usually their outputs (115 of the 159 first inputs appear in their prompt). prefer_unseen
    takes the inputs that do not appear in the prompt (spaces and quote style aside) first, in
    test order, then the others; 158 of the 159 problems have one."""
    if per_problem < 1:
        raise ValueError(f"per_problem must be >= 1, got {per_problem!r}")
    plan, items = [], []
    for problem in problems:
        program = task_program(problem.prompt, problem.canonical_solution, problem.entry_point)
        inputs = candidate_inputs(problem.test, max_chars)
        if prefer_unseen:
            inputs.sort(key=lambda given: _squeezed(given) in _squeezed(problem.prompt))  # stable
        for given in inputs:
            plan.append((problem, program, given))
            items.append((program, given))
    tasks: list[ReasoningTask] = []
    taken: dict[str, int] = {}
    for (problem, program, given), outcome in zip(plan, executor.validate_proposals(items)):
        n = taken.get(problem.task_id, 0)
        if n >= per_problem or not outcome.valid or len(outcome.output) > max_chars:
            continue
        # The input check compares type-tagged values, a longer repr than the output's own.
        if len(_typed_source(outcome.output)) > executor.max_output_chars:
            continue
        tasks.append(ReasoningTask(problem.task_id, program, problem.entry_point, given, outcome.output, n))
        taken[problem.task_id] = n + 1
    return tasks


def _squeezed(text: str) -> str:
    return "".join(text.replace('"', "'").split())


def check_output_predictions(executor: TaskExecutor, tasks: list[ReasoningTask],
                             answers: list[str | None]) -> list[bool]:
    """Whether each answer (text of a Python literal) is the task's output as a value of the
    same type, at every depth: TaskExecutor's deduction check, then the typed comparison.
    None or any text that is no literal value is False. Runs nothing in the sandbox."""
    _same_length(tasks, answers)
    where = [k for k, a in enumerate(answers) if isinstance(a, str)]
    verdicts = [False] * len(tasks)
    deduction = [(tasks[k].output, answers[k]) for k in where]
    loose, _, _ = executor.check_answers(deduction, [], [])
    for k, ok in zip(where, loose):
        verdicts[k] = ok and strict_same_value_text(tasks[k].output, answers[k])
    return verdicts


def check_input_predictions(executor: TaskExecutor, tasks: list[ReasoningTask],
                            answers: list[str | None]) -> list[bool]:
    """Whether the task's program, called on each answer (the arguments of one call, literal
    values only: "[3, 1], 'a'"), returns the task's output as a value of the same type. Any
    input that does so is right, not only the task's own. One sandbox batch, one job per answer
    that is literal values; None or anything else is False unrun."""
    _same_length(tasks, answers)
    where = [k for k, a in enumerate(answers) if isinstance(a, str)]
    verdicts = [False] * len(tasks)
    abduction = [(typed_program(tasks[k]), _typed_source(tasks[k].output), answers[k]) for k in where]
    _, checked, _ = executor.check_answers([], abduction, [])
    for k, ok in zip(where, checked):
        verdicts[k] = ok
    return verdicts


def _same_length(tasks, answers) -> None:
    if len(tasks) != len(answers):
        raise ValueError(f"{len(tasks)} tasks but {len(answers)} answers")


# --- values with their types ---------------------------------------------------------------

# Every value becomes (type code, payload); a container's payload is the same container of
# tagged values. Tagged values of different types never compare equal (1, 1.0, True, 1+0j
# differ), and a user tuple ('i', 1) is tagged ('t', (('s', 'i'), ('i', 1))), so no value
# imitates another's tag. The same function runs in the child (TYPED_SOURCE): keep them one.
TYPED_SOURCE = '''
def _reasoning_typed(value):
    kind = type(value)
    if kind is list:
        return ("l", [_reasoning_typed(v) for v in value])
    if kind is tuple:
        return ("t", tuple(_reasoning_typed(v) for v in value))
    if kind is set:
        return ("S", {_reasoning_typed(v) for v in value})
    if kind is frozenset:
        return ("F", frozenset(_reasoning_typed(v) for v in value))
    if kind is dict:
        return ("d", {_reasoning_typed(k): _reasoning_typed(v) for k, v in value.items()})
    code = _REASONING_CODES.get(kind)
    if code is None:
        raise TypeError(f"{kind.__name__} is no literal value")
    return (code, value)


_REASONING_CODES = {bool: "b", int: "i", float: "f", complex: "c", str: "s", bytes: "y", type(None): "n"}
'''
_namespace: dict = {}
exec(TYPED_SOURCE, _namespace)  # our own constant source: the parent's copy of the child's function
typed = _namespace["_reasoning_typed"]
typed.__doc__ = "`value` (a value parse_value returns) with the type of every part of it made part of its value."


def strict_same_value(a, b) -> bool:
    """same_value, and the same type at every depth: 1, 1.0, True and 1+0j all differ."""
    try:
        return same_value(typed(a), typed(b))
    except (TypeError, RecursionError):
        return False


def strict_same_value_text(gold: str, answer) -> bool:
    """strict_same_value of two texts parsed by parse_value; False when either is no literal."""
    try:
        return strict_same_value(parse_value(gold), parse_value(answer))
    except ValueParseError:
        return False


def _typed_source(output: str) -> str:
    """The typed value of an output repr, as text parse_value reads back: repr, as the child
    writes it (to_source writes complex numbers as complex(...), which parse_value refuses),
    or to_source where repr cannot write it (ints past the decimal digit limit)."""
    value = typed(parse_value(output))
    try:
        return repr(value)
    except ValueError:
        return to_source(value)


def typed_program(task: ReasoningTask) -> str:
    """The task's program run in a namespace of its own, behind an `f` that returns the
    type-tagged value of its `f`. Its own namespace keeps the program's `f`, and so any
    recursion through the name, the program's own."""
    return (f"{TYPED_SOURCE}\n\n_reasoning_namespace = {{'__name__': '__main__'}}\n"
            f"exec({task.program!r}, _reasoning_namespace)\n\n\n"
            f"def {ENTRY}(*args):\n"
            f"    return _reasoning_typed(_reasoning_namespace[{ENTRY!r}](*args))\n")
