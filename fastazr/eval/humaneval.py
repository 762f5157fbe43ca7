"""HumanEval scoring: a model's response -> the program to test -> a verdict from the sandbox ->
pass@k.

A verdict is the problem's own check(candidate) run in a sandbox child, one child per
(problem, sample), all of them in one Sandbox.call_many batch. The test runs beside the
model's program in that child (HumanEval's tests are assert statements, not values that could
travel back as repr text), so the job is arranged to make a wrong program fail rather than trust
it (see JOB). Nothing a model wrote is evaluated in this process: extract_program only parses."""

from __future__ import annotations

import ast
import math
import secrets
import textwrap
from functools import lru_cache

from ..azr import parsing
from ..sandbox import Sandbox, SandboxConfig
from ..sandbox.config import AZR_MODULES, default_workers
from .problems import Problem

# Longest code (an answer block's content, or a plain response) read; longer is no answer, as
# the trainer's parser rules. ast.parse of this much takes ~10 ms.
MAX_CODE_CHARS = 20_000
# Fence kinds that hold code, most specific first: an untagged block is used only without a tagged one.
CODE_KINDS = (("python", "py", "python3"), ("",))
# What the parser raises on hostile source besides SyntaxError (null bytes, deep nesting, huge literals).
PARSE_ERRORS = (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError)

# The program each (problem, sample) job runs: trusted code, with the model's program, the
# prompt and the test as string constants appended below it (see job_source). The child calls
# JOB_ENTRY, whose value must be this job's random token: a job that exits early (sys.exit,
# os._exit), dies, times out, prints a fake verdict or writes its own "ok" result frame (the
# child's channel believes one) returns no token, so only a check() that ran to its end passes.
# Beyond that, the job closes the easy ways a program could pass without being right:
# - the test runs in its own namespace, built from the trusted prompt (its imports and helpers)
#   and the test before the program runs, with builtins as they were then: the program's globals
#   (abs = ..., check = ..., poly = ...) and rebinding builtins (builtins.abs = ...) reach none
#   of the test's names;
# - every value the candidate returns must be plain data, exact built-in types all the way
#   down, so an object whose __eq__ always says True cannot pass an `==` assert. OrderedDict
#   and defaultdict are allowed (C types, which no program can patch); Counter is not (a Python
#   class: a program could patch its __eq__).
# Not closed, as nothing in one process can close them: a program that walks its caller's
# frames to read the token and forge its result, or patches a shared module the test imports
# while it runs (math.fabs = ...). Stopping those needs the test in another process.
JOB_ENTRY = "humaneval_job"
JOB = '''
def humaneval_job():
    safe = dict(vars(__builtins__))
    exec_, type_, id_, callable_ = safe["exec"], safe["type"], safe["id"], safe["callable"]
    set_, TypeError_, NameError_ = safe["set"], safe["TypeError"], safe["NameError"]
    import collections
    scalars = {id_(t) for t in (int, float, complex, bool, str, bytes, type_(None))}
    sequences = {id_(t) for t in (list, tuple, set, frozenset)}
    mappings = {id_(t) for t in (dict, collections.OrderedDict, collections.defaultdict)}
    list_extend, dict_keys, dict_values = list.extend, dict.keys, dict.values

    tests = {"__name__": "__main__", "__builtins__": safe}
    exec_(PROMPT, tests)
    exec_(TEST, tests)
    check = tests["check"]

    program = {"__name__": "candidate"}  # not __main__: a model's `if __name__ == "__main__":` demo must not run
    exec_(PROGRAM, program)
    candidate = program.get(ENTRY_POINT)
    if not callable_(candidate):
        raise NameError_(f"the program defines no function {ENTRY_POINT!r}")

    def plain(value):
        stack, seen = [value], set_()
        while stack:
            item = stack.pop()
            kind = id_(type_(item))
            if kind in scalars:
                continue
            if kind not in sequences and kind not in mappings:
                raise TypeError_(f"{ENTRY_POINT} returned a {type_(item).__name__}, not plain data")
            if id_(item) not in seen:
                seen.add(id_(item))
                if kind in mappings:
                    list_extend(stack, dict_keys(item))
                    list_extend(stack, dict_values(item))
                else:
                    list_extend(stack, item)
        return value

    def guarded(*args, **kwargs):
        return plain(candidate(*args, **kwargs))

    tests[ENTRY_POINT] = guarded
    check(guarded)
    return TOKEN
'''


