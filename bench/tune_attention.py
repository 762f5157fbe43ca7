"""Tile sweep for the training attention's backward (kernels/varlen_attention.py): times forward
+ backward at one micro-batch for each candidate, first the dQ kernel's tiles (dK/dV at their
defaults), then dK/dV's (dQ at the best found), so _DQ and _DKDV are chosen from measurements.
The forward's tiles are not swept: they fix its bits, which the engine's must equal.

    python bench/tune_attention.py --model qwen2.5-1.5b --tokens 16384

Shapes as bench_attention.py's (sequences of 300-2,500 tokens, the model's heads); TFLOP/s at
the causal count, the backward 2.5x the forward. A candidate that does not fit shared memory or
registers is listed as failed."""
from __future__ import annotations

import argparse
import itertools

import torch

from bench_attention import make_batch
from common import cuda_ms, json_line, print_table, profiled
from fastazr.kernels import varlen_attention as module
from fastazr.model import preset_config

DQ_TILES = [(64, 32), (64, 64), (128, 32), (128, 64)]  # (BLOCK_M, BLOCK_N): BLOCK_M a multiple of BLOCK_N
DKDV_TILES = [(32, 64), (64, 64), (32, 128), (64, 128)]  # BLOCK_N a multiple of BLOCK_M


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-1.5b")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--profile", help="write a torch.profiler trace of the sweep here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_attention.py needs a CUDA device")
    c = preset_config(args.model)
    lengths, q, k, v, cu = make_batch(args.tokens, c.num_heads, c.num_kv_heads, c.head_dim)
    dout = torch.randn_like(q)
    longest = max(lengths)
    flop = 3.5 * 4 * c.head_dim * c.num_heads * sum(n * (n + 1) // 2 for n in lengths)

    def step():
        out = module.varlen_attention(q, k, v, cu, longest)
        torch.autograd.grad(out, (q, k, v), dout)

    def measure(part: str, dq: dict, dkdv: dict) -> float | None:
        module._DQ, module._DKDV = dq, dkdv
        label = str(dq) if part == "dQ" else str(dkdv) if part == "dK/dV" else f"{dq} {dkdv}"
        try:
            ms = cuda_ms(step, 3, args.rounds)
        except Exception as error:  # out of shared memory or registers
            rows.append([part, label, f"failed: {type(error).__name__}", ""])
            return None
        rows.append([part, label, f"{ms:.3f}", f"{flop / ms / 1e9:.0f}"])
        results.append({"part": part, "dq": dq, "dkdv": dkdv, "ms": ms})
        return ms

    shipped = dict(module._DQ), dict(module._DKDV)
    rows, results = [], []
    with profiled(args.profile, "tune_attention"):
        best = (measure("shipped", *shipped), *shipped)
        for (m, n), warps, stages in itertools.product(DQ_TILES, (4, 8), (2, 3)):
            dq = dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages)
            ms = measure("dQ", dq, shipped[1])
            if ms is not None and ms < best[0]:
                best = (ms, dq, shipped[1])
        for (m, n), warps, stages, split in itertools.product(DKDV_TILES, (4, 8), (2, 3), (1, 2, 3, 6)):
            dkdv = dict(BLOCK_M=m, BLOCK_N=n, num_warps=warps, num_stages=stages, SPLIT=split)
            ms = measure("dK/dV", best[1], dkdv)
            if ms is not None and ms < best[0]:
                best = (ms, best[1], dkdv)
    module._DQ, module._DKDV = shipped
    print(f"{args.model} heads {c.num_heads} / {c.num_kv_heads} x {c.head_dim}, {sum(lengths)} tokens in "
          f"{len(lengths)} sequences, bf16 on {torch.cuda.get_device_name()}")
    print_table(["part", "tiles", "fwd+bwd ms", "TFLOP/s"], rows)
    print(f"best: _DQ = {best[1]}, _DKDV = {best[2]} ({best[0]:.3f} ms)")
    json_line({"bench": "tune_attention", "model": args.model, "tokens": sum(lengths), "best_ms": best[0],
               "best_dq": best[1], "best_dkdv": best[2], "results": results})


if __name__ == "__main__":
    main()
