"""Launching small MPI jobs from the tests: the venv's own mpiexec, a timeout, and no orphans.

Every job runs in its own session (process group) so that on timeout the launcher and every rank are
killed together with ``os.killpg``; a hung job fails its test instead of hanging the suite.
"""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "mpi_scripts"
BIN = Path(sys.executable).parent              # tests run under .venv/bin/python: mpiexec lives next to it
MPIEXEC = BIN / "mpiexec"
TIMEOUT = 60.0


def missing():
    """Why MPI jobs cannot run here, or None when they can."""
    if not MPIEXEC.exists():
        return f"no mpiexec next to {sys.executable} (install the MPI extra: pip install 'ringattn[mpi]')"
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'ringattn[mpi]')"
    return None


@dataclass
class Job:
    args: list
    returncode: int
    stdout: str
    stderr: str
    elapsed: float

    def describe(self):
        return (f"$ {' '.join(map(str, self.args))}\nexit {self.returncode} after {self.elapsed:.1f} s\n"
                f"--- stdout ---\n{self.stdout[-4000:]}\n--- stderr ---\n{self.stderr[-4000:]}")


def env():
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    # Launcher variables inherited from an outer job would confuse launch detection in the ranks.
    for name in ("PMI_SIZE", "PMI_RANK", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE", "MPI_LOCALNRANKS"):
        e.pop(name, None)
    return e


def mpirun(P, *args, mpi4py=True, entry=None, timeout=TIMEOUT, cwd=None):
    """Run ``mpiexec -n P python [-m mpi4py] ARGS`` (or ``mpiexec -n P ENTRY ARGS``); return a ``Job``.

    The whole job (launcher and ranks) is killed if it runs past ``timeout`` seconds.
    """
    program = [str(entry)] if entry is not None else [sys.executable] + (["-m", "mpi4py"] if mpi4py else [])
    cmd = [str(MPIEXEC), "-n", str(P)] + program + [str(a) for a in args]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(),
                            cwd=cwd or ROOT, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        out, err = proc.communicate()
        job = Job(cmd, proc.returncode, out, err, time.monotonic() - t0)
        raise AssertionError(f"MPI job did not finish within {timeout:g} s and was killed\n{job.describe()}")
    return Job(cmd, proc.returncode, out, err, time.monotonic() - t0)


def script(name):
    return SCRIPTS / name