# ---- reading responses ----

def extract_program(problem: Problem, text: str) -> str | None:
    """The complete program a response gives for `problem`, or None when it gives none.

    Trainer format (the response has <answer> tags): the last <answer> block, read by the
    trainer's parser; an unclosed or empty answer is no answer. Plain format: the whole
    response. Either way the code is the last ```python block that defines the entry point (else
    the last such block, else the last untagged one, else, without any fence, the text itself).
    Code that defines the entry point gets the prompt's imports, helpers and constants it lacks;
    an indented function body gets the prompt (signature and docstring) put before it. Never
    raises on model text."""
    if not isinstance(problem, Problem):
        raise TypeError(f"problem must be a fastazr.eval.Problem (from load_humaneval), got {type(problem).__name__}")
    code = response_code(text, problem.entry_point)
    return None if code is None else complete_program(problem, code)


def response_code(text: str, entry_point: str) -> str | None:
    """The code a response holds, before any completion from the prompt."""
    if not isinstance(text, str):
        return None
    if parsing.ANSWER_OPEN in text or parsing.ANSWER_CLOSE in text:
        content, _ = parsing.answer_block(text, MAX_CODE_CHARS)
        if content is None:
            return None
    elif len(text) > MAX_CODE_CHARS:
        return None
    else:
        content = text
    if parsing.FENCE_MARK not in content:
        return content.strip("\n").rstrip() or None
    found = parsing.fenced_blocks(content)
    for kinds in CODE_KINDS:
        blocks = [b.rstrip() for kind in kinds for b in found.get(kind, []) if b.strip()]
        if blocks:
            defining = [b for b in blocks if defines(b, entry_point)]
            return (defining or blocks)[-1]
    return None  # fences, but no closed code block: a truncated or malformed answer


def complete_program(problem: Problem, code: str) -> str | None:
    """code made into a whole program for problem, or None when it is neither a program that
    defines the entry point nor a body that parses after the prompt."""
    for source in (code, textwrap.dedent(code)):  # a whole function indented as a block is one too
        names = top_level_names(source)
        if names is not None and problem.entry_point in names:
            missing = [stmt for stmt, bound in prompt_context(problem.prompt, problem.entry_point)
                       if not bound <= names]
            return "\n".join(missing) + "\n\n\n" + source if missing else source
    first = next((line for line in code.splitlines() if line.strip()), "")
    if first[:1] in (" ", "\t"):  # the body of the prompt's function, as a completion model writes it
        program = problem.prompt + code + "\n"
        if top_level_names(program) is not None:
            return program
    return None


def defines(code: str, name: str) -> bool:
    names = top_level_names(code) or top_level_names(textwrap.dedent(code))
    return bool(names) and name in names


def top_level_names(source: str) -> set[str] | None:
    """Names the module binds at its top level, or None when it does not parse."""
    try:
        tree = ast.parse(source)
    except PARSE_ERRORS:
        return None
    names: set[str] = set()
    for node in tree.body:
        names |= bound_names(node)
    return names


def bound_names(node: ast.stmt) -> set[str]:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return {alias.asname or alias.name.split(".")[0] for alias in node.names}
    if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return set()


@lru_cache(maxsize=256)
def prompt_context(prompt: str, entry_point: str) -> tuple[tuple[str, frozenset[str]], ...]:
    """The prompt's top-level statements other than the entry point's stub (imports, helper
    functions, constants), each with the names it binds. Cached: parsed once per problem,
    not once per sample."""
    tree = ast.parse(prompt)
    return tuple((ast.get_source_segment(prompt, node), frozenset(bound_names(node)))
                 for node in tree.body
                 if not (isinstance(node, ast.FunctionDef) and node.name == entry_point))


# ---- running the tests ----

def eval_sandbox_config(workers: int | None = None) -> SandboxConfig:
    """The sandbox HumanEval runs in: the default limits and protections, plus hashlib preloaded.
    HumanEval/162 hashes with md5; a child cannot load OpenSSL's libcrypto itself (Landlock
    confines its reads to the standard library), so hashlib works in a child only through
    Python's built-in _md5 fallback, which some builds leave out. Imported in the zygote, before
    any confinement, OpenSSL is simply inherited (forks measured no slower on the dev VM).
    workers: jobs at once, default one per core this process may use."""
    return SandboxConfig(workers=default_workers() if workers is None else workers,
                         preload=(*AZR_MODULES, "hashlib"))


