"""Checkpoint writes of a trained run: how fast, and what they cost the generation they overlap.

    python bench/bench_checkpoint.py --model qwen2.5-1.5b            # H100: 3 GB of weights, 18 GB of state
    python bench/bench_checkpoint.py --model default --dir /tmp/ck   # the embedded model (CPU or GPU)

Builds the trainer of `python -m fastazr.train` (gpu preset on CUDA, cpu preset otherwise), runs
one step so Adam's state exists, then measures side by side:
- the model's weights alone (save_hf, the Hugging Face directory a checkpoint holds);
- a whole checkpoint in the foreground (weights, fp32 master and moments, state, fsync, rename);
- the step's proposer generation alone, and again while a checkpoint is written in the
  background, as `python -m fastazr.train` does: the difference is what the write stalls
  generation (the target: no more than the weights' write).
Each is written to --dir and deleted. Medians of --rounds."""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import json_line, machine, median, print_table, profiled
from fastazr.model import save_hf
from fastazr.options import parse_args
from fastazr.runlog.run_state import Checkpointer, boundary
from fastazr.train import build, train_step


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--fixed-tokens", type=int, default=256, help="response length of the step and replays")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", help="where checkpoints are written (default: a temporary directory)")
    parser.add_argument("--profile", help="write a torch.profiler trace of a background write overlapping generation")
    args = parser.parse_args()
    work = Path(args.dir or tempfile.mkdtemp(prefix="bench-checkpoint-"))
    argv = ["--preset", "gpu" if torch.cuda.is_available() else "cpu", "--model", args.model, "--out",
            str(work / "run"), "--azr.fixed-response-tokens", str(args.fixed_tokens), "--run.tensorboard", "false"]
    trainer = build(parse_args(argv, torch.cuda.is_available()))
    try:
        train_step(trainer, 1)
        at = boundary(trainer, 1)
        requests = trainer.game.last_requests[0]
        # Each save is of a new step, as in a run, and none is pruned while timed: the time is until
        # the checkpoint is durable (written, summed, fsynced, renamed). Deleting an old one (0.3 s
        # for 1.6 GB on the VM) happens after that, off the step's path.
        saver = Checkpointer(work / "ck", keep=2 * args.rounds + 1)
        weights, whole, alone, overlapped = [], [], [], []
        nbytes = {}
        for r in range(args.rounds):
            target = work / f"weights{r}"
            sync()
            start = time.perf_counter()
            save_hf(trainer.model, target, trainer.game.tokenizer)
            weights.append(time.perf_counter() - start)
            nbytes["weights"] = size(target)
            shutil.rmtree(target)

            start = time.perf_counter()
            saver.save(trainer, dataclasses.replace(at, step=2 * r + 1), background=False)
            whole.append(time.perf_counter() - start)
            nbytes["checkpoint"] = size(saver.root / f"step_{2 * r + 1:08d}")
            shutil.rmtree(saver.root / f"step_{2 * r + 1:08d}")  # untimed: 21.6 GB a checkpoint on the H100

            alone.append(timed_generate(trainer, requests))
            with profiled(args.profile if r == args.rounds - 1 else None, "checkpoint_overlap"):
                saver.save(trainer, dataclasses.replace(at, step=2 * r + 2), background=True)
                overlapped.append(timed_generate(trainer, requests))
                start = time.perf_counter()
                saver.wait()
                tail = time.perf_counter() - start
            shutil.rmtree(saver.root / f"step_{2 * r + 2:08d}")
        report(args, nbytes, weights, whole, alone, overlapped, tail)
    finally:
        trainer.close()
        shutil.rmtree(work, ignore_errors=True)


def timed_generate(trainer, requests) -> float:
    trainer.engine.weights_updated()
    sync()
    start = time.perf_counter()
    trainer.engine.generate(requests)
    sync()
    return time.perf_counter() - start


def report(args, nbytes, weights, whole, alone, overlapped, tail) -> None:
    gb = 1e9
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"# {machine()}; {device}; model {args.model}; medians of {args.rounds}")
    w, c, a, o = median(weights), median(whole), median(alone), median(overlapped)
    rows = [["model weights (save_hf)", f"{nbytes['weights'] / gb:.2f}", f"{w:.2f}", f"{nbytes['weights'] / gb / w:.2f}"],
            ["checkpoint, foreground", f"{nbytes['checkpoint'] / gb:.2f}", f"{c:.2f}", f"{nbytes['checkpoint'] / gb / c:.2f}"],
            ["proposer generation alone", "", f"{a:.2f}", ""],
            ["generation + background checkpoint", "", f"{o:.2f}", ""],
            ["stall (difference)", "", f"{o - a:+.2f}", f"{(o - a) / w:.2f} x weights' write"]]
    print_table(["what", "GB", "seconds", "GB/s"], rows)
    json_line({"bench": "checkpoint", "model": args.model, "device": device, "weights_bytes": nbytes["weights"],
               "checkpoint_bytes": nbytes["checkpoint"], "weights_s": w, "checkpoint_s": c,
               "checkpoint_gb_per_s": nbytes["checkpoint"] / gb / c, "generate_s": a, "generate_with_write_s": o,
               "stall_s": o - a, "write_after_generate_s": tail})


if __name__ == "__main__":
    sys.exit(main())
