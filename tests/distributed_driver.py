"""`python tests/distributed_driver.py FAULTS [train options]`: one rank of a data-parallel
`python -m fastazr.train` (the test sets torchrun's environment) with faults injected:

    none
    raise-in-solve-S-R   rank R raises in step S's solver generation
    stall-in-solve-S-R   rank R's solver generation in step S takes 10 minutes (a rank that is
                         busy, in no collective, when another fails)

FAULTS is one fault or several joined by commas (tests/test_distributed_train.py)."""

from __future__ import annotations

import os
import sys
import time

from fastazr.azr.selfplay import SelfPlay
from fastazr.train import main


def inject(faults: str) -> None:
    rank = int(os.environ["RANK"])
    for fault in faults.split(","):
        if fault == "none":
            continue
        kind, step, who = fault.rsplit("-", 2)
        if int(who) != rank:
            continue
        real_generate = SelfPlay.generate

        def generate(self, batch, at, phase, share=None, kind=kind, step=int(step), real=real_generate):
            if at == step and phase == 1:
                if kind == "raise-in-solve":
                    raise RuntimeError(f"injected failure on rank {rank}")
                if kind == "stall-in-solve":
                    time.sleep(600)
            return real(self, batch, at, phase, share)

        if kind not in ("raise-in-solve", "stall-in-solve"):
            raise SystemExit(f"unknown fault {fault!r}")
        SelfPlay.generate = generate


if __name__ == "__main__":
    inject(sys.argv[1])
    sys.exit(main(sys.argv[2:]))
