"""Absolute Zero's task operations on top of the sandbox: validating proposed programs and
checking deduction, abduction and induction answers. Pure Python; all comparisons happen here,
on values parsed safely from the repr strings children send back."""

from .executor import ProgramOutput, TaskExecutor
from .validate import BANNED_CALLS, BANNED_MODULES, ProgramCheck, check_program
from .values import ValueParseError, parse_value, same_value

__all__ = ["TaskExecutor", "ProgramOutput", "check_program", "ProgramCheck", "BANNED_MODULES",
           "BANNED_CALLS", "parse_value", "same_value", "ValueParseError"]
