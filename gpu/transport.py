"""Moving device arrays around the ring: straight from device memory, or staged through pinned host buffers.

The ring (``refimpl/ring.py``) posts ``isend``/``irecv`` on its K/V and dK/dV buffers, which the GPU engine
keeps in device memory. Two communicators wrap a host one (``SimComm``, ``MPIComm``) to carry them:

``DirectComm``  hands device arrays to the transport as they are: a CUDA-aware MPI, or the simulated world
                on one GPU (whose copy is a device-to-device memcpy). Before a device pointer is handed
                over, the work queued on the rank's stream is synchronised, so the buffer is complete.
``StagedComm``  for an MPI that cannot read device memory. Each device buffer gets a pinned host mirror;
                the ring's two alternating K/V buffers and two dK/dV buffers make the mirrors double
                buffered. A send copies device -> mirror on a copy stream that waits for the compute
                stream's work so far, and is posted to MPI as soon as that copy is done (checked in
                ``progress``, forced in any ``wait``): the copy and the message overlap the step's
                compute. A receive lands in the mirror and is copied to the device in ``wait``.

Whether MPI takes device pointers is decided once, collectively (``decide``). Each rank votes, in order:
the environment override ``RINGATTN_CUDA_AWARE=0|1``; the MPI 4.1 info key ``mpi_memory_alloc_kinds``
containing ``cuda``; ``MPIX_Query_cuda_support()`` (MPICH, Open MPI) through ctypes. The direct path is
taken only if every rank votes yes; overrides that contradict each other across ranks are an error. The
decision and its reason go into the run's report.

What a transport needs from the device is the small ``Device`` interface below; ``gpu/device.py``
implements it with CuPy, and ``HostDevice`` with NumPy, which is how CI tests this module without a GPU.
Nothing here imports CuPy.
"""

import os
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from refimpl import validate
from refimpl.comm.base import Comm

ENV = "RINGATTN_CUDA_AWARE"


# -- the decision -----------------------------------------------------------------------------------

@dataclass
class Vote:
    """One rank's answer to "can this MPI read device memory?", and why."""
    yes: bool
    reason: str
    forced: bool = False             # from the environment override


def vote(environ=None, alloc_kinds=None, query=None):
    """This rank's vote. ``alloc_kinds``: the value of ``mpi_memory_alloc_kinds`` (None if MPI has no such
    key); ``query``: a callable returning ``MPIX_Query_cuda_support()``, or None if the library lacks it."""
    env = os.environ if environ is None else environ
    value = env.get(ENV)
    if value is not None:
        if value.strip() not in ("0", "1"):
            raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
        return Vote(value.strip() == "1", f"{ENV}={value.strip()}", forced=True)
    reasons = []
    if alloc_kinds is not None:
        if "cuda" in alloc_kinds.lower():
            return Vote(True, f"mpi_memory_alloc_kinds = {alloc_kinds!r}")
        reasons.append(f"mpi_memory_alloc_kinds = {alloc_kinds!r} has no cuda")
    else:
        reasons.append("no mpi_memory_alloc_kinds info key")
    if query is not None:
        answer = int(query())
        if answer:
            return Vote(True, f"MPIX_Query_cuda_support() = {answer}")
        reasons.append(f"MPIX_Query_cuda_support() = {answer}")
    else:
        reasons.append("no MPIX_Query_cuda_support")
    return Vote(False, "; ".join(reasons))


@dataclass
class Decision:
    path: str                         # "cuda-aware" or "staged"
    reason: str
    votes: list = field(default_factory=list)


def decide(votes):
    """The collective decision from every rank's ``Vote`` (in rank order)."""
    forced = {v.yes for v in votes if v.forced}
    if len(forced) > 1:
        raise ValueError(f"ranks disagree on {ENV}: " + ", ".join(
            f"rank {r}: {v.reason}" for r, v in enumerate(votes) if v.forced))
    if all(v.yes for v in votes):
        return Decision("cuda-aware", votes[0].reason if len({v.reason for v in votes}) == 1 else
                        "every rank: " + "; ".join(f"rank {r}: {v.reason}" for r, v in enumerate(votes)), votes)
    no = [(r, v) for r, v in enumerate(votes) if not v.yes]
    if len({v.reason for _, v in no}) == 1:
        who = "every rank" if len(no) == len(votes) else "rank " + ", ".join(str(r) for r, _ in no)
        return Decision("staged", f"{who}: {no[0][1].reason}", votes)
    return Decision("staged", "; ".join(f"rank {r}: {v.reason}" for r, v in no), votes)


def mpi_vote(mpi_comm, environ=None):
    """This rank's vote, asking the MPI library behind ``mpi_comm`` (an ``MPIComm``)."""
    MPI = mpi_comm.MPI
    kinds = None
    for info in (lambda: mpi_comm.comm.Get_info(), lambda: MPI.INFO_ENV):
        try:
            kinds = info().Get("mpi_memory_alloc_kinds")
        except Exception:                # noqa: BLE001 - an MPI older than 4.1 has neither
            kinds = None
        if kinds:
            break
    return vote(environ, kinds, _mpix_query(MPI))


def _mpix_query(MPI):
    """``MPIX_Query_cuda_support`` of the MPI library mpi4py loaded, or None if it has none."""
    import ctypes
    try:
        function = ctypes.CDLL(MPI.__file__).MPIX_Query_cuda_support   # dlsym searches its libmpi too
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    return function


# -- the device interface ---------------------------------------------------------------------------

