"""Row counts at which cuBLAS computes a projection as it does for the trainer's large batches.

cuBLAS picks a GEMM kernel by shape. At the row counts of decode steps it splits some
reductions over K and adds the partial sums in another order, which changes the last bit of a
few tenths of a percent of the outputs against the same rows of a large batch: the trainer's
forward. Measured on the H100 node (torch 2.11, bf16): qwen2.5-1.5b's down projection
(K = 8,960) at 14 of the 17 decode batch sizes below 224 rows, qwen2.5-7b's (K = 18,944) at
every one up to 384, its o projection at 16 rows. A differing bit grows over the layers into
logprobs that are not the trainer's recomputation.

GemmRows tries each projection shape once (the choice depends on shapes, not values) at every
candidate row count against `reference_rows` rows of random data, and linear() pads a batch
whose row count gives other bits up to the smallest larger candidate that gives the same ones.
Cost: the padded rows' work (1.5b down: 16 rows run at 160, the next size that agrees; the
GEMM takes 9.7 us at 16 rows, 12.9 at 128, 17.9 at 256).

A second GEMM, `fast` (the engine's: kernels/decode_linear.py, a Triton GEMM launched with
programmatic dependent launch), is tried beside it at the candidates up to `fast_rows(weight)`,
its own limit for the shape; where it gives the reference's bits it takes those row counts
unpadded. Measured on the H100 (graph replays, us a GEMM at 64 rows, cuBLAS / fast): SmolLM2's
four projections 3.19 / 2.82, 3.18 / 2.79, 3.39 / 2.90, 4.44 / 4.25, every tile shape tried
giving the reference's bits."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Linear = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def probe_operands(weight: torch.Tensor, bias: torch.Tensor | None, rows: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Seeded random rows x [rows, K], a weight like `weight` and a bias like `bias`, on its
    device and in its dtype: what a bit check of a GEMM kernel needs (the kernel, and so its
    bits, follows the shapes, not the values)."""
    g = torch.Generator(weight.device).manual_seed(0)
    x = torch.randn(rows, weight.shape[1], generator=g, device=weight.device).to(weight.dtype)
    w = (torch.randn(weight.shape, generator=g, device=weight.device) * 0.02).to(weight.dtype)
    b = None if bias is None else torch.randn(bias.shape, generator=g, device=weight.device).to(bias.dtype)
    return x, w, b


class GemmRows:
    def __init__(self, candidates: list[int], reference_rows: int = 2048, linear: Linear = F.linear,
                 fast: Linear | None = None, fast_rows: Callable[[torch.Tensor], int] = lambda weight: 0):
        """`candidates`: the row counts to try (the decode batch sizes, then larger ones); rows
        at or past `reference_rows` are taken as the trainer's kernel. `fast`, where given, is
        tried at the candidates up to `fast_rows(weight)`."""
        self.candidates = sorted(c for c in set(candidates) if c < reference_rows) + [reference_rows]
        self.reference_rows = reference_rows
        self.linear = linear
        self.fast, self.fast_rows = fast, fast_rows
        self._fast: dict[tuple, frozenset[int]] = {}
        """shape key -> the candidate row counts at which `fast` gives the reference's bits"""
        self._padded: dict[tuple, dict[int, int]] = {}
        """shape key -> candidate rows -> rows to compute them at"""
        self._floor: dict[tuple, int] = {}
        """shape key -> fewest rows from which every candidate gives the reference's bits"""

    @staticmethod
    def _key(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple:
        return tuple(weight.shape), weight.dtype, weight.device, bias is not None

    def learn(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        """Try every candidate row count for this projection's shape (once per shape; a few ms)."""
        key = self._key(weight, bias)
        if key in self._padded:
            return
        x, w, b = probe_operands(weight, bias, self.reference_rows)
        want = self.linear(x, w, b)
        same = {rows: torch.equal(self.linear(x[:rows], w, b), want[:rows]) for rows in self.candidates}
        limit = self.fast_rows(weight) if self.fast is not None else 0
        self._fast[key] = frozenset(rows for rows in self.candidates
                                    if rows <= limit and torch.equal(self.fast(x[:rows], w, b), want[:rows]))
        floor = self.reference_rows
        for rows in reversed(self.candidates):
            if not same[rows]:
                break
            floor = rows
        padded = {}
        for rows in self.candidates:
            if same[rows]:
                padded[rows] = rows
            else:
                padded[rows] = next(r for r in self.candidates if r > rows and same[r])
        self._padded[key], self._floor[key] = padded, floor

    def rows(self, weight: torch.Tensor, bias: torch.Tensor | None, count: int) -> int:
        """Rows to compute `count` rows of this projection at (learn() must have seen its shape)."""
        key = self._key(weight, bias)
        if key not in self._padded:
            raise RuntimeError(f"GemmRows.learn() has not seen a {tuple(weight.shape)} projection: a bug")
        known = self._padded[key].get(count)
        if known is not None:
            return known
        floor = self._floor[key]
        return count if count >= floor else floor

    def takes_fast(self, weight: torch.Tensor, bias: torch.Tensor | None, count: int) -> bool:
        """Whether `count` rows of this projection go through `fast` (a candidate up to its limit
        at which it gave the reference's bits)."""
        return count in self._fast.get(self._key(weight, bias), ())

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """linear(x, weight, bias) with the trainer's bits for every row."""
        count = x.shape[0]
        if self.takes_fast(weight, bias, count):
            return self.fast(x, weight, bias)
        rows = self.rows(weight, bias, count)
        if rows == count:
            return self.linear(x, weight, bias)
        return self.linear(F.pad(x, (0, 0, 0, rows - count)), weight, bias)[:count]
