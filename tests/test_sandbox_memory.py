"""The zygote's memory: the Stash no child inherits, object arenas in huge pages and the
zygote keeping them, a job's fresh allocation region, and the reserved output regions (their
limits and their wiping)."""

import os

import pytest

from fastazr import _sandbox
from fastazr.sandbox import Sandbox
from fastazr.sandbox import zygote

ADD = "def f(a, b):\n    return a + b\n"


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2, timeout_s=2.0, memory_mb=512) as box:
        yield box


def _mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's anonymous mappings ([heap] and named ones left out)."""
    with open("/proc/self/maps") as f:
        return [tuple(int(x, 16) for x in fields[0].split("-")) for fields in map(str.split, f) if len(fields) == 5]


def _in_child(probe) -> int:
    """probe's exit status run in a forked child (3: it raised PermissionError)."""
    pid = os.fork()
    if pid == 0:
        try:
            os._exit(probe())
        except PermissionError:
            os._exit(3)
    _, status = os.waitpid(pid, 0)
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)


def test_a_stash_is_out_of_reach_of_forked_children():
    """Keys, values and where items end live in MADV_DONTFORK memory, absent from a child even
    after growing (mremap moves the flag with the mapping); what the object itself holds
    (lengths, sizes) answers only the process that made the Stash."""
    stash = _sandbox.Stash()
    stash.put(b"program source", b"its code")
    stash.append(b"an output")
    assert stash.find(b"program source") == b"its code" and stash.find(b"other") is None
    assert stash.get(2) == b"an output" and len(stash) == 3 and stash.nbytes == 31
    before = set(_mappings())
    grown = _sandbox.Stash()
    grown.append(b"x" * (3 << 20))  # past the first 1 MiB region: grown by mremap, twice
    grown.put(b"a key", b"a value")
    assert grown.get(0) == b"x" * (3 << 20) and grown.find(b"a key") == b"a value"
    # >= rather than ==: the kernel merges the region with an adjacent mapping of the same flags
    # (another MADV_DONTFORK region) where the address layout puts one there
    regions = [r for r in set(_mappings()) - before if r[1] - r[0] >= 4 << 20]
    assert regions, f"the grown Stash's 4 MiB region was not found in /proc/self/maps: {set(_mappings()) - before}"

    def overlap() -> int:
        return int(any(a < e and s < b for a, b in regions for s, e in _mappings()))
    assert _in_child(overlap) == 0, "a child inherited the grown Stash's memory"
    for probe in (lambda: len(stash), lambda: stash.nbytes, lambda: grown.nbytes, lambda: stash.get(2),
                  lambda: stash.find(b"program source"), lambda: grown.put(b"k", b"v"), lambda: grown.append(b"v")):
        assert _in_child(lambda: probe() and 1) == 3, "a child got an answer from a Stash"


def test_zygote_object_arenas_sit_in_huge_pages_only_when_asked(sb):
    """SandboxConfig.huge_arenas: the zygote starts with the C module preloaded, whose allocator
    carves Python's object arenas out of 2 MiB chunks (csrc/sandbox/stash.c); a child still maps
    its own new arenas page by page, sees none of the preload in its environment, and runs the
    same. Off, nothing is preloaded."""
    hello = sb._zygotes[0].hello
    assert hello["huge_arena_bytes"] >= 2 << 20 and hello["huge_arena_bytes"] % (2 << 20) == 0
    if os.path.exists("/sys/kernel/mm/transparent_hugepage/enabled"):
        # The chunks are advised (VmFlags "hg"); whether the kernel grants a huge page at a fault
        # depends on its THP mode and on fragmentation, so a CI machine may hold none.
        assert any("hg" in line.split()[1:] for line in open(f"/proc/{hello['pid']}/smaps")
                   if line.startswith("VmFlags:")), "no mapping of the zygote is advised MADV_HUGEPAGE"
    grow = "def f(n):\n    return len([[i] for i in range(n)])\n"  # ~15 MiB of new arenas in the child
    environ = "import os\ndef f():\n    return dict(os.environ)\n"
    with Sandbox(workers=1, huge_arenas=False) as plain:
        assert plain._zygotes[0].hello["huge_arena_bytes"] == 0
        off = plain.call_many([(grow, "f", "200_000"), (environ, "f", "")])
    on = sb.call_many([(grow, "f", "200_000"), (environ, "f", "")])
    assert [(r.status, r.value) for r in on] == [(r.status, r.value) for r in off] == [("ok", "200000"), ("ok", "{}")]


