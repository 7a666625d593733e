"""The MPI communicator: one rank per process, over mpi4py, with the semantics of ``comm.base``.

Run a program that uses it with one process per rank, for example::

    mpiexec -n 4 ringattn run ...
    mpiexec -n 4 python -m mpi4py -m refimpl run ...

The ring (``ring.py``) is the same code as in the simulation; only the communicator changes. So an MPI run
and ``simulate_ring`` with the same P, inputs and block sizes produce bitwise-identical results.

Point to point. ``isend``/``irecv`` post ``MPI_Isend``/``MPI_Irecv`` on the raw bytes of a C-contiguous
NumPy array (datatype ``MPI.BYTE``: any dtype, float16 included, travels bit for bit; the ranks of one
job are assumed to share one byte order), or of a device array (``__cuda_array_interface__``) for a
CUDA-aware MPI, as ``gpu/transport.py: DirectComm`` hands them over. ``wait`` blocks in ``MPI_Wait``,
adds the seconds it blocked to ``wait_seconds``, and checks the size of a received message against the
receive buffer: a mismatch is a ``CommError`` naming both ranks and the message
(``schedule.describe_tag``), never silent garbage.

Failures. A rank that raises must not leave its peers blocked forever in a receive. Under
``python -m mpi4py`` an uncaught exception calls ``MPI_Abort``, which kills every rank of the job.
``install_abort_hook`` gives a plain ``python`` (or the ``ringattn`` console script) the same behaviour,
prefixes the traceback with the failing rank, and waits until the launcher has read it before aborting.
Errors that every rank can see (bad shapes, NaN, P > N) are agreed on collectively
(``validate.collective``), so every rank raises the same message.

Launch detection. ``launched_world_size()`` reads the launcher's environment variables to tell whether
this process is one rank of an MPI job, *without* importing mpi4py (importing ``mpi4py.MPI`` initializes
MPI, which is slow, and under some launchers fails or hangs when the process was not started by one).

mpi4py is an optional dependency (``pip install 'ringattn[mpi]'``): importing this module without it
raises ``ImportError`` saying so. ``mpi4py.MPI`` itself is imported only when a communicator is made or
the abort hook is installed.
"""

import importlib.util
import os
import sys
import time
import traceback

import numpy as np

from ..schedule import describe_tag
from .base import Comm, CommError

_INSTALL_HINT = "pip install 'ringattn[mpi]'"

try:
    _HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
except (ImportError, ValueError):
    _HAVE_MPI4PY = False
if not _HAVE_MPI4PY:
    raise ImportError(f"refimpl.comm.mpi needs mpi4py, which is not installed; install it (and an MPI library) "
                      f"with: {_INSTALL_HINT}")


