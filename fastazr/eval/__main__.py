"""`python -m fastazr.eval --model default|PATH|OUT --bench humaneval,reasoning [--samples k] [--limit n] [--out FILE]`

Evaluates a model on the embedded engine and the sandbox: HumanEval greedy pass@1 (and sampled
pass@k with --samples k), output and input prediction; in the trainer's prompt format and a
plain one. --model takes what `python -m fastazr.train --model` takes, a checkpoint directory
(OUT/checkpoints/step_<n>) or a run directory (its newest good checkpoint). Prints a table and
writes a JSON file with the scores, every response and its outcome."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import torch

from fastazr.model import ModelError, load, preset_names
from fastazr.rollout import Engine
from fastazr.rollout.config import EngineConfig
from fastazr.runlog import checkpoint
from fastazr.runlog.checkpoint import CheckpointError
from fastazr.sandbox import Sandbox
from fastazr.tasks import TaskExecutor

from .evaluate import BENCHES, EvalConfig, Evaluator
from .humaneval import eval_sandbox_config
from .prompts import FORMATS


def resolve_model(text: str) -> str:
    """A run directory -> its newest good checkpoint's model; a checkpoint directory -> its model."""
    path = Path(text)
    if (path / "checkpoints").is_dir():
        return str(checkpoint.newest(path / "checkpoints") / "model")
    if (path / "model").is_dir() and (path / "state.json").exists() or (path / checkpoint.MANIFEST).is_file():
        problem = checkpoint.verify(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint {path} is unusable: {problem}; pass an earlier checkpoint or the run "
                                  "directory (its newest good one is taken)")
        return str(path / "model")
    return text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m fastazr.eval", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="default, a preset, an HF directory, a .gguf file, a "
                        "checkpoint directory or a run directory (default: default)")
    parser.add_argument("--bench", default=",".join(BENCHES), help=f"comma-separated, of {BENCHES}")
    parser.add_argument("--formats", default=",".join(FORMATS), help=f"prompt formats, of {FORMATS}")
    parser.add_argument("--samples", type=int, default=1, help="sampled completions per problem for pass@k")
    parser.add_argument("--temperature", type=float, default=0.8, help="temperature of sampled completions")
    parser.add_argument("--max-tokens", type=int, default=512, help="longest response")
    parser.add_argument("--limit", type=int, help="evaluate the first n HumanEval problems only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompt-format", default="auto", choices=("auto", "chat", "plain"),
                        help="how the trainer format is wrapped: the --azr.prompt-format the model trained with")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--workers", type=int, help="sandbox workers (default: the usable cores)")
    parser.add_argument("--out", help="JSON file of scores and per-response outcomes (default: print only)")
    return parser.parse_args(argv)


# The config fields whose command-line flag is not --<field>; the rest are --<field> with '-'.
FLAGS = {"EvalConfig.benches": "--bench", "EvalConfig.template": "--prompt-format", "SandboxConfig.workers": "--workers"}


def flag_names(message: str) -> str:
    """A config's error message with each field named as the flag that sets it."""
    for field, flag in FLAGS.items():
        message = message.replace(field, flag)
    return re.sub(r"EvalConfig\.(\w+)", lambda m: "--" + m.group(1).replace("_", "-"), message)


def check_out(out: str | None) -> None:
    """Before the evaluation, not after it (minutes to hours): --out must be a file we can write."""
    if out is None:
        return
    path = Path(out)
    if path.is_dir():
        raise ValueError(f"--out {out} is a directory: name the JSON file to write, e.g. {path / 'eval.json'}")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} cannot be written ({existing} is not a writable directory)")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    try:
        config = EvalConfig(benches=args.bench, formats=args.formats, samples=args.samples,
                            temperature=args.temperature, max_tokens=args.max_tokens, limit=args.limit, seed=args.seed,
                            template=args.prompt_format)
        sandbox_config = eval_sandbox_config(args.workers)
        source = resolve_model(args.model)
        check_out(args.out)
    except (ValueError, CheckpointError) as exc:
        print(f"fastazr.eval: {flag_names(str(exc))}", file=sys.stderr)
        return 2
    if args.model.lower() in preset_names():
        print(f"fastazr.eval: {args.model} has random weights: every response runs to --max-tokens and scores 0 "
              "(presets are for timing)", file=sys.stderr)
    from fastazr.train import text_tokenizer  # the borrowed tokenizer of random-init presets

    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    started = time.perf_counter()
    try:
        model, tokenizer = load(source, device=device, seed=args.seed)
    except ModelError as exc:
        print(f"fastazr.eval: {exc}", file=sys.stderr)
        return 2
    tokenizer = text_tokenizer(tokenizer, model.config.vocab_size)
    engine = Engine(model, tokenizer, EngineConfig(), seed=args.seed)
    with Sandbox(config=sandbox_config) as sandbox:
        evaluator = Evaluator(engine, tokenizer, sandbox, TaskExecutor(sandbox), config)
        built = time.perf_counter()
        metrics, records = evaluator.run()
    seconds = time.perf_counter() - built
    if not metrics:
        print("fastazr.eval: nothing was evaluated (no reasoning task could be built from these problems)",
              file=sys.stderr)
        return 1
    print(f"# {args.model}: {len(evaluator.problems)} HumanEval problems, {len(evaluator.tasks)} reasoning tasks; "
          f"{seconds:.1f} s to evaluate ({built - started:.1f} s to load and build)")
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key:<{width}}  {100 * value:6.1f}%")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"model": args.model, "config": vars(args), "metrics": metrics,
                                              "seconds": seconds, "records": records}, indent=1, default=str))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
