"""`python -m fastazr.train`: the option tree and its command line, and two real steps of the CPU
preset with the embedded model, end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from fastazr.azr.tasks import GROUPS, TASK_TYPES
from fastazr.options import TrainConfig, _options, build_parser, parse_args
from fastazr.train import PHASES, main


def test_presets_and_overrides():
    config = parse_args(["--azr.batch-size", "3", "--update.lr", "2e-6", "--prompt-format", "plain",
                         "--engine.max-model-len", "none", "--azr.stop-at-answer", "false"], cuda_available=False)
    assert config.preset == "cpu" and config.device == "cpu"
    assert config.azr.batch_size == 3 and config.azr.references == 2  # the override, then the preset's value
    assert config.update.lr == 2e-6 and config.azr.prompt_format == "plain" and config.engine.max_model_len is None
    assert config.azr.stop_at_answer is False
    assert parse_args([], cuda_available=True).preset == "gpu"
    assert parse_args(["--preset", "gpu"], cuda_available=False).azr.batch_size == 64


@pytest.mark.parametrize("argv, message", [
    (["--azr.batch-size", "two"], "--azr.batch-size takes a value of type int"),
    (["--azr.batch-size", "0"], "AZRConfig.batch_size must be an integer >= 1"),
    (["--azr.stop-at-answer", "maybe"], "takes true or false"),
    (["--preset", "tpu"], "--preset must be one of"),
    (["--update.temperature", "0.7", "--azr.temperature", "0.8"], "must equal --azr.temperature"),
    (["--out", ""], "--out must name a run directory"),
    (["--azr.temperature", "0.001"], "AZRConfig.temperature must be >= 0.01"),
    (["--azr.seed-tasks", "20", "--azr.buffer-capacity", "10"], "seed_tasks (20) must be <= buffer_capacity"),
    (["--azr.prompt-format", "xml"], "AZRConfig.prompt_format must be one of"),
    (["--run.max-minutes", "-1"], "--run.max-minutes must be a finite number >= 0"),
    (["--run.max-minutes", "nan"], "--run.max-minutes must be a finite number >= 0"),
    (["--distributed.timeout-s", "0"], "--distributed.timeout-s must be a finite number from 1 to 1e+09"),
    (["--distributed.timeout-s", "1e15"], "--distributed.timeout-s must be a finite number from 1"),  # timedelta
    (["--distributed.bucket-mib", "nan"], "--distributed.bucket-mib must be a finite number"),
    (["--distributed.bucket-mib", "1e308"], "--distributed.bucket-mib must be a finite number"),
    (["--steps", "0"], "--steps must be an integer >= 1"),  # exit 0 and "wrote metrics.jsonl", which it had not
    (["--seed", str(1 << 64)], "--seed must be an integer from 0 to 2**63 - 1"),  # torch.manual_seed overflowed
    (["--azr.learnability-rollouts", "1"], "AZRConfig.learnability_rollouts must be an integer >= 2"),
    (["--sandbox.timeout-s", "inf"], "SandboxConfig.timeout_s: must be a finite number of seconds"),
    (["--sandbox.unprivileged-uid", str(1 << 32)], "SandboxConfig.unprivileged_uid"),  # wrapped to root in C
])
def test_bad_options_name_the_option(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv, cuda_available=False)
    assert message in capsys.readouterr().err


def test_negative_numbers_in_exponent_form_are_values():
    """argparse took -1e-3 for an option ("expected one argument", then the usage); rewards are
    negative by default, so this is a natural thing to type."""
    config = parse_args(["--azr.rewards.solver-wrong", "-1e-3", "--azr.rewards.proposer-invalid", "-2"],
                        cuda_available=False)
    assert config.azr.rewards.solver_wrong == -1e-3 and config.azr.rewards.proposer_invalid == -2


def test_one_temperature_option_sets_both():
    """--azr.temperature alone was refused ('must equal --update.temperature'): the two are one
    setting, so either one sets both."""
    for option in ("--azr.temperature", "--update.temperature"):
        config = parse_args([option, "0.7"], cuda_available=False)
        assert config.azr.temperature == 0.7 == config.update.temperature


def test_help_lists_every_option_with_its_doc():
    text = build_parser().format_help()
    for path, _, doc in _options(TrainConfig):
        assert "--" + path.replace("_", "-") in text, path
        assert doc, f"option {path} has no docstring"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of --device cuda where there is no GPU")
def test_device_cuda_without_a_gpu_is_refused_before_the_run_starts(tmp_path, capsys):
    assert main(["--device", "cuda", "--out", str(tmp_path / "run")]) == 2
    assert "sees no CUDA device" in capsys.readouterr().err and not (tmp_path / "run").exists()


def test_an_out_that_cannot_be_a_directory_is_refused_by_name(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    assert main(["--out", str(tmp_path / "file" / "run")]) == 1
    assert "--out " in capsys.readouterr().err


def test_a_context_no_prompt_fits_stops_the_run(tmp_path):
    """It ran to the end with no token generated and exit 0: an update never happened."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastazr.train", "--preset", "cpu", "--steps", "2",
                           "--engine.max-model-len", "64", "--out", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 1 and "step 1: every proposer prompt is longer" in proc.stderr, proc.stderr[-2000:]
    assert "--engine.max-model-len 64" in proc.stderr and not (tmp_path / "run" / "metrics.jsonl").exists()


REQUIRED = (["step", "tokens_per_s", "loss", "grad_norm", "host_memory_gib", "gpu_memory_gib"]
            + [f"time/{p}" for p in PHASES]
            + [f"{m}/{t}" for t in TASK_TYPES for m in ("valid_rate", "accuracy", "learnability", "buffer_size")]
            + [f"{m}/{t}/{r}" for t, r in GROUPS for m in ("reward", "advantage_std", "response_tokens")])


def test_two_cpu_steps_with_the_embedded_model(tmp_path):
    """The CI run of the real program: every metric written, finite, for both steps, and every
    sample logged. Values are not asserted: they are the model's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the torch paths, as users run it
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fastazr.train", "--preset", "cpu", "--steps", "2", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    for step, line in enumerate(lines, 1):
        metrics = json.loads(line)
        assert metrics["step"] == step
        missing = [k for k in REQUIRED if k not in metrics]
        assert not missing, missing
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, (int, float)))
        samples = [json.loads(s) for s in (out / "samples" / f"step_{step}.jsonl").read_text().splitlines()]
        trained = [s for s in samples if s["trained"]]
        assert len(trained) == 6 * 2  # 3 task types x 2 roles x the CPU preset's B = 2
        assert {s["status"] for s in samples} <= {"valid", "invalid", "duplicate", "malformed", "correct", "wrong"}
    assert "step 2/2" in proc.stdout