class HostDevice:
    """NumPy standing in for a device: arrays are host arrays, copies finish at once, events are None.

    The interface (``gpu/device.py: CupyDevice`` implements it for CUDA):
    ``pointer(buf)`` the buffer's start address; ``pinned(nbytes)`` a page-locked uint8 host array;
    ``to_host(dst, src)`` / ``to_device(dst, src)`` start a copy on the copy stream, after the work the
    current stream has queued, and return an event; ``done(event)``; ``wait(event)``; ``sync()`` waits
    for the current stream; ``copy(dst, src)`` a device-to-device copy, complete when it returns.
    """

    @staticmethod
    def pointer(buf):
        return buf.__array_interface__["data"][0]

    @staticmethod
    def pinned(nbytes):
        return np.empty(nbytes, np.uint8)

    @staticmethod
    def to_host(dst, src):
        np.copyto(dst, src.reshape(-1).view(np.uint8))

    @staticmethod
    def to_device(dst, src):
        np.copyto(dst.reshape(-1).view(np.uint8), src)

    @staticmethod
    def done(event):
        return True

    @staticmethod
    def wait(event):
        pass

    @staticmethod
    def sync():
        pass

    @staticmethod
    def copy(dst, src):
        np.copyto(dst.reshape(-1), src.reshape(-1))


# -- the communicators ------------------------------------------------------------------------------

class _Wrapped(Comm):
    """A communicator over ``inner`` for device buffers; collectives and counters pass through."""

    def __init__(self, inner, device, decision):
        super().__init__()
        self.inner, self.device, self.decision = inner, device, decision
        self.rank, self.size = inner.rank, inner.size

    @property
    def path(self):
        return self.decision.path

    def allgather(self, value):
        return self.inner.allgather(value)

    def barrier(self):
        self.inner.barrier()


class DirectComm(_Wrapped):
    """Device buffers go to the inner communicator as they are (CUDA-aware MPI, or the one-GPU world)."""

    def isend(self, buf, dest, tag):
        self.device.sync()                       # the buffer's producers are done before MPI reads it
        self._count(buf)
        return self.inner.isend(buf, dest, tag)

    def irecv(self, buf, source, tag):
        return self.inner.irecv(buf, source, tag)

    def wait(self, req):
        self.inner.wait(req)

    def progress(self):
        self.inner.progress()


class _Staged:
    __slots__ = ("kind", "buf", "host", "peer", "tag", "event", "inner")

    def __init__(self, kind, buf, host, peer, tag, event=None, inner=None):
        self.kind, self.buf, self.host, self.peer, self.tag, self.event, self.inner = \
            kind, buf, host, peer, tag, event, inner


class StagedComm(_Wrapped):
    """Device buffers travel through pinned host mirrors (see the module docstring)."""

    MIRRORS = 4                                  # the ring's two K/V and two dK/dV buffers

    def __init__(self, inner, device, decision):
        super().__init__(inner, device, decision)
        self._mirrors = OrderedDict()            # device buffer start -> pinned uint8 host array, LRU first
        self._unposted = []                      # sends whose device -> host copy may still run

    @property
    def pinned_bytes(self):
        return sum(m.nbytes for m in self._mirrors.values())

    def _mirror(self, buf):
        """The pinned mirror of a device buffer. Each live device buffer has its own; a mirror dropped from
        the cache stays valid for the requests that hold it (the pinned pool recycles it afterwards)."""
        key = self.device.pointer(buf)
        host = self._mirrors.pop(key, None)
        if host is None or host.nbytes < buf.nbytes:
            host = self.device.pinned(buf.nbytes)
        self._mirrors[key] = host
        while len(self._mirrors) > self.MIRRORS:
            self._mirrors.popitem(last=False)
        return host[:buf.nbytes]

    def isend(self, buf, dest, tag):
        self._count(buf)
        host = self._mirror(buf)
        req = _Staged("send", buf, host, dest, tag, event=self.device.to_host(host, buf))
        self._unposted.append(req)
        return req

    def irecv(self, buf, source, tag):
        host = self._mirror(buf)
        return _Staged("recv", buf, host, source, tag, inner=self.inner.irecv(host, source, tag))

    def _post(self, block):
        """Hand to MPI, in posting order, the sends whose copy to the host is done (all, if ``block``)."""
        while self._unposted:
            req = self._unposted[0]
            if block:
                self.device.wait(req.event)
            elif not self.device.done(req.event):
                return
            req.inner = self.inner.isend(req.host, req.peer, req.tag)
            self._unposted.pop(0)

    def progress(self):
        self._post(block=False)
        self.inner.progress()

    def wait(self, req):
        self._post(block=True)                   # a peer may be waiting for our send before it sends
        self.inner.wait(req.inner)
        if req.kind == "recv":
            self.device.wait(self.device.to_device(req.buf, req.host))


def device_comm(comm, device, environ=None):
    """Wrap a host communicator for device buffers, deciding the path collectively.

    ``comm`` is an ``MPIComm`` (every rank votes, see ``mpi_vote``) or any other ``Comm``, whose transport
    is taken to move device arrays directly (the simulated world on one GPU). Returns ``DirectComm`` or
    ``StagedComm``; ``.decision`` says which path and why.
    """
    if hasattr(comm, "MPI"):
        decision = decide(validate.collective(comm, lambda: mpi_vote(comm, environ)))
    else:
        decision = Decision("device", "simulated ranks on one device: device-to-device copies")
    return (StagedComm if decision.path == "staged" else DirectComm)(comm, device, decision)
