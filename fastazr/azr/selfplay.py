"""One self-play step in four batched phases, over any RolloutBackend and a TaskExecutor:

    prompts = game.proposer_prompts(step)         # 3 x B proposers
    proposals = game.generate(prompts, step, 0)   # engine call 1
    game.validate(proposals, step)                # sandbox batch 1 (execute), valid tasks join the buffers (admit)
    prompts = game.solver_prompts(proposals, step)  # 3 x B solvers + n per valid proposal
    solves = game.generate(prompts, step, 1)      # engine call 2
    game.check(solves)                            # sandbox batch 2

The reference implementation runs nine sequential generation phases; here every proposal of
every task type is one engine call and every solve, learnability rollouts included, is another,
so the engine's batch is as large as the step allows. Rewards and advantages are pure
functions of the statuses set here (rewards.py, advantages.py).

A data-parallel rank generates only its share of each batch (generate's `share`: the prompts'
indices, whose seeds are their global index's), executes and checks those, and gathers the rest
(fastazr.distributed.gather) before admit() takes the valid tasks into the buffers in the batch's
order: every rank then holds what one process would."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from fastazr.rollout.backend import RolloutBackend
from fastazr.rollout.request import Request, SamplingParams
from fastazr.runlog.progress import progress_bar, shown
from fastazr.tasks import TaskExecutor
from fastazr.tasks.executor import literal_arguments

from . import parsing, prompts
from .advantages import task_relative
from .buffers import TaskBuffers
from .config import AZRConfig
from .rewards import RewardScale, proposer_reward, solver_reward
from .tasks import TASK_TYPES, InductionTask, Sample, Triplet

SEED_SPACE = 2 ** 62
# The bar of each generate() phase.
PHASE_NAMES = ("propose", "solve")


def derived_seed(*parts: int | str) -> int:
    """A 62-bit seed from the run's seed and where it is used (step, phase, index): the same
    parts give the same seed in every process and after every restart, different parts
    practically never collide."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % SEED_SPACE


@dataclass
class Prompt:
    task: str
    role: str
    ids: list[int]
    item: Triplet | InductionTask | str | None
    """What the prompt is about: the task a solver solves, the program an induction proposer
    got, None for deduction and abduction proposers."""
    n: int = 1
    trained: bool = True
    parent: int = -1
    """For learnability rollouts: the index of the proposal they judge."""


