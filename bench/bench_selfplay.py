"""A self-play step of `python -m fastazr.train`, timed by phase, and its generation phases against
the same requests replayed through the engine alone.

    python bench/bench_selfplay.py --model qwen2.5-1.5b --fixed-tokens 512     # H100: timing shapes
    python bench/bench_selfplay.py --model default                              # the embedded model

Runs --steps steps of the gpu preset (the first is warm-up: CUDA graphs, Triton compiles, the
allocator's growth), then replays the last step's two engine calls (proposals; solves with the
learnability rollouts) through Engine.generate with the prefix cache dropped, --rounds times,
warm. "of replay" = the step's generated tokens/s in that phase over the replay's median: what
the step loses to everything around the engine call (prompt building is outside the phase; the
phase includes decoding completions to text). A random-init model writes noise, so
--fixed-tokens makes every response that many tokens (EOS and </answer> ignored) and every
proposal is malformed: the solver batch then holds 3 x B buffer tasks and no learnability
rollouts, a lower bound on the paper's solve phase."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from common import json_line, machine, median, print_table, profiled
from fastazr.options import parse_args
from fastazr.train import PHASES, build, train_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--fixed-tokens", type=int, help="every response exactly this long (random-init models)")
    parser.add_argument("--steps", type=int, default=3, help="steps to run; the first is warm-up")
    parser.add_argument("--rounds", type=int, default=3, help="replays of each generation phase (median)")
    parser.add_argument("--profile", help="write a torch.profiler trace of the last step here")
    parser.add_argument("train_options", nargs="*", help="more `python -m fastazr.train` options, after --")
    args = parser.parse_args()
    argv = ["--preset", "gpu" if torch.cuda.is_available() else "cpu", "--model", args.model,
            "--out", tempfile.mkdtemp(prefix="bench-selfplay-")] + args.train_options
    if args.fixed_tokens:
        argv += ["--azr.fixed-response-tokens", str(args.fixed_tokens)]
    config = parse_args(argv, torch.cuda.is_available())
    trainer = build(config)
    try:
        steps = []
        for step in range(1, args.steps + 1):
            last = step == args.steps
            with profiled(args.profile if last else None, "selfplay_step"):
                steps.append(train_step(trainer, step))
        replay = {phase: replay_seconds(trainer, phase, args.rounds) for phase in (0, 1)}
    finally:
        trainer.close()
    timed = steps[1:] or steps
    report(config, timed, replay, trainer)


def replay_seconds(trainer, phase: int, rounds: int) -> tuple[float, int]:
    """(median seconds, completion tokens) of the step's requests through the engine alone."""
    requests = trainer.game.last_requests[phase]
    times, tokens = [], 0
    for _ in range(rounds):
        trainer.engine.weights_updated()  # drop the prefix cache: the step starts without one too
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = trainer.engine.generate(requests)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        tokens = sum(len(c.completion_ids) for group in out for c in group)
    return median(times), tokens


def report(config, steps, replay, trainer) -> None:
    step_s = median([m["time/step"] for m in steps])
    print(f"# {machine()}; {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}; "
          f"model {config.model}, B = {config.azr.batch_size}, fixed tokens {config.azr.fixed_response_tokens}; "
          f"median of {len(steps)} step(s) after warm-up")
    rows = [[p, f"{median([m[f'time/{p}'] for m in steps]):.2f}",
             f"{100 * median([m[f'time/{p}'] for m in steps]) / step_s:.1f}%"] for p in PHASES]
    rows.append(["step", f"{step_s:.2f}", "100%"])
    print_table(["phase", "seconds", "share"], rows)
    last = steps[-1]
    gen_rows, ratios = [], {}
    for phase, name in ((0, "generate_propose"), (1, "generate_solve")):
        seconds, tokens = replay[phase]
        step_rate = last[f"tokens/{name}"] / last[f"time/{name}"]
        alone = tokens / seconds
        ratios[name] = step_rate / alone
        gen_rows.append([name, len(trainer.game.last_requests[phase]), f"{step_rate:,.0f}", f"{alone:,.0f}",
                         f"{ratios[name]:.2f}"])
    print_table(["phase", "requests", "tokens/s in step", "tokens/s replayed", "of replay"], gen_rows)
    json_line({"bench": "selfplay", "model": config.model, "batch_size": config.azr.batch_size,
               "fixed_tokens": config.azr.fixed_response_tokens, "step_s": step_s,
               "phases": {p: median([m[f"time/{p}"] for m in steps]) for p in PHASES},
               "of_replay": ratios, "tokens_per_s": last["tokens_per_s"],
               "gpu_memory_gib": last.get("gpu_memory_gib"), "device": torch.cuda.get_device_name()
               if torch.cuda.is_available() else "cpu"})


if __name__ == "__main__":
    sys.exit(main())
