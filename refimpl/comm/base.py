"""The communicator interface the ring is written against.

It is the small subset of MPI that ring attention needs, with MPI's semantics:

``isend(buf, dest, tag)`` / ``irecv(buf, source, tag)``
    post a non-blocking send of a contiguous array, or a receive into a preallocated contiguous array;
    both return a request. A message matches the receive with the same (source, dest, tag); messages
    between one pair with one tag arrive in the order they were sent. The send buffer must not be
    written, and the receive buffer not read, until the request has been waited on.
``wait(req)`` / ``waitall(reqs)``
    block until the request is complete.
``send``, ``recv``, ``sendrecv``
    the blocking forms, built from the above.
``allreduce(value, op)``, ``allgather(value)``, ``barrier()``
    collectives on small Python or NumPy values, used to agree on shapes and to gather statistics.
``progress()``
    give the transport a chance to move posted messages along; the ring calls it between tiles. A
    no-op where transfers progress by themselves (the simulator); one ``MPI_Iprobe`` under MPI.

Every implementation counts the bytes it sends (``bytes_sent``, ``messages_sent``).
"""


import functools

import numpy as np


class CommError(RuntimeError):
    """A communication failure: a mismatched message, a deadlock, or a peer that failed."""


class DeadlockError(CommError):
    """Every rank that has not finished is waiting for a message no one will send."""


class RankAborted(CommError):
    """This rank stopped because another rank failed."""


_REDUCE = {"sum": np.add, "max": np.maximum, "min": np.minimum}    # elementwise on arrays, as in MPI


class Comm:
    """Base class: subclasses provide rank, size, isend, irecv, wait and allgather."""

    rank: int
    size: int

    def __init__(self):
        self.bytes_sent = 0
        self.messages_sent = 0

    def _count(self, buf):
        self.bytes_sent += buf.nbytes
        self.messages_sent += 1

    def progress(self):
        """Let posted messages advance while this rank computes. Nothing to do by default."""

    def waitall(self, requests):
        for req in requests:
            self.wait(req)

    def send(self, buf, dest, tag):
        self.wait(self.isend(buf, dest, tag))

    def recv(self, buf, source, tag):
        self.wait(self.irecv(buf, source, tag))

    def sendrecv(self, sendbuf, dest, recvbuf, source, tag):
        self.waitall([self.irecv(recvbuf, source, tag), self.isend(sendbuf, dest, tag)])

    def allreduce(self, value, op="sum"):
        if op not in _REDUCE:
            raise ValueError(f"op must be one of {sorted(_REDUCE)}, got {op!r}")
        return functools.reduce(_REDUCE[op], self.allgather(value))

    def barrier(self):
        self.allgather(None)