def test_the_zygote_keeps_its_huge_pages_through_compiles_timeouts_and_output():
    """The zygote's next write into a huge page that a live child still maps splits the zygote's
    own mapping of it for good (khugepaged merges it again only once no other process maps it).
    Three such children: the compiler, which lives across batches (before it copied them at its
    start, none was left after the startup probe's batch, and every fork and exit copied and tore
    down ~1,500 more page-table entries); a child killed at its timeout and still tearing down
    (now waited for, briefly); a child whose output the zygote reads while it runs (now into
    memory no child inherits, not the heap). Measured from outside, after all three."""
    loop = "def f():\n    while True:\n        pass\n"
    printer = "def f():\n    print('x' * 100_000)\n    return 1\n"
    with Sandbox(workers=1, timeout_s=0.5) as box:
        hello = box._zygotes[0].hello
        if hello["huge_page_bytes"] == 0:
            pytest.skip("the kernel gave the zygote no huge page (THP off, or no free 2 MiB page)")
        results = box.call_many([(ADD, "f", f"{i}, 1") for i in range(20)]
                                + [("def f(:\n", "f", ""), (loop, "f", ""), (printer, "f", "")])
        assert [r.status for r in results[-3:]] == ["error", "timeout", "ok"]
        assert len(results[-1].stdout) == 100_001
        assert zygote.huge_page_bytes(hello["pid"]) >= hello["huge_page_bytes"]


CHURN = """
def f():
    total = 0
    for i in range(400):
        chunk = [str(j) * 3 for j in range(1000)]
        total += len(''.join(chunk))
    grown = []
    for i in range(300_000):
        grown.append(i * i)
    text = ''
    for i in range(20_000):
        text += chr(97 + i % 26)
    data = bytearray()
    for i in range(50_000):
        data += b'xyz'
    table = {i: [i] * (i % 7) for i in range(50_000)}
    zeros = bytes(100_000)  # calloc: zeros whoever serves it
    return (total, len(grown), sum(grown[-10:]), text[-30:], len(data), bytes(data[-6:]),
            sum(map(len, table.values())), zeros.count(0))
"""


def test_a_job_churning_memory_past_its_fresh_region_runs_as_before(sb):
    """A job's child takes its new objects from a fresh region first (csrc/sandbox/bump.c), then
    from the inherited allocator; its frees of region blocks are no-ops and its reallocs copy.
    ~60 MB of allocations churned, lists, strings, a bytearray and a dict grown by realloc past
    the region's 4 MiB, under the fixture's 512 MB limit: the same value as here."""
    namespace = {}
    exec(CHURN, namespace)
    r = sb.call_many([(CHURN, "f", "")])[0]
    assert (r.status, r.value) == ("ok", repr(namespace["f"]())), r
    # and the region is in use: 2,000 new objects leave pymalloc's block count where it was
    counted = "import sys\ndef f():\n    a = sys.getallocatedblocks()\n    x = [[i] for i in range(1000)]\n" \
              "    return sys.getallocatedblocks() - a\n"
    assert int(sb.call_many([(counted, "f", "")])[0].value) < 100


def test_output_regions_do_not_count_against_a_jobs_memory_limit():
    """The zygote reserves room for a running child's result and outputs (2 x max_output_bytes
    and more) in memory no child inherits; memory_mb bounds a child, so the check of memory_mb
    against what the zygote maps leaves those regions out."""
    with Sandbox(workers=1, memory_mb=128, max_output_bytes=200_000_000) as box:
        assert box.call_many([(ADD, "f", "2, 3")])[0].value == "5"


def test_a_big_output_is_not_kept_resident_in_the_zygote():
    """The output regions are reserved once and reused: a job's output is wiped after it, and a
    big one's pages are given back rather than kept dirty for the zygote's life."""
    printer = "import sys\ndef f():\n    sys.stdout.write('x' * 20_000_000)\n    return 1\n"

    def resident_mib(pid):
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    with Sandbox(workers=1, memory_mb=512, max_output_bytes=30_000_000) as box:
        pid = box._zygotes[0].hello["pid"]
        before = resident_mib(pid)
        r = box.call_many([(printer, "f", "")])[0]
        assert (r.status, len(r.stdout)) == ("ok", 20_000_000)
        assert resident_mib(pid) < before + 5  # 20 MB kept would be +19 MiB


def test_huge_arenas_stay_off_where_ld_preload_would_split_the_path(monkeypatch):
    from fastazr.sandbox import pool

    assert pool.huge_arena_env(False) == {}
    monkeypatch.setattr(_sandbox, "__file__", "/opt/my env/_sandbox.so")
    assert pool.huge_arena_env(True) == {}
    monkeypatch.setattr(_sandbox, "__file__", "/opt/env/_sandbox.so")
    assert pool.huge_arena_env(True)["LD_PRELOAD"] == "/opt/env/_sandbox.so"
