"""The Absolute Zero game without a model: a scripted policy stands in for the engine, the real
sandbox validates and checks. Parsing, validation outcomes, rewards, TRR++, buffers, the
induction hold-out and a whole step."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from fastazr.azr import AZRConfig, RewardScale, SelfPlay, assign_advantages, assign_rewards, derived_seed
from fastazr.azr import parsing
from fastazr.azr.advantages import task_relative, whiten
from fastazr.azr.buffers import SEED_TRIPLET, TaskBuffer, TaskBuffers, normalized_program
from fastazr.azr.rewards import learnability, proposer_reward, solver_reward
from fastazr.azr.tasks import InductionTask, Sample, Triplet
from fastazr.rollout.backend import RolloutBackend
from fastazr.rollout.request import Completion
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor


class CharTokenizer:
    """One token per character: prompts and responses round-trip exactly."""
    chat_template = "yes"

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages) -> list[int]:
        return self.encode("<user>" + messages[-1]["content"] + "<assistant>")

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join(map(chr, ids))


class ScriptedPolicy(RolloutBackend):
    """Answers each prompt with script(prompt_text, sample_index) and records the requests."""

    def __init__(self, script):
        self.script, self.requests = script, []

    def generate(self, requests, progress=None):
        self.requests.append(requests)
        out = []
        for r in requests:
            prompt = "".join(map(chr, r.prompt_ids))
            out.append([self._completion(r, self.script(prompt, i)) for i in range(r.n)])
            if progress is not None:
                progress(sum(len(c.completion_ids) for c in out[-1]))
        return out

    @staticmethod
    def _completion(request, text):
        ids = [ord(c) for c in text]
        return Completion(list(request.prompt_ids), ids, [-0.5] * len(ids), "stop_string")

    def release_memory(self):
        pass

    def resume_memory(self):
        pass

    def weights_updated(self):
        pass


def answer(*blocks: tuple[str, str], think: str = "hmm") -> str:
    body = "\n".join(f"```{kind}\n{text}\n```" for kind, text in blocks)
    return f"<think>{think}</think><answer>\n{body}\n</answer>"


@pytest.fixture(scope="module")
def executor():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=512) as sb:
        yield TaskExecutor(sb)


def game(script, executor, **options) -> SelfPlay:
    config = AZRConfig(**{"batch_size": 2, "references": 2, "induction_inputs": 4, "induction_min_pairs": 2,
                          "learnability_rollouts": 4, **options})
    return SelfPlay(config, ScriptedPolicy(script), executor, CharTokenizer(), seed=7)


def sample(task: str, role: str, text: str, item=None) -> Sample:
    s = Sample(task, role, [1], [ord(c) for c in text], [0.0] * len(text), text, "stop_string")
    s.details["item"] = item
    s.details["parent"] = -1
    return s


# ---- parsing ----

@pytest.mark.parametrize("text, reason", [
    ("no tags at all", "no <answer> block"),
    ("<think>x</think><answer>```python\ndef f(a): return a", "truncated"),
    ("</answer> then nothing", "</answer> without <answer>"),
    ("<answer>   \n </answer>", "empty"),
    ("<answer>" + "x" * 30_000 + "</answer>", "more than 20000"),
    (answer(("python", "def f(a):\n    return a")), "needs 1 ```input```"),
    (answer(("input", "1")), "needs 1 ```python```"),
    (None, "not text"),
])
def test_malformed_proposals_are_classified(text, reason):
    parsed = parsing.program_proposal(text)
    assert not parsed.ok and reason in parsed.reason


def test_the_last_answer_block_wins_and_nested_tags_take_the_innermost():
    text = answer(("python", "def f(a):\n    return 1"), ("input", "1")) + "\n" + \
        answer(("python", "def f(a):\n    return 2"), ("input", "2"))
    parsed = parsing.program_proposal(text)
    assert parsed.ok and parsed.first("python").endswith("return 2") and parsed.first("input") == "2"
    nested = "<answer>outer <answer>\n```python\ndef f(a):\n    return 3\n```\n```input\n3\n```\n</answer></answer>"
    parsed = parsing.program_proposal(nested)
    assert parsed.ok and parsed.first("input") == "3"


def test_solver_answers_may_be_bare_or_fenced():
    assert parsing.solver_answer("deduction", "<answer> 42 </answer>").first("output") == "42"
    assert parsing.solver_answer("deduction", "<answer>```output\n[1, 2]\n```</answer>").first("output") == "[1, 2]"
    assert parsing.solver_answer("abduction", "<answer>```\n'a', 3\n```</answer>").first("input") == "'a', 3"
    induction = parsing.solver_answer("induction", answer(("python", "def f(x):\n    return x")))
    assert induction.ok and induction.first("python").startswith("def f")
    # a fence of another kind is not a bare answer
    assert not parsing.solver_answer("deduction", "<answer>```python\nprint(1)\n```</answer>").ok


def test_induction_proposals_need_a_message_and_enough_inputs():
    ok = answer(("input", "1"), ("input", "2"), ("message", "adds one"))
    assert parsing.induction_proposal(ok, 2).ok
    assert not parsing.induction_proposal(ok, 3).ok
    assert "message" in parsing.induction_proposal(answer(("input", "1"), ("input", "2")), 2).reason


def test_hostile_text_never_raises():
    rng = np.random.default_rng(0)
    alphabet = list("<>/answer`pythoninputmessage\n ()[]{}'\"\\") + ["<answer>", "</answer>", "```", "```python\n"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 80)))
        for task in ("deduction", "abduction", "induction"):
            parsing.solver_answer(task, text)
        parsing.program_proposal(text)
        parsing.induction_proposal(text, 2)


# ---- rewards and advantages ----

def test_every_reward_case():
    scale = RewardScale()
    assert [solver_reward(s, scale) for s in ("correct", "wrong", "malformed")] == [1.0, -0.5, -1.0]
    assert proposer_reward("valid", 0.25, scale) == 0.75
    assert proposer_reward("valid", 0.0, scale) == 0.0 == proposer_reward("valid", 1.0, scale)
    assert proposer_reward("invalid", None, scale) == -1.0 == proposer_reward("duplicate", None, scale)
    assert proposer_reward("malformed", None, scale) == -1.0
    reference = RewardScale(learnability_extreme=-0.5)  # the reference code's; its invalid proposals get -1 too
    assert learnability(1.0, reference) == -0.5 and proposer_reward("invalid", None, reference) == -1.0
    with pytest.raises(ValueError, match="solve rate"):
        proposer_reward("valid", None, scale)


@pytest.mark.parametrize("call, message", [
    (lambda s: learnability(1.7, s), "in \\[0, 1\\]"),            # returned the extreme reward
    (lambda s: proposer_reward("", None, s), "a proposal's status"),  # returned the invalid reward
    (lambda s: solver_reward("bogus", s), "a solve's status"),        # a bare KeyError
    (lambda s: task_relative([("deduction", "solve")], [1.0, -1.0], [3, 3]), "a group, a reward and a length"),
    (lambda s: task_relative([("deduction", "solve")] * 2, [1.0, math.nan], [3, 3]), "finite rewards"),
])
def test_reward_inputs_are_checked(call, message):
    with pytest.raises(ValueError, match=message):
        call(RewardScale())


@pytest.mark.parametrize("make, message", [
    # a RewardScale built on its own gave NaN rewards; 1e200 passed and overflowed in the advantages
    (lambda: RewardScale(solver_correct=math.nan), "AZRConfig.rewards.solver_correct must be a number from"),
    (lambda: RewardScale(proposer_invalid=-1e200), "AZRConfig.rewards.proposer_invalid must be a number from"),
    (lambda: RewardScale(learnability_extreme="0"), "AZRConfig.rewards.learnability_extreme"),
    (lambda: TaskBuffer(SEED_TRIPLET, 1.5), "integer capacity >= 1"),
    (lambda: TaskBuffer(SEED_TRIPLET, True), "integer capacity >= 1"),
    (lambda: TaskBuffer(SEED_TRIPLET, 3).sample(-1, np.random.default_rng(0)), "integer >= 0"),
    (lambda: TaskBuffers(3).programs(2.0, np.random.default_rng(0)), "integer >= 0"),
    (lambda: parsing.solver_answer("Deduction", "<answer>1</answer>"), "a solver's task is one of"),  # KeyError
])
def test_game_pieces_check_their_own_arguments(make, message):
    with pytest.raises(ValueError, match=message):
        make()
    assert TaskBuffer(SEED_TRIPLET, np.int64(3)).capacity == 3  # numpy integers are integers


def test_trr_whitens_each_group_token_weighted_against_a_hand_computed_example():
    # group A: rewards 1 (2 tokens) and -1 (6 tokens): mean = (2 - 6) / 8 = -0.5,
    # unbiased token variance = (2 * 1.5^2 + 6 * 0.5^2) / 7 = 6 / 7
    # group B: one response, so its advantage is 0 whatever its reward
    groups = [("deduction", "solve"), ("deduction", "solve"), ("induction", "propose")]
    advantages, stds = task_relative(groups, [1.0, -1.0, 5.0], [2, 6, 3])
    scale = 1 / math.sqrt(6 / 7 + 1e-8)
    assert advantages[0] == pytest.approx(1.5 * scale) and advantages[1] == pytest.approx(-0.5 * scale)
    assert advantages[2] == 0.0
    assert stds[("deduction", "solve")] == pytest.approx(math.sqrt(6 / 7))
    # the token-weighted mean of the advantages is zero
    assert 2 * advantages[0] + 6 * advantages[1] == pytest.approx(0.0, abs=1e-9)


def test_trr_keeps_groups_apart():
    # the same rewards in two groups whiten the same, whatever the other group holds
    a, _ = task_relative([("x", "p")] * 2 + [("y", "p")] * 2, [1.0, 0.0, 100.0, 0.0], [1, 1, 1, 1])
    assert a[0] == pytest.approx(-a[1]) and a[2] == pytest.approx(-a[3]) and a[0] == pytest.approx(a[2])
    assert whiten([3.0], [0]) == ([0.0], 0.0)


# ---- buffers ----

def test_buffers_seed_dedup_and_keep_the_newest():
    buffers = TaskBuffers(capacity=3)
    assert buffers.sizes() == {"deduction": 1, "abduction": 1, "induction": 1}
    assert SEED_TRIPLET in buffers["deduction"]
    b = TaskBuffer(SEED_TRIPLET, capacity=3)
    # same function with other spacing and a comment, on the same input: a duplicate
    assert not b.add(Triplet("def f(a):  # identity\n    return (a)", SEED_TRIPLET.input, SEED_TRIPLET.output))
    for k in range(4):
        assert b.add(Triplet(f"def f(a):\n    return a + {k}", "1", str(1 + k)))
    assert len(b) == 3 and [t.output for t in b.items()] == ["2", "3", "4"]  # the seed and k=0 left
    assert normalized_program("def f(:") == "def f(:"
    picks = b.sample(10, np.random.default_rng(0))
    assert len(picks) == 3 and len(b.sample(10, np.random.default_rng(0), replace=True)) == 10


# ---- validation, solving and checking with a scripted policy ----

GOOD = "def f(xs):\n    return sorted(xs)[::-1]"


def proposer_script(prompt: str, i: int) -> str:
    if "Design a new Python coding task" in prompt:
        if "solver will be given your program and your input" in prompt:  # deduction
            return answer(("python", GOOD), ("input", "[3, 1, 2]"))
        return answer(("python", "import os\ndef f(a):\n    return a"), ("input", "1"))  # abduction: banned
    if "Write 4 different inputs" in prompt:
        return answer(("input", "'ab'"), ("input", "[1]"), ("input", "'ab'"), ("input", "len"), ("message", "echo"))
    return "I will not answer"


def test_validate_sets_every_outcome(executor):
    g = game(proposer_script, executor)
    proposals = g.generate(g.proposer_prompts(1), 1, 0)
    assert [s.task for s in proposals] == ["deduction"] * 2 + ["abduction"] * 2 + ["induction"] * 2
    g.validate(proposals, 1)
    statuses = [s.status for s in proposals]
    # the second identical deduction proposal is a duplicate of the first
    assert statuses[:2] == ["valid", "duplicate"]
    assert statuses[2:4] == ["invalid", "invalid"] and "os" in proposals[2].reason
    assert proposals[0].details["output"] == "[3, 2, 1]"
    assert g.buffers.sizes()["deduction"] == 2 and g.buffers.sizes()["abduction"] == 1
    # induction: 'ab' twice and the non-literal `len` leave 2 distinct pairs: valid, one shown, one held out
    first = proposals[4]
    assert first.status == "valid", first.reason
    task = first.details["task"]
    assert task.shown == (("'ab'", "'ab'"),) and task.hidden == (("[1]", "[1]"),) and task.message == "echo"
    assert proposals[5].status == "duplicate"


def test_induction_with_too_few_pairs_or_no_message_is_invalid(executor):
    def script(prompt, i):
        if "different inputs" in prompt:
            return answer(("input", "1"), ("input", "1"), ("message", "x")) if i == 0 else "x"
        return "x"

    g = game(script, executor)
    proposals = g.generate(g.proposer_prompts(1), 1, 0)
    g.validate(proposals, 1)
    induction = [s for s in proposals if s.task == "induction"]
    assert induction[0].status == "invalid" and "1 distinct inputs ran, 2 needed" in induction[0].reason
    empty = sample("induction", "propose", answer(("input", "1"), ("input", "2"), ("message", " ")),
                   "def f(a):\n    return a")
    g.validate([empty], 1)
    assert empty.status == "malformed" and "message" in empty.reason


def solver_script(prompt: str, i: int) -> str:
    """Right on even samples, wrong on odd ones, malformed on the third."""
    if i == 2:
        return "no answer here"
    right = i % 2 == 0
    if "Work out the output" in prompt:
        program, given = re.findall(r"```(?:python|input)\n(.*?)\n```", prompt, re.S)[:2]
        truth = {"'Hello world'": "'Hello world'", "[3, 1, 2]": "[3, 2, 1]"}[given]
        return answer(("output", truth if right else "'nope'"))
    if "Find an input" in prompt:
        out = re.findall(r"```output\n(.*?)\n```", prompt, re.S)[0]
        return answer(("input", out if right else "123"))
    return answer(("python", "def f(a):\n    return a" if right else "def f(a):\n    return 0"))


def test_a_whole_step_with_a_scripted_policy(executor):
    def policy(prompt, i):
        return proposer_script(prompt, i) if "Design a new" in prompt or "different inputs" in prompt \
            else solver_script(prompt, i)

    g = game(policy, executor)
    proposals = g.generate(g.proposer_prompts(3), 3, 0)
    g.validate(proposals, 3)
    prompts = g.solver_prompts(proposals, 3)
    trained = [p for p in prompts if p.trained]
    assert [p.task for p in trained] == ["deduction"] * 2 + ["abduction"] * 2 + ["induction"] * 2
    # this step's valid deduction task comes first in its solver batch
    assert trained[0].item == proposals[0].details["task"]
    learn = [p for p in prompts if not p.trained]
    assert [(p.task, p.n, p.parent) for p in learn] == [("deduction", 4, 0), ("induction", 4, 4)]
    solves = g.generate(prompts, 3, 1)
    g.check(solves)
    rates = assign_rewards(proposals, solves, RewardScale())
    # 4 rollouts per valid proposal: right, wrong, malformed, wrong -> solve rate 1/4
    assert rates == {0: 0.25, 4: 0.25}
    assert proposals[0].reward == 0.75 and proposals[1].reward == -1.0 and proposals[2].reward == -1.0
    assert all(s.status == "correct" and s.reward == 1.0 for s in solves if s.trained)
    assert [s.status for s in solves if not s.trained][:4] == ["correct", "wrong", "malformed", "wrong"]
    stds = assign_advantages([s for s in proposals + solves if s.trained])
    assert set(stds) == {(t, r) for t in ("deduction", "abduction", "induction") for r in ("propose", "solve")}


def test_requests_carry_distinct_seeds_per_step_phase_and_index(executor):
    g = game(lambda p, i: "x", executor)
    g.generate(g.proposer_prompts(1), 1, 0)
    g.generate(g.proposer_prompts(2), 2, 0)
    seeds = [r.params.seed for call in g.backend.requests for r in call]
    assert len(set(seeds)) == len(seeds) == 12
    assert all(0 <= s < 2 ** 62 for s in seeds)
    assert derived_seed(7, 1, 0, 0) == seeds[0]
    # the same (seed, step) gives the same random choices: a resumed run proposes alike
    assert g.rng(5, "propose").integers(1 << 30) == g.rng(5, "propose").integers(1 << 30)


def test_seeding_stage_fills_the_buffers(executor):
    counter = {"k": 0}

    def script(prompt, i):
        counter["k"] += 1
        k = counter["k"]
        if "Design a new" in prompt:
            return answer(("python", f"def f(a):\n    return a * {k}"), ("input", str(k)))
        return answer(*[("input", str(k * 10 + j)) for j in range(4)], ("message", "scales"))

    g = game(script, executor, seed_tasks=3)
    rounds = g.seed_buffers()
    assert min(g.buffers.sizes().values()) >= 3 and rounds >= 1


# ---- regressions found by review ----

def test_an_empty_first_block_does_not_hide_a_full_one(executor):
    """A whitespace-only block before the real one: `ok` counted the real one, but the step read
    the empty one (the input '' called f() with no argument; the message '' reached the solver)."""
    g = game(lambda p, i: "x", executor)
    deduction = sample("deduction", "propose", answer(("python", "\n"), ("python", "def f(a):\n    return a + 1"),
                                                      ("input", " "), ("input", "41")))
    induction = sample("induction", "propose", answer(("input", ""), ("input", "1"), ("input", " "), ("input", "2"),
                                                      ("message", " "), ("message", "adds one")),
                       "def f(a):\n    return a + 1")
    g.validate([deduction, induction], 1)
    assert deduction.status == "valid", deduction.reason
    assert deduction.details["task"].input == "41" and deduction.details["output"] == "42"
    assert induction.status == "valid", induction.reason
    task = induction.details["task"]
    assert task.message == "adds one" and task.shown == (("1", "2"),) and task.hidden == (("2", "3"),)
    assert parsing.solver_answer("deduction", "<answer>```output\n\n```\n```output\n7\n```</answer>").first("output") == "7"


def test_fence_parsing_is_linear_and_reads_what_the_regex_read():
    """The fence regex backtracked quadratically on a long line after an unclosed fence: a 20K-char
    answer took ~0.35 s to parse (hundreds of such responses stall a step; a larger
    max_answer_chars, minutes)."""
    import time
    hostile = ["<answer>```" + "a" * 19_990 + "</answer>", "<answer>" + "```a " * 3_990 + "</answer>",
               "<answer>" + ("```" + "a" * 40) * 450 + "</answer>", "<answer>```" + " " * 19_990 + "</answer>"]
    started = time.perf_counter()
    for text in hostile:
        for task in ("deduction", "abduction", "induction"):
            parsing.solver_answer(task, text)
        parsing.program_proposal(text)
    assert time.perf_counter() - started < 0.2
    regex = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
    rng = np.random.default_rng(1)
    alphabet = list("`\n \tpyi_-+aA") + ["```", "```python\n", "```input ", "\n```"]
    for _ in range(2000):
        text = "".join(rng.choice(alphabet, size=rng.integers(0, 50)))
        expected: dict[str, list[str]] = {}
        for kind, body in regex.findall(text):
            expected.setdefault(kind.lower(), []).append(body.strip("\n"))
        assert parsing.fenced_blocks(text) == expected, repr(text)


class EmptyPolicy(ScriptedPolicy):
    """The engine's answer to prompts that do not fit: no tokens, finish reason 'prompt_too_long'."""

    def generate(self, requests, progress=None):
        self.requests.append(requests)
        return [[Completion(list(r.prompt_ids), [], [], "prompt_too_long") for _ in range(r.n)] for r in requests]


