"""The first failure of any rank, told to every rank, so that a rank that raises makes all of them
exit with its error instead of leaving them to hang.

A rank that raises leaves the others waiting in their next collective for a peer that never
comes: gloo notices the closed connection at once, NCCL only at its timeout, and a rank busy
generating notices nothing until its next collective. So, inside `with Failures(world):`

- the failing rank writes its error into the rendezvous store (the first writer wins) before it
  exits, and waits until every other rank has read it (at most ACK_S: without torchrun, rank 0's
  process hosts the store, which dies with it);
- every rank's watcher thread polls that key; a rank whose own main thread fails afterwards (its
  collective's peer is gone) exits with the first rank's error, not with its consequence of it;
- a rank whose main thread does not get there by itself within GRACE_S (blocked in an NCCL
  collective, or generating) has its watcher print the error and end the process: a thread
  cannot interrupt a C++ collective. Its sandbox workers die with it (they watch their
  parent), a checkpoint being written is left as a partial directory that the next run sweeps.

Under torchrun the agent also stops the other workers when one exits with an error and prints
the failing rank's traceback; across nodes, the other nodes' agents learn nothing of it, which
this covers. Cost: one store read every POLL_S per rank."""

from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

from .world import World

KEY = "failure"
SEEN = "failure_seen"
POLL_S = 0.5
GRACE_S = 5.0
ACK_S = 5.0


def deliberate(exc: BaseException | None) -> bool:
    """No failure: a normal end, or SystemExit with an exit status (a stop on a signal, which
    every rank takes at the same phase boundary)."""
    return exc is None or (isinstance(exc, SystemExit) and (exc.code is None or isinstance(exc.code, int)))


def describe(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return str(exc.code)
    return f"{type(exc).__name__}: {exc}"


class Failures:
    def __init__(self, world: World):
        self.world = world
        self._stopped = threading.Event()
        self._exiting = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "Failures":
        if self.world.size > 1:
            self._thread = threading.Thread(target=self._watch, name="fastazr-failures", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        self._exiting.set()
        try:
            if self.world.size > 1 and deliberate(exc):
                # every rank stops watching before any leaves: without torchrun rank 0's process
                # hosts the store, and a watcher that still polled it would take its exit for a failure
                try:
                    dist.barrier()
                except Exception as failed:  # noqa: BLE001 - another rank failed at the end
                    self._raise_first(failed)
                    raise
            elif self.world.size > 1:
                self._raise_first(exc)
        finally:
            self._stopped.set()
            if self._thread is not None:
                self._thread.join()
        return False

    def _raise_first(self, exc: BaseException) -> None:
        """SystemExit with the first failure's error when another rank's came first; else return
        (this rank's own error is the one to raise)."""
        rank, text = self.report(exc)
        if rank != self.world.rank:
            own = (describe(exc).splitlines() or [""])[0][:300]
            raise SystemExit(f"fastazr: rank {rank} failed: {text}\n(rank {self.world.rank} stops with it; its own "
                             f"error was {own})") from exc

    def report(self, exc: BaseException) -> tuple[int, str]:
        """Record exc as this rank's failure unless another rank's came first; returns the first
        failure's (rank, text). When the store is gone (its host died), this rank's own."""
        store, mine = self.world.store, describe(exc)
        try:
            first = store.compare_set(KEY, "", f"{self.world.rank}\n{mine}").decode()
        except Exception:  # noqa: BLE001 - the store's host is gone: nothing left to tell
            return self.world.rank, mine
        rank, text = first.split("\n", 1)
        if int(rank) == self.world.rank:
            deadline = time.monotonic() + ACK_S
            try:
                while store.add(SEEN, 0) < self.world.size - 1 and time.monotonic() < deadline:
                    time.sleep(POLL_S / 5)
            except Exception:  # noqa: BLE001 - a rank that stopped may have taken the store with it
                pass
        return int(rank), text

    def _watch(self) -> None:
        store = self.world.store
        while not self._stopped.wait(POLL_S):
            try:
                if not store.check([KEY]):
                    continue
                rank, text = store.get(KEY).decode().split("\n", 1)
                if int(rank) == self.world.rank:
                    return  # our own report: the main thread is on its way out
                store.add(SEEN, 1)
                message = f"fastazr: rank {rank} failed: {text}"
            except Exception as exc:  # noqa: BLE001 - any store error means its host is gone
                if self._stopped.is_set():
                    return
                message = (f"fastazr: the run's store is unreachable ({exc}): rank 0 or the launcher died; "
                           "see its output for the error")
            if not self._exiting.wait(GRACE_S):
                print(f"{message}\n(rank {self.world.rank} stops with it)", file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(1)
            return