class SelfPlay:
    def __init__(self, config: AZRConfig, backend: RolloutBackend, executor: TaskExecutor, tokenizer, seed: int,
                 progress_mode: str = "off"):
        """progress_mode: RunConfig.progress ('auto', 'on' or 'off'): a bar per generate (tokens),
        validate and check (sandbox jobs) call."""
        shown(progress_mode)  # a bad mode fails here, not a step later
        self.config, self.backend, self.executor, self.tokenizer, self.seed = config, backend, executor, tokenizer, seed
        self.progress_mode = progress_mode
        self.buffers = TaskBuffers(config.buffer_capacity)
        template = config.prompt_format
        if template == "auto":
            template = "chat" if getattr(tokenizer, "chat_template", None) else "plain"
        self.template = template
        self.last_requests: dict[int, list[Request]] = {}
        """Each phase's requests of the latest generate() call (bench/bench_selfplay.py replays them)."""

    def rng(self, step: int, purpose: str) -> np.random.Generator:
        """The random choices of one step and purpose: a function of (seed, step, purpose), so a
        resumed run makes the same choices."""
        return np.random.default_rng(derived_seed(self.seed, step, purpose))

    def _start(self, task: str, role: str) -> str:
        return prompts.prefill(task, role) if self.config.answer_prefill else ""

    def _ids(self, text: str, task: str, role: str) -> list[int]:
        return prompts.wrap(text, self.template, self.tokenizer, self._start(task, role))

    # ---- propose ----

    def proposer_prompts(self, step: int, batch_size: int | None = None) -> list[Prompt]:
        """B proposers of each task type: K references for deduction and abduction, one program
        from the buffers for induction."""
        B, c = batch_size or self.config.batch_size, self.config
        rng = self.rng(step, "propose")
        out = []
        for task in ("deduction", "abduction"):
            for _ in range(B):
                references = self.buffers[task].sample(c.references, rng)
                text = prompts.propose_program(task, references)
                out.append(Prompt(task, "propose", self._ids(text, task, "propose"), None))
        for program in self.buffers.programs(B, rng):
            out.append(Prompt("induction", "propose", self._ids(prompts.propose_inputs(program, c.induction_inputs),
                                                                 "induction", "propose"),
                              program))
        return out

    def generate(self, batch: list[Prompt], step: int, phase: int, share: list[int] | None = None) -> list[Sample]:
        """One backend call for the prompts of `share` (indices into batch, default all of them);
        a Sample per completion, in prompt order. A prompt's sampling seed is a function of its
        index in the whole batch, whichever share it is in."""
        c = self.config
        chosen = range(len(batch)) if share is None else share
        requests = []
        for k in chosen:
            p = batch[k]
            limit = c.propose_max_tokens if p.role == "propose" else c.solve_max_tokens
            fixed = c.fixed_response_tokens
            params = SamplingParams(temperature=c.temperature, top_p=c.top_p, max_new_tokens=fixed or limit,
                                    ignore_eos=fixed is not None,
                                    stop_strings=(parsing.ANSWER_CLOSE,) if c.stop_at_answer and not fixed else (),
                                    seed=derived_seed(self.seed, step, phase, k))
            requests.append(Request(p.ids, params, n=p.n))
        self.last_requests[phase] = requests
        with progress_bar(PHASE_NAMES[phase], unit="tok", mode=self.progress_mode) as bar:
            generated = self.backend.generate(requests, progress=bar.update)
        samples = []
        for p, completions in zip((batch[k] for k in chosen), generated):
            for completion in completions:
                text = prompts.prefilled(self._start(p.task, p.role),
                                         self.tokenizer.decode(completion.completion_ids, skip_special_tokens=True))
                sample = Sample(p.task, p.role, completion.prompt_ids, completion.completion_ids, completion.logprobs,
                                text, completion.finish_reason, trained=p.trained)
                sample.details["item"] = p.item
                sample.details["parent"] = p.parent
                samples.append(sample)
        return samples

    # ---- validate ----

    def validate(self, proposals: list[Sample], step: int) -> None:
        """Parse every proposal, run every runnable one in one sandbox batch, set each status
        ('valid', 'invalid', 'duplicate', 'malformed') and add the valid tasks to the buffers.
        An induction proposal's inputs each run twice (two hash seeds, fresh children)."""
        self.execute(proposals, step)
        self.admit(proposals)

    def execute(self, proposals: list[Sample], step: int) -> None:
        """validate() up to the buffers: each proposal is then 'malformed', 'invalid', or holds the
        task it defines as details['candidate'], for admit()."""
        c = self.config
        jobs: list[tuple[str, str]] = []
        plans: list[tuple[Sample, list[int], list[str]]] = []
        for s in proposals:
            if s.task == "induction":
                parsed = parsing.induction_proposal(s.text, c.induction_min_pairs, c.max_answer_chars)
                inputs = parsed.nonempty("input")[:c.induction_inputs] if parsed.ok else []
                program = s.details["item"]
            else:
                parsed = parsing.program_proposal(s.text, c.max_answer_chars)
                inputs = [parsed.first("input")] if parsed.ok else []
                program = parsed.first("python")
            if not parsed.ok:
                s.status, s.reason = "malformed", parsed.reason
                continue
            s.details.update(program=program, inputs=inputs, message=(parsed.first("message") or "").strip())
            plans.append((s, list(range(len(jobs), len(jobs) + len(inputs))), inputs))
            jobs.extend((program, given) for given in inputs)
        outcomes = []
        if jobs:
            with progress_bar("validate", 2 * len(jobs), "job", self.progress_mode) as bar:
                outcomes = self.executor.validate_proposals(jobs, progress=bar.update)
        for s, where, inputs in plans:
            runs = [(literal_arguments(given), outcomes[j]) for j, given in zip(where, inputs)]
            if s.task == "induction":
                self._accept_induction(s, runs, step)
            else:
                self._accept_triplet(s, runs[0], step)

    def admit(self, proposals: list[Sample]) -> None:
        """The candidate tasks into their buffers, in order: 'valid', or 'duplicate' when the buffer
        already holds the task (from an earlier step, or earlier in this batch)."""
        for s in proposals:
            task = s.details.pop("candidate", None)
            if task is None:
                continue
            if self.buffers[s.task].add(task):
                s.status, s.details["task"] = "valid", task
            else:
                s.status, s.reason = "duplicate", ("the buffer already holds this program with these inputs"
                                                   if s.task == "induction" else
                                                   "the buffer already holds this program on this input")

    def _accept_triplet(self, s: Sample, run, step: int) -> None:
        given, outcome = run
        if not outcome.valid:
            s.status, s.reason = "invalid", outcome.reason
            return
        s.details["output"] = outcome.output
        s.details["candidate"] = Triplet(s.details["program"], given, outcome.output, step)

    def _accept_induction(self, s: Sample, runs, step: int) -> None:
        pairs: dict[str, str] = {}
        reasons = []
        for given, outcome in runs:
            if outcome.valid and given not in pairs:
                pairs[given] = outcome.output
            elif not outcome.valid:
                reasons.append(outcome.reason)
        s.details["pairs"] = list(pairs.items())
        if len(pairs) < self.config.induction_min_pairs:
            s.status = "invalid"
            s.reason = (f"{len(pairs)} distinct inputs ran, {self.config.induction_min_pairs} needed"
                        + (f" (first failure: {reasons[0]})" if reasons else ""))
            return
        items = list(pairs.items())
        shown = math.ceil(len(items) / 2)
        s.details["candidate"] = InductionTask(s.details["program"], s.details["message"], tuple(items[:shown]),
                                               tuple(items[shown:]), step)

    def seed_buffers(self, max_rounds: int = 20, propose=None) -> int:
        """The optional seeding stage: untrained proposal rounds until every buffer holds
        config.seed_tasks tasks (or max_rounds pass). Rounds use steps -1, -2, ... so their
        seeds never meet a training step's. Returns the rounds run. propose(step): one round,
        its valid tasks into the buffers (default: this process generates and validates all of
        it; a data-parallel run passes its ranks' split round)."""
        target = self.config.seed_tasks
        rounds = 0
        while rounds < max_rounds and min(self.buffers.sizes().values()) < target:
            rounds += 1
            if propose is None:
                self.validate(self.generate(self.proposer_prompts(-rounds), -rounds, 0), -rounds)
            else:
                propose(-rounds)
        return rounds

    # ---- solve ----

    def solver_prompts(self, proposals: list[Sample], step: int, batch_size: int | None = None) -> list[Prompt]:
        """B trained solver prompts per task type (this step's valid tasks first, then drawn
        uniformly from the buffer), then n learnability rollouts of each valid proposal."""
        B = batch_size or self.config.batch_size
        rng = self.rng(step, "solve")
        out = []
        for task in TASK_TYPES:
            fresh = [s.details["task"] for s in proposals if s.task == task and s.status == "valid"][:B]
            chosen = fresh + self.buffers[task].sample(B - len(fresh), rng, replace=True)
            out.extend(Prompt(task, "solve", self._ids(prompts.solve(task, item), task, "solve"), item)
                       for item in chosen)
        for k, s in enumerate(proposals):
            if s.status == "valid":
                item = s.details["task"]
                out.append(Prompt(s.task, "solve", self._ids(prompts.solve(s.task, item), s.task, "solve"), item,
                                  n=self.config.learnability_rollouts, trained=False, parent=k))
        return out

    # ---- check ----

    def check(self, solves: list[Sample]) -> None:
        """Parse every answer and judge it: status 'correct', 'wrong' or 'malformed'."""
        by_task: dict[str, list[tuple[Sample, str]]] = {t: [] for t in TASK_TYPES}
        for s in solves:
            parsed = parsing.solver_answer(s.task, s.text, self.config.max_answer_chars)
            if not parsed.ok:
                s.status, s.reason = "malformed", parsed.reason
                continue
            answer = parsed.first(parsing.SOLVER_FIELD[s.task])
            s.details["answer"] = answer
            by_task[s.task].append((s, answer))
        abduction_items = [(s.details["item"].program, s.details["item"].output, a) for s, a in by_task["abduction"]]
        induction_items = [(a, list(s.details["item"].hidden)) for s, a in by_task["induction"]]
        total = self.executor.check_jobs(abduction_items, induction_items)
        with progress_bar("check", total, "job", self.progress_mode) as bar:
            deduction, abduction, induction = self.executor.check_answers(
                [(s.details["item"].output, a) for s, a in by_task["deduction"]], abduction_items, induction_items,
                progress=bar.update)
        verdicts = {"deduction": deduction, "abduction": abduction, "induction": induction}
        for task, judged in by_task.items():
            for (s, _), ok in zip(judged, verdicts[task]):
                s.status = "correct" if ok else "wrong"


