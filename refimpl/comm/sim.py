"""An in-process communicator: P ranks as P threads, with MPI-like point-to-point semantics.

NumPy releases the GIL inside BLAS and ufuncs, so the ranks that run at once (one per core, see
"turns" below) really compute concurrently. Messages are matched on (source, dest, tag) in posting
order. The bytes are copied once, by whichever side posts second, straight from the send buffer into
the receive buffer; a send request completes only when its data has been delivered (MPI's synchronous
mode), so a schedule that would deadlock under a real MPI's rendezvous protocol deadlocks here too,
instead of passing by luck.

A deadlock is an error, never a hang. The world knows what every rank is waiting for: when every rank
that has not finished waits on a message that has not been posted, or on a collective that cannot
complete, no one can make progress, and every waiting rank raises ``DeadlockError`` naming each rank and
the message it waits for. A rank that raises any exception makes the others raise ``RankAborted`` at
their next communication call. ``timeout`` bounds any single wait as a last resort.

How thousands of ranks stay cheap: whatever P, a message costs O(1) work and wakes at most one thread.
One lock guards the world's state, held for a few dictionary operations; the bytes are copied outside it.

matching
    Unmatched requests queue per (source, dest, tag): posting finds its partner with one lookup.
turns and waking
    At most ``running`` ranks (one per core) run at once; the others are parked, each on a lock of its
    own. A rank that must wait hands its turn to the first rank in line and parks. What it waits for
    (the message, or the last rank to arrive at a collective) puts it back in line, or straight back to
    running if a turn is free, and its thread is woken only then: one wakeup per wait, and no one else
    is disturbed. A failure or a deadlock puts every waiting rank in line, once. (Without turns, P
    runnable threads fight over the GIL at every NumPy call: at P=256 that cost as much as the
    attention itself. So rank code must block only in the communicator: a rank waiting on a plain
    lock or event for another rank would keep a turn that rank may need.)
deadlock detection
    A rank is *stuck* while it waits on a request no one has matched, or in a collective that has not
    completed: only another rank's post can free it. (A matched request always completes: the rank
    that matched it is copying the bytes.) The world counts stuck ranks, one more or one less when a
    rank starts or stops waiting and when a request someone waits on is matched, and counts finished
    ranks. The moment stuck + finished = P, with at least one stuck, no rank is left that could post
    anything: a deadlock, seen in O(1) by the rank whose wait or exit made it so. Only then are the
    waits listed, for the error message.
garbage collection
    ``run`` switches Python's cyclic collector off until the ranks are done. Rank code keeps objects
    alive (the ring's trace: P records per rank, P^2 in all), and every full collection walks all of
    them: at P=1024 a run took 78 CPU seconds with the collector and 55 without. The ranks make no
    garbage cycles worth collecting meanwhile; reference counting still frees everything else at once.
"""

import gc
import math
import numbers
import os
import threading
import time
from collections import deque

import numpy as np

from ..schedule import describe_tag
from .base import Comm, CommError, DeadlockError, RankAborted

class _Request:
    __slots__ = ("kind", "buf", "rank", "peer", "tag", "matched", "done", "error")

    def __init__(self, kind, buf, rank, peer, tag):
        self.kind, self.buf, self.rank, self.peer, self.tag = kind, buf, rank, peer, tag
        self.matched = False              # the other side is posted: the bytes are being copied
        self.done = False
        self.error = None

    def describe(self):
        verb = "send to" if self.kind == "send" else "receive from"
        return f"waits to {verb} rank {self.peer}: tag {self.tag} ({describe_tag(self.tag)})"


class _Gather:
    """One allgather: the value of every rank that has arrived. Matched, and done, when all have."""

    def __init__(self, size):
        self.values = [None] * size
        self.arrived = 0
        self.matched = self.done = False

    @staticmethod
    def describe():
        return "waits in a collective (allgather/allreduce/barrier)"


def _host_copy(dst, src):
    np.copyto(dst.reshape(-1), src.reshape(-1))


