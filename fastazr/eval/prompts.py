"""Every text an evaluated model reads, in two formats, and reading its answers back.

- 'trainer': the prompts self-play trains on. Code reasoning *is* the AZR solver's deduction
  (program + input -> output) and abduction (program + output -> an input) task, so those are
  the trainer's own solver prompts; a HumanEval problem gets the same <think>/<answer> wrapper.
  Answers are read by the trainer's parser (the last <answer> block, then its fenced blocks).
- 'prefill': the trainer's prompts with the response started inside its <answer> block, as
  self-play with --azr.answer-prefill trains (fastazr.azr.prompts.PREFILL); read back the same way.
- 'plain': a short instruction and one fenced block back, as evaluation harnesses ask; what a
  model that never saw the trainer's format can follow. The last fenced block is the answer.

Both go through the tokenizer's chat template when it has one, as self-play prompts do."""

from __future__ import annotations

from fastazr.azr import parsing, prompts
from fastazr.azr.tasks import Triplet

FORMATS = ("trainer", "prefill", "plain")
TRAINER_FORMATS = ("trainer", "prefill")
HUMANEVAL_PREFILL = f"{parsing.ANSWER_OPEN}\n```python\n"
"""A HumanEval response's prefilled start: the complete function follows, signature included."""


def _fence(kind: str, body: str) -> str:
    return f"```{kind}\n{body.rstrip()}\n```"


def start(bench: str, fmt: str) -> str:
    """The prefilled start of a response to `bench` ('humaneval', 'deduction' or 'abduction')."""
    if fmt != "prefill":
        return ""
    return HUMANEVAL_PREFILL if bench == "humaneval" else prompts.prefill(bench, "solve")


def humaneval(problem, fmt: str) -> str:
    if fmt in TRAINER_FORMATS:
        return (f"Complete this Python function so that it does what its docstring says.\n"
                f"{_fence('python', problem.prompt)}\n\n{prompts.FORMAT} Write the complete function, its signature "
                f"and imports included:\n{_fence('python', '...')}")
    return (f"Complete this Python function so that it does what its docstring says. Reply with the complete "
            f"function, its signature and imports included, in one ```python block.\n{_fence('python', problem.prompt)}")


def output_prediction(task, fmt: str) -> str:
    if fmt in TRAINER_FORMATS:
        return prompts.solve_deduction(Triplet(task.program, task.input, task.output))
    return (f"What does `f({task.input})` return? Reply with the value as a Python literal, exactly as repr() "
            f"would print it, in one ```python block.\n{_fence('python', task.program)}")


def input_prediction(task, fmt: str) -> str:
    if fmt in TRAINER_FORMATS:
        return prompts.solve_abduction(Triplet(task.program, task.input, task.output))
    return (f"Find arguments for which `f` returns `{task.output}`. Reply with the arguments of one call as "
            f"Python literals (for example: [3, 1], 'a') in one ```python block.\n{_fence('python', task.program)}")


def encode(text: str, fmt: str, tokenizer, template: str = "auto", prefill: str = "") -> list[int]:
    """Token ids: the trainer formats exactly as self-play wraps its prompts (template: its
    --azr.prompt-format, 'chat', 'plain' or 'auto'; prefill: start()'s); the plain format as the
    chat template's user turn (or the bare text for a model without one)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    if fmt in TRAINER_FORMATS:
        return prompts.wrap(text, ("chat" if chat else "plain") if template == "auto" else template, tokenizer,
                            prefill)
    if chat:
        return tokenizer.encode_chat([{"role": "user", "content": text}])
    return tokenizer.encode(f"{text}\n")


def answer(task_kind: str, text: str, fmt: str, max_chars: int = 20_000) -> str | None:
    """The answer a code-reasoning response gives: an output literal ('deduction') or an input
    ('abduction'); None when it gives none. Never raises on model text. (HumanEval responses
    are read by humaneval.extract_program, which knows the problem's signature.) A prefilled
    response is read with its prefill in front (fastazr.azr.prompts.prefilled)."""
    if fmt in TRAINER_FORMATS:
        parsed = parsing.solver_answer(task_kind, text, max_chars)
        return parsed.first(parsing.SOLVER_FIELD[task_kind]) if parsed.ok else None
    if not isinstance(text, str) or len(text) > max_chars:
        return None
    blocks = [body.strip() for _, body in parsing.fenced_list(text) if body.strip()]
    if blocks:
        return blocks[-1]  # the last fenced block of any kind: models trace in blocks, then answer
    return text.strip() or None
