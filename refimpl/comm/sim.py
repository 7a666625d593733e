"""An in-process communicator: P ranks as P threads, with MPI-like point-to-point semantics.

NumPy releases the GIL inside BLAS and ufuncs, so the ranks really compute concurrently. Messages are
matched on (source, dest, tag) in posting order. The bytes are copied once, by whichever side posts
second, straight from the send buffer into the receive buffer; a send request completes only when its
data has been delivered (MPI's synchronous mode), so a schedule that would deadlock under a real MPI's
rendezvous protocol deadlocks here too, instead of passing by luck.

A deadlock is an error, never a hang. The world knows what every rank is waiting for: when every rank
that has not finished waits on a message that has not been posted, or on a collective that cannot
complete, no one can make progress, and every waiting rank raises ``DeadlockError`` naming each rank and
the message it waits for. A rank that raises any exception makes the others raise ``RankAborted`` at
their next communication call. ``timeout`` bounds any single wait as a last resort.
"""

import threading
import time
from collections import deque

import numpy as np

from ..schedule import describe_tag
from .base import Comm, CommError, DeadlockError, RankAborted


class _Request:
    def __init__(self, kind, buf, rank, peer, tag):
        self.kind, self.buf, self.rank, self.peer, self.tag = kind, buf, rank, peer, tag
        self.matched = False
        self.done = False
        self.error = None

    def describe(self):
        verb = "send to" if self.kind == "send" else "receive from"
        return f"rank {self.rank} waits to {verb} rank {self.peer}: tag {self.tag} ({describe_tag(self.tag)})"


def _host_copy(dst, src):
    np.copyto(dst.reshape(-1), src.reshape(-1))


class SimWorld:
    """The shared state of P simulated ranks. ``run(fn)`` calls ``fn(comm)`` on P threads.

    Messages are NumPy arrays by default. ``array_type`` and ``copy(dst, src)`` let the ranks exchange
    other arrays: ``gpu.sim_world`` passes device arrays and a copy that is complete when it returns.
    """

    def __init__(self, size, timeout=600.0, *, array_type=np.ndarray, copy=_host_copy):
        self.size, self.timeout = size, timeout
        self._array_type, self._copy = array_type, copy
        self._cv = threading.Condition()
        self._pending = {}                # (src, dst, tag) -> deque of unmatched requests, all one kind
        self._waiting = {}                # rank -> description of what it is blocked on
        self._finished = set()
        self._failure = None              # (rank, exception) of the first rank that failed
        self._deadlock = None
        self._gather = [None] * size
        self._gather_count = 0
        self._gather_generation = 0
        self._gather_result = None

    # -- point to point ---------------------------------------------------------------------------
    def _post(self, kind, buf, rank, peer, tag):
        if not isinstance(buf, self._array_type) or not buf.flags.c_contiguous:
            raise CommError(f"rank {rank}: {kind} buffer must be a C-contiguous "
                            f"{self._array_type.__module__.split('.')[0]} array")
        if not 0 <= peer < self.size:
            raise CommError(f"rank {rank}: peer rank {peer} is outside 0..{self.size - 1}")
        req = _Request(kind, buf, rank, peer, tag)
        key = (rank, peer, tag) if kind == "send" else (peer, rank, tag)
        with self._cv:
            self._check_alive(rank)
            queue = self._pending.setdefault(key, deque())
            if queue and queue[0].kind != kind:
                other = queue.popleft()
                other.matched = req.matched = True
            else:
                queue.append(req)
                return req
        send, recv = (req, other) if kind == "send" else (other, req)
        error = None
        if send.buf.nbytes != recv.buf.nbytes or send.buf.dtype != recv.buf.dtype:
            error = CommError(f"message from rank {send.rank} to rank {recv.rank} with tag {tag} "
                              f"({describe_tag(tag)}) is {send.buf.nbytes} bytes of {send.buf.dtype}, "
                              f"but the receive buffer is {recv.buf.nbytes} bytes of {recv.buf.dtype}")
        else:
            self._copy(recv.buf, send.buf)
        with self._cv:
            send.done = recv.done = True
            send.error = recv.error = error
            self._cv.notify_all()
        return req

    def _check_alive(self, rank):
        if self._deadlock is not None:
            raise DeadlockError(self._deadlock)
        if self._failure is not None and self._failure[0] != rank:
            failed, exc = self._failure
            raise RankAborted(f"rank {rank} stopped because rank {failed} failed: {type(exc).__name__}: {exc}")

    def _block(self, rank, description, ready, can_progress):
        """Wait until ``ready()``; detect a world in which no rank can ever make progress."""
        deadline = time.monotonic() + self.timeout
        with self._cv:
            while not ready():
                self._check_alive(rank)
                self._waiting[rank] = (description, can_progress)
                stuck = [r for r in range(self.size) if r not in self._finished]
                if all(r in self._waiting and not self._waiting[r][1]() for r in stuck):
                    self._deadlock = "deadlock: " + "; ".join(self._waiting[r][0] for r in sorted(stuck))
                    self._cv.notify_all()
                    raise DeadlockError(self._deadlock)
                left = deadline - time.monotonic()
                if left <= 0:
                    del self._waiting[rank]
                    raise DeadlockError(f"timeout after {self.timeout:g} s: {description}")
                self._cv.wait(min(left, 1.0))
            self._waiting.pop(rank, None)
            self._check_alive(rank)

    def _wait(self, rank, req):
        self._block(rank, req.describe(), lambda: req.done, lambda: req.matched)
        if req.error is not None:
            raise req.error

    # -- collectives ------------------------------------------------------------------------------
    def _allgather(self, rank, value):
        with self._cv:
            self._check_alive(rank)
            generation = self._gather_generation
            self._gather[rank] = value
            self._gather_count += 1
            if self._gather_count == self.size:
                self._gather_result = list(self._gather)
                self._gather, self._gather_count = [None] * self.size, 0
                self._gather_generation += 1
                self._cv.notify_all()
                return self._gather_result
        complete = lambda: self._gather_generation != generation    # noqa: E731
        self._block(rank, f"rank {rank} waits in a collective (allgather/allreduce/barrier)", complete, complete)
        return self._gather_result

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

        def main(rank):
            try:
                results[rank] = fn(self.comm(rank))
            except BaseException as exc:            # noqa: BLE001 - reported to the caller below
                errors[rank] = exc
                with self._cv:
                    if self._failure is None and not isinstance(exc, (RankAborted, DeadlockError)):
                        self._failure = (rank, exc)
                    self._cv.notify_all()
            finally:
                with self._cv:
                    self._finished.add(rank)
                    self._waiting.pop(rank, None)
                    self._cv.notify_all()

        threads = [threading.Thread(target=main, args=(r,), name=f"rank-{r}", daemon=True)
                   for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
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
