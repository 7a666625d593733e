"""Moving device buffers between ranks (gpu/transport.py), with NumPy standing in for device arrays.

CI has no GPU, so the logic is tested with ``HostDevice`` (the device interface on host arrays):
* the CUDA-aware decision: each rank's vote (environment override, MPI info key, MPIX query) and the
  collective decision, including contradictory overrides;
* ``StagedComm`` (pinned, double-buffered mirrors; sends posted once their device -> host copy is done)
  and ``DirectComm`` carry the ring bit for bit, simulated and under a real ``mpiexec``, and the deferred
  sends never deadlock the synchronous-mode simulator;
* under ``mpiexec`` with the PyPI MPICH, which cannot read device memory, the decision is "staged", and
  ranks that disagree on ``RINGATTN_CUDA_AWARE`` all stop with the same error.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import make_dout, make_qkv
from mpi_helpers import MPIEXEC, ROOT, env, missing, mpirun

import refimpl
from gpu.transport import (ENV, Decision, DirectComm, HostDevice, StagedComm, Vote, decide, vote)
from refimpl.engine import NumpyEngine

HERE = ROOT / "tests" / "gpu"
needs_mpi = pytest.mark.skipif(missing() is not None, reason=str(missing()))


# -- the decision ---------------------------------------------------------------------------------

def test_environment_override_wins():
    assert vote({ENV: "1"}, "mpi,system", lambda: 0) == Vote(True, f"{ENV}=1", forced=True)
    assert vote({ENV: " 0 "}, "system,cuda", lambda: 1) == Vote(False, f"{ENV}=0", forced=True)


@pytest.mark.parametrize("value", ["yes", "2", "", "true"])
def test_bad_override_names_the_variable(value):
    with pytest.raises(ValueError, match=f"{ENV} must be 0 or 1"):
        vote({ENV: value}, None, None)


def test_info_key_then_mpix_query():
    assert vote({}, "system,mpi,cuda:device", None).yes
    v = vote({}, "mpi,system", lambda: 1)
    assert v.yes and "MPIX_Query_cuda_support() = 1" in v.reason
    v = vote({}, "mpi,system", lambda: 0)
    assert not v.yes and "has no cuda" in v.reason and "MPIX_Query_cuda_support() = 0" in v.reason
    v = vote({}, None, None)
    assert not v.yes and "no mpi_memory_alloc_kinds" in v.reason and "no MPIX_Query_cuda_support" in v.reason


def test_decision_needs_every_rank():
    yes, no = Vote(True, "info says cuda"), Vote(False, "MPIX_Query_cuda_support() = 0")
    assert decide([yes, yes]).path == "cuda-aware"
    d = decide([yes, no, yes])
    assert d.path == "staged" and d.reason == "rank 1: MPIX_Query_cuda_support() = 0"
    assert decide([no, no]).reason == "every rank: MPIX_Query_cuda_support() = 0"
    forced_yes, forced_no = Vote(True, f"{ENV}=1", True), Vote(False, f"{ENV}=0", True)
    assert decide([forced_yes, yes]).path == "cuda-aware"
    with pytest.raises(ValueError, match=f"ranks disagree on {ENV}: rank 0: {ENV}=1, rank 1: {ENV}=0"):
        decide([forced_yes, forced_no])


# -- the ring through the wrappers, simulated ---------------------------------------------------------

def _engine(kind):
    """NumpyEngine whose messages go through ``kind`` with HostDevice, and which keeps its comm."""
    class Wrapped(NumpyEngine):
        comms = []

        def wrap(self, comm):
            wrapped = kind(comm, HostDevice(), Decision(kind.__name__, "test"))
            Wrapped.comms.append(wrapped)
            return wrapped
    return Wrapped


@pytest.mark.parametrize("kind", [StagedComm, DirectComm])
@pytest.mark.parametrize("P", [1, 2, 3, 5])
def test_wrapped_ring_is_bitwise_the_plain_ring(rng, kind, P):
    q, k, v = make_qkv(rng, B=2, N=37, Hq=4, Hkv=2, D=8, dtype=np.float32)
    dout = make_dout(rng, q)
    options = dict(ranks=P, causal=True, dout=dout, block_q=8, block_k=8, timeout=20.0)
    plain = refimpl.simulate_ring(q, k, v, **options)
    engine = _engine(kind)
    wrapped = refimpl.simulate_ring(q, k, v, engine=engine, **options)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert np.array_equal(getattr(wrapped, name), getattr(plain, name)), name
    assert wrapped.bytes_sent == plain.bytes_sent
    if kind is StagedComm:
        buffer = 2 * 2 * -(-37 // P) * 2 * 8 * 4           # one packed (2, B, n_max, Hkv, D) float32 buffer
        for comm in engine.comms:
            assert len(comm._mirrors) <= 4, "two K/V and two dK/dV mirrors: double buffered"
            assert all(m.nbytes <= buffer for m in comm._mirrors.values())
            assert not comm._unposted


class _SlowCopies(HostDevice):
    """Copies that finish only when waited on: sends stay unposted until some wait forces them."""

    @staticmethod
    def to_host(dst, src):
        return [False, dst, src]

    @staticmethod
    def done(event):
        return event is None or event[0]

    @staticmethod
    def wait(event):
        if event is not None and not event[0]:
            HostDevice.to_host(event[1], event[2])
            event[0] = True


def test_unfinished_copies_never_deadlock_the_synchronous_world(rng):
    q, k, v = make_qkv(rng, B=1, N=24, Hq=2, D=4)
    dout = make_dout(rng, q)

    class Slow(NumpyEngine):
        def wrap(self, comm):
            return StagedComm(comm, _SlowCopies(), Decision("staged", "test"))

    got = refimpl.simulate_ring(q, k, v, ranks=4, causal=False, dout=dout, block_q=4, block_k=4, engine=Slow,
                                timeout=20.0)
    ref = refimpl.simulate_ring(q, k, v, ranks=4, causal=False, dout=dout, block_q=4, block_k=4)
    for name in ("out", "dq", "dk", "dv"):
        assert np.array_equal(getattr(got, name), getattr(ref, name))


# -- under mpiexec ------------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("P", [2, 3])
def test_staged_ring_under_mpiexec_is_bitwise_the_simulation(tmp_path, rng, P):
    q, k, v = make_qkv(rng, B=1, N=45, Hq=4, Hkv=2, D=8, dtype=np.float32)
    dout = make_dout(rng, q)
    np.savez(tmp_path / "inputs.npz", q=q, k=k, v=v, dout=dout)
    job = mpirun(P, HERE / "mpi_staged.py", tmp_path)
    assert job.returncode == 0, job.describe()
    ref = refimpl.simulate_ring(q, k, v, ranks=P, causal=True, dout=dout, block_q=16, block_k=8)
    report = json.loads((tmp_path / "decision.json").read_text())
    assert report["path"] == "staged", report
    assert "MPIX_Query_cuda_support" in report["reason"] or "mpi_memory_alloc_kinds" in report["reason"]
    layout = refimpl.layouts.Contiguous(45, P)
    for name in ("out", "lse", "dq", "dk", "dv"):
        got = layout.unshard([np.load(tmp_path / f"rank{r}.npz")[name] for r in range(P)], axis=2 if name == "lse" else 1)
        assert np.array_equal(got, getattr(ref, name)), name


@needs_mpi
def test_ranks_that_disagree_on_the_override_all_stop(tmp_path):
    script = [sys.executable, "-m", "mpi4py", str(HERE / "mpi_staged.py"), str(tmp_path)]
    cmd = [str(MPIEXEC), "-n", "1", "-env", ENV, "1"] + script + [":", "-n", "1", "-env", ENV, "0"] + script
    t0 = time.monotonic()
    job = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=60)
    assert job.returncode != 0 and time.monotonic() - t0 < 30
    assert f"ranks disagree on {ENV}: rank 0: {ENV}=1, rank 1: {ENV}=0" in job.stderr, job.stderr[-3000:]
