"""Shared pieces of the benchmark scripts: timing statistics, the machine line, profiling."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def cuda_ms(fn, warmup: int, rounds: int) -> float:
    """Median milliseconds of fn() between two CUDA events, after `warmup` untimed calls."""
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return median(times)


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    return (f"{model}, {len(os.sched_getaffinity(0))} cores, Linux {platform.release()}, "
            f"Python {platform.python_version()}")


@contextlib.contextmanager
def profiled(directory: str | None, name: str):
    """A torch.profiler trace (Chrome/Perfetto JSON) of the block when --profile was given."""
    if not directory:
        yield lambda label: contextlib.nullcontext()
        return
    try:
        import torch
    except ImportError:
        raise SystemExit("--profile needs torch (pip install torch==2.13.0 on the CPU machines)") from None
    os.makedirs(directory, exist_ok=True)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        yield torch.profiler.record_function
    path = os.path.join(directory, f"{name}.json")
    prof.export_chrome_trace(path)
    print(f"profile: {path}")
    print_top_kernels(prof)


def print_top_kernels(prof, rows: int = 12) -> None:
    """The kernels that took the most GPU time in a profile: a trace of a whole generate() holds
    ~80K kernel events, too many to read off a timeline."""
    import torch
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA
               and e.device_time_total > 0]
    if not kernels:
        return
    total = sum(e.device_time_total for e in kernels)
    print(f"GPU time {total / 1e3:.1f} ms in {sum(e.count for e in kernels)} kernels; the top {rows}:")
    print_table(["kernel", "calls", "ms", "us a call", "share"],
                [[e.key[:70], e.count, f"{e.device_time_total / 1e3:.2f}", f"{e.device_time_total / e.count:.2f}",
                  f"{e.device_time_total / total:.0%}"]
                 for e in sorted(kernels, key=lambda e: -e.device_time_total)[:rows]])


def print_table(headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |")


def json_line(payload: dict) -> None:
    print(json.dumps(payload, sort_keys=True))
