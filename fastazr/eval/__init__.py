"""Evaluation: HumanEval problems, reading a model's programs from its responses, checking them
in the sandbox, and pass@k."""

from .humaneval import check_programs, eval_sandbox_config, extract_program, pass_at_k, score
from .problems import Problem, load_humaneval

__all__ = ["Problem", "check_programs", "eval_sandbox_config", "extract_program", "load_humaneval", "pass_at_k", "score"]