def check_timeout(timeout):
    """``timeout`` as float seconds: a positive, finite number."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, got {type(timeout).__name__}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ValueError(f"timeout must be a positive, finite number of seconds, got {timeout}")
    return float(timeout)


class SimWorld:
    """The shared state of P simulated ranks. ``run(fn)`` calls ``fn(comm)`` on P threads.

    ``timeout`` (seconds, positive and finite) bounds any single wait. Messages are NumPy arrays by
    default. ``array_type`` and ``copy(dst, src)`` let the ranks exchange other arrays: ``gpu.sim_world``
    passes device arrays and a copy that is complete when it returns.
    """

    def __init__(self, size, timeout=600.0, *, array_type=np.ndarray, copy=_host_copy):
        self.size, self.timeout = size, check_timeout(timeout)
        self.running = min(size, os.cpu_count() or 1)      # ranks that may run at once
        self.wakeups = 0                  # threads woken: one per wait that had to park, one per rank start
        self._array_type, self._copy = array_type, copy
        self._lock = threading.Lock()
        self._pending = {}                # (src, dst, tag) -> deque of unmatched requests, all one kind
        self._waits = {}                  # rank -> the _Request or _Gather it is blocked on
        self._stuck = 0                   # ranks in _waits whose request or gather is not matched
        self._finished = 0
        self._failure = None              # (rank, exception) of the first rank that failed
        self._deadlock = None
        self._gather = _Gather(size)
        self._free_turns = self.running
        self._line = deque()              # ranks waiting for a turn to run, first come first served
        self._parked = [True] * size      # asleep with nothing to wake for: not in line, not given a turn
        self._parking = [threading.Lock() for _ in range(size)]     # held while the rank may not run
        for lock in self._parking:
            lock.acquire()

    # -- point to point ---------------------------------------------------------------------------
    def _post(self, kind, buf, rank, peer, tag):
        if not isinstance(buf, self._array_type) or not buf.flags.c_contiguous:
            raise CommError(f"rank {rank}: {kind} buffer must be a C-contiguous "
                            f"{self._array_type.__module__.split('.')[0]} array")
        if not 0 <= peer < self.size:
            raise CommError(f"rank {rank}: peer rank {peer} is outside 0..{self.size - 1}")
        req = _Request(kind, buf, rank, peer, tag)
        key = (rank, peer, tag) if kind == "send" else (peer, rank, tag)
        with self._lock:
            self._check_alive(rank)
            queue = self._pending.get(key)
            if not queue or queue[0].kind == kind:
                self._pending.setdefault(key, deque()).append(req)
                return req
            other = queue.popleft()
            if not queue:
                del self._pending[key]
            other.matched = req.matched = True
            if self._waits.get(other.rank) is other:
                self._stuck -= 1
        send, recv = (req, other) if kind == "send" else (other, req)
        error = None
        if send.buf.nbytes != recv.buf.nbytes or send.buf.dtype != recv.buf.dtype:
            error = CommError(f"message from rank {send.rank} to rank {recv.rank} with tag {tag} "
                              f"({describe_tag(tag)}) is {send.buf.nbytes} bytes of {send.buf.dtype}, "
                              f"but the receive buffer is {recv.buf.nbytes} bytes of {recv.buf.dtype}")
        else:
            self._copy(recv.buf, send.buf)
        with self._lock:
            send.done = recv.done = True
            send.error = recv.error = error
            if self._waits.get(other.rank) is other:
                self._wake(other.rank)
        return req

    def _wait(self, rank, req):
        with self._lock:
            if not req.done:
                self._block(rank, req)
            self._check_alive(rank)
        if req.error is not None:
            raise req.error

    # -- collectives ------------------------------------------------------------------------------
    def _allgather(self, rank, value):
        with self._lock:
            self._check_alive(rank)
            gather = self._gather
            gather.values[rank] = value
            gather.arrived += 1
            if gather.arrived < self.size:
                self._block(rank, gather)
                self._check_alive(rank)
                return gather.values
            gather.matched = gather.done = True
            self._gather = _Gather(self.size)
            for r, waiting_on in self._waits.items():
                if waiting_on is gather:
                    self._stuck -= 1
                    self._wake(r)
            return gather.values

    # -- waiting (all of these hold the lock) -----------------------------------------------------
    def _check_alive(self, rank):
        if self._deadlock is not None:
            raise DeadlockError(self._deadlock)
        if self._failure is not None and self._failure[0] != rank:
            failed, exc = self._failure
            raise RankAborted(f"rank {rank} stopped because rank {failed} failed: {type(exc).__name__}: {exc}")

    def _block(self, rank, waiting_on):
        """Park until ``waiting_on`` (a _Request or _Gather) is done, or until the world ends the wait: a
        deadlock, a failed rank or the timeout."""
        deadline = time.monotonic() + self.timeout
        self._waits[rank] = waiting_on
        self._stuck += not waiting_on.matched
        try:
            self._detect_deadlock()
            while not waiting_on.done:
                self._check_alive(rank)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlockError(f"timeout after {self.timeout:g} s: rank {rank} {waiting_on.describe()}")
                self._park(rank, min(left, threading.TIMEOUT_MAX))
        finally:
            del self._waits[rank]
            self._stuck -= not waiting_on.matched

    def _detect_deadlock(self):
        """Called whenever a rank became stuck or finished."""
        if (self._stuck and self._stuck + self._finished == self.size and self._deadlock is None
                and self._failure is None):
            self._deadlock = "deadlock: " + "; ".join(f"rank {r} {self._waits[r].describe()}"
                                                      for r in sorted(self._waits))
            self._wake_all()

    def _wake_all(self):
        for rank in self._waits:
            self._wake(rank)

    def _wake(self, rank):
        """``rank`` has something to look at: give it a free turn, or put it in line for one."""
        if not self._parked[rank]:
            return
        self._parked[rank] = False
        if self._free_turns:
            self._free_turns -= 1
            self._give_turn(rank)
        else:
            self._line.append(rank)

    def _end_turn(self):
        """The calling rank stops running: its turn goes to the first rank in line."""
        if self._line:
            self._give_turn(self._line.popleft())
        else:
            self._free_turns += 1

    def _give_turn(self, rank):
        self.wakeups += 1
        self._parking[rank].release()

    def _park(self, rank, seconds):
        """End this rank's turn and sleep until it is woken with a new one, or ``seconds`` have passed
        (then it gets in line, and returns when its turn comes)."""
        self._end_turn()
        self._parked[rank] = True
        self._lock.release()
        woken = self._parking[rank].acquire(True, seconds)
        self._lock.acquire()
        if not woken:
            self._take_turn(rank)

    def _take_turn(self, rank):
        """Wait for a turn to run (a parked rank gets in line first)."""
        self._wake(rank)
        self._lock.release()
        self._parking[rank].acquire()
        self._lock.acquire()

    # -- running ranks ----------------------------------------------------------------------------
    def comm(self, rank):
        return SimComm(self, rank)

    def run(self, fn):
        """Run ``fn(comm)`` for every rank on its own thread; return the P results in rank order.

        If any rank raises, the exception of the first rank that failed is re-raised here (the other
        ranks stop with ``RankAborted``).
        """
        results = [None] * self.size
        errors = [None] * self.size
        self._parked, self._finished = [True] * self.size, 0       # a world may run again, on new threads

        def main(rank):
            with self._lock:
                self._take_turn(rank)
            try:
                results[rank] = fn(self.comm(rank))
            except BaseException as exc:            # noqa: BLE001 - reported to the caller below
                errors[rank] = exc
                with self._lock:
                    if self._failure is None and not isinstance(exc, (RankAborted, DeadlockError)):
                        self._failure = (rank, exc)
                        self._wake_all()
            finally:
                with self._lock:
                    self._finished += 1
                    self._end_turn()
                    self._detect_deadlock()

        threads = [threading.Thread(target=main, args=(r,), name=f"rank-{r}", daemon=True)
                   for r in range(self.size)]
        collecting = gc.isenabled()
        gc.disable()
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            if collecting:
                gc.enable()
        if self._failure is not None:
            raise self._failure[1]
        for exc in errors:
            if exc is not None:
                raise exc
        return results


class SimComm(Comm):
    """One rank's view of a ``SimWorld``."""

    def __init__(self, world, rank):
        super().__init__()
        self.world, self.rank, self.size = world, rank, world.size

    def isend(self, buf, dest, tag):
        self._count(buf)
        return self.world._post("send", buf, self.rank, dest, tag)

    def irecv(self, buf, source, tag):
        return self.world._post("recv", buf, self.rank, source, tag)

    def wait(self, req):
        self.world._wait(self.rank, req)

    def allgather(self, value):
        return self.world._allgather(self.rank, value)
