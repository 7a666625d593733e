"""The GPU engine under a real ``mpiexec -n 2`` on one GPU: both ranks share the device (device choice by
node-local rank), messages staged through pinned host buffers (the PyPI MPICH cannot read device memory),
and, forced with RINGATTN_CUDA_AWARE=1 on managed memory, through the CUDA-aware path. Both must give the
bits of the simulated ring on the same GPU: the kernels are deterministic and the messages exact.
"""

import json
import os

import numpy as np
import pytest

from gpu_helpers import gpu_missing, inputs, needs_gpu, to_host
from mpi_helpers import BIN, ROOT, missing, mpirun

import refimpl
from refimpl.layouts import Contiguous

pytestmark = [needs_gpu, pytest.mark.skipif(missing() is not None, reason=str(missing()))]
HERE = ROOT / "tests" / "gpu"


def _run(tmp_path, rng, extra_env):
    q, k, v, dout = inputs(rng, "bfloat16", B=1, N=333, Hq=4, Hkv=2, D=64)
    np.savez(tmp_path / "inputs.npz", **{n: x.view(np.uint16) for n, x in zip("q k v dout".split(), (q, k, v, dout))},
             causal=True, block_q=96, block_k=80)
    saved = {name: os.environ.get(name) for name in extra_env}
    os.environ.update(extra_env)
    try:
        job = mpirun(2, HERE / "mpi_gpu_ring.py", tmp_path, timeout=180)
    finally:
        for name, value in saved.items():
            os.environ.pop(name) if value is None else os.environ.__setitem__(name, value)
    assert job.returncode == 0, job.describe()
    from gpu.engine import CupyEngine
    ref = refimpl.simulate_ring(q, k, v, ranks=2, causal=True, dout=dout, block_q=96, block_k=80, engine=CupyEngine)
    layout = Contiguous(333, 2)
    for name in ("out", "lse", "dq", "dk", "dv"):
        parts = [np.load(tmp_path / f"rank{r}.npz")[name] for r in range(2)]
        got = layout.unshard(parts, axis=2 if name == "lse" else 1)
        want = to_host(getattr(ref, name))
        assert np.array_equal(got, want.view(np.uint16) if want.dtype.itemsize == 2 else want), name
    return json.loads((tmp_path / "decision.json").read_text())


def test_staged_on_one_shared_gpu(tmp_path, rng):
    decision = _run(tmp_path, rng, {})
    assert decision["path"] == "staged" and decision["local_size"] == 2, decision


def test_cuda_aware_path_on_managed_memory(tmp_path, rng):
    decision = _run(tmp_path, rng, {"RINGATTN_CUDA_AWARE": "1", "RINGATTN_TEST_MANAGED": "1"})
    assert decision["path"] == "cuda-aware" and "RINGATTN_CUDA_AWARE=1" in decision["reason"], decision


def test_command_line_on_gpu_under_mpiexec():
    job = mpirun(2, "-m", "refimpl", "run", "--device", "gpu", "--seq", "1000", "--heads", "4", "--kv-heads", "2",
                 "--dim", "64", "--dtype", "bf16", "--backward", "--check", "--json", "--block-q", "128",
                 "--block-k", "128", timeout=180)
    assert job.returncode == 0, job.describe()
    summary = json.loads(job.stdout.strip().splitlines()[-1])
    assert summary["check"]["passed"] and summary["engine"] == "gpu" and summary["messages"]["path"] == "staged"
