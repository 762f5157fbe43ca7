"""`python tests/resume_driver.py FAULT [train options]`: python -m fastazr.train with one fault
injected at a point the test chooses (tests/test_resume.py).

    none                    no fault
    kill-in-checkpoint-N    SIGKILL while checkpoint N's files are being summed (mid-write)
    sigint-in-validate-N    SIGINT while step N validates its proposals
    oom-in-solve-N          torch.OutOfMemoryError from step N's solver generation
    enospc-in-checkpoint-N  a full disk (ENOSPC) while checkpoint N is fsynced
    oom-in-eval-N           torch.OutOfMemoryError from the evaluation after step N's update
    long-step-N             step N reports that it took 10^9 s (what --run.max-minutes budgets by)"""

from __future__ import annotations

import errno
import os
import signal
import sys

import torch

from fastazr.azr.selfplay import SelfPlay
from fastazr.runlog import checkpoint
from fastazr.train import main


def inject(fault: str) -> None:
    if fault == "none":
        return
    kind, _, number = fault.rpartition("-")
    n = int(number)
    if kind == "kill-in-checkpoint":
        real_crc32 = checkpoint.crc32

        def crc32(path):
            if f".step_{n:08d}.partial" in str(path):
                os.kill(os.getpid(), signal.SIGKILL)
            return real_crc32(path)

        checkpoint.crc32 = crc32
    elif kind == "sigint-in-validate":
        real_execute = SelfPlay.execute  # the validation's sandbox batch

        def execute(self, proposals, step):
            if step == n:
                os.kill(os.getpid(), signal.SIGINT)  # the handler runs now: mid-phase
            return real_execute(self, proposals, step)

        SelfPlay.execute = execute
    elif kind == "oom-in-solve":
        real_generate = SelfPlay.generate

        def generate(self, batch, step, phase, share=None):
            if step == n and phase == 1:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
            return real_generate(self, batch, step, phase, share)

        SelfPlay.generate = generate
    elif kind == "oom-in-eval":
        from fastazr.eval.evaluate import Evaluator
        real_run = Evaluator.run

        def run(self, round_=0):
            if round_ == n:
                raise torch.OutOfMemoryError("CUDA out of memory (injected in evaluation)")
            return real_run(self, round_)

        Evaluator.run = run
    elif kind == "enospc-in-checkpoint":
        real_sum = checkpoint._sum_and_sync

        def full_disk(path):
            if f".step_{n:08d}.partial" in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_sum(path)

        checkpoint._sum_and_sync = full_disk
    elif kind == "long-step":
        import fastazr.train as train_module
        real_step = train_module.train_step

        def train_step(trainer, step):
            metrics = real_step(trainer, step)
            return {**metrics, "time/step": 1e9} if step == n else metrics

        train_module.train_step = train_step
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