def _mpi():
    """Import ``mpi4py.MPI`` (this initializes MPI) with an actionable error if the MPI library is missing."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError, OSError) as exc:
        raise ImportError(f"mpi4py is installed but could not load an MPI library ({exc}); install one with: "
                          f"{_INSTALL_HINT}") from exc
    return MPI


# -- launch detection -------------------------------------------------------------------------------

# Slurm's step ids above this are not task-launching steps: the batch script (0xFFFFFFFE), the extern
# step (0xFFFFFFFF), the interactive step, ... (``SLURM_BATCH_SCRIPT`` and friends in slurm.h).
_SLURM_MAX_STEP_ID = 0xFFFFFFF0


def _env_int(env, name):
    value = env.get(name)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def detect_launch(environ=None):
    """Which launcher started this process, and how many ranks its job has, from environment variables.

    Returns ``(launcher, size, variable)``: ``launcher`` is None when no launcher was detected; ``size``
    is the world size, or None when the launcher is detected but does not publish the size in the
    environment; ``variable`` names the variable the answer came from. Never imports mpi4py.

    The variables, in the order they are consulted (an MPI launcher run inside a Slurm allocation sees
    both, and the MPI launcher's own variables describe the job this process belongs to):

    ``OMPI_COMM_WORLD_SIZE``
        Open MPI's ``mpiexec``/``mpirun`` (ORTE up to 4.x, PRRTE in 5.x): the number of ranks in
        MPI_COMM_WORLD. ``OMPI_COMM_WORLD_RANK`` holds the rank.
    ``PMI_SIZE``
        The PMI-1/PMI-2 wire-up of MPICH's Hydra ``mpiexec`` (the ``mpich`` wheel's mpiexec included),
        Intel MPI's Hydra ``mpiexec``/``mpirun``, MVAPICH, and Slurm's ``srun --mpi=pmi2``: the job's
        size. ``PMI_RANK`` holds the rank.
    ``PMIX_RANK``
        Set for every process started by a PMIx server (Open MPI 5's ``prterun``/``mpiexec``, ``srun
        --mpi=pmix``). PMIx passes the job size through its key-value store, not the environment, so
        the size comes from ``OMPI_COMM_WORLD_SIZE`` or ``SLURM_STEP_NUM_TASKS`` when either is set, and
        is otherwise unknown until MPI is initialized.
    ``SLURM_STEP_NUM_TASKS``
        Set by ``srun`` for the tasks of a job step: the number of tasks in the step. ``sbatch`` and
        ``salloc`` do not set it, so a batch script that runs python directly is not mistaken for rank 0
        of an MPI job.
    ``SLURM_NTASKS`` with ``SLURM_PROCID``, inside a step only
        Older Slurm versions: ``SLURM_NTASKS`` (alias ``SLURM_NPROCS``) is the task count of the job
        *allocation*; ``sbatch`` sets it (and ``SLURM_PROCID=0``) in the batch script, where nothing was
        launched yet. It is believed only when ``SLURM_STEP_ID`` (or the older ``SLURM_STEPID``) names
        an ordinary step, that is a number below the reserved batch/extern/interactive step ids.
    ``MPI_LOCALNRANKS``
        Hydra (MPICH, Intel MPI) also sets this: the number of ranks *on this node*. It is a last resort,
        used only when ``PMI_SIZE`` is absent, and is the job's size only for a single-node job.
    """
    env = os.environ if environ is None else environ
    size = _env_int(env, "OMPI_COMM_WORLD_SIZE")
    if size is not None:
        return "Open MPI", size, "OMPI_COMM_WORLD_SIZE"
    size = _env_int(env, "PMI_SIZE")
    if size is not None:
        return "PMI (MPICH/Hydra, Intel MPI, srun --mpi=pmi2)", size, "PMI_SIZE"
    if "PMIX_RANK" in env:
        size = _env_int(env, "SLURM_STEP_NUM_TASKS")
        return "PMIx", size, "SLURM_STEP_NUM_TASKS" if size is not None else "PMIX_RANK"
    size = _env_int(env, "SLURM_STEP_NUM_TASKS")
    if size is not None:
        return "Slurm srun", size, "SLURM_STEP_NUM_TASKS"
    step = _env_int(env, "SLURM_STEP_ID")
    if step is None:
        step = _env_int(env, "SLURM_STEPID")
    if step is not None and 0 <= step < _SLURM_MAX_STEP_ID and "SLURM_PROCID" in env:
        for name in ("SLURM_NTASKS", "SLURM_NPROCS"):
            size = _env_int(env, name)
            if size is not None:
                return "Slurm srun", size, name
    size = _env_int(env, "MPI_LOCALNRANKS")
    if size is not None:
        return "Hydra (node-local count)", size, "MPI_LOCALNRANKS"
    return None, None, None


def launched_world_size(environ=None):
    """How many ranks the MPI job this process belongs to has: 1 when it was not started by a launcher.

    Reads environment variables only (``detect_launch`` documents each one); never imports mpi4py, so
    it is cheap and safe to call before deciding whether to use MPI at all. Returns 0 when a launcher
    is detected but does not say how many ranks it started (a bare PMIx launch): treat any value other
    than 1 as "use ``MPIComm`` and take the size from it". ``mpiexec -n 1`` returns 1, and running the
    single rank in-process gives the same results as MPI would.
    """
    launcher, size, _ = detect_launch(environ)
    if launcher is None:
        return 1
    return 0 if size is None else size


# -- the communicator -------------------------------------------------------------------------------

class _Request:
    __slots__ = ("mpi", "kind", "buf", "rank", "peer", "tag")

    def __init__(self, mpi_request, kind, buf, rank, peer, tag):
        self.mpi, self.kind, self.buf, self.rank, self.peer, self.tag = mpi_request, kind, buf, rank, peer, tag

    def describe(self):
        if self.kind == "send":
            return f"message from rank {self.rank} to rank {self.peer} with tag {self.tag} ({describe_tag(self.tag)})"
        return f"message from rank {self.peer} to rank {self.rank} with tag {self.tag} ({describe_tag(self.tag)})"


class MPIComm(Comm):
    """One rank of an MPI communicator (``MPI.COMM_WORLD`` unless another mpi4py communicator is given).

    ``wait_seconds`` is the total time this rank spent blocked in ``wait``/``waitall``/``sendrecv``;
    ``bytes_sent`` and ``messages_sent`` count the point-to-point messages it posted.
    """

    def __init__(self, comm=None, *, check_launch=True):
        super().__init__()
        MPI = _mpi()
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.wait_seconds = 0.0
        if check_launch and comm is None:
            expected = launched_world_size()
            if expected not in (0, self.size):
                launcher, _, variable = detect_launch()
                raise CommError(
                    f"rank {self.rank}: the launcher ({launcher}, {variable}) started {expected} processes, but "
                    f"MPI_COMM_WORLD has {self.size} rank(s): the mpiexec that launched this job belongs to a "
                    f"different MPI than the one mpi4py loaded ({MPI.Get_library_version().splitlines()[0].strip()}). "
                    f"Use the mpiexec installed next to this Python ({os.path.dirname(sys.executable)}) or "
                    f"rebuild mpi4py against your MPI")

    # -- point to point -----------------------------------------------------------------------------
    def _check(self, kind, buf, peer):
        device = hasattr(buf, "__cuda_array_interface__")     # a CUDA-aware MPI takes device arrays as they are
        if not (isinstance(buf, np.ndarray) or device) or not buf.flags.c_contiguous:
            raise CommError(f"rank {self.rank}: {kind} buffer must be a C-contiguous numpy array "
                            "(or a device array, for a CUDA-aware MPI)")
        if isinstance(peer, bool) or not isinstance(peer, (int, np.integer)) or not 0 <= peer < self.size:
            raise CommError(f"rank {self.rank}: peer rank {peer} is outside 0..{self.size - 1}")

    def isend(self, buf, dest, tag):
        self._check("send", buf, dest)
        self._count(buf)
        request = self.comm.Isend([buf, self.MPI.BYTE], int(dest), tag)
        return _Request(request, "send", buf, self.rank, int(dest), tag)

    def irecv(self, buf, source, tag):
        self._check("recv", buf, source)
        if isinstance(buf, np.ndarray) and not buf.flags.writeable:
            raise CommError(f"rank {self.rank}: receive buffer is read-only")
        request = self.comm.Irecv([buf, self.MPI.BYTE], int(source), tag)
        return _Request(request, "recv", buf, self.rank, int(source), tag)

    def _complete(self, req, block):
        """Run ``block(status)`` (an MPI call that completes ``req``), timed; check the received size."""
        MPI = self.MPI
        status = MPI.Status()
        t0 = time.perf_counter()
        try:
            block(status)
        except MPI.Exception as exc:
            if exc.Get_error_class() == MPI.ERR_TRUNCATE:
                raise CommError(f"{req.describe()} is larger than the {req.buf.nbytes}-byte receive buffer "
                                f"({req.buf.dtype}, shape {req.buf.shape})") from exc
            raise CommError(f"rank {self.rank}: MPI error while waiting for the {req.describe()}: "
                            f"{exc.Get_error_string()}") from exc
        finally:
            self.wait_seconds += time.perf_counter() - t0
        if req.kind == "recv":
            count = status.Get_count(MPI.BYTE)
            if count != req.buf.nbytes:
                raise CommError(f"{req.describe()} is {count} bytes, but the receive buffer is {req.buf.nbytes} "
                                f"bytes ({req.buf.dtype}, shape {req.buf.shape})")

    def wait(self, req):
        self._complete(req, req.mpi.Wait)

    def sendrecv(self, sendbuf, dest, recvbuf, source, tag):
        """Blocking exchange in one ``MPI_Sendrecv``; the whole call counts as waiting."""
        self._check("send", sendbuf, dest)
        self._check("recv", recvbuf, source)
        self._count(sendbuf)
        req = _Request(None, "recv", recvbuf, self.rank, int(source), tag)
        self._complete(req, lambda status: self.comm.Sendrecv(
            [sendbuf, self.MPI.BYTE], int(dest), tag, [recvbuf, self.MPI.BYTE], int(source), tag, status))

    # -- collectives --------------------------------------------------------------------------------
    def allgather(self, value):
        return self.comm.allgather(value)

    def node_size(self):
        """How many ranks of this communicator share this rank's node (``MPI_Comm_split_type`` with
        ``MPI_COMM_TYPE_SHARED``): the ranks that divide this node's cores among them."""
        node = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        try:
            return node.Get_size()
        finally:
            node.Free()

    def barrier(self):
        self.comm.Barrier()

    def progress(self):
        """Let MPI move pending messages along without blocking (one ``MPI_Iprobe``).

        MPI libraries without a progress thread copy a large (rendezvous) message only while one of the
        two ranks is inside an MPI call; a rank computing tiles makes no such call. The ring calls this
        after every tile, so the transfer advances during the compute. It receives nothing and changes
        no result.
        """
        self.comm.Iprobe(self.MPI.ANY_SOURCE, self.MPI.ANY_TAG)

    def abort(self, code=1):
        """End every rank of the job now (``MPI_Abort`` on COMM_WORLD)."""
        self.MPI.COMM_WORLD.Abort(code)


