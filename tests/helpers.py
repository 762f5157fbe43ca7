"""Process and descriptor inventories the sandbox tests compare before and after."""

import os


def children_of(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.add(int(entry))
    return found


def descendants_of(pid: int) -> set[int]:
    found, frontier = set(), {pid}
    while frontier:
        nxt = set()
        for p in frontier:
            nxt |= children_of(p)
        frontier = nxt - found
        found |= nxt
    return found


def comm(pid: int) -> str | None:
    """The process's name, None once it is gone (or a zombie: a container's init may never reap)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                return None
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def open_fds() -> set[str]:
    fds = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.add(f"{fd}->{os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            pass
    return fds
