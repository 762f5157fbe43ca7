"""Every hostile program in fastazr.sandbox.hostile ends in its documented status, within its
timeout + 100 ms, does no damage, leaves the pool serving the next job correctly, and leaves no
process, file or descriptor behind."""

import os
import stat
import time

import pytest

from fastazr.sandbox import Sandbox
from fastazr.sandbox.hostile import ATTACKS
from helpers import comm, descendants_of, open_fds

CANARY = "print(sum(range(10)))"


def jobs_alive(zygote_pid: int) -> set[int]:
    """The zygote's descendants but its compiler, which lives as long as the zygote."""
    return {p for p in descendants_of(zygote_pid) if comm(p) != "fastazr-compile"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Each attack, then a canary, on one zygote, so every attack's successor is checked."""
    root = tmp_path_factory.mktemp("adversarial")
    fds_before = open_fds()
    with Sandbox(workers=1, memory_mb=512, max_output_bytes=200_000) as sb:
        zygote_pid = sb._zygotes[0].process.pid
        outcomes = {}
        for attack in ATTACKS:
            sentinel = root / f"{attack.name}.sentinel"
            sentinel.write_text("precious")
            sentinel.chmod(0o644)
            drop = root / f"{attack.name}.dropped"
            source = attack.render(attack.source, str(sentinel), str(drop))
            start = time.monotonic()
            result, canary = sb.exec_many([source, CANARY], timeout_s=attack.timeout_s)
            outcomes[attack.name] = dict(result=result, canary=canary, sentinel=sentinel, drop=drop,
                                         wall=time.monotonic() - start,
                                         leftover=jobs_alive(zygote_pid))
        workdir = sb._workdir
    gone = not os.path.exists(workdir)
    return outcomes, fds_before, open_fds(), gone, zygote_pid


@pytest.mark.parametrize("attack", ATTACKS, ids=[a.name for a in ATTACKS])
def test_attack_is_contained(run, attack):
    outcomes = run[0][attack.name]
    result, canary = outcomes["result"], outcomes["canary"]
    assert result.status in attack.expected, f"{attack.name}: {result}"
    assert result.duration_s <= attack.timeout_s + 0.1, result
    assert "pwned" not in result.stdout
    sentinel = outcomes["sentinel"]
    assert sentinel.read_text() == "precious"
    assert stat.S_IMODE(sentinel.stat().st_mode) == 0o644
    assert not outcomes["drop"].exists()
    assert not os.path.exists("/tmp/pwned.txt")
    assert canary.status == "ok" and canary.stdout == "45\n", f"pool broken after {attack.name}: {canary}"
    assert outcomes["leftover"] == set(), f"{attack.name} left processes behind"


def test_violations_name_the_syscall(run):
    named = {name: o["result"].error for name, o in run[0].items() if o["result"].status == "violation"}
    assert "openat" in named["write_new_file_tmp"]
    # importing socket imports selectors, which probes epoll at import time
    assert "socket" in named["socket_tcp"] or "epoll_create1" in named["socket_tcp"]
    assert "execve" in named["execv"]
    assert "kill" in named["kill_parent"]
    assert "prlimit64" in named["raise_rlimits"]


RAW = [a for a in ATTACKS if "raw" in a.tags]


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the raw syscall numbers are x86-64's")
@pytest.mark.filterwarnings("ignore:fastazr sandbox")
@pytest.mark.parametrize("backend", ["bpf", "libseccomp"])
def test_seccomp_alone_stops_raw_syscalls(tmp_path, backend):
    """Landlock (which keeps ctypes from loading at all) off: the filter must stop each call."""
    from fastazr import _sandbox

    if backend == "libseccomp" and not _sandbox.have_libseccomp():
        pytest.skip("built without libseccomp headers")
    sentinel, drop = tmp_path / "sentinel", tmp_path / "drop"
    sentinel.write_text("precious")
    with Sandbox(workers=1, landlock="off", drop_privileges="off", seccomp_backend=backend) as sb:
        results = sb.exec_many([a.render(a.source, str(sentinel), str(drop)) for a in RAW])
    expected_syscall = {"ptrace_parent": "ptrace", "raw_creat": "creat", "raw_openat2": "openat2",
                        "tgkill_parent": "tgkill", "tkill_parent": "tkill",
                        "raw_io_uring_setup": "io_uring_setup", "raw_unshare": "unshare",
                        "prctl_seccomp_off": "prctl"}
    for attack, result in zip(RAW, results):
        assert result.status == "violation", (attack.name, result)
        assert expected_syscall[attack.name] in result.error, (attack.name, result.error)
    assert not drop.exists() and sentinel.read_text() == "precious"


def test_parent_environment_never_reaches_the_job(run):
    result = run[0]["read_parent_environ"]["result"]
    assert "PATH=" not in result.stdout and "PATH=" not in (result.error or "")


def test_nothing_left_behind(run):
    _, fds_before, fds_after, workdir_gone, zygote_pid = run
    assert fds_after == fds_before
    assert workdir_gone
    assert not os.path.exists(f"/proc/{zygote_pid}") or open(f"/proc/{zygote_pid}/stat").read().split()[2] == "Z"


def test_monkeypatching_does_not_carry_over():
    with Sandbox(workers=1) as sb:
        first, second = sb.exec_many([
            "import math, builtins\nmath.sqrt = lambda x: 42\nbuiltins.len = lambda x: -1\nbuiltins.LEAK = 1",
            "import math, builtins\nprint(math.sqrt(4.0), len([1, 2]), hasattr(builtins, 'LEAK'))",
        ])
    assert first.status == "ok"
    assert second.stdout == "2.0 2 False\n"


def test_gc_hunt_finds_no_other_job(tmp_path):
    secret = "S3CRET_" + os.urandom(8).hex()
    hunter = """
import gc
needle = "S3CRET" + "_"
found = False
for obj in gc.get_objects():
    for text in (obj if isinstance(obj, (list, tuple, dict, set)) else [obj]):
        if isinstance(text, str) and text.startswith(needle) and len(text) > len(needle):
            found = True
        code = getattr(text, "__code__", None) or (text if type(text).__name__ == "code" else None)
        if code is not None and any(isinstance(c, str) and c.startswith(needle) and len(c) > 7 for c in code.co_consts):
            found = True
print(found)
"""
    victim = f"def f():\n    return {secret!r}\nx = [{secret!r}, {{'k': {secret!r}}}]\n"
    with Sandbox(workers=1) as sb:
        # one zygote, one batch: the victim ran in a sibling child of the same batch
        results = sb.exec_many([victim, hunter, victim, hunter])
    assert [r.status for r in results] == ["ok"] * 4
    assert results[1].stdout == "False\n" and results[3].stdout == "False\n"


def test_frame_walk_finds_no_other_job():
    """A child inherits the zygote's stack: walking up from the job must reach nothing of the
    other jobs of its batch, run before or after it."""
    walker = """
import sys
seen = []
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        seen.append(repr(value)[:100000])
    frame = frame.f_back
print("S3CRET" + "_" in "\\n".join(seen).replace("S3CRET\" + \"_", ""))
"""
    victim = "print('S3CRET_' + 'output')\nX = 'S3CRET_program'\n"
    with Sandbox(workers=1) as sb:
        results = sb.exec_many([victim, walker, victim, victim])
    assert [r.status for r in results] == ["ok"] * 4, results
    assert results[1].stdout == "False\n", results[1]


def test_lying_objects_cannot_pass_a_check():
    from fastazr.tasks import TaskExecutor

    liar = """
class Liar:
    def __eq__(self, other):
        return True
    def __hash__(self):
        return 0
def f(x):
    return Liar()
"""
    raising_repr = "class R:\n    def __repr__(self):\n        raise ValueError('no')\ndef f(x):\n    return R()\n"
    non_str_repr = "class R:\n    def __repr__(self):\n        return 7\ndef f(x):\n    return R()\n"
    with Sandbox(workers=2) as sb:
        ex = TaskExecutor(sb)
        assert ex.check_induction([(liar, [("1", "2"), ("3", "4")])]) == [False]
        assert ex.check_abduction([("def f(x):\n    return x", "5", "__import__('fastazr')")]) == [False]
        bad = sb.call_many([(raising_repr, "f", "1"), (non_str_repr, "f", "1")])
    assert bad[0].status == "error" and "ValueError" in bad[0].error
    assert bad[1].status == "error" and "__repr__" in bad[1].error


SHELLCODE = """
import ctypes, mmap
buf = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
buf.write(bytes({code}))
ctypes.CFUNCTYPE(ctypes.c_long)(ctypes.addressof(ctypes.c_char.from_buffer(buf)))()
print("not stopped")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="i386 and x32 entry points are x86-64's")
@pytest.mark.filterwarnings("ignore:fastazr sandbox")
@pytest.mark.parametrize("backend", ["bpf", "libseccomp"])
def test_other_architectures_kill_the_process(backend):
    """getpid through int 0x80 (i386) and through syscall with the x32 bit: no filter rule may
    match them, the process dies outright (ctypes needs Landlock off to load)."""
    from fastazr import _sandbox

    if backend == "libseccomp" and not _sandbox.have_libseccomp():
        pytest.skip("built without libseccomp headers")
    i386_getpid = [0xB8, 0x14, 0, 0, 0, 0xCD, 0x80, 0xC3]       # mov eax, 20; int 0x80; ret
    x32_getpid = [0xB8, 0x27, 0, 0, 0x40, 0x0F, 0x05, 0xC3]     # mov eax, 0x40000027; syscall; ret
    native_getpid = [0xB8, 0x27, 0, 0, 0, 0x0F, 0x05, 0xC3]     # mov eax, 39; syscall; ret
    with Sandbox(workers=1, landlock="off", drop_privileges="off", seccomp_backend=backend) as sb:
        r = sb.exec_many([SHELLCODE.format(code=c) for c in (i386_getpid, x32_getpid, native_getpid)])
    assert r[0].status == "violation" and "SIGSYS" in r[0].error, r[0]
    assert r[1].status == "violation" and "SIGSYS" in r[1].error, r[1]
    assert r[2].status == "ok" and r[2].stdout == "not stopped\n", r[2]
