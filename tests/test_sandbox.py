"""The Sandbox API: every status, ordering, isolation between jobs, configuration errors and
recovery from a lost zygote (its memory: tests/test_sandbox_memory.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from fastazr import _sandbox
from fastazr.sandbox import STATUSES, Sandbox, SandboxConfig, SandboxError
from fastazr.sandbox.config import AZR_MODULES_UNDER_ANOTHER_UID

ADD = "def f(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=512) as box:
        yield box


def test_ok_returns_the_repr(sb):
    r = sb.call_many([(ADD, "f", "1, 2"), (ADD, "f", "[1], [2, 3]"), (ADD, "f", "'a', 'b'")])
    assert [x.status for x in r] == ["ok"] * 3
    assert [x.value for x in r] == ["3", "[1, 2, 3]", "'ab'"]
    assert all(x.error is None and 0 < x.duration_s < 1 for x in r)


def test_a_result_or_exception_that_lies_about_itself_is_judged_by_its_real_text():
    """A str subclass whose __len__ says 1, an exception class named by a million characters, a
    metaclass whose __name__ raises or is no str: the child measures exact strs and names the
    type past its metaclass, so each job gets its own status and no zygote frame reaches
    stderr."""
    lying_len = ("class S(str):\n    def __len__(self):\n        return 1\n"
                 "class A:\n    def __repr__(self):\n        return S('1' * 3000)\n"
                 "def f():\n    return A()\n")
    long_name = "def f():\n    raise type('E' * 1000000, (Exception,), {})('boom')\n"
    raising_name = ("class M(type):\n    @property\n    def __name__(cls):\n        raise RuntimeError('no')\n"
                    "class E(Exception, metaclass=M):\n    pass\n"
                    "def f():\n    raise E('x')\n")
    odd_name = raising_name.replace("raise RuntimeError('no')", "return 7")
    with Sandbox(workers=1, timeout_s=2.0, max_value_chars=1000) as box:
        r = box.call_many([(lying_len, "f", ""), (long_name, "f", ""), (raising_name, "f", ""), (odd_name, "f", "")])
    assert r[0].status == "output_limit" and r[0].value is None and "3000 chars" in r[0].error
    assert r[1].status == "error" and r[1].error.startswith("E" * 200 + "...: boom")
    assert [x.status for x in r[2:]] == ["error", "error"] and all(x.error == "E: x" for x in r[2:]), r[2:]
    assert all(not x.stderr for x in r), [x.stderr[:200] for x in r]


def test_arguments_are_parsed_in_the_child(sb):
    r = sb.call_many([("def f(*a):\n    return a\n", "f", ""),
                      ("def f(x):\n    return x\n", "f", "{'k': (1, 2.5, None, b'x')}"),
                      ("def f(x):\n    return x\n", "f", "__import__('os').getpid()")])
    assert r[0].value == "()"
    assert r[1].value == "{'k': (1, 2.5, None, b'x')}"
    assert r[2].status == "ok" and int(r[2].value) != os.getpid()  # evaluated in the child


def test_error_carries_type_and_message(sb):
    r = sb.call_many([("def f():\n    raise KeyError('nope')\n", "f", ""),
                      ("def f(:\n", "f", ""),
                      ("x = 1\n", "f", ""),
                      (ADD, "f", "1"),
                      ("def f():\n    raise SystemExit(3)\n", "f", "")])
    assert all(x.status == "error" for x in r), r
    assert r[0].error == "KeyError: 'nope'"
    assert r[1].error.startswith("SyntaxError")
    assert "defines no 'f'" in r[2].error
    assert r[3].error.startswith("TypeError")
    assert r[4].error == "SystemExit: 3"


def test_timeout_returns_within_100ms_of_the_limit(sb):
    start = time.monotonic()
    r = sb.call_many([("def f():\n    while True:\n        pass\n", "f", "")], timeout_s=0.3)[0]
    wall = time.monotonic() - start
    assert r.status == "timeout"
    assert 0.3 <= r.duration_s <= 0.4
    assert wall <= 0.4 + 0.1  # plus the trip to and from the zygote


def test_memory(sb):
    r = sb.call_many([("def f():\n    return len(bytearray(2 << 30))\n", "f", ""),
                      ("def f():\n    x = []\n    while True:\n        x.append(' ' * 10**6)\n", "f", "")])
    assert [x.status for x in r] == ["memory", "memory"], r


def test_violation_names_the_syscall(sb):
    r = sb.call_many([("import _socket\ndef f():\n    return _socket.socket()\n", "f", "")])[0]
    assert r.status == "violation" and r.error.startswith("denied syscall: socket (")


def test_value_over_the_limit_is_a_status_not_a_truncation():
    with Sandbox(workers=1, max_value_chars=100) as box:
        r = box.call_many([("def f(n):\n    return 'x' * n\n", "f", "98"), ("def f(n):\n    return 'x' * n\n", "f", "99")])
    assert r[0].status == "ok" and len(r[0].value) == 100
    assert r[1].status == "output_limit" and r[1].value is None and "max_value_chars=100" in r[1].error


def test_stdout_is_captured_and_capped():
    with Sandbox(workers=1, max_output_bytes=1000) as box:
        r = box.exec_many(["print('hello')\nimport sys\nprint('oops', file=sys.stderr)",
                           "print('x' * 999)", "print('x' * 1000)"])
    assert r[0].status == "ok" and r[0].stdout == "hello\n" and r[0].stderr == "oops\n"
    assert r[1].status == "ok" and len(r[1].stdout) == 1000
    assert r[2].status == "output_limit" and r[2].stdout.startswith("x")


def test_every_way_of_writing_text_is_flushed(sb):
    """A child flushes its streams only once they were written (child._Output): writelines,
    stderr alone, a warning, an exception raised in __del__ (the unraisable hook writes from C),
    text before an exception, before sys.exit and before a MemoryError all count."""
    r = sb.exec_many(["import sys\nsys.stdout.writelines(['a', 'b\\n'])",
                      "import sys\nsys.stderr.write('only err')",
                      "import warnings\nwarnings.warn('careful')",
                      "class A:\n    def __del__(self):\n        raise KeyError('in del')\nA()",
                      "print('before')\nraise ValueError('after')",
                      "import sys\nprint('bye')\nsys.exit(3)",
                      "print('big')\nx = bytearray(10 ** 12)",
                      "x = 1"])
    assert (r[0].stdout, r[0].stderr) == ("ab\n", "")
    assert (r[1].stdout, r[1].stderr) == ("", "only err")
    assert "UserWarning: careful" in r[2].stderr
    assert "KeyError: 'in del'" in r[3].stderr
    assert r[4].status == "error" and r[4].stdout == "before\n"
    assert r[5].stdout == "bye\n"
    assert r[6].status == "memory" and r[6].stdout == "big\n"
    assert r[7].status == "ok" and (r[7].stdout, r[7].stderr) == ("", "")


def test_children_start_with_nothing_written_and_a_write_marks_it(sb):
    """The flag the skipped flush hangs on: children start with it clear (a zygote that wrote to
    these streams would turn the skip off for every job, silently), and a write sets it. That
    serve() then skips the flush is a cost, seen in --breakdown, not an output."""
    flag = "def f(text):\n    if text:\n        print(text)\n    import sys\n    return sys.modules['fastazr.sandbox.child']._written[0]\n"
    r = sb.call_many([(flag, "f", "''"), (flag, "f", "'x'"), (flag, "f", "''")])
    assert [x.value for x in r] == ["False", "True", "False"]


def test_output_survives_a_swapped_stdout(sb):
    r = sb.exec_many(["import sys, io\nprint('kept')\nsys.stdout = io.StringIO()\nprint('swallowed')"])[0]
    assert r.status == "ok" and r.stdout == "kept\n"


def test_every_status_is_reachable(sb):
    jobs = ["x = 1", "raise ValueError", "while True: pass", "x = bytearray(1 << 40)",
            "import os\nos.fork()", "print('x' * 2_000_000)"]
    r = sb.exec_many(jobs, timeout_s=0.5)
    assert [x.status for x in r] == list(STATUSES)


def test_results_keep_input_order_and_failures_stay_local(sb):
    calls = []
    for i in range(40):
        if i % 10 == 3:
            calls.append(("def f(i):\n    while True:\n        pass\n", "f", str(i)))
        elif i % 10 == 7:
            calls.append(("def f(i):\n    return 1 / 0\n", "f", str(i)))
        else:
            calls.append(("import time\ndef f(i):\n    time.sleep(0.001 * (i % 5))\n    return i * i\n", "f", str(i)))
    r = sb.call_many(calls, timeout_s=0.3)
    for i, x in enumerate(r):
        expected = "timeout" if i % 10 == 3 else "error" if i % 10 == 7 else "ok"
        assert x.status == expected, (i, x)
        if expected == "ok":
            assert x.value == str(i * i)


def test_children_are_independent(sb):
    program = "import random\ndef f():\n    return random.random()\n"
    values = [r.value for r in sb.call_many([(program, "f", "")] * 6)]
    assert len(set(values)) == 6, "every child must reseed random"


def test_hash_seed_differs_between_groups(sb):
    program = "def f():\n    return hash('fastazr')\n"
    r = sb.call_many([(program, "f", "")] * 4, groups=[0, 1, 0, 1])
    assert r[0].value == r[2].value and r[1].value == r[3].value
    assert r[0].value != r[1].value


def test_a_determinism_checks_second_run_shifts_object_addresses(sb):
    """Validation runs a program in group 0 then group 1 (two zygotes of one history, so their
    heaps differ only above the page offset, which address randomization moves). A set of
    instances orders by id's low bits, so this program's value is what such a set's order
    follows: without the ballast group 1's children hold, the two runs agreed on it."""
    program = "def f():\n    return [id(x) % 4096 for x in (object(), 1.5 + len([]), bytes(100), [0] * 50)]\n"
    runs = sb.call_many([(program, "f", "")] * 12, groups=[0] * 6 + [1] * 6)
    assert all(r.ok for r in runs), [r.error for r in runs if not r.ok]
    differ = sum(runs[i].value != runs[6 + i].value for i in range(6))
    assert differ >= 5, [r.value for r in runs]