def job_source(problem: Problem, program: str, token: str) -> str:
    return (f"{JOB}\nPROGRAM = {program!r}\nPROMPT = {problem.prompt!r}\nTEST = {problem.test!r}\n"
            f"ENTRY_POINT = {problem.entry_point!r}\nTOKEN = {token!r}\n")


def check_programs(sandbox: Sandbox, problems: list[Problem], programs: list[list[str | None]],
                   timeout_s: float = 10.0, progress=None) -> list[list[bool]]:
    """Whether each program passes its problem's test: programs[i][j] is sample j for
    problems[i]; None (no program) is False without running. Every program runs in its own
    sandbox child with `timeout_s` seconds, all in one batch over the sandbox's workers; the
    sandbox's memory limit (SandboxConfig.memory_mb, default 1 GiB) applies to each. Run it on
    a Sandbox(config=eval_sandbox_config(workers)). progress(n), if given, counts finished
    jobs, as Sandbox.call_many does, those with no program at once."""
    if not isinstance(sandbox, Sandbox):
        raise TypeError(f"sandbox must be a fastazr.sandbox.Sandbox, got {type(sandbox).__name__}")
    if len(problems) != len(programs):
        raise ValueError(f"programs needs one list of samples per problem: {len(problems)} problems, "
                         f"{len(programs)} lists")
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise ValueError(f"timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    calls, owners, tokens = [], [], []
    verdicts: list[list[bool]] = []
    for i, (problem, samples) in enumerate(zip(problems, programs)):
        if not isinstance(problem, Problem):
            raise TypeError(f"problems[{i}] must be a Problem (from load_humaneval), got {type(problem).__name__}")
        if not isinstance(samples, (list, tuple)):
            raise TypeError(f"programs[{i}] must be a list of programs (str, or None for none), "
                            f"got {type(samples).__name__}")
        verdicts.append([False] * len(samples))
        for j, program in enumerate(samples):
            if program is None:
                continue
            if not isinstance(program, str):
                raise TypeError(f"programs[{i}][{j}] must be str or None, got {type(program).__name__}")
            token = secrets.token_hex(16)
            calls.append((job_source(problem, program, token), JOB_ENTRY, ""))
            owners.append((i, j))
            tokens.append(repr(token))
    unrun = sum(map(len, verdicts)) - len(calls)
    if progress is not None and unrun:
        progress(unrun)
    results = sandbox.call_many(calls, timeout_s=timeout_s, progress=progress)
    for (i, j), token, result in zip(owners, tokens, results):
        verdicts[i][j] = result.ok and result.value == token
    return verdicts


# ---- scoring ----

def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimate of pass@k from n samples of which c passed: 1 - C(n-c, k) / C(n, k),
    computed as a product (Chen et al. 2021), which neither overflows nor loses precision."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"pass_at_k: {name} must be an int, got {value!r}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c (samples that passed) must be between 0 and n={n}, got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k must be between 1 and n={n} (the samples drawn), got {k}: "
                         "draw at least k samples per problem")
    if n - c < k:
        return 1.0  # every k-subset holds a passing sample
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def score(results: list[list[bool]], ks: tuple[int, ...] = (1,)) -> dict[str, float]:
    """{'pass@k': mean over problems of pass_at_k} for each k in ks that is at most the fewest
    samples any problem has; a larger k is left out (it has no unbiased estimate)."""
    if not results:
        raise ValueError("score needs the verdicts of at least one problem")
    if not all(isinstance(row, (list, tuple)) and row for row in results):
        raise ValueError("score: every problem needs a non-empty list of verdicts (one bool per sample)")
    if not ks or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 1 for k in ks):
        raise ValueError(f"ks must be a non-empty tuple of ints >= 1, got {ks!r}")
    n = min(map(len, results))
    usable = [k for k in dict.fromkeys(ks) if k <= n]
    if not usable:
        raise ValueError(f"every k in {ks} exceeds the {n} samples some problem has: pass a k <= {n}, "
                         "or draw more samples")
    return {f"pass@{k}": sum(pass_at_k(len(row), sum(map(bool, row)), k) for row in results) / len(results)
            for k in usable}
