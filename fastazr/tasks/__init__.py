"""Absolute Zero's task operations on top of the sandbox: validating proposed programs and
checking deduction, abduction and induction answers. Pure Python; all comparisons happen here,
on values parsed safely from the repr strings children send back."""

from .executor import ProgramOutput, TaskExecutor
from .validate import ALLOWED_MODULES, BANNED_ATTRIBUTES, BANNED_BUILTINS, ProgramCheck, check_program
from .values import ValueParseError, parse_value, same_value

__all__ = ["TaskExecutor", "ProgramOutput", "check_program", "ProgramCheck", "ALLOWED_MODULES",
           "BANNED_BUILTINS", "BANNED_ATTRIBUTES", "parse_value", "same_value", "ValueParseError"]
