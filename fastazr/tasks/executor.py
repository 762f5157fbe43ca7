"""TaskExecutor: the batched checks an Absolute Zero step runs through the sandbox.

Every operation takes and returns lists, so one call covers a whole phase (thousands of
jobs spread over all zygotes). Programs' outputs travel as repr text and are compared here as
values parsed by fastazr.tasks.values; nothing a model wrote is evaluated in this process.
Every check is total: whatever text a model wrote, it returns a verdict and never raises.

Every job runs at the sandbox's one canonical hash seed (SandboxConfig.hash_seed), the seed
validation's first run used, so a valid proposal reproduces its output on every later run;
validation's second run uses another seed and rejects a program whose value differs.

Held-out pairs for an induction task: validate_proposals on (program, input) for each input
gives each input's output (or why there is none) under the same rules as any proposal:
literal input, one fresh child per input with its own limits, a literal output within
max_output_chars, the same value at both hash seeds. check_induction then runs each pair in
its own child too, so the proposer's own program always passes its own task."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..sandbox import Result, Sandbox
from .validate import check_program
from .values import ValueParseError, parse_arguments, parse_value, same_value, to_source

ENTRY = "f"


def literal_arguments(text: str) -> str | None:
    """Argument source rebuilt from the literal values in `text` ("[3, 1], 'a'"), or None when
    it holds anything but literals. Only this rebuilt text reaches a child."""
    if not isinstance(text, str):
        return None
    try:
        return ", ".join(map(to_source, parse_arguments(text)))
    except ValueParseError:
        return None


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
        """f(input) for each (program, input_source), once each, at the canonical hash seed. A
        Result is "ok" only with a literal value of at most max_output_chars; an input that is
        not literal values is the status "error" unrun, a longer output "output_limit", an output
        that is no literal "error"."""
        outcomes: list[Result | None] = [None] * len(items)
        calls, where = [], []
        for k, (program, given) in enumerate(items):
            args = literal_arguments(given)
            if args is None:
                outcomes[k] = Result("error", error="the input is not literal values")
            else:
                calls.append((program, ENTRY, args))
                where.append(k)
        for k, result in zip(where, self.sandbox.call_many(calls)):
            outcomes[k] = self._literal_output(result)
        return outcomes  # type: ignore[return-value]

    def _literal_output(self, result: Result) -> Result:
        if not result.ok:
            return result
        if len(result.value) > self.max_output_chars:
            return replace(result, status="output_limit", value=None, error=f"output of {len(result.value)} chars "
                           f"exceeds max_output_chars={self.max_output_chars}")
        try:
            parse_value(result.value)
        except ValueParseError as exc:
            return replace(result, status="error", value=None, error=f"output is not a literal value ({exc})")
        return result

    def validate_proposals(self, items: list[tuple[str, str]], progress=None) -> list[ProgramOutput]:
        """Static checks, an input of literal values, then f(input) twice in separate children,
        at the canonical hash seed and at another: a proposal is valid when both runs succeed
        with the same value, a literal of at most max_output_chars (longer outputs are rejected,
        never truncated). Its output is the canonical run's repr, which every later run at
        that seed reproduces.

        progress(n), if given, counts sandbox jobs as they finish: two per item (so a bar's
        total is 2 * len(items)), the two of an item the checks rejected counted at once."""
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
        if progress is not None and n < len(items):
            progress(2 * (len(items) - n))
        results = self.sandbox.call_many(calls + calls, groups=[0] * n + [1] * n, progress=progress)
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
        if not same_value(a, b):  # as values: a set's repr order follows the hash seed
            return ProgramOutput(False, reason="not deterministic: two runs (two hash seeds, shifted object addresses) gave "
                                                "different values")
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
        plan = self._plan_abduction(items)
        return self._judge(plan, self.sandbox.call_many(plan[1]))

    def check_induction(self, items: list[tuple[str, list[tuple[str, str]]]]) -> list[bool]:
        """(predicted program, [(input source, gold output repr), ...]): the program passes the
        static checks and reproduces every held-out output. Each pair runs in its own fresh
        child with the full limits: no state, time or memory carries from one pair to the next."""
        plan = self._plan_induction(items)
        return self._judge(plan, self.sandbox.call_many(plan[1]))

    def check_answers(self, deduction: list[tuple[str, str]], abduction: list[tuple[str, str, str]],
                      induction: list[tuple[str, list[tuple[str, str]]]],
                      progress=None) -> tuple[list[bool], list[bool], list[bool]]:
        """The three checks above in one sandbox batch: a self-play step's answers of every task
        type spread over all zygotes at once, with no barrier between task types.

        progress(n), if given, counts sandbox jobs as they finish: one per abduction answer and
        one per held-out pair of each induction answer (check_jobs gives the total), those of
        an answer rejected unrun counted at once. Deduction answers run nothing."""
        abd, ind = self._plan_abduction(abduction), self._plan_induction(induction)
        unrun = self.check_jobs(abduction, induction) - len(abd[1]) - len(ind[1])
        if progress is not None and unrun:
            progress(unrun)
        results = self.sandbox.call_many(abd[1] + ind[1], progress=progress)
        split = len(abd[1])
        return (self.check_deduction(deduction), self._judge(abd, results[:split]),
                self._judge(ind, results[split:]))

    @staticmethod
    def check_jobs(abduction: list[tuple[str, str, str]], induction: list[tuple[str, list[tuple[str, str]]]]) -> int:
        """The jobs check_answers counts in its progress: one per abduction answer, one per
        held-out pair of each induction answer."""
        return len(abduction) + sum(len(pairs) for _, pairs in induction)

    def _plan_abduction(self, items):
        """(verdicts so far, sandbox calls, (item, gold) each call is judged against)."""
        verdicts: list[bool] = [True] * len(items)
        calls, owners = [], []
        for k, (program, gold, answer) in enumerate(items):
            args = literal_arguments(answer)
            if args is None:
                verdicts[k] = False
            else:
                calls.append((program, ENTRY, args))
                owners.append((k, gold))
        return verdicts, calls, owners

    def _plan_induction(self, items):
        verdicts: list[bool] = [True] * len(items)
        calls, owners = [], []
        for k, (program, pairs) in enumerate(items):
            args = [literal_arguments(source) for source, _ in pairs]
            if not pairs or None in args or not check_program(program, ENTRY, self.max_program_chars).ok:
                verdicts[k] = False
                continue
            calls.extend((program, ENTRY, a) for a in args)
            owners.extend((k, gold) for _, gold in pairs)
        return verdicts, calls, owners

    def _judge(self, plan, results: list[Result]) -> list[bool]:
        verdicts, _, owners = plan
        for (k, gold), result in zip(owners, results):
            verdicts[k] = verdicts[k] and self._matches(result, gold)
        return verdicts

    def _matches(self, result: Result, gold: str) -> bool:
        if not result.ok:
            return False
        try:
            return same_value(parse_value(result.value), parse_value(gold))
        except ValueParseError:
            return False
