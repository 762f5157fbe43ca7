"""Reading the model's responses: the last <answer> block, then the fenced blocks inside it.

Everything here is total: any text, however long, nested or hostile, gives a ParsedAnswer whose
`ok` says whether the fields the role needs are there, and `reason` says what was wrong. Nothing
is evaluated; values are judged later by fastazr.tasks (literal parsing) and the sandbox."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FENCE_MARK = "```"
# the kind of a fence: the word that opens its info line (python, input, output, message) or nothing
FENCE_KIND = re.compile(r"[ \t]*([A-Za-z0-9_+-]*)")


@dataclass
class ParsedAnswer:
    ok: bool
    reason: str = ""
    fields: dict[str, list[str]] = field(default_factory=dict)
    """Fenced blocks by kind, in order ('python', 'input', 'output', 'message'); '' for a block
    without a kind."""

    def first(self, kind: str) -> str | None:
        """The first block of `kind` with more than whitespace in it (what `ok` counted)."""
        return next((b for b in self.fields.get(kind, []) if b.strip()), None)

    def nonempty(self, kind: str) -> list[str]:
        """Every block of `kind` with more than whitespace in it, in order."""
        return [b for b in self.fields.get(kind, []) if b.strip()]


def answer_block(text: str, max_chars: int) -> tuple[str | None, str]:
    """(content of the last complete <answer>...</answer>, '') or (None, why not). With nested
    tags the innermost block that ends last wins: the text after the last <answer> before the
    last </answer>."""
    if not isinstance(text, str):
        return None, "the response is not text"
    end = text.rfind(ANSWER_CLOSE)
    if end < 0:
        return None, "truncated: <answer> is never closed" if ANSWER_OPEN in text else "no <answer> block"
    start = text.rfind(ANSWER_OPEN, 0, end)
    if start < 0:
        return None, "</answer> without <answer>"
    content = text[start + len(ANSWER_OPEN):end]
    if len(content) > max_chars:
        return None, f"the answer has {len(content)} chars, more than {max_chars}"
    if not content.strip():
        return None, "the answer is empty"
    return content, ""


def fenced_blocks(content: str) -> dict[str, list[str]]:
    """```kind<rest of the line>\n body ``` blocks, by kind (fenced_list's, grouped)."""
    blocks: dict[str, list[str]] = {}
    for kind, body in fenced_list(content):
        blocks.setdefault(kind, []).append(body)
    return blocks


def fenced_list(content: str) -> list[tuple[str, str]]:
    """(kind, body) of every ```kind<rest of the line>\n body ``` block, in order. One linear scan:
    a block opens at a fence mark, its kind is the word starting the info line, its body runs
    from the next line to the next fence mark (the regex r"```[ \\t]*(\\w*)[^\\n]*\\n(.*?)```"
    would read the same blocks, but backtracks quadratically on a long line of text after an
    unclosed fence)."""
    blocks: list[tuple[str, str]] = []
    at = 0
    while True:
        start = content.find(FENCE_MARK, at)
        if start < 0:
            break
        newline = content.find("\n", start + len(FENCE_MARK))
        if newline < 0:  # no info line ends: no later fence has one either
            break
        end = content.find(FENCE_MARK, newline + 1)
        if end < 0:  # never closed: neither is any later fence
            break
        kind = FENCE_KIND.match(content, start + len(FENCE_MARK), newline).group(1)
        blocks.append((kind.lower(), content[newline + 1:end].strip("\n")))
        at = end + len(FENCE_MARK)
    return blocks


def parse_answer(text: str, need: dict[str, int], max_chars: int = 20_000, bare: str | None = None) -> ParsedAnswer:
    """The blocks of the response's last <answer>: `need` maps each required kind to the fewest
    blocks of it. `bare` names the one kind an answer may give as plain text without a fence (a
    solver's "```output\\n3\\n```" and "3" are the same answer)."""
    content, why = answer_block(text, max_chars)
    if content is None:
        return ParsedAnswer(False, why)
    blocks = fenced_blocks(content)
    if bare is not None and bare not in blocks:
        if "" in blocks:
            blocks[bare] = blocks.pop("")
        elif "```" not in content:
            blocks[bare] = [content.strip()]
    parsed = ParsedAnswer(True, "", blocks)
    for kind, count in need.items():
        have = len(parsed.nonempty(kind))
        if have < count:
            return ParsedAnswer(False, f"needs {count} ```{kind}``` block{'s' * (count > 1)}, found {have}", blocks)
    return parsed


def program_proposal(text: str, max_chars: int = 20_000) -> ParsedAnswer:
    """A deduction or abduction proposal: a ```python``` program and an ```input```."""
    return parse_answer(text, {"python": 1, "input": 1}, max_chars)


def induction_proposal(text: str, min_inputs: int, max_chars: int = 20_000) -> ParsedAnswer:
    """An induction proposal: a ```message``` and at least min_inputs ```input``` blocks."""
    return parse_answer(text, {"message": 1, "input": min_inputs}, max_chars)


SOLVER_FIELD = {"deduction": "output", "abduction": "input", "induction": "python"}


def solver_answer(task: str, text: str, max_chars: int = 20_000) -> ParsedAnswer:
    """A solver's answer: the predicted output (deduction), input (abduction) or program
    (induction), fenced or bare."""
    if task not in SOLVER_FIELD:
        raise ValueError(f"a solver's task is one of {', '.join(SOLVER_FIELD)}, got {task!r}")
    kind = SOLVER_FIELD[task]
    return parse_answer(text, {kind: 1}, max_chars, bare=kind)
