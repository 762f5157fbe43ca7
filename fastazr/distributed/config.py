"""DistributedConfig: the options of a data-parallel run (`torchrun ... -m fastazr.train`); a single
process reads none of them."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass


@dataclass
class DistributedConfig:
    timeout_s: float = 1800.0
    """Longest wait of one collective before the run fails instead of hanging. A gather waits
    for the slowest rank's generation and sandbox phase, so this must cover the longest phase
    (a GPU step's generation takes seconds to minutes); a rank that raises is reported to the
    others at once, without waiting for it."""

    bucket_mib: float = 32.0
    """Size of a gradient bucket, in MiB of fp32 gradients: the backward of the last
    micro-batch starts a bucket's reduce-scatter as soon as all its gradients exist, so larger
    buckets mean fewer collectives and less overlap (a parameter larger than this is a bucket
    of its own)."""

    check_buffers: bool = False
    """Debug: after each step all ranks compare a digest of their task buffers and stop, naming
    the rank, when one differs (one small all-gather a step)."""

    def __post_init__(self) -> None:
        # upper bounds: timedelta holds < 1e14 s, and a bucket is a real allocation (1e6 MiB ~ 1 TB)
        for name, minimum, maximum in (("timeout_s", 1.0, 1e9), ("bucket_mib", 1.0 / 1024, 1e6)):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value)
                    or not minimum <= value <= maximum):
                raise ValueError(f"--distributed.{name.replace('_', '-')} must be a finite number from {minimum:g} "
                                 f"to {maximum:g}, got {value!r}")
        if not isinstance(self.check_buffers, bool):
            raise ValueError(f"--distributed.check-buffers takes true or false, got {self.check_buffers!r}")

    @property
    def bucket_elements(self) -> int:
        """fp32 gradient elements in one bucket."""
        return max(1, int(self.bucket_mib * 2**20) // 4)