# -- failure handling -------------------------------------------------------------------------------

# How long the abort hook waits for the launcher to read what the failing rank wrote (``_wait_until_read``).
_READ_SECONDS = 1.0


def _wait_until_read(fd, seconds):
    """Return once the reader of the pipe ``fd`` has taken everything written to it, or after ``seconds``.

    A launcher forwards a rank's stdout and stderr through pipes that it reads in the same event loop as
    the rank's abort request, and it may act on the abort first: Hydra's ``mpiexec`` exits as soon as it
    handles an abort, so text still in the pipe, or read after the abort, is lost. Once the pipe is empty,
    the text is on its way ahead of the abort. ``FIONREAD`` on either end of a Linux pipe counts the
    unread bytes. Does nothing when ``fd`` is not a pipe (a file or a terminal is written directly).
    """
    import fcntl
    import stat
    import termios

    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return
        deadline = time.monotonic() + seconds
        unread = bytearray(4)
        while time.monotonic() < deadline:
            fcntl.ioctl(fd, termios.FIONREAD, unread)
            if not int.from_bytes(unread, sys.byteorder):
                return
            time.sleep(0.001)
    except OSError:                        # a closed or odd descriptor must not stop the abort
        pass


def install_abort_hook(comm=None):
    """Make an uncaught exception on any rank end the whole MPI job, with that rank's traceback.

    Replaces ``sys.excepthook`` (and ``threading.excepthook``) with a hook that writes ``rank R: `` and
    the traceback to stderr, flushes stdout and stderr, waits (at most ``_READ_SECONDS``) until the
    launcher has read both (``_wait_until_read``), and calls ``MPI.COMM_WORLD.Abort(1)``: the launcher
    then kills every other rank, which would otherwise wait forever for a message from the failed one.
    ``python -m mpi4py`` also aborts (without that wait); the hook makes a plain ``python`` or the
    ``ringattn`` console script behave the same. ``comm`` (an ``MPIComm`` or an mpi4py communicator,
    default COMM_WORLD) only supplies the rank for the message. Returns the previous ``sys.excepthook``.

    ``SystemExit`` does not reach an excepthook: a rank that calls ``sys.exit(n)`` alone still leaves its
    peers waiting, so exit on one rank only through an exception.
    """
    import threading

    MPI = _mpi()
    if comm is None:
        rank = MPI.COMM_WORLD.Get_rank()
    else:
        rank = comm.rank if isinstance(comm, Comm) else comm.Get_rank()
    previous = sys.excepthook

    def abort(exc_type, exc, tb):
        try:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            try:
                sys.stdout.flush()
            except Exception:              # noqa: BLE001 - a closed stdout must not stop the abort
                pass
            sys.stderr.write("".join(f"rank {rank}: {line}\n" for line in text.rstrip("\n").split("\n")))
            sys.stderr.flush()
            for fd in (1, 2):
                _wait_until_read(fd, _READ_SECONDS)
        finally:
            code = 130 if issubclass(exc_type, KeyboardInterrupt) else 1
            MPI.COMM_WORLD.Abort(code)

    def thread_abort(args):
        if args.exc_type is SystemExit:
            return
        abort(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = abort
    threading.excepthook = thread_abort
    return previous
