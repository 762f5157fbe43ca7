"""Tile sweep for the linear_logprobs kernels: times the forward (GEMM + online softmax) and
the backward (dLogits GEMM + two cuBLAS GEMMs) at one shape for each candidate tile shape, so
default_tiles() in kernels/logprobs.py is chosen from measurements.

    python bench/tune_logprob.py --hidden 1536 --tokens 16384
"""
from __future__ import annotations

import argparse
import torch

from common import cuda_ms, json_line, print_table, profiled
from fastazr.kernels.logprobs import Tiles, backward_grads, forward_stats


def cublas_ms(hidden, weight, rounds: int) -> float:
    """The backward's share that is not ours: dWeight and dHidden GEMMs over 512 MiB chunks."""
    n, v = hidden.shape[0], weight.shape[0]
    chunk = (512 << 20) // (2 * n) // 128 * 128
    dz = torch.randn(n, chunk, device="cuda").bfloat16()
    grad_weight = torch.empty_like(weight)
    grad_hidden = torch.zeros(hidden.shape, device="cuda")

    def gemms():
        for c0 in range(0, v, chunk):
            cols = min(chunk, v - c0)
            torch.mm(dz[:, :cols].t(), hidden, out=grad_weight[c0:c0 + cols])
            torch.addmm(grad_hidden, dz[:, :cols], weight[c0:c0 + cols], out_dtype=torch.float32, out=grad_hidden)
    return cuda_ms(gemms, 1, rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", help="write a torch.profiler trace of the sweep here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("tune_logprob.py times CUDA kernels: run it on a GPU machine")
    n, h, v = args.tokens, args.hidden, args.vocab
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, device="cuda", generator=gen).bfloat16()
    weight = (torch.randn(v, h, device="cuda", generator=gen) * h ** -0.5).bfloat16()
    targets = torch.randint(0, v, (n,), device="cuda", generator=gen)
    grad = torch.randn(n, device="cuda", generator=gen)
    flop = 2 * n * h * v
    rows, results = [], []
    forward_candidates = [Tiles(*c[:5], tma=True, flatten=c[5]) for c in [
        (64, 256, 64, 4, 4, False), (64, 256, 64, 4, 4, True), (64, 256, 64, 4, 3, True),
        (128, 256, 64, 8, 4, False), (128, 256, 64, 8, 3, True), (128, 128, 64, 4, 4, True)]]
    backward_candidates = [Tiles(*c[:5], group_n=c[5], tma=True, flatten=c[6], programs_per_sm=c[7]) for c in [
        (256, 128, 64, 8, 3, 16, False, 1), (256, 128, 64, 8, 3, 16, True, 1), (128, 256, 64, 8, 3, 16, True, 1),
        (128, 128, 64, 4, 4, 16, True, 2), (128, 128, 64, 4, 4, 8, True, 2), (128, 128, 64, 4, 4, 32, True, 2),
        (128, 128, 64, 4, 3, 16, True, 3), (128, 128, 64, 8, 4, 16, True, 2), (128, 256, 64, 8, 4, 16, True, 1),
        (64, 256, 64, 4, 4, 16, True, 2)]]
    _, lse, entropy = forward_stats(hidden, weight, targets, 1.0, True)
    with profiled(args.profile, "tune_logprob"):
        for part, candidates in (("forward", forward_candidates), ("backward", backward_candidates)):
            for tiles in candidates:
                def fn(tiles=tiles, part=part):
                    if part == "forward":
                        return forward_stats(hidden, weight, targets, 1.0, False, tiles)
                    return backward_grads(hidden, weight, targets, lse, entropy, grad, None, 1.0,
                                          True, True, 512 << 20, tiles)
                try:
                    ms = cuda_ms(fn, 1, args.rounds)
                except Exception as error:  # a tile shape that does not fit shared memory or registers
                    rows.append([part, str(tiles), f"failed: {type(error).__name__}", ""])
                    continue
                work = flop if part == "forward" else 3 * flop
                rows.append([part, str(tiles), f"{ms:.2f}", f"{work / ms / 1e9:.0f}"])
                results.append({"part": part, "tiles": tiles.__dict__, "ms": ms})
    print(f"N={n} H={h} V={v} bf16 on {torch.cuda.get_device_name()}; the two cuBLAS GEMMs alone: "
          f"{cublas_ms(hidden, weight, args.rounds):.2f} ms")
    print_table(["part", "tiles", "ms", "TFLOP/s (backward: 3 GEMMs)"], rows)
    json_line({"bench": "tune_logprob", "tokens": n, "hidden": h, "vocab": v, "results": results})


if __name__ == "__main__":
    main()
