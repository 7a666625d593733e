"""BLAS threads per rank: every rank gets its share of the cores, not a whole thread pool of its own.

A BLAS library starts as many threads as the machine has cores. When P ranks share those cores (P
simulated ranks in one process, or P MPI processes on one node), each rank's matrix products then
start a full pool, and P pools fight over the same cores: on 2 cores, 4 simulated ranks ran 5x slower
and `mpiexec -n 2` 10x slower than with one thread each. So each rank gets

    threads = max(1, min(pool, cores // ranks_sharing))

where ``cores`` are the cores this process may run on (its CPU affinity), ``ranks_sharing`` the ranks
that share them (P for simulated ranks; under MPI the ranks on this node, or 1 when the launcher has
bound this process to a subset of the node's cores, as ``srun --cpus-per-task`` and ``mpiexec -bind-to``
do: those cores are this rank's alone, ``bound_by_launcher``), and ``pool`` the size of the
BLAS pool as the process started, so ``OPENBLAS_NUM_THREADS=1`` (or ``OMP_NUM_THREADS``) set by the user
is never exceeded. ``--threads N``, or the environment variable ``RINGATTN_THREADS``, overrides the
share. The BLAS pool is process-wide: simulated ranks, which are threads of one process, all use the same
setting. ``threadpoolctl`` sets it for the duration of a run and restores it afterwards.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass

from threadpoolctl import threadpool_info, threadpool_limits

ENV = "RINGATTN_THREADS"


def available_cores():
    """Cores this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:                       # macOS, Windows: no affinity API
        return os.cpu_count() or 1


def bound_by_launcher():
    """Whether this process may run on fewer cores than the machine has: a launcher bound it to its own."""
    return available_cores() < (os.cpu_count() or 1)


def blas_pool():
    """Threads of the largest BLAS pool loaded now (1 if NumPy's BLAS reports none)."""
    return max([lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"], default=1)


@dataclass(frozen=True)
class Threads:
    """How many BLAS threads each rank uses, and why (printed in the run's report)."""
    per_rank: int
    reason: str


def choose(ranks_sharing, override=None, environ=None):
    """The BLAS threads of each of ``ranks_sharing`` ranks on this machine; ``override`` (--threads) first,
    then ``RINGATTN_THREADS``, then the share of the cores. A bad override is a ValueError naming it."""
    env = os.environ if environ is None else environ
    if override is not None:
        return Threads(_positive("--threads", override), "--threads")
    if env.get(ENV, "").strip():
        return Threads(_positive(ENV, env[ENV]), ENV)
    cores, pool = available_cores(), blas_pool()
    share = max(1, min(pool, cores // max(1, ranks_sharing)))
    return Threads(share, f"{cores} cores shared by {ranks_sharing} rank(s), BLAS pool {pool}")


def _positive(name, value):
    try:
        n = int(str(value).strip())
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{name} must be a positive number of threads, got {value!r}")
    return n


@contextmanager
def limited(threads):
    """Run the body with every BLAS pool of the process at ``threads.per_rank`` threads."""
    with threadpool_limits(limits=threads.per_rank, user_api="blas"):
        yield threads
