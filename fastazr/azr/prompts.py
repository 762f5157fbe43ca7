"""Every text the model reads, in one place: the answer-format wrapper, the three proposer
prompts and the three solver prompts. Written for fastazr; the structure follows the Absolute
Zero paper (K reference tasks for deduction and abduction proposals, one reference program for
induction proposals, the task itself for solvers).

A prompt is built as the user message of a chat (models with a chat template) or as plain text
ending in "Assistant: <think>" (base models, --prompt-format plain). With --azr.answer-prefill the
response is started for the model inside its answer block (PREFILL): the prefill is prompt, not
trained, and the parser reads it back in front of the completion (prefilled())."""

from __future__ import annotations

from .parsing import ANSWER_CLOSE, ANSWER_OPEN, FENCE_MARK
from .tasks import InductionTask, Triplet

FORMAT = ("Think step by step inside <think> </think>, then give only the final answer inside "
          "<answer> </answer>.")

PROPOSE_RULES = """Rules for the program:
- it defines a function named `f`; helper functions and classes are allowed;
- it is deterministic: no randomness, no clock, no files, no network, no input(), no printing;
- it imports only from the standard library's pure modules (math, itertools, collections, ...);
- the input is Python literals only (numbers, strings, lists, tuples, dicts, sets, booleans, None),
  written as the arguments of one call, for example: [3, 1, 2], 'abc'"""

PROPOSE_PROGRAM = {
    "deduction": "Another solver will be given your program and your input and must work out the output.",
    "abduction": "Another solver will be given your program and its output and must find an input that "
                 "produces it.",
}


PREFILL = {"program": f"{ANSWER_OPEN}\n```python\ndef f(", "input": f"{ANSWER_OPEN}\n```input\n",
           "output": f"{ANSWER_OPEN}\n```output\n"}
"""Response starts by what the response must write first: a program opens its ```python block at
`def f(`, inputs and outputs open their block. Unprompted, SmolLM2-135M-Instruct proposed no
valid task in any step of its first H100 runs (batch 64; temperature 0.7 and 1.0; chat and plain
templates; in the step whose samples were read, no response had an <answer> block): every
proposer reward is then -1, the solvers have nothing new to solve, and with equal rewards every
advantage is 0."""


def prefill(task: str, role: str) -> str:
    """The answer-block start of a (task, role) response under --azr.answer-prefill."""
    if role == "propose":
        return PREFILL["input"] if task == "induction" else PREFILL["program"]
    return PREFILL[{"deduction": "output", "abduction": "input", "induction": "program"}[task]]


def prefilled(start: str, completion: str) -> str:
    """The response the parser reads: the prefill and the completion, with the prefilled answer
    block closed where the model left it open: </answer> added when the response ends without
    one, and the prefill's fence closed when the answer ends inside it ("3\n</answer>" after
    "```output\n" answers 3, as "<answer>3</answer>" does in the unprefilled format)."""
    if not start:
        return completion
    body, _, rest = completion.partition(ANSWER_CLOSE)
    answer = start + body
    if answer.count(FENCE_MARK) % 2:
        answer += "\n" + FENCE_MARK
    return answer + ANSWER_CLOSE + rest


def _fence(kind: str, body: str) -> str:
    return f"```{kind}\n{body}\n```"


def _reference(t: Triplet) -> str:
    return "\n".join([_fence("python", t.program), _fence("input", t.input), _fence("output", t.output)])


def propose_program(task: str, references: list[Triplet]) -> str:
    """Deduction or abduction proposer: write a new program and an input, unlike the references."""
    shown = "\n\n".join(f"Reference {i + 1}:\n{_reference(t)}" for i, t in enumerate(references))
    return f"""Design a new Python coding task: a function and one input for it. {PROPOSE_PROGRAM[task]}
Make it hard enough to require careful reasoning, but solvable.

{PROPOSE_RULES}

Here are earlier tasks; write something different from all of them.

{shown}

{FORMAT} In the answer write the program and the input:
{_fence("python", "def f(...):" + chr(10) + "    ...")}
{_fence("input", "...")}"""


def propose_inputs(program: str, num_inputs: int) -> str:
    """Induction proposer: inputs that reveal what the given program does, and a message."""
    return f"""Here is a Python function:
{_fence("python", program)}

Write {num_inputs} different inputs for `f` that together reveal what it does, and a short message
that hints at its behaviour without giving the code. Another solver will see the message and some
of the input/output pairs, and must write the function. Inputs are Python literals written as the
arguments of one call, for example: [3, 1, 2], 'abc'

{FORMAT} In the answer write each input in its own block, then the message:
{_fence("input", "...")}
{_fence("input", "...")}
...
{_fence("message", "...")}"""


def solve_deduction(t: Triplet) -> str:
    return f"""Work out the output of this Python function on the given input.
{_fence("python", t.program)}
{_fence("input", t.input)}

{FORMAT} Write the output as a Python literal, exactly as repr() would print it:
{_fence("output", "...")}"""


def solve_abduction(t: Triplet) -> str:
    return f"""Find an input for which this Python function returns the given output.
{_fence("python", t.program)}
{_fence("output", t.output)}

{FORMAT} Write the input as Python literals, the arguments of one call (for example: [3, 1], 'a'):
{_fence("input", "...")}"""


def solve_induction(t: InductionTask) -> str:
    pairs = "\n".join(f"{_fence('input', i)}\n{_fence('output', o)}" for i, o in t.shown)
    return f"""Write a Python function `f` that maps each of these inputs to its output.
Hint from the author: {t.message}

{pairs}

Your function is also checked on other inputs, so implement the rule, not a lookup table.
{FORMAT} Write the program:
{_fence("python", "def f(...):" + chr(10) + "    ...")}"""


def solve(task: str, item: Triplet | InductionTask) -> str:
    if task == "deduction":
        return solve_deduction(item)
    if task == "abduction":
        return solve_abduction(item)
    return solve_induction(item)


def wrap(text: str, template: str, tokenizer, start: str = "") -> list[int]:
    """Token ids of a prompt: the tokenizer's chat template ('chat') or plain text ('plain'),
    then the response's prefilled start (in place of plain text's "<think>")."""
    if template == "chat":
        ids = tokenizer.encode_chat([{"role": "user", "content": text}])
        return ids + tokenizer.encode(start) if start else ids
    return tokenizer.encode(f"A conversation between User and Assistant. The Assistant thinks, then answers.\n"
                            f"User: {text}\nAssistant: {start or '<think>'}")
