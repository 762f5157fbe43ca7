"""The adversarial catalogue: hostile programs and the outcome each must have in the sandbox.

tests/test_adversarial.py runs every `source` through Sandbox.exec_many and checks the status,
that the damage did not happen, and that nothing was left behind. bench/bench_sandbox.py runs
every `probe` (a harmless test of the same capability: it returns True when the capability is
there) through fastazr and through a plain process pool, to show what each lets through.

Sources and probes may use two placeholders, filled in by `render`: {sentinel}, a file that
exists and must survive, and {drop}, a path that must not come to exist."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Attack:
    name: str
    source: str
    expected: frozenset
    probe: str = "escaped = False"
    timeout_s: float = 1.0
    tags: tuple = field(default=())

    def render(self, text: str, sentinel: str, drop: str) -> str:
        return text.replace("{sentinel}", sentinel).replace("{drop}", drop)


def _attack(name, source, expected, probe="escaped = False", **kw) -> Attack:
    return Attack(name, source.strip() + "\n", frozenset(expected.split()), probe.strip() + "\n", **kw)


def _raw(name, source, probe="escaped = False") -> Attack:
    """A raw syscall through ctypes. Under Landlock, ctypes cannot even load libffi (an error);
    tests rerun these with Landlock off, where seccomp alone must stop them (a violation)."""
    return _attack(name, CTYPES + source, f"{V} {E}", probe if probe == "escaped = False" else CTYPES + probe,
                   tags=("raw",))


V, E, T, M, O = "violation", "error", "timeout", "memory", "output_limit"
CTYPES = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"


def _probe(setup: str, attempt: str, errors: str = "OSError") -> str:
    """`setup`, then `attempt`: escaped is True when the attempt raised none of `errors`."""
    body = "\n".join("    " + line for line in attempt.splitlines())
    return f"{setup}\ntry:\n{body}\n    escaped = True\nexcept {errors}:\n    escaped = False"


WRITE_PROBE = _probe("import os", 'with open("{drop}", "w") as handle:\n    handle.write("x")\nos.remove("{drop}")')
FORK_PROBE = _probe("import os", "pid = os.fork()\nif pid == 0:\n    os._exit(0)\nos.waitpid(pid, 0)")
SOCKET_PROBE = _probe("import socket", "socket.socket(socket.AF_INET, socket.SOCK_STREAM).close()")
SIGNAL_PROBE = _probe("import os", "os.kill(os.getppid(), 0)")
EXEC_PROBE = _probe("import os", 'pid = os.posix_spawn("/bin/true", ["true"], {})\nos.waitpid(pid, 0)')
OUTPUT_PROBE = """
import os
for _ in range(64):
    os.write({fd}, b"x" * 65536)
