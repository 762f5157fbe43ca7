"""The PPO-clip policy-gradient loss, side by side on one CUDA device: fastazr's fused Triton
kernels vs the eager torch reference vs torch.compile of that reference.

    python bench/bench_pg_loss.py --n 4096,16384,65536

Inputs are fp32 [N] tokens (logprobs and entropy differentiable, ~70% valid under a bool mask, the
entropy bonus on, asymmetric clip). Each time is the median over --rounds of the mean of --inner
back-to-back calls between two CUDA events, after --warmup calls: a call's cost as a training step
sees it, host launch overhead included. "bwd" runs autograd.grad on a retained graph, so it times
the backward alone. GB/s divides the bytes the fused kernels must move (forward reads 17 B a token;
backward reads 13 and writes 8) by the time, for every contender: the eager and compiled ones move
more, so for them it is an effective rate. Launches are CUDA kernels (and memsets/copies) one call
makes, counted with torch.profiler. Errors are max |x - eager reference| over the loss and the
metrics ("sums") and over both gradients."""

from __future__ import annotations

import argparse

import torch

from common import json_line, machine, median, percentile, print_table, profiled
from fastazr.kernels.policy_loss import pg_loss
from fastazr.kernels.policy_loss_reference import pg_loss_reference
from fastazr.kernels.runtime import interpreting

FWD_BYTES, BWD_BYTES = 4 * 4 + 1, 3 * 4 + 1 + 2 * 4  # per token: see the docstring
OPTIONS = dict(clip_low=0.2, clip_high=0.28, entropy_coef=0.01)


def make_inputs(n: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    logprobs = -torch.rand(n, device="cuda", generator=g) * 4
    return dict(logprobs=logprobs.requires_grad_(),
                old_logprobs=logprobs.detach() - torch.randn(n, device="cuda", generator=g) * 0.6,
                advantages=torch.randn(n, device="cuda", generator=g),
                mask=torch.rand(n, device="cuda", generator=g) > 0.3,
                entropy=(torch.rand(n, device="cuda", generator=g) * 2).requires_grad_())


def call(fn, x: dict):
    return fn(x["logprobs"], x["old_logprobs"], x["advantages"], x["mask"], entropy=x["entropy"], **OPTIONS)


def grads(loss: torch.Tensor, x: dict, one: torch.Tensor, retain: bool):
    # An explicit upstream gradient: autograd would otherwise launch a fill for it on every call.
    return torch.autograd.grad(loss, [x["logprobs"], x["entropy"]], grad_outputs=one, retain_graph=retain)


def us_per_call(fn, inner: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(inner):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / inner


def launches(fn) -> int:
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def max_errors(fn, x: dict, expected, one: torch.Tensor) -> tuple[float, float]:
    out = call(fn, x)
    got = grads(out.loss, x, one, retain=False)
    sums = max(float((a.detach() - b.detach()).abs()) for a, b in zip(out, expected[0]))
    grad = max(float((a - b).abs().max()) for a, b in zip(got, expected[1]))
    return sums, grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", default="4096,16384,65536", help="comma-separated token counts")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--inner", type=int, default=20, help="back-to-back calls per timed round")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--skip-compile", action="store_true", help="leave out torch.compile of the reference")
    parser.add_argument("--profile", help="write a torch.profiler trace of the measured region here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_pg_loss.py needs a CUDA device (the kernels' CPU path is the torch reference; "
                         "tests/test_pg_loss.py checks the kernels on CPU under TRITON_INTERPRET=1)")
    if interpreting():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter would time numpy, not the GPU")
    sizes = [int(s) for s in args.n.split(",")]

    contenders = {"fastazr triton": pg_loss, "torch eager reference": pg_loss_reference}
    if not args.skip_compile:
        contenders["torch.compile reference"] = torch.compile(pg_loss_reference, dynamic=False)
    one = torch.ones((), device="cuda")
    results = []
    for n in sizes:
        x = make_inputs(n)
        expected_out = call(pg_loss_reference, x)
        expected = (expected_out, grads(expected_out.loss, x, one, retain=False))
        cases = {}
        for name, fn in contenders.items():
            retained = call(fn, x).loss
            directions = {
                "fwd": lambda fn=fn: call(fn, x),
                "bwd": lambda loss=retained: grads(loss, x, one, retain=True),
                "fwd+bwd": lambda fn=fn: grads(call(fn, x).loss, x, one, retain=False),
            }
            for f in directions.values():
                for _ in range(args.warmup):
                    f()
            torch.cuda.synchronize()
            cases[name] = directions
            results.append(dict(n=n, contender=name, fwd_launches=launches(directions["fwd"]),
                                bwd_launches=launches(directions["bwd"]),
                                **dict(zip(["max_err_sums", "max_err_grads"], max_errors(fn, x, expected, one)))))
        times = {(name, d): [] for name in cases for d in ("fwd", "bwd", "fwd+bwd")}
        with profiled(args.profile, f"bench_pg_loss_n{n}") as mark:
            for _ in range(args.rounds):  # contenders interleaved, so clock drift hits all alike
                for (name, direction), values in times.items():
                    with mark(f"{name} {direction} n={n}"):
                        values.append(us_per_call(cases[name][direction], args.inner))
        for row in results:
            if row["n"] == n:
                for d in ("fwd", "bwd", "fwd+bwd"):
                    row[f"{d}_us"] = median(times[(row["contender"], d)])
                    row[f"{d}_us_p90"] = percentile(times[(row["contender"], d)], 90)

    print(f"machine: {machine()}; GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    print(f"fp32 inputs, {OPTIONS}, ~70% valid tokens; median of {args.rounds} rounds x {args.inner} calls (µs/call)")
    rows = []
    for r in results:
        eager = next(e for e in results if e["n"] == r["n"] and e["contender"] == "torch eager reference")
        gbps = r["n"] * (FWD_BYTES + BWD_BYTES) / (r["fwd+bwd_us"] * 1e-6) / 1e9
        rows.append([r["n"], r["contender"], f"{r['fwd_us']:.1f}", f"{r['bwd_us']:.1f}", f"{r['fwd+bwd_us']:.1f}",
                     f"{r['fwd_launches']} / {r['bwd_launches']}", f"{gbps:.1f}",
                     f"{r['max_err_sums']:.1e} / {r['max_err_grads']:.1e}",
                     f"{eager['fwd+bwd_us'] / r['fwd+bwd_us']:.2f}x"])
    print_table(["N", "contender", "fwd µs", "bwd µs", "fwd+bwd µs", "launches fwd / bwd", "fwd+bwd GB/s",
                 "max |err| sums / grads", "fwd+bwd vs eager"], rows)
    json_line({"bench": "pg_loss", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
               "bytes_per_token": {"fwd": FWD_BYTES, "bwd": BWD_BYTES}, "results": results})


if __name__ == "__main__":
    main()
