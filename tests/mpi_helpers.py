"""Launching small MPI jobs from the tests: the venv's own mpiexec, a timeout, and no orphans.

Every job runs in its own session (process group) and carries a marker in its environment
(``RINGATTN_TEST_JOB``), which the launcher passes on to every process it starts. Hydra puts each rank
in a session of its own, so the marker, not the process group, is how the tests find every process of a
job (``job_processes``, from ``/proc``): to kill one rank on purpose, to check that none outlives the job,
and to kill them all if the job hangs, so that a hung job fails its test instead of hanging the suite.

Times are ``time.monotonic()``, which on Linux is ``CLOCK_MONOTONIC``: one clock for every process of the
machine, so a rank can stamp a moment that the test compares with its own.
"""

import importlib.util
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
BIN = Path(sys.executable).parent              # tests run under .venv/bin/python: mpiexec lives next to it
MPIEXEC = BIN / "mpiexec"
TIMEOUT = 60.0
MARKER = "RINGATTN_TEST_JOB"
LINGER = 10.0                                  # seconds a process may outlive its launcher before it is an orphan


def missing():
    """Why MPI jobs cannot run here, or None when they can."""
    if not MPIEXEC.exists():
        return f"no mpiexec next to {sys.executable} (install the MPI extra: pip install 'ringattn[mpi]')"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'ringattn[mpi]')"
    return None


@dataclass
class Job:
    """A finished job: ``elapsed`` seconds from its start until the launcher exited, ``ended`` until every
    process of the job had exited (``ended_at``: that moment on the ``time.monotonic()`` clock)."""
    args: list
    returncode: int
    stdout: str
    stderr: str
    elapsed: float
    ended: float
    ended_at: float

    def describe(self):
        return (f"$ {' '.join(map(str, self.args))}\nexit {self.returncode} after {self.elapsed:.1f} s "
                f"(last process gone after {self.ended:.1f} s)\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


def env(marker=None):
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    # Launcher variables inherited from an outer job would confuse launch detection in the ranks.
    for name in ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        e.pop(name, None)
    if marker is not None:
        e[MARKER] = marker
    return e


def job_processes(marker):
    """The live processes of the job with ``marker``: {pid: its rank (``PMI_RANK``), or None for the
    launcher and its proxy}. Empty where there is no ``/proc``; an exited process (a zombie) has no
    environment left, so it is not listed."""
    tag, found = f"{MARKER}={marker}".encode(), {}
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                variables = f.read().split(b"\0")
        except OSError:                        # gone meanwhile, or another user's
            continue
        if tag in variables:
            rank = [v for v in variables if v.startswith(b"PMI_RANK=")]
            found[pid] = int(rank[0].split(b"=", 1)[1]) if rank else None
    return found


class Running:
    """A job started by ``start``: ``proc`` is the launcher, ``marker`` finds its processes."""

    def __init__(self, cmd, cwd):
        self.cmd, self.marker, self.early_stderr = cmd, uuid.uuid4().hex, ""
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env(self.marker), cwd=cwd or ROOT, start_new_session=True)

    def processes(self):
        return job_processes(self.marker)

    def wait_for_stderr(self, timeout):
        """Block until the job writes to stderr (or ``timeout`` s pass); True if it did. What was read is
        kept for the ``Job``."""
        ready, _, _ = select.select([self.proc.stderr], [], [], timeout)
        if ready:
            self.early_stderr += os.read(self.proc.stderr.fileno(), 65536).decode(errors="replace")
        return bool(ready)

    def kill_all(self):
        """SIGKILL the launcher's process group and every process of the job."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def command(P, args, mpi4py=True, entry=None):
    program = [str(entry)] if entry is not None else [sys.executable] + (["-m", "mpi4py"] if mpi4py else [])
    return [str(MPIEXEC), "-n", str(P)] + program + [str(a) for a in args]


def start(P, *args, mpi4py=True, entry=None, cwd=None):
    """Start ``mpiexec -n P python [-m mpi4py] ARGS`` (or ``mpiexec -n P ENTRY ARGS``); ``finish`` it."""
    return Running(command(P, args, mpi4py, entry), cwd)


def finish(job, timeout=TIMEOUT):
    """Wait for a started job; return a ``Job``. Fails (AssertionError) if the launcher runs past ``timeout``
    seconds from the start, or a process of the job outlives the launcher by ``LINGER`` seconds; either way
    every process of the job is killed first."""
    try:
        out, err = job.proc.communicate(timeout=max(0.0, job.started + timeout - time.monotonic()))
    except subprocess.TimeoutExpired:
        job.kill_all()
        out, err = job.proc.communicate()
        now = time.monotonic()
        done = Job(job.cmd, job.proc.returncode, out, job.early_stderr + err, now - job.started, now - job.started, now)
        raise AssertionError(f"MPI job did not finish within {timeout:g} s and was killed\n{done.describe()}")
    exited = time.monotonic()
    while (left := job.processes()) and time.monotonic() < exited + LINGER:
        time.sleep(0.005)
    now = time.monotonic()
    done = Job(job.cmd, job.proc.returncode, out, job.early_stderr + err, exited - job.started, now - job.started, now)
    if left:
        job.kill_all()
        raise AssertionError(f"processes {sorted(left)} of the job outlived its launcher by {LINGER:g} s and were "
                             f"killed\n{done.describe()}")
    return done


def mpirun(P, *args, mpi4py=True, entry=None, timeout=TIMEOUT, cwd=None):
    """Run ``mpiexec -n P python [-m mpi4py] ARGS`` (or ``mpiexec -n P ENTRY ARGS``); return a ``Job``.

    The whole job (launcher and ranks) is killed if it runs past ``timeout`` seconds.
    """
    return finish(start(P, *args, mpi4py=mpi4py, entry=entry, cwd=cwd), timeout)


def script(name):
    return SCRIPTS / name
