"""An evaluation pass over any RolloutBackend: HumanEval (greedy pass@1, sampled pass@k) and code
reasoning (output and input prediction), in every prompt format, one generate() call and one
sandbox batch per benchmark. Used by `python -m fastazr.eval` and by training (--run.eval-every)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fastazr.azr import prompts as train_prompts
from fastazr.azr.parsing import ANSWER_CLOSE
from fastazr.azr.selfplay import derived_seed
from fastazr.rollout.request import MIN_TEMPERATURE, Request, SamplingParams

from . import prompts
from .humaneval import check_programs, extract_program, score
from .problems import load_humaneval
from .reasoning import build_reasoning_tasks, check_input_predictions, check_output_predictions

BENCHES = ("humaneval", "reasoning")


@dataclass
class EvalConfig:
    benches: tuple[str, ...] = BENCHES
    """Which benchmarks: 'humaneval' (164 problems), 'reasoning' (output and input prediction
    built from HumanEval's solutions and test inputs)."""

    formats: tuple[str, ...] = prompts.FORMATS
    """Prompt formats: 'trainer' (self-play's <think>/<answer> prompts), 'prefill' (the same,
    started inside <answer> as --azr.answer-prefill trains) and 'plain'."""

    samples: int = 1
    """Sampled completions per HumanEval problem for pass@k (k = 1 and this), besides the greedy
    one; 1: greedy only."""

    temperature: float = 0.8
    """Temperature of the sampled completions."""

    max_tokens: int = 512
    """Longest response."""

    limit: int | None = None
    """The first n HumanEval problems (and the reasoning tasks built from them); None: all."""

    seed: int = 0
    """Seeds every sampled completion."""

    template: str = "auto"
    """How the trainer format is wrapped: self-play's --azr.prompt-format ('chat', 'plain', or
    'auto': chat when the tokenizer has a template)."""

    def __post_init__(self) -> None:
        for name, allowed in (("benches", BENCHES), ("formats", prompts.FORMATS)):
            values = getattr(self, name)
            if isinstance(values, str):
                values = tuple(v.strip() for v in values.split(",") if v.strip())
                setattr(self, name, values)
            if not values or any(v not in allowed for v in values):
                raise ValueError(f"EvalConfig.{name} takes some of {allowed}, got {values!r}")
        for name, minimum in (("samples", 1), ("max_tokens", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"EvalConfig.{name} must be an integer >= {minimum}, got {value!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            raise ValueError(f"EvalConfig.limit must be an integer >= 1 or None, got {self.limit!r}")
        if self.template not in ("auto", "chat", "plain"):
            raise ValueError(f"EvalConfig.template must be 'auto', 'chat' or 'plain', got {self.template!r}")
        if (isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float))
                or not math.isfinite(self.temperature) or self.temperature < MIN_TEMPERATURE):
            raise ValueError(f"EvalConfig.temperature must be a number >= {MIN_TEMPERATURE}, got {self.temperature!r}")


class Evaluator:
    """Builds the problems and reasoning tasks once (the tasks' outputs come from the sandbox),
    then evaluates the backend's current weights on every run()."""

    def __init__(self, backend, tokenizer, sandbox, executor, config: EvalConfig):
        self.backend, self.tokenizer, self.sandbox, self.executor, self.config = (backend, tokenizer, sandbox,
                                                                                 executor, config)
        self.problems = load_humaneval(config.limit)
        # inputs the docstring does not show first: 115 of HumanEval's first test inputs appear in
        # the prompt with their output, which would make output prediction a lookup
        self.tasks = (build_reasoning_tasks(self.problems, executor, prefer_unseen=True)
                      if "reasoning" in config.benches else [])

    def _params(self, fmt: str, greedy: bool, seed: int) -> SamplingParams:
        stop = (ANSWER_CLOSE,) if fmt in prompts.TRAINER_FORMATS else ()
        return SamplingParams(temperature=0.0 if greedy else self.config.temperature,
                              max_new_tokens=self.config.max_tokens, stop_strings=stop, seed=seed)

    def _texts(self, completions, start: str = "") -> list[str]:
        return [train_prompts.prefilled(start, self.tokenizer.decode(c.completion_ids, skip_special_tokens=True))
                for c in completions]

    def run(self, round_: int = 0) -> tuple[dict[str, float], list[dict]]:
        """(metrics, one record per response) of the backend's weights now. round_ (the training
        step) varies the sampled completions' seeds between evaluations."""
        metrics: dict[str, float] = {}
        records: list[dict] = []
        if "humaneval" in self.config.benches:
            self._humaneval(round_, metrics, records)
        if "reasoning" in self.config.benches and self.tasks:
            self._reasoning(metrics, records)
        return metrics, records

    def _humaneval(self, round_: int, metrics: dict, records: list) -> None:
        c, k = self.config, self.config.samples
        plan, requests = [], []
        for fmt in c.formats:
            for i, problem in enumerate(self.problems):
                ids = prompts.encode(prompts.humaneval(problem, fmt), fmt, self.tokenizer, c.template,
                                     prompts.start("humaneval", fmt))
                requests.append(Request(ids, self._params(fmt, True, 0)))
                plan.append((fmt, i, "greedy"))
                if k > 1:
                    seed = derived_seed(c.seed, round_, "humaneval", fmt, i)
                    requests.append(Request(ids, self._params(fmt, False, seed), n=k))
                    plan.append((fmt, i, "sampled"))
        outputs = self.backend.generate(requests)
        texts = [self._texts(group, prompts.start("humaneval", fmt)) for (fmt, _, _), group in zip(plan, outputs)]
        programs = [[extract_program(self.problems[i], t) for t in group] for (_, i, _), group in zip(plan, texts)]
        passed = check_programs(self.sandbox, [self.problems[i] for _, i, _ in plan], programs)
        for fmt in c.formats:
            for kind in ("greedy", "sampled"):
                rows = [ok for (f, _, g), ok in zip(plan, passed) if f == fmt and g == kind]
                if not rows:
                    continue
                scored = score(rows, (1, k) if kind == "sampled" else (1,))
                for name, value in scored.items():
                    metrics[f"humaneval/{fmt}/{'greedy_' if kind == 'greedy' else ''}{name}"] = value
        for (fmt, i, kind), group, progs, oks in zip(plan, texts, programs, passed):
            for s, (text, program, ok) in enumerate(zip(group, progs, oks)):
                records.append({"bench": "humaneval", "task_id": self.problems[i].task_id, "format": fmt,
                                "kind": kind, "sample": s, "response": text, "program": program, "correct": ok})

    def _reasoning(self, metrics: dict, records: list) -> None:
        c = self.config
        plan, requests = [], []
        builders = {"deduction": prompts.output_prediction, "abduction": prompts.input_prediction}
        for fmt in c.formats:
            for kind, build in builders.items():
                for j, task in enumerate(self.tasks):
                    ids = prompts.encode(build(task, fmt), fmt, self.tokenizer, c.template, prompts.start(kind, fmt))
                    requests.append(Request(ids, self._params(fmt, True, 0)))
                    plan.append((fmt, kind, j))
        texts = [self._texts(group, prompts.start(kind, fmt))[0]
                 for (fmt, kind, _), group in zip(plan, self.backend.generate(requests))]
        answers = [prompts.answer(kind, text, fmt) for (fmt, kind, _), text in zip(plan, texts)]
        verdicts: list[bool] = [False] * len(plan)
        for kind, check in (("deduction", check_output_predictions), ("abduction", check_input_predictions)):
            where = [n for n, (_, k, _) in enumerate(plan) if k == kind]
            for n, ok in zip(where, check(self.executor, [self.tasks[plan[n][2]] for n in where],
                                           [answers[n] for n in where])):
                verdicts[n] = ok
        names = {"deduction": "output_prediction", "abduction": "input_prediction"}
        for fmt in c.formats:
            for kind, name in names.items():
                rows = [ok for (f, k, _), ok in zip(plan, verdicts) if f == fmt and k == kind]
                metrics[f"{name}/{fmt}"] = sum(rows) / len(rows)
        for (fmt, kind, j), text, given, ok in zip(plan, texts, answers, verdicts):
            records.append({"bench": names[kind], "task_id": self.tasks[j].task_id, "format": fmt, "kind": "greedy",
                            "sample": 0, "response": text, "answer": given, "correct": ok})