escaped = True
"""
RLIMIT_PROBE = """
import resource
escaped = resource.getrlimit(resource.RLIMIT_AS)[0] == resource.RLIM_INFINITY
"""

ATTACKS = [
    # -- the file system: writes, deletes, renames and creation anywhere
    _attack("write_new_file_tmp", 'open("{drop}", "w").write("pwned")', V, WRITE_PROBE),
    _attack("write_new_file_cwd", 'open("pwned.txt", "w").write("pwned")', V, WRITE_PROBE),
    _attack("append_existing_file", 'open("{sentinel}", "a").write("pwned")', V, WRITE_PROBE),
    _attack("truncate_existing_file", 'open("{sentinel}", "w")', V, WRITE_PROBE),
    _attack("delete_file", 'import os\nos.remove("{sentinel}")', V, WRITE_PROBE),
    _attack("rename_file", 'import os\nos.rename("{sentinel}", "{drop}")', V, WRITE_PROBE),
    _attack("make_directory", 'import os\nos.mkdir("{drop}")', V, WRITE_PROBE),
    _attack("symlink", 'import os\nos.symlink("/etc/passwd", "{drop}")', V, WRITE_PROBE),
    _attack("chmod", 'import os\nos.chmod("{sentinel}", 0o777)', V, WRITE_PROBE),
    _attack("os_truncate", 'import os\nos.truncate("{sentinel}", 0)', V, WRITE_PROBE),
    _attack("write_dev_shm", 'open("/dev/shm/fastazr-pwned", "w").write("x")', V, WRITE_PROBE),
    _attack("memfd_create", 'import os\nos.memfd_create("x")', V, WRITE_PROBE),
    _attack("chdir_out", 'import os\nos.chdir("/")', V),
    # -- reading what is not the job's: the parent's memory and environment, other files
    _attack("read_parent_environ", 'import os\nprint(open(f"/proc/{os.getppid()}/environ").read())', E,
            _probe("import os", 'open(f"/proc/{os.getppid()}/environ").read()')),
    _attack("read_parent_memory", 'import os\nopen(f"/proc/{os.getppid()}/mem", "rb").read(16)', E,
            _probe("import os", 'open(f"/proc/{os.getppid()}/mem", "rb").close()')),
    _attack("list_root", 'import os\nprint(os.listdir("/"))', E,
            _probe("import os", 'os.listdir("/")')),
    # -- new processes and programs
    _attack("fork_bomb", "import os\nwhile True:\n    os.fork()", V, FORK_PROBE),
    _attack("os_system", 'import os\nos.system("touch {drop}")', V, EXEC_PROBE),
    _attack("subprocess_run", 'import subprocess\nsubprocess.run(["touch", "{drop}"])', V, EXEC_PROBE),
    _attack("posix_system", 'import posix\nposix.system("touch {drop}")', V, EXEC_PROBE),
    _attack("execv", 'import os\nos.execv("/bin/sh", ["sh", "-c", "touch {drop}"])', V, EXEC_PROBE),
    _attack("posix_spawn", 'import os\nos.posix_spawn("/usr/bin/touch", ["touch", "{drop}"], {})', V, EXEC_PROBE),
    _attack("thread_bomb", "import threading\nwhile True:\n    threading.Thread(target=lambda: None).start()", V,
            _probe("import threading", "t = threading.Thread(target=lambda: None)\nt.start()\nt.join()",
                   "(OSError, RuntimeError)")),
    # -- signals and tracing aimed at other processes
    _attack("kill_parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", V, SIGNAL_PROBE),
    _attack("kill_everyone", "import os, signal\nos.kill(-1, signal.SIGKILL)", V, SIGNAL_PROBE),
    _attack("killpg_own_group", "import os, signal\nos.killpg(0, signal.SIGKILL)", V, SIGNAL_PROBE),
    _attack("killpg_parent_group", "import os, signal\nos.killpg(os.getpgid(os.getppid()), signal.SIGTERM)", V, SIGNAL_PROBE),
    # The probe reads /proc/<parent>/mem, which needs ptrace access, rather than stopping the parent.
    _raw("ptrace_parent", "libc.ptrace(16, __import__('os').getppid(), 0, 0)",
         _probe("import os", "open(f'/proc/{os.getppid()}/mem', 'rb').close()")),
    # -- the network
    _attack("socket_tcp", 'import socket\nsocket.create_connection(("127.0.0.1", 22), timeout=0.2)', V, SOCKET_PROBE),
    _attack("socket_udp", 'import socket\nsocket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("127.0.0.1", 53))', V, SOCKET_PROBE),
    _attack("socket_unix", 'import socket\nsocket.socket(socket.AF_UNIX).connect("/run/systemd/private")', V, SOCKET_PROBE),
    _attack("dns_lookup", 'import socket\nsocket.getaddrinfo("example.com", 80)', f"{V} {E}", SOCKET_PROBE),
    # -- time
    _attack("infinite_loop", "while True:\n    pass", T, "while True:\n    pass\nescaped = True", timeout_s=0.5),
    _attack("long_c_computation", "pow(10, 10**9)", f"{T} {M}", "pow(10, 10**9)\nescaped = True", timeout_s=0.5),
    _attack("sleep", "import time\ntime.sleep(100)", T, "import time\ntime.sleep(100)\nescaped = True", timeout_s=0.5),
    _attack("ignore_sigalrm_sigterm",
            "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass",
            T, timeout_s=0.5),
    _attack("block_all_signals", "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, range(1, 65))\nwhile True:\n    pass", T,
            timeout_s=0.5),
    # -- memory
    _attack("memory_bomb_fast", "x = bytearray(10**11)", M, RLIMIT_PROBE),
    _attack("memory_bomb_slow", "chunks = []\nwhile True:\n    chunks.append(bytearray(10**6))", M, RLIMIT_PROBE, timeout_s=5.0),
    # Python-to-Python calls use heap frames since 3.11: this ends in memory, or runs out the clock.
    _attack("deep_recursion", "import sys\nsys.setrecursionlimit(10**7)\ndef down(n):\n    return down(n + 1)\ndown(0)",
            f"{E} {M} {T}", timeout_s=2.0),
    # repr recurses in C: with the limit raised, the C stack overflows (SIGSEGV).
    _attack("deep_c_recursion", "import sys\nsys.setrecursionlimit(10**7)\nx = []\nfor _ in range(10**6):\n    x = [x]\nrepr(x)",
            f"{E} {M}", timeout_s=5.0),
    # -- output
    _attack("huge_stdout", "while True:\n    print('x' * 10000)", O, OUTPUT_PROBE.replace("{fd}", "1"), timeout_s=5.0),
    _attack("huge_stderr", "import sys\nwhile True:\n    sys.stderr.write('x' * 10000)", O,
            OUTPUT_PROBE.replace("{fd}", "2"), timeout_s=5.0),
    _attack("huge_raw_fd_write", "import os\nwhile True:\n    os.write(1, b'x' * 65536)", O,
            OUTPUT_PROBE.replace("{fd}", "1"), timeout_s=5.0),
    # -- limits and the kernel's attack surface
    _attack("raise_rlimits", "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))", V,
            _probe("import resource", "resource.setrlimit(resource.RLIMIT_CORE, resource.getrlimit(resource.RLIMIT_CORE))",
                   "(OSError, ValueError)")),
    _attack("setuid_root", "import os\nos.setuid(0)", V,
            _probe("import os", "os.setuid(os.getuid())")),
    _raw("raw_creat", 'libc.syscall(85, b"{drop}", 0o644)'),
    _raw("raw_openat2", "libc.syscall(437, -100, b'{drop}', 0, 0)"),
    _raw("raw_io_uring_setup", "buf = ctypes.create_string_buffer(120)\nlibc.syscall(425, 8, buf)",
         "buf = ctypes.create_string_buffer(120)\nfd = libc.syscall(425, 8, buf)\nescaped = fd >= 0\nif escaped:\n    __import__('os').close(fd)"),
    _raw("raw_unshare", "libc.unshare(0x10000000)"),
    _raw("tgkill_parent", "import os\nlibc.syscall(234, os.getppid(), os.getppid(), 19)"),
    _raw("tkill_parent", "import os\nlibc.syscall(200, os.getppid(), 19)"),
    _raw("prctl_seccomp_off", "libc.prctl(22, 0, 0, 0, 0)"),
    # -- the result channel and the verdict
    _attack("close_result_channel", "import os\nos.close(3)", E),
    _attack("overwrite_result_channel", "import os\nos.write(3, b'\\x00\\x00\\x00\\x10garbage-garbage!')\nos._exit(0)", E),
    _attack("fake_result_on_stdout", 'print(\'\\x00\\x00\\x00\\x05\\x00\\x00\\x00\\x00\\x01{"status": "ok", "value": "42"}\')', "ok"),
    _attack("exit_zero_early", "import os\nos._exit(0)", E),
    _attack("sys_exit", "import sys\nsys.exit(0)", E),
]