def test_every_plain_job_runs_at_the_canonical_hash_seed(sb):
    """What validation's first run saw, every later run sees, on whichever zygote it lands."""
    program = "def f():\n    return hash('fastazr'), ''.join(set('abcdefgh'))\n"
    values = {r.value for r in sb.call_many([(program, "f", "")] * 8) + sb.call_many([(program, "f", "")] * 8, groups=[0] * 8)}
    expected = subprocess.run([sys.executable, "-c", "print(repr((hash('fastazr'), ''.join(set('abcdefgh')))))"],
                              env={**os.environ, "PYTHONHASHSEED": str(sb.hash_seeds[0])},
                              capture_output=True, text=True, check=True).stdout.strip()
    assert values == {expected}
    assert sb.hash_seeds[0] == SandboxConfig().hash_seed != sb.hash_seeds[1]


def test_zygote_imports_neither_torch_nor_numpy(sb):
    r = sb.exec_many(["import sys\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))"])[0]
    assert r.stdout == "[]\n"


def test_sandbox_package_never_imports_torch_or_numpy():
    code = "import fastazr.sandbox, fastazr.tasks, sys; print([m for m in ('torch', 'numpy') if m in sys.modules])"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_child_environment_and_descriptors(sb):
    r = sb.exec_many(["import os\nprint(dict(os.environ), os.getcwd(), os.listdir('.'))",
                      "import os\nprint(sorted(os.listdir('/proc/self/fd')))"])
    assert r[0].status == "ok" and r[0].stdout.startswith("{} ") and r[0].stdout.endswith(" []\n")
    # Landlock keeps /proc out of reach; without it the child must hold only fds 0-3
    assert r[1].status == "error" if sb.protections["landlock_abi"] else r[1].stdout == "['0', '1', '2', '3']\n"
    stdin = sb.call_many([("def f():\n    return input()\n", "f", "")])[0]
    assert stdin.status == "error" and stdin.error.startswith("EOFError")


