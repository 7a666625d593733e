"""BLAS threads per rank (refimpl/threads.py): each rank gets its share of the cores, the user can override it."""

import json

import pytest
from threadpoolctl import threadpool_info

from mpi_helpers import missing, mpirun
from refimpl import cli, threads

needs_mpi = pytest.mark.skipif(missing() is not None, reason=str(missing()))


def test_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 16)
    monkeypatch.setattr(threads, "blas_pool", lambda: 16)
    assert threads.choose(4, environ={}).per_rank == 4
    assert threads.choose(5, environ={}).per_rank == 3
    assert threads.choose(64, environ={}).per_rank == 1
    monkeypatch.setattr(threads, "blas_pool", lambda: 2)        # OPENBLAS_NUM_THREADS=2 at start: never more
    assert threads.choose(1, environ={}).per_rank == 2


def test_a_bound_process_owns_its_cores(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 32)
    assert threads.bound_by_launcher()
    monkeypatch.setattr(threads, "available_cores", lambda: 32)
    assert not threads.bound_by_launcher()


def test_overrides():
    assert threads.choose(4, 3, environ={threads.ENV: "5"}) == threads.Threads(3, "--threads")
    assert threads.choose(4, environ={threads.ENV: " 5 "}) == threads.Threads(5, threads.ENV)
    with pytest.raises(ValueError, match=f"{threads.ENV} must be a positive number of threads, got 'x'"):
        threads.choose(4, environ={threads.ENV: "x"})
    with pytest.raises(ValueError, match="--threads must be a positive number of threads, got 0"):
        threads.choose(4, 0, environ={})


def test_limited_sets_and_restores_the_pool():
    before = [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]
    with threads.limited(threads.Threads(1, "test")):
        assert all(lib["num_threads"] == 1 for lib in threadpool_info() if lib["user_api"] == "blas")
    assert [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"] == before


def test_the_run_reports_its_threads(capsys, monkeypatch):
    monkeypatch.setenv(threads.ENV, "1")
    assert cli.main(["run", "--json", "--no-progress", "--seq", "64", "--heads", "2", "--dim", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["threads"] == {"per_rank": 1, "reason": threads.ENV}
    monkeypatch.setenv(threads.ENV, "-2")
    with pytest.raises(SystemExit):
        cli.main(["run", "--no-progress", "--seq", "64"])
    assert f"{threads.ENV} must be a positive number" in capsys.readouterr().err


@needs_mpi
def test_mpi_ranks_share_the_node():
    """Two ranks on this node: each gets half of this process's cores (at least one)."""
    job = mpirun(2, "-m", "refimpl", "run", "--seq", "64", "--heads", "2", "--dim", "4", "--json")
    assert job.returncode == 0, job.describe()
    reason = json.loads(job.stdout)["threads"]["reason"]
    assert "shared by 2 rank(s)" in reason, reason
