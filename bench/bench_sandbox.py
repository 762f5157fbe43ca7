"""Sandbox throughput, latency and containment: fastazr side by side with the alternatives.

    python bench/bench_sandbox.py [--workers N] [--jobs N] [--profile DIR]

One job mix (a trivial snippet; an AZR-typical program with loops and dicts; a 10-input
induction check), the same worker count for every contender:
  (a) fastazr      Sandbox.call_many: zygotes, one hardened child per job
  (b) subprocess   a fresh `python -c` per job
  (c) pebble       a persistent ProcessPool with exec and a timeout (the AZR reference's
                   executor pattern: no isolation), with N workers and with 1
  (d) fork ceiling bare fork + _exit + wait loops in N small Python processes: the most any
                   fork-per-job design can do on this machine
Then every probe of fastazr.sandbox.hostile through (a) and (c). A table, the ratios, and one
JSON line last."""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

from common import json_line, machine, median, percentile, print_table, profiled

from fastazr.sandbox import Sandbox
from fastazr.sandbox.hostile import ATTACKS
from fastazr.tasks.executor import INDUCTION_RUNNER

TRIVIAL = ("def f(x):\n    return x + 1\n", "f", "41")
AZR = ("""
def f(words, k):
    counts = {}
    for w in words:
        counts[w] = counts.get(w, 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    table = {}
    for i, (w, c) in enumerate(ranked[:k]):
        table[w] = [c * j % 7 for j in range(i + 3)]
    return ranked[:k], table
""", "f", "['a', 'b', 'a', 'c', 'b', 'a', 'd', 'e', 'e', 'e'] * 5, 3")
INDUCTION = ("def f(a, b):\n    return [x * b for x in a if x % 2 == 0]\n" + INDUCTION_RUNNER, "__fastazr_run_all",
             "[" + ", ".join(f"([{i}, {i + 1}, {i + 2}, {i + 3}], {i})" for i in range(10)) + "]")
MIX = [TRIVIAL, AZR, INDUCTION]
TIMEOUT_S = 5.0

SUBPROCESS_RUNNER = """
import json, sys
program, entry, args = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
exec(program, namespace)
print(repr(namespace[entry](*eval(f"({args},)" if args.strip() else "()"))))
"""
FORK_LOOP = """
import os, sys, time
n = int(sys.argv[1])
start = time.time()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
print(start, time.time())
"""


def pebble_job(program: str, entry: str, args: str) -> str:
    """(c)'s worker body: exec in a fresh namespace of a long-lived process."""
    namespace = {"__name__": "__main__"}
    exec(program, namespace)
    return repr(namespace[entry](*eval(f"({args},)" if args.strip() else "()", {})))


def jobs(n: int) -> list[tuple[str, str, str]]:
    return [MIX[i % len(MIX)] for i in range(n)]


def expected_values() -> list[str]:
    return [pebble_job(*job) for job in MIX]


# ---- (a) fastazr -------------------------------------------------------------------------