@pytest.mark.filterwarnings("ignore:fastazr sandbox")
def test_child_descriptors_without_landlock():
    with Sandbox(workers=1, landlock="off", drop_privileges="off") as box:
        r = box.exec_many(["import os\nprint(sorted(os.listdir('/proc/self/fd')))"])[0]
    # 0-3 plus the descriptor listdir itself opened
    assert r.status == "ok" and eval(r.stdout)[:4] == ["0", "1", "2", "3"] and len(eval(r.stdout)) <= 5, r


def test_limits_are_hard(sb):
    program = """
import resource
def f():
    return [resource.getrlimit(r) for r in (resource.RLIMIT_AS, resource.RLIMIT_CPU, resource.RLIMIT_FSIZE,
                                            resource.RLIMIT_NPROC, resource.RLIMIT_NOFILE, resource.RLIMIT_CORE,
                                            resource.RLIMIT_MEMLOCK, resource.RLIMIT_MSGQUEUE, 10)]  # 10: RLIMIT_LOCKS
"""
    r = sb.call_many([(program, "f", "")])[0]
    limits = eval(r.value)  # test code reading its own fixture's output
    assert all(soft == hard for soft, hard in limits)
    assert limits[0][0] == 512 << 20 and limits[2][0] == 0 and limits[3][0] == 0
    assert limits[4][0] == 32 and limits[1][0] == 4  # open_files; timeout_s (2) + 2
    # set once in the zygote, inherited: still zero in every child
    assert [soft for soft, _ in limits[5:]] == [0, 0, 0, 0]