def solve_rates(proposals: list[Sample], solves: list[Sample]) -> dict[int, float]:
    """Each valid proposal's (index) share of correct learnability rollouts."""
    counts: dict[int, list[int]] = {}
    for s in solves:
        parent = s.details.get("parent", -1)
        if not s.trained and parent >= 0:
            counts.setdefault(parent, []).append(s.status == "correct")
    return {k: sum(v) / len(v) for k, v in counts.items()}


def assign_rewards(proposals: list[Sample], solves: list[Sample], scale: RewardScale) -> dict[int, float]:
    """Every sample's reward; returns the solve rates the proposers' rewards came from."""
    rates = solve_rates(proposals, solves)
    for s in solves:
        s.reward = solver_reward(s.status, scale)
    for k, s in enumerate(proposals):
        s.reward = proposer_reward(s.status, rates.get(k), scale)
        if k in rates:
            s.details["solve_rate"] = rates[k]
    return rates


def assign_advantages(samples: list[Sample]) -> dict[tuple[str, str], float]:
    """Task-Relative REINFORCE++ advantages of the trained samples; returns each group's
    token-weighted reward std."""
    advantages, stds = task_relative([(s.task, s.role) for s in samples], [s.reward for s in samples],
                                     [len(s.completion_ids) for s in samples])
    for s, a in zip(samples, advantages):
        s.advantage = a
    return stds