def test_a_step_with_no_response_tokens_completes_and_reports_every_metric(executor, tmp_path, caplog):
    """Every completion empty: train.py handed PolicyUpdate an empty list (it raises 'nothing to
    train on') and the step crashed; gpu_memory_gib was missing on the CPU. A later step than
    the run's first (buffers can lengthen prompts) goes on, with a warning; a first one stops
    the run (tests/test_train.py)."""
    from types import SimpleNamespace

    from fastazr.azr.report import console_line
    from fastazr.distributed import World
    from fastazr.train import PHASES, train_step
    from fastazr.update import Telemetry

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"no update or swap without rollouts ({name})")

        def __call__(self, *args):
            raise AssertionError("no update without rollouts")

    g = SelfPlay(AZRConfig(batch_size=2, references=2, induction_inputs=4, induction_min_pairs=2,
                           learnability_rollouts=2), EmptyPolicy(None), executor, CharTokenizer(), seed=7)
    (tmp_path / "samples").mkdir()
    trainer = SimpleNamespace(game=g, telemetry=Telemetry("cpu"), memory=Untouchable(), update=Untouchable(),
                              out=tmp_path, check_stop=lambda: None, start=0,
                              config=SimpleNamespace(azr=g.config, rollout="embedded",
                                                     engine=SimpleNamespace(max_model_len=None)),
                              checkpoints=SimpleNamespace(wait=lambda: None), board=None, evaluator=None, world=World())
    metrics = train_step(trainer, 2)
    assert "step 2: every proposer prompt is longer" in caplog.text and "without an update" in caplog.text
    required = (["step", "tokens_per_s", "gpu_memory_gib"] + [f"time/{p}" for p in PHASES]
                + [f"{m}/{t}" for t in ("deduction", "abduction", "induction")
                   for m in ("valid_rate", "accuracy", "learnability", "buffer_size")]
                + [f"{m}/{t}/{r}" for t in ("deduction", "abduction", "induction") for r in ("propose", "solve")
                   for m in ("reward", "advantage_std", "response_tokens")])
    assert not [k for k in required if k not in metrics]
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float)))
    assert metrics["proposals/malformed"] == 6 and "loss" not in metrics
    assert "loss -" in console_line(2, 2, metrics)
    console_line(1, 1, {})  # nothing at all still prints