def test_a_job_runs_in_a_process_group_of_its_own(sb):
    program = "import os\ndef f():\n    return os.getpgid(0) == os.getpid() != os.getpgid(os.getppid())\n"
    assert sb.call_many([(program, "f", "")])[0].value == "True"


@pytest.mark.filterwarnings("ignore:fastazr sandbox")
def test_root_keeping_its_uid_has_no_capabilities():
    """The zygote empties its capability sets once; its children inherit them empty."""
    if os.geteuid() != 0:
        pytest.skip("only a root parent has capabilities to drop")
    program = ("def f():\n    return [line.split()[1] for line in open('/proc/self/status')"
               " if line.startswith(('CapInh', 'CapPrm', 'CapEff'))]\n")
    with Sandbox(workers=1, landlock="off", drop_privileges="off") as box:
        r = box.call_many([(program, "f", "")])[0]
    assert r.value == str(["0000000000000000"] * 3), r


def test_protections_are_reported(sb):
    p = sb.protections
    assert p["seccomp"] in ("bpf", "libseccomp")
    assert p["landlock_abi"] == _sandbox.landlock_abi()
    assert p["no_new_privs"] and not p["dumpable"]


@pytest.mark.parametrize("backend", ["bpf", "libseccomp"])
def test_both_filter_backends_run_jobs(backend):
    if backend == "libseccomp" and not _sandbox.have_libseccomp():
        pytest.skip("built without libseccomp headers")
    with Sandbox(workers=1, seccomp_backend=backend) as box:
        r = box.call_many([(ADD, "f", "2, 3"), ("import os\ndef f():\n    os.mkdir('x')\n", "f", "")])
    assert r[0].value == "5" and r[1].status == "violation" and "mkdir" in r[1].error


def test_dropped_privileges_when_root():
    if os.geteuid() != 0:
        pytest.skip("only a root parent drops privileges")
    with Sandbox(workers=1, drop_privileges="on") as box:
        r = box.call_many([("import os\ndef f():\n    return os.getuid(), os.getgid()\n", "f", "")])[0]
    assert r.value == "(65534, 65534)"


def test_zygote_lost_while_idle_is_replaced_and_no_job_fails():
    with Sandbox(workers=1) as box:
        os.kill(box._zygotes[0].process.pid, signal.SIGKILL)
        time.sleep(0.3)
        assert [r.value for r in box.call_many([(ADD, "f", "1, 1")] * 3)] == ["2", "2", "2"]
        assert [r.value for r in box.call_many([(ADD, "f", "2, 2")])] == ["4"]


def test_per_call_timeout_above_the_configured_one():
    with Sandbox(workers=1, timeout_s=0.5) as box:
        # 3 s of CPU: past the 2.5 s RLIMIT_CPU a 0.5 s configuration would set
        busy = "import time\ndef f():\n    end = time.monotonic() + 3\n    while time.monotonic() < end:\n        pass\n    return 1\n"
        r = box.call_many([(busy, "f", "")], timeout_s=20)[0]
    assert r.status == "ok", r


def test_hash_seeds_differ_with_one_worker():
    with Sandbox(workers=1) as box:
        r = box.call_many([("def f():\n    return hash('fastazr')\n", "f", "")] * 2, groups=[0, 1])
    assert r[0].status == r[1].status == "ok" and r[0].value != r[1].value


def test_a_job_may_signal_itself(sb):
    program = ("import signal\nhits = []\nsignal.signal(signal.SIGUSR1, lambda *a: hits.append(1))\n"
               "def f():\n    signal.raise_signal(signal.SIGUSR1)\n    return len(hits)\n")
    r = sb.call_many([(program, "f", "")])[0]
    assert r.status == "ok" and r.value == "1", r


