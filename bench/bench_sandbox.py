"""Sandbox throughput, latency and containment: fastazr side by side with the alternatives.

    python bench/bench_sandbox.py [--workers N] [--jobs N] [--profile DIR] [--breakdown]

One job mix (a trivial snippet; an AZR-typical program with loops and dicts; a 10-input
induction check), the same worker count for every contender:
  (a) fastazr      Sandbox.call_many: zygotes, one hardened child per job
  (b) subprocess   a fresh `python -c` per job
  (c) pebble       a persistent ProcessPool with exec and a timeout (the AZR reference's
                   executor pattern: no isolation), with N workers and with 1
  (d) fork ceiling bare fork + _exit + wait loops in N small Python processes: the most any
                   fork-per-job design can do on this machine
Then every probe of fastazr.sandbox.hostile through (a) and (c). A table, the ratios, and one
JSON line last.

--breakdown instead times each stage of a fastazr job (zygote and child side, from clock stamps
taken with SandboxConfig.trace on) over the same mix and worker count, next to the fork ceiling
measured in the same rounds: where a job's time goes, and how much of it fork and exit are."""

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
from fastazr.sandbox.trace import CYCLE, STAGES
from fastazr.sandbox.zygote import huge_page_bytes

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
# A job that loops over ten inputs in one child: the workload shape these numbers were first
# measured with (check_induction now runs each pair as its own job).
INDUCTION_RUNNER = """

def run_all(inputs):
    return [repr(f(*args)) for args in inputs]
"""
INDUCTION = ("def f(a, b):\n    return [x * b for x in a if x % 2 == 0]\n" + INDUCTION_RUNNER, "run_all",
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


# ---- the contenders: each keeps its workers warm across rounds --------------------------

class Fastazr:
    name = "fastazr"

    def __init__(self, workers: int):
        start = time.perf_counter()
        self.sb = Sandbox(workers=workers, timeout_s=TIMEOUT_S)
        self.startup_s = time.perf_counter() - start
        self.sb.call_many(jobs(20 * workers))

    def run(self, batch):
        return [r.value for r in self.sb.call_many(batch)]

    def one(self, job):
        return self.sb.call_many([job])[0].value

    def close(self):
        self.sb.close()


def subprocess_job(job) -> str:
    out = subprocess.run([sys.executable, "-c", SUBPROCESS_RUNNER], input=json.dumps(job), capture_output=True,
                         text=True, timeout=TIMEOUT_S)
    return out.stdout.strip()


class FreshInterpreter:
    name = "subprocess"

    def __init__(self, workers: int):
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        list(self.pool.map(subprocess_job, jobs(workers)))

    def run(self, batch):
        return list(self.pool.map(subprocess_job, batch))

    def one(self, job):
        return subprocess_job(job)

    def close(self):
        self.pool.shutdown()


class Pebble:
    def __init__(self, workers: int):
        from pebble import ProcessPool

        self.name = f"pebble x{workers}"
        self.pool = ProcessPool(max_workers=workers)
        self.run(jobs(4 * workers))

    def run(self, batch):
        return [f.result() for f in [self.pool.schedule(pebble_job, args=job, timeout=TIMEOUT_S) for job in batch]]

    def one(self, job):
        return self.pool.schedule(pebble_job, args=job, timeout=TIMEOUT_S).result()

    def close(self):
        self.pool.close()
        self.pool.join()


class ForkCeiling:
    """Bare fork + _exit + wait in `workers` fresh small Python processes at once."""

    name = "fork ceiling"

    def __init__(self, workers: int):
        self.workers = workers

    def rate(self, n: int) -> float:
        per_worker = max(1, n // self.workers)
        procs = [subprocess.Popen([sys.executable, "-c", FORK_LOOP, str(per_worker)], stdout=subprocess.PIPE, text=True)
                 for _ in range(self.workers)]
        spans = [tuple(map(float, p.communicate()[0].split())) for p in procs]
        return self.workers * per_worker / (max(end for _, end in spans) - min(start for start, _ in spans))

    def close(self):
        pass


def measure(contenders, n: int, rounds: int, latency_n: int, mark) -> dict:
    """Every contender runs n / rounds jobs per round, in turn, so that a noisy stretch of the
    machine hits all of them; rates are the median over rounds. Then one-at-a-time latency."""
    expected = [pebble_job(*job) for job in MIX]
    stats = {c.name: {"rates": [], "correct": True} for c in contenders}
    for _ in range(rounds):
        for c in contenders:
            size = n // rounds if not isinstance(c, FreshInterpreter) else max(len(MIX), n // rounds // 10)
            with mark(f"{c.name} throughput"):
                if isinstance(c, ForkCeiling):
                    stats[c.name]["rates"].append(c.rate(size))
                    continue
                start = time.perf_counter()
                values = c.run(jobs(size))
                stats[c.name]["rates"].append(size / (time.perf_counter() - start))
            stats[c.name]["correct"] &= values[:len(MIX)] == expected
    for c in contenders:
        if isinstance(c, ForkCeiling):
            continue
        latencies = []
        with mark(f"{c.name} latency"):
            for _ in range(latency_n if not isinstance(c, FreshInterpreter) else max(10, latency_n // 10)):
                start = time.perf_counter()
                c.one(TRIVIAL)
                latencies.append(time.perf_counter() - start)
        stats[c.name]["latencies"] = latencies
    for v in stats.values():
        v["rate"] = median(v["rates"])
    return stats


def timeout_overshoot(sb: Sandbox) -> tuple[float, str]:
    limit = 0.2
    start = time.perf_counter()
    r = sb.call_many([("def f():\n    while True:\n        pass\n", "f", "")], timeout_s=limit)[0]
    return (time.perf_counter() - start - limit) * 1e3, r.status


# ---- where a job's time goes ----------------------------------------------------------

def breakdown(workers: int, n: int, rounds: int, mark) -> dict:
    """Per-stage times of n jobs of the mix (SandboxConfig.trace), in rounds interleaved with
    the fork ceiling; the wall time per job each worker sees, and the trainer's CPU time."""
    ceiling, results, wall, trainer_cpu = ForkCeiling(workers), [], 0.0, 0.0
    fork_rates = []
    with Sandbox(workers=workers, timeout_s=TIMEOUT_S, trace=True) as sb:
        sb.call_many(jobs(20 * workers))
        for _ in range(rounds):
            with mark("fastazr traced"):
                start, cpu = time.perf_counter(), time.process_time()
                batch = sb.call_many(jobs(n // rounds))
                wall += time.perf_counter() - start
                trainer_cpu += time.process_time() - cpu
            results += batch
            with mark("fork ceiling"):
                fork_rates.append(ceiling.rate(n // rounds))
        huge = [(z.hello["huge_page_bytes"], huge_page_bytes(z.hello["pid"])) for z in sb._zygotes]
    traced = [r.stages for r in results if r.stages]
    stages = {}
    for name in STAGES:
        times = [t[name][0] for t in traced]
        faults = [t[name][1] for t in traced if t[name][1] is not None]
        stages[name] = {"mean_us": sum(times) / len(times) * 1e6, "p50_us": median(times) * 1e6,
                        "faults": sum(faults) / len(faults) if faults else None}
    return {"stages": stages, "jobs": len(traced), "per_worker_us": wall * workers / len(results) * 1e6,
            "trainer_cpu_us": trainer_cpu / len(results) * 1e6, "fork_ceiling": median(fork_rates),
            "huge_page_mib": [[b / 2 ** 20 for b in pair] for pair in huge]}


def print_breakdown(b: dict, workers: int) -> None:
    stages = b["stages"]
    cycle = sum(stages[name]["mean_us"] for name, _ in CYCLE)
    per_worker = b["per_worker_us"]
    rows = [[name, f"{v['mean_us']:.1f}", f"{v['p50_us']:.1f}", f"{v['mean_us'] / per_worker:.1%}",
             "-" if v["faults"] is None else f"{v['faults']:.1f}"] for name, v in stages.items()]
    batch = sum(stages[name]["mean_us"] for name in STAGES[len(CYCLE):])
    rows.append([f"= one job's cycle in the zygote (first {len(CYCLE)} rows)", f"{cycle:.1f}", "",
                 f"{cycle / per_worker:.1%}", ""])
    rest = per_worker - cycle - batch
    rows.append(["rest: trainer, channel, waiting for the next batch", f"{rest:.1f}", "", f"{rest / per_worker:.1%}", ""])
    rows.append(["= wall time per job per worker", f"{per_worker:.1f}", "", "100.0%", ""])
    print_table(["stage (mean over jobs)", "mean us", "p50 us", "of wall", "minor faults"], rows)
    fork_us = workers / b["fork_ceiling"] * 1e6
    kernel = sum(stages[name]["mean_us"] for name in ("zygote: fork (parent side)", "child exit, zygote wakeup"))
    print()
    print(f"trainer CPU per job: {b['trainer_cpu_us']:.1f} us (it shares the cores with the zygotes)")
    print("zygotes' memory in huge pages, MiB at start -> after the run: "
          + ", ".join(f"{start:g} -> {end:g}" for start, end in b["huge_page_mib"]))
    print(f"fork ceiling in the same rounds: {b['fork_ceiling']:,.0f}/s, {fork_us:.0f} us per fork+exit+wait a "
          f"worker; fastazr's fork and exit stages: {kernel:.0f} us; traced rate "
          f"{workers / per_worker * 1e6:,.0f} jobs/s = {fork_us / per_worker:.2f}x the fork ceiling")


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
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; rates are their median")
    parser.add_argument("--latency-jobs", type=int, default=300)
    parser.add_argument("--profile", metavar="DIR", help="write a torch.profiler trace of the measured region")
    parser.add_argument("--skip-pebble", action="store_true", help="when pebble is not installed")
    parser.add_argument("--breakdown", action="store_true",
                        help="only time each stage of a fastazr job (SandboxConfig.trace) beside the fork ceiling")
    args = parser.parse_args()
    w, n = args.workers, args.jobs
    print(f"machine: {machine()}")
    if args.breakdown:
        print(f"workers: {w}, jobs: {n} in {args.rounds} rounds, each followed by a fork-ceiling round; per-stage "
              "stamps cost ~50 us a job (~5% on the 2-core VM), so the traced rate is below the untraced one")
        with profiled(args.profile, "bench_sandbox_breakdown") as mark:
            b = breakdown(w, n, args.rounds, mark)
        print()
        print_breakdown(b, w)
        json_line({"bench": "sandbox_breakdown", "machine": machine(), "workers": w, "jobs": n, "rounds": args.rounds,
                   "stages": {k: {m: None if x is None else round(x, 2) for m, x in v.items()}
                              for k, v in b["stages"].items()},
                   "per_worker_us": round(b["per_worker_us"], 1), "trainer_cpu_us": round(b["trainer_cpu_us"], 1),
                   "fork_ceiling": round(b["fork_ceiling"], 1)})
        return
    print(f"workers: {w}, jobs: {n} in {args.rounds} interleaved rounds "
          f"(a third each: trivial, AZR-typical, 10-input induction)")

    ours = Fastazr(w)
    contenders = [ours, FreshInterpreter(w)]
    if not args.skip_pebble:
        contenders += [Pebble(w), Pebble(1)]
    contenders.append(ForkCeiling(w))
    try:
        with profiled(args.profile, "bench_sandbox") as mark:
            results = measure(contenders, n, args.rounds, args.latency_jobs, mark)
        overshoot_ms, timeout_status = timeout_overshoot(ours.sb)
        protections = ours.sb.protections
    finally:
        for c in contenders:
            c.close()
    contained = None if args.skip_pebble else containment(w)

    print(f"fastazr protections: {protections}")
    print(f"fastazr startup: {ours.startup_s * 1e3:.0f} ms for {w} zygotes; a 0.2 s timeout returned after "
          f"+{overshoot_ms:.1f} ms ({timeout_status})")
    headers = ["contender", "jobs/s (median)", "min-max", "p50 ms (trivial)", "p99 ms (trivial)", "correct"]
    rows = []
    for name, r in results.items():
        lat = r.get("latencies")
        rows.append([name, f"{r['rate']:,.0f}", f"{min(r['rates']):,.0f}-{max(r['rates']):,.0f}",
                     f"{median(lat) * 1e3:.2f}" if lat else "-", f"{percentile(lat, 99) * 1e3:.2f}" if lat else "-",
                     "yes" if r["correct"] else "NO"])
    if contained:
        headers.append("attacks contained")
        for row, key in zip(rows, results):
            index = 0 if key == "fastazr" else 1 if key.startswith("pebble") else None
            row.append(f"{sum(v[index] for v in contained.values())}/{len(contained)}" if index is not None else "-")
    print()
    print_table(headers, rows)
    rate = results["fastazr"]["rate"]
    ratios = {"vs_fork_ceiling": rate / results["fork ceiling"]["rate"], "vs_subprocess": rate / results["subprocess"]["rate"]}
    if not args.skip_pebble:
        ratios["vs_pebble_same_workers"] = rate / results[f"pebble x{w}"]["rate"]
        ratios["vs_pebble_one_worker"] = rate / results["pebble x1"]["rate"]
    print()
    print("ratios: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    if contained:
        let_through = [k for k, (_, theirs) in contained.items() if not theirs]
        missed = [k for k, (ours_ok, _) in contained.items() if not ours_ok]
        print(f"pebble let through {len(let_through)}/{len(contained)}: {', '.join(let_through)}")
        print(f"fastazr let through {len(missed)}/{len(contained)}" + (f": {', '.join(missed)}" if missed else ""))
    json_line({"bench": "sandbox", "machine": machine(), "workers": w, "jobs": n, "rounds": args.rounds,
               "rates": {k: round(v["rate"], 1) for k, v in results.items()},
               "rate_rounds": {k: [round(x, 1) for x in v["rates"]] for k, v in results.items()},
               "p50_ms": {k: round(median(v["latencies"]) * 1e3, 3) for k, v in results.items() if v.get("latencies")},
               "p99_ms": {k: round(percentile(v["latencies"], 99) * 1e3, 3) for k, v in results.items() if v.get("latencies")},
               "ratios": {k: round(v, 3) for k, v in ratios.items()},
               "timeout_overshoot_ms": round(overshoot_ms, 2),
               "contained": {k: {"fastazr": a, "pebble": b} for k, (a, b) in contained.items()} if contained else None})


if __name__ == "__main__":
    main()