def bench_fastazr(workers: int, n: int, latency_n: int, mark) -> dict:
    start = time.perf_counter()
    with Sandbox(workers=workers, timeout_s=TIMEOUT_S) as sb:
        startup = time.perf_counter() - start
        sb.call_many(jobs(max(50, n // 10)))
        with mark("fastazr throughput"):
            t = time.perf_counter()
            results = sb.call_many(jobs(n))
            wall = time.perf_counter() - t
        latencies = []
        with mark("fastazr latency"):
            for _ in range(latency_n):
                t = time.perf_counter()
                sb.call_many([TRIVIAL])
                latencies.append(time.perf_counter() - t)
        timeout = [0.2]
        t = time.perf_counter()
        timed_out = sb.call_many([("def f():\n    while True:\n        pass\n", "f", "")], timeout_s=timeout[0])[0]
        timeout_wall = time.perf_counter() - t
        protections = sb.protections
    values = [r.value for r in results[:3]]
    return dict(rate=n / wall, latencies=latencies, correct=values == expected_values() and all(r.ok for r in results),
                startup_s=startup, timeout_overshoot_ms=(timeout_wall - timeout[0]) * 1e3,
                timeout_status=timed_out.status, protections=protections)


# ---- (b) a fresh interpreter per job ----------------------------------------------------

def subprocess_job(job) -> str:
    out = subprocess.run([sys.executable, "-c", SUBPROCESS_RUNNER], input=json.dumps(job), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    return out.stdout.strip()


def bench_subprocess(workers: int, n: int, latency_n: int, mark) -> dict:
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(subprocess_job, jobs(workers)))
        with mark("subprocess throughput"):
            t = time.perf_counter()
            values = list(pool.map(subprocess_job, jobs(n)))
            wall = time.perf_counter() - t
    latencies = []
    for _ in range(latency_n):
        t = time.perf_counter()
        subprocess_job(TRIVIAL)
        latencies.append(time.perf_counter() - t)
    return dict(rate=n / wall, latencies=latencies, correct=values[:3] == expected_values())


# ---- (c) a persistent process pool ------------------------------------------------------

def bench_pebble(workers: int, n: int, latency_n: int, mark) -> dict:
    from pebble import ProcessPool

    with ProcessPool(max_workers=workers) as pool:
        for f in [pool.schedule(pebble_job, args=job, timeout=TIMEOUT_S) for job in jobs(4 * workers)]:
            f.result()
        with mark(f"pebble x{workers} throughput"):
            t = time.perf_counter()
            futures = [pool.schedule(pebble_job, args=job, timeout=TIMEOUT_S) for job in jobs(n)]
            values = [f.result() for f in futures]
            wall = time.perf_counter() - t
        latencies = []
        for _ in range(latency_n):
            t = time.perf_counter()
            pool.schedule(pebble_job, args=TRIVIAL, timeout=TIMEOUT_S).result()
            latencies.append(time.perf_counter() - t)
    return dict(rate=n / wall, latencies=latencies, correct=values[:3] == expected_values())


# ---- (d) the fork ceiling ---------------------------------------------------------------

def bench_fork_ceiling(workers: int, forks_per_worker: int, mark) -> dict:
    with mark("fork ceiling"):
        procs = [subprocess.Popen([sys.executable, "-c", FORK_LOOP, str(forks_per_worker)], stdout=subprocess.PIPE,
                                  text=True) for _ in range(workers)]
        spans = [tuple(map(float, p.communicate()[0].split())) for p in procs]
    wall = max(end for _, end in spans) - min(start for start, _ in spans)
    return dict(rate=workers * forks_per_worker / wall)


# ---- containment ------------------------------------------------------------------------

def probe_program(attack, root: str) -> str:
    sentinel = os.path.join(root, f"{attack.name}.sentinel")
    with open(sentinel, "w") as f:
        f.write("precious")
    body = attack.render(attack.probe, sentinel, os.path.join(root, f"{attack.name}.dropped"))
    return body + "\ndef f():\n    return escaped\n"


CARRY_OVER = [  # (name, first job, second job): escaped if the second sees the first
    ("monkeypatch_carries_over", "import math\nmath.sqrt = lambda x: 42\ndef f():\n    return False\n",
     "import math\ndef f():\n    return math.sqrt(4.0) == 42\n"),
    ("gc_hunt_other_jobs", "SECRET = 'fastazr-secret-' + 'x' * 8\ndef f():\n    return False\n",
     "import gc\ndef f():\n    return any(isinstance(o, dict) and str(o.get('SECRET', '')).startswith('fastazr-secret-')"
     " for o in gc.get_objects())\n"),
]


@contextlib.contextmanager
def quiet_fds():
    """The pool's workers inherit fds 1 and 2: let their probes' output go nowhere."""
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    sys.stdout.flush()
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def containment(workers: int) -> dict:
    from pebble import ProcessPool

    probes = [a for a in ATTACKS if a.probe.strip() != "escaped = False"]
    with tempfile.TemporaryDirectory() as root:
        programs = [probe_program(a, root) for a in probes]
        with Sandbox(workers=workers, timeout_s=1.0, memory_mb=512) as sb:
            ours = sb.call_many([(p, "f", "") for p in programs])
            ours_carry = [sb.call_many([(first, "f", "")]) + sb.call_many([(second, "f", "")])
                          for _, first, second in CARRY_OVER]
        theirs = []
        with quiet_fds(), ProcessPool(max_workers=1) as pool:
            for program in programs:
                try:
                    theirs.append(pool.schedule(pebble_job, args=(program, "f", ""), timeout=1.0).result())
                except Exception as exc:  # a worker killed by timeout or crash: the probe was stopped
                    theirs.append(type(exc).__name__)
            theirs_carry = [[pool.schedule(pebble_job, args=(p, "f", ""), timeout=1.0).result() for p in pair[1:]]
                            for pair in CARRY_OVER]
    rows = {}
    for attack, a, c in zip(probes, ours, theirs):
        rows[attack.name] = (not (a.ok and a.value == "True"), c != "True")
    for (name, *_), a, c in zip(CARRY_OVER, ours_carry, theirs_carry):
        rows[name] = (not (a[1].ok and a[1].value == "True"), c[1] != "True")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per contender (subprocess runs a tenth)")
    parser.add_argument("--latency-jobs", type=int, default=300)
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of the measured region")
    parser.add_argument("--skip-pebble", action="store_true", help="when pebble is not installed")
    args = parser.parse_args()
    w, n = args.workers, args.jobs
    print(f"machine: {machine()}")
    print(f"workers: {w}, jobs: {n} (a third each: trivial, AZR-typical, 10-input induction)")

    with profiled(args.profile, "bench_sandbox") as mark:
        results = {"fastazr": bench_fastazr(w, n, args.latency_jobs, mark),
                   "subprocess": bench_subprocess(w, max(3 * w, n // 10), max(20, args.latency_jobs // 10), mark)}
        if not args.skip_pebble:
            results[f"pebble x{w}"] = bench_pebble(w, n, args.latency_jobs, mark)
            results["pebble x1"] = bench_pebble(1, n, args.latency_jobs, mark)
        results["fork ceiling"] = bench_fork_ceiling(w, max(200, n // w), mark)
    contained = None if args.skip_pebble else containment(w)

    print(f"fastazr protections: {results['fastazr']['protections']}")
    print(f"fastazr startup: {results['fastazr']['startup_s'] * 1e3:.0f} ms for {w} zygotes; a 0.2 s timeout "
          f"returned after +{results['fastazr']['timeout_overshoot_ms']:.1f} ms ({results['fastazr']['timeout_status']})")
    rows = []
    for name, r in results.items():
        lat = r.get("latencies")
        rows.append([name, f"{r['rate']:,.0f}", f"{median(lat) * 1e3:.2f}" if lat else "-",
                     f"{percentile(lat, 99) * 1e3:.2f}" if lat else "-",
                     "yes" if r.get("correct", True) else "NO"])
    if contained:
        total = len(contained)
        for row, key in zip(rows, results):
            index = 0 if key == "fastazr" else 1 if key.startswith("pebble") else None
            row.append(f"{sum(v[index] for v in contained.values())}/{total}" if index is not None else "-")
    print()
    print_table(["contender", "jobs/s", "p50 ms (trivial)", "p99 ms (trivial)", "correct", "attacks contained"]
                if contained else ["contender", "jobs/s", "p50 ms (trivial)", "p99 ms (trivial)", "correct"], rows)
    ours = results["fastazr"]["rate"]
    ratios = {"vs_fork_ceiling": ours / results["fork ceiling"]["rate"], "vs_subprocess": ours / results["subprocess"]["rate"]}
    if not args.skip_pebble:
        ratios["vs_pebble_same_workers"] = ours / results[f"pebble x{w}"]["rate"]
        ratios["vs_pebble_one_worker"] = ours / results["pebble x1"]["rate"]
    print()
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if contained:
        let_through = [k for k, (_, theirs) in contained.items() if not theirs]
        missed = [k for k, (ours_ok, _) in contained.items() if not ours_ok]
        print(f"pebble let through {len(let_through)}/{len(contained)}: {', '.join(let_through)}")
        print(f"fastazr let through {len(missed)}/{len(contained)}" + (f": {', '.join(missed)}" if missed else ""))
    json_line({"bench": "sandbox", "machine": machine(), "workers": w, "jobs": n,
               "rates": {k: round(v["rate"], 1) for k, v in results.items()},
               "p50_ms": {k: round(median(v["latencies"]) * 1e3, 3) for k, v in results.items() if v.get("latencies")},
               "p99_ms": {k: round(percentile(v["latencies"], 99) * 1e3, 3) for k, v in results.items() if v.get("latencies")},
               "ratios": {k: round(v, 3) for k, v in ratios.items()},
               "timeout_overshoot_ms": round(results["fastazr"]["timeout_overshoot_ms"], 2),
               "contained": {k: {"fastazr": a, "pebble": b} for k, (a, b) in contained.items()} if contained else None})


if __name__ == "__main__":
    main()
