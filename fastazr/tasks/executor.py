"""TaskExecutor: the batched checks an Absolute Zero step runs through the sandbox.

Every operation takes and returns lists, so one call covers a whole phase (thousands of
jobs spread over all zygotes). Programs' outputs travel as repr text and are compared here as
values parsed by fastazr.tasks.values; nothing a model wrote is evaluated in this process."""

from __future__ import annotations

from dataclasses import dataclass

from ..sandbox import Result, Sandbox
from .validate import check_program
from .values import ValueParseError, parse_value, same_value, to_source

ENTRY = "f"
# Appended to an induction answer: runs f on every held-out input in one child and returns the
# reprs, so a batch of 10 pairs costs one fork, and one input's exception fails only that pair.
INDUCTION_RUNNER = '''

def __fastazr_run_all(inputs):
    results = []
    for args in inputs:
        try:
            results.append(("ok", repr(f(*args))))
        except Exception as exc:
            results.append(("error", type(exc).__name__))
    return results
'''


def literal_arguments(text: str) -> str | None:
    """Argument source rebuilt from the literal values in `text` ("[3, 1], 'a'"), or None when
    it holds anything but literals. Only this rebuilt text reaches a child."""
    if not isinstance(text, str):
        return None
    if not text.strip():
        return ""
    try:
        values = parse_value(f"({text},)")
    except ValueParseError:
        return None
    return ", ".join(map(to_source, values))


@dataclass(frozen=True)
class ProgramOutput:
    """A proposal's fate: valid, with the output its program gives on its input, or not, and why."""

    valid: bool
    output: str | None = None
    reason: str = ""


class TaskExecutor:
    """The AZR operations over one Sandbox (which it does not own)."""

    def __init__(self, sandbox: Sandbox, max_program_chars: int = 20_000, max_output_chars: int = 10_000):
        self.sandbox = sandbox
        self.max_program_chars = max_program_chars
        self.max_output_chars = max_output_chars

    def run_programs(self, items: list[tuple[str, str]]) -> list[Result]:
        """f(input) for each (program, input_source), once each; results are raw sandbox Results."""
        return self.sandbox.call_many([(p, ENTRY, i) for p, i in items])

    def validate_proposals(self, items: list[tuple[str, str]]) -> list[ProgramOutput]:
        """Static checks, an input of literal values, then f(input) twice in separate children
        with different hash seeds: a proposal is valid when both runs succeed with the same
        literal output of at most max_output_chars (longer outputs are rejected, never
        truncated)."""
        outcomes: list[ProgramOutput | None] = [None] * len(items)
        runnable, arguments = [], []
        for k, (program, given) in enumerate(items):
            check = check_program(program, ENTRY, self.max_program_chars)
            args = literal_arguments(given)
            if not check.ok:
                outcomes[k] = ProgramOutput(False, reason=check.reason)
            elif args is None:
                outcomes[k] = ProgramOutput(False, reason="the input is not literal values")
            else:
                runnable.append(k)
                arguments.append(args)
        calls = [(items[k][0], ENTRY, args) for k, args in zip(runnable, arguments)]
        n = len(calls)
        results = self.sandbox.call_many(calls + calls, groups=[0] * n + [1] * n)
        for j, k in enumerate(runnable):
            outcomes[k] = self._judge_twice(results[j], results[n + j])
        return outcomes  # type: ignore[return-value]

    def _judge_twice(self, first: Result, second: Result) -> ProgramOutput:
        if not first.ok:
            return ProgramOutput(False, reason=f"{first.status}: {first.error}")
        if not second.ok:
            return ProgramOutput(False, reason=f"second run {second.status}: {second.error}")
        if len(first.value) > self.max_output_chars:
            return ProgramOutput(False, reason=f"output of {len(first.value)} chars exceeds {self.max_output_chars}")
        try:
            a, b = parse_value(first.value), parse_value(second.value)
        except ValueParseError as exc:
            return ProgramOutput(False, reason=f"output is not a literal value ({exc})")
        if first.value != second.value or not same_value(a, b):
            return ProgramOutput(False, reason="not deterministic: two runs gave different outputs")
        return ProgramOutput(True, output=first.value)

    @staticmethod
    def check_deduction(items: list[tuple[str, str]]) -> list[bool]:
        """(gold output repr, predicted output text): equal as parsed values. Runs nothing."""
        verdicts = []
        for gold, answer in items:
            try:
                verdicts.append(same_value(parse_value(gold), parse_value(answer)))
            except ValueParseError:
                verdicts.append(False)
        return verdicts

    def check_abduction(self, items: list[tuple[str, str, str]]) -> list[bool]:
        """(program, gold output repr, predicted input text): f(predicted input) reproduces
        the gold output as a value. The prediction must be literal values ("[1, 2], 'a'"):
        an expression could build an object whose repr imitates the gold output."""
        verdicts: list[bool | None] = [None] * len(items)
        calls, where = [], []
        for k, (program, _, answer) in enumerate(items):
            args = literal_arguments(answer)
            if args is None:
                verdicts[k] = False
            else:
                calls.append((program, ENTRY, args))
                where.append(k)
        for k, result in zip(where, self.sandbox.call_many(calls)):
            verdicts[k] = self._matches(result, items[k][1])
        return verdicts  # type: ignore[return-value]

    def check_induction(self, items: list[tuple[str, list[tuple[str, str]]]]) -> list[bool]:
        """(predicted program, [(input source, gold output repr), ...]): the program passes the
        static checks and reproduces every held-out output, all inputs run in one child."""
        verdicts: list[bool | None] = [None] * len(items)
        calls, where = [], []
        for k, (program, pairs) in enumerate(items):
            args = [literal_arguments(source) for source, _ in pairs]
            if not pairs or None in args or not check_program(program, ENTRY, self.max_program_chars).ok:
                verdicts[k] = False
                continue
            inputs = ", ".join(f"({a},)" if a else "()" for a in args)
            calls.append((program + INDUCTION_RUNNER, "__fastazr_run_all", f"[{inputs}]"))
            where.append(k)
        for k, result in zip(where, self.sandbox.call_many(calls)):
            verdicts[k] = self._all_pairs_match(result, [gold for _, gold in items[k][1]])
        return verdicts  # type: ignore[return-value]

    def _matches(self, result: Result, gold: str) -> bool:
        if not result.ok:
            return False
        try:
            return same_value(parse_value(result.value), parse_value(gold))
        except ValueParseError:
            return False

    def _all_pairs_match(self, result: Result, golds: list[str]) -> bool:
        if not result.ok:
            return False
        try:
            runs = parse_value(result.value)
        except ValueParseError:
            return False
        if not isinstance(runs, list) or len(runs) != len(golds):
            return False
        for run, gold in zip(runs, golds):
            if not (isinstance(run, tuple) and len(run) == 2 and run[0] == "ok" and isinstance(run[1], str)):
                return False
            try:
                if not same_value(parse_value(run[1]), parse_value(gold)):
                    return False
            except ValueParseError:
                return False
        return True