def test_unprotected_files_are_warned_about():
    with pytest.warns(RuntimeWarning, match="Landlock"):
        Sandbox(workers=1, landlock="off", drop_privileges="off").close()


def test_zygotes_are_pinned_one_cpu_each():
    cpus = sorted(os.sched_getaffinity(0))
    probe = "import os\nprint(sorted(os.sched_getaffinity(0)))"
    with Sandbox(workers=len(cpus)) as box:
        pinned = {box.exec_many([probe])[0].stdout for _ in range(4 * len(cpus))}
    assert all(len(eval(p)) == 1 for p in pinned) and {eval(p)[0] for p in pinned} <= set(cpus)
    with Sandbox(workers=1, pin_cpus=False) as box:
        assert box.exec_many([probe])[0].stdout == f"{cpus}\n"


def test_workers_default_to_cores():
    assert SandboxConfig().workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("option, value", [("workers", 0), ("timeout_s", 0), ("memory_mb", 8),
                                           ("seccomp_backend", "magic"), ("landlock", "maybe"),
                                           ("max_value_chars", 0), ("open_files", 2), ("hash_seed", -1),
                                           ("hash_seed", 1 << 32), ("workers", True), ("hash_seed", True),
                                           ("timeout_s", float("inf")), ("timeout_s", float("nan")), ("timeout_s", "5"),
                                           ("memory_mb", 1000.5), ("memory_mb", (1 << 44) + 512),
                                           ("unprivileged_uid", 0), ("unprivileged_uid", 1 << 32),
                                           ("unprivileged_uid", (1 << 32) - 1), ("pin_cpus", "no"), ("trace", 1),
                                           ("preload", "math"), ("preload", ("math", 3)),
                                           ("preload", ("math", "colections")), ("preload", ("os.path.nope",))])
def test_bad_config_names_the_option(option, value):
    with pytest.raises(ValueError, match=f"SandboxConfig.{option}"):
        SandboxConfig(**{option: value})


@pytest.mark.parametrize("uid", [0, -2, (1 << 32) - 1, 1 << 32, (1 << 32) + 65534])
def test_the_c_module_refuses_uids_that_wrap_or_mean_unchanged(uid):
    """uid_t is 32 bits: 2**32 wrapped to root (the child ran with uid 0 and every capability),
    2**32 - 1 leaves the uid unchanged. Checked before the module configures anything."""
    from fastazr import _sandbox
    with pytest.raises(ValueError, match="drop_to_uid"):
        _sandbox.configure(-1, "/tmp", 1 << 30, 32, uid, -1, 4096, 4096, 4096)


@pytest.mark.parametrize("kwargs", [{"timeout_s": float("inf")}, {"timeout_s": -1.0}, {"timeout_s": True},
                                    {"groups": [0]}, {"groups": [0, 2]}])
def test_bad_call_arguments_are_refused_before_running(sb, kwargs):
    with pytest.raises(ValueError, match="timeout_s|groups"):
        sb.call_many([(ADD, "f", "1, 2"), (ADD, "f", "3, 4")], **kwargs)


def test_closed_sandbox_refuses_work():
    box = Sandbox(workers=1)
    box.close()
    with pytest.raises(SandboxError, match="closed"):
        box.call_many([(ADD, "f", "1, 2")])


def test_non_text_jobs_are_rejected(sb):
    with pytest.raises(TypeError):
        sb.call_many([(b"def f(): pass", "f", "")])


@pytest.mark.parametrize("call,pattern", [
    (lambda box: box.exec_many("print(1)"), "not one str"),
    (lambda box: box.call_many((ADD, "f", "1, 2")), "wrap it"),
    (lambda box: box.call_many([(ADD, "f")]), "must be a \\(program, entry, args_source\\) tuple"),
    (lambda box: Sandbox(config=box.config, open_files=9), "inside config"),
])
def test_misshapen_calls_are_refused_by_name(sb, call, pattern):
    """A str where a list belongs would run each character as a program (8 results for
    "print(1)"); a lone tuple would unpack wrongly; options beside a config would be dropped."""
    with pytest.raises(TypeError, match=pattern):
        call(sb)


def test_stages_are_traced_only_when_asked(sb):
    assert sb.call_many([(ADD, "f", "1, 2")])[0].stages is None


def test_a_traced_job_carries_every_stage_and_they_add_up():
    from fastazr.sandbox.trace import CHILD_STAMPS, CYCLE, STAGES

    loop = "def f():\n    while True:\n        pass\n"
    with Sandbox(workers=1, trace=True) as box:
        results = box.call_many([(ADD, "f", "1, 2")] * 4 + [(loop, "f", ""), ("import os\ndef f():\n    os.mkdir('x')\n", "f", "")],
                                timeout_s=0.3)
    done, timed_out, denied = results[:4], results[4], results[5]
    assert timed_out.status == "timeout" and denied.status == "violation"
    assert timed_out.stages is None and denied.stages is None  # stamps skipped: no partial breakdown
    for r in done:
        assert r.ok and list(r.stages) == list(STAGES)
        cycle = [r.stages[name] for name, _ in CYCLE]
        # the zygote's whole cycle holds the window Result.duration_s measures (supervision)
        assert sum(seconds for seconds, _ in cycle) >= r.duration_s > 0
        within_child = [r.stages[name] for (name, stamp), (_, before) in zip(CYCLE[1:], CYCLE)
                        if stamp in CHILD_STAMPS and before in CHILD_STAMPS]
        assert len(within_child) == 9 and all(seconds >= 0 and faults >= 0 for seconds, faults in within_child)
        assert all(isinstance(faults, int) for _, faults in cycle)
        assert all(r.stages[name][1] is None and r.stages[name][0] >= 0 for name in STAGES[len(CYCLE):])


def test_the_breakdown_bench_prints_every_stage():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(root, "bench", "bench_sandbox.py"), "--breakdown", "--workers", "1",
                          "--jobs", "60", "--rounds", "2"], capture_output=True, text=True, timeout=120, check=True).stdout
    from fastazr.sandbox.trace import STAGES

    report = json.loads(out.strip().splitlines()[-1])
    assert sorted(report["stages"]) == sorted(STAGES)  # json_line sorts keys
    assert all(name in out for name in STAGES) and "= wall time per job per worker" in out
    assert report["per_worker_us"] > 0 and report["fork_ceiling"] > 0


def test_jobs_compiled_in_an_earlier_call_run_from_the_cache_and_stay_apart(sb):
    first = sb.call_many([(ADD, "f", "1, 2"), ("def f():\n    return 1\n", "f", "")])
    again = sb.call_many([(ADD, "f", "1, 2"), ("def f():\n    return 2\n", "f", ""), (ADD, "f", "3, 4")])
    assert [r.value for r in first] == ["3", "1"] and [r.value for r in again] == ["3", "2", "7"]
    printed = [sb.exec_many(["print('once')"])[0].stdout for _ in range(2)]
    assert printed == ["once\n", "once\n"]


def test_compile_warnings_stay_out_of_every_job(sb):
    """A SyntaxWarning raised while the zygote compiles a batch went to the zygote's buffered
    stderr: every later child flushed it as its own, and 3,000 of them wedged the zygote."""
    noisy = "def f():\n    x = 1\n    return x is 1\n"
    first = sb.exec_many(["print('spy')", noisy + "print(f())\n"])
    later = sb.exec_many(["print('later')"])
    assert [r.stderr for r in first + later] == ["", "", ""]
    assert [r.stdout for r in first + later] == ["spy\n", "True\n", "later\n"]
    wedge = sb.exec_many(["x = 1\n" + "x is 1\n" * 3000 + "print('done')"])[0]
    assert wedge.status == "ok" and wedge.stdout == "done\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping children to another uid needs a root trainer")
def test_children_under_another_uid_get_the_modules_they_may_not_read():
    """That uid may not read the stdlib (a pyenv under /root): a lazy import would fail there."""
    with Sandbox(workers=1, drop_privileges="off") as own, Sandbox(workers=1, drop_privileges="on") as other:
        assert not set(AZR_MODULES_UNDER_ANOTHER_UID) & set(own._zygote_settings()["preload"])
        assert set(AZR_MODULES_UNDER_ANOTHER_UID) <= set(other._zygote_settings()["preload"])
        program = "import dataclasses, statistics, fractions, decimal\nprint(statistics.mean([1, 2]))\n"
        assert [r.stdout for r in own.exec_many([program]) + other.exec_many([program])] == ["1.5\n", "1.5\n"]
