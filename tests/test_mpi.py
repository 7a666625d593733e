"""The MPI transport: real ``mpiexec -n P`` jobs, P = 1..4, oversubscribed on a small machine.

Each job is a subprocess of the venv's own ``mpiexec`` running the venv's python with ``-m mpi4py`` (an
uncaught exception on any rank aborts the whole job), with one BLAS thread, a timeout, and every process
of the job killed if the timeout expires or if one outlives the launcher (``mpi_helpers.mpirun``). The
scripts the jobs run are in ``tests/mpi_scripts``.

What is checked:
* ``MPIComm``: a double-buffered ring shift of every dtype, byte counts, collectives, buffer checks, and a
  message whose size differs from the receive buffer (``comm_check.py``);
* ring attention forward and backward under MPI against the float64 oracle, and *bitwise* against
  ``simulate_ring`` with the same P, inputs and block sizes, for out, lse, dq, dk, dv (``ring_check.py``);
* failures end the job quickly, non-zero, with the failing rank's message: an exception on one rank in
  the middle of the ring (under ``python -m mpi4py`` and under plain python with ``install_abort_hook``),
  and bad input that is rejected collectively (NaN, a mismatched shard length or dtype, P > N)
  (``fail_check.py``); after an exception, and after a rank of ``ringattn run`` is killed, every process
  of the job is gone within ``END_SECONDS`` (``specs/protocol.md``, "What ends a job");
* ``launched_world_size`` on the environments of the common launchers, without MPI, and the error when the
  launcher and mpi4py's MPI library disagree on the world size;
* the command line under ``mpiexec`` (``python -m mpi4py -m refimpl run`` and the ``ringattn`` script):
  checked, bitwise equal to its own simulated run, and failing cleanly on P > N and mismatched shard files.
"""

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import assert_fp64_close, make_dout, make_qkv, rel_err
from mpi_helpers import BIN, MPIEXEC, Running, finish, missing, mpirun, script, start

import refimpl
from refimpl.schedule import describe_tag

RANKS = (1, 2, 3, 4)
BIN_RINGATTN = BIN / "ringattn"
FAIL_SECONDS = 20.0    # from the start of a failing job until its last process exited
# From a failure (an exception on a rank, or a rank killed) until every process of the job has exited.
# Measured with mpich 5.0.2's Hydra on 2 cores, idle and with both cores kept busy (8 runs each): medians
# 0.02-0.18 s, at most 0.36 s, after an exception or a SIGKILL. Nothing in these paths waits on a timer
# except the abort hook, at most _READ_SECONDS (1 s) for the launcher to read the rank's message.
END_SECONDS = 5.0

needs_mpi = pytest.mark.skipif(missing() is not None, reason=str(missing()))


# -- launch detection (no MPI needed) -----------------------------------------------------------------

LAUNCH_ENVIRONMENTS = [
    ({}, 1),
    ({"PMI_SIZE": "4", "PMI_RANK": "2", "MPI_LOCALNRANKS": "4"}, 4),                  # MPICH / Intel Hydra
    ({"OMPI_COMM_WORLD_SIZE": "3", "OMPI_COMM_WORLD_RANK": "0", "PMIX_RANK": "0"}, 3),  # Open MPI 5
    ({"OMPI_COMM_WORLD_SIZE": "2", "SLURM_NTASKS": "8", "SLURM_PROCID": "0"}, 2),      # mpiexec in sbatch
    ({"PMIX_RANK": "1", "SLURM_STEP_NUM_TASKS": "6", "SLURM_STEP_ID": "0"}, 6),       # srun --mpi=pmix
    ({"PMIX_RANK": "0"}, 0),                                                          # bare PMIx: unknown
    ({"SLURM_STEP_NUM_TASKS": "5", "SLURM_PROCID": "3", "SLURM_STEP_ID": "1"}, 5),    # srun
    ({"SLURM_NTASKS": "7", "SLURM_PROCID": "2", "SLURM_STEP_ID": "0"}, 7),            # srun, old Slurm
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_JOB_ID": "12"}, 1),             # sbatch script
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "0", "SLURM_STEP_ID": "4294967294"}, 1),    # batch step
    ({"MPI_LOCALNRANKS": "2"}, 2),                                                    # Hydra, node-local
]


@pytest.mark.parametrize("environ, size", LAUNCH_ENVIRONMENTS)
def test_launched_world_size(environ, size):
    mpi = pytest.importorskip("refimpl.comm.mpi", reason="mpi4py is not installed")
    assert mpi.launched_world_size(environ) == size


def test_launch_detection_does_not_initialize_mpi():
    code = ("import sys; from refimpl.comm.mpi import launched_world_size; n = launched_world_size(); "
            "assert 'mpi4py.MPI' not in sys.modules, 'mpi4py.MPI was imported'; print(n)")
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "SLURM_"))}
    env.pop("MPI_LOCALNRANKS", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1"


@needs_mpi
def test_wrong_launcher_is_reported():
    """A launcher of another MPI (here: Open MPI's variables, MPICH's library) starts singletons: say so."""
    code = "from refimpl.comm.mpi import MPIComm; MPIComm()"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "OMPI_", "SLURM_"))}
    env.update(OMPI_COMM_WORLD_SIZE="3", OMPI_COMM_WORLD_RANK="1")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0
    assert "started 3 processes, but MPI_COMM_WORLD has 1 rank(s)" in done.stderr, done.stderr


# -- the communicator ---------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("P", RANKS)
def test_comm(P):
    job = mpirun(P, script("comm_check.py"))
    assert job.returncode == 0, job.describe()
    for r in range(P):
        assert f"comm ok rank {r} of {P}" in job.stdout, job.describe()


# -- ring attention under MPI -------------------------------------------------------------------------

# name, dtype, (B, N, Hq, Hkv, D), causal, block_q, block_k, scale
CASES = [
    ("full", np.float64, (2, 24, 2, 2, 8), False, 4, 8, None),
    ("causal_odd", np.float64, (1, 37, 2, 2, 8), True, 4, 3, None),
    ("gqa_causal", np.float64, (1, 30, 4, 2, 8), True, 8, 5, 0.3),
    ("gqa_mqa_odd", np.float64, (2, 23, 3, 1, 5), False, 3, 4, None),
    ("fp32_causal_gqa", np.float32, (1, 29, 4, 2, 16), True, 4, 8, None),
]
CASE_NAMES = [c[0] for c in CASES]


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(20240611)
    data = {}
    for name, dtype, (B, N, Hq, Hkv, D), causal, bq, bk, scale in CASES:
        q, k, v = make_qkv(rng, B=B, N=N, Hq=Hq, Hkv=Hkv, D=D, dtype=dtype)
        data[name] = dict(q=q, k=k, v=v, dout=make_dout(rng, q),
                          options=dict(causal=causal, block_q=bq, block_k=bk, scale=scale))
    return data


@pytest.fixture(scope="module")
def mpi_runs(inputs, tmp_path_factory):
    """One ``mpiexec -n P ring_check.py`` job per P, run on first use; every case in one job."""
    runs = {}

    def get(P):
        if P not in runs:
            directory = tmp_path_factory.mktemp(f"ring_p{P}")
            (directory / "cases.json").write_text(json.dumps(
                [dict(name=name, **d["options"]) for name, d in inputs.items()]))
            for name, d in inputs.items():
                np.savez(directory / f"{name}.npz", q=d["q"], k=d["k"], v=d["v"], dout=d["dout"])
            job = mpirun(P, script("ring_check.py"), directory)
            assert job.returncode == 0, job.describe()
            results = {}
            for name in inputs:
                shards = [dict(np.load(directory / f"{name}.rank{r}.npz")) for r in range(P)]
                results[name] = shards
            runs[P] = results
        return runs[P]

    return get


def _gather(shards):
    """Rank shards (contiguous layout) -> natural order; lse's sequence axis is 2, the rest 1."""
    return {key: np.concatenate([s[key] for s in shards], axis=2 if key == "lse" else 1)
            for key in ("out", "lse", "dq", "dk", "dv")}


@needs_mpi
@pytest.mark.parametrize("P", RANKS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_ring_matches_oracle(P, name, inputs, mpi_runs):
    d = inputs[name]
    got = _gather(mpi_runs(P)[name])
    causal, scale = d["options"]["causal"], d["options"]["scale"]
    out, lse = refimpl.naive_attention(d["q"], d["k"], d["v"], causal=causal, scale=scale)
    dq, dk, dv = refimpl.naive_attention_backward(d["q"], d["k"], d["v"], d["dout"], causal=causal, scale=scale)
    expected = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    for key, ref in expected.items():
        if d["q"].dtype == np.float64:
            assert_fp64_close(got[key], ref, f"{name} P={P} {key}")
        else:
            err = rel_err(got[key], ref)
            assert err <= 1e-5, f"{name} P={P} {key}: relative error {err:.2e}"


@needs_mpi
@pytest.mark.parametrize("P", RANKS)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_ring_bitwise_equals_simulation(P, name, inputs, mpi_runs):
    d = inputs[name]
    got = _gather(mpi_runs(P)[name])
    sim = refimpl.simulate_ring(d["q"], d["k"], d["v"], ranks=P, dout=d["dout"], **d["options"])
    for key in ("out", "lse", "dq", "dk", "dv"):
        expected = getattr(sim, key)
        assert got[key].dtype == expected.dtype and got[key].shape == expected.shape, key
        assert np.array_equal(got[key], expected), (
            f"{name} P={P}: {key} differs from simulate_ring "
            f"(max abs diff {np.max(np.abs(got[key].astype(np.float64) - expected)):.3e})")


@needs_mpi
@pytest.mark.parametrize("P", RANKS)
def test_ring_counts_bytes_per_step(P, inputs, mpi_runs):
    """Only KV heads travel; every step's bytes are in the trace, and they add up to what MPIComm sent."""
    for name, shards in mpi_runs(P).items():
        d = inputs[name]
        B, N, Hkv, D = d["k"].shape
        item = d["k"].dtype.itemsize
        acc = 8 if d["k"].dtype == np.float64 else 4
        lengths = [len(a) for a in np.array_split(np.arange(N), P)]
        for r, s in enumerate(shards):
            assert int(s["bytes_sent"]) == int(s["trace_bytes"].sum()), (name, r)
            # forward: P-1 K/V hops; backward: P-1 K/V hops and P dK/dV hops (accumulation dtype)
            kv = [2 * B * lengths[(r - t) % P] * Hkv * D for t in range(P)]
            expected = sum(kv[:-1]) * item * 2 + sum(kv) * acc
            assert int(s["bytes_sent"]) == expected, (name, r, int(s["bytes_sent"]), expected)
            assert (s["trace_wait"] >= 0).all()


# -- failures -----------------------------------------------------------------------------------------

def _assert_failed(job, *messages):
    assert job.returncode != 0, job.describe()
    assert job.ended < FAIL_SECONDS, f"the failing job took {job.ended:.1f} s\n{job.describe()}"
    for message in messages:
        assert message in job.stderr, f"{message!r} not in stderr\n{job.describe()}"


def _assert_ended_soon_after_raise(job):
    """fail_check.py's raise mode stamps the moment rank 1 raised (time.monotonic(): one clock per machine)."""
    raised = re.search(r"deliberate failure on rank 1 in ring step 1 \(monotonic clock ([0-9.]+)\)", job.stderr)
    assert raised, job.describe()
    seconds = job.ended_at - float(raised.group(1))
    assert seconds < END_SECONDS, f"the last process exited {seconds:.2f} s after the exception\n{job.describe()}"


@needs_mpi
@pytest.mark.parametrize("P", [2, 4])
def test_exception_on_one_rank_aborts_the_job(P):
    """Rank 1 raises in ring step 1 while the others wait for its messages: python -m mpi4py aborts everyone."""
    job = mpirun(P, script("fail_check.py"), "raise")
    _assert_failed(job, "RuntimeError: deliberate failure on rank 1")
    _assert_ended_soon_after_raise(job)


@needs_mpi
def test_abort_hook_under_plain_python():
    """Without -m mpi4py, install_abort_hook does the same, and names the rank on every line.

    Its message must arrive even on a loaded machine, where Hydra's proxy may find the text and the
    abort request waiting together and forward the abort first (see ``comm.mpi._wait_until_read``).
    """
    job = mpirun(3, script("fail_check.py"), "raise", "hook", mpi4py=False)
    _assert_failed(job, "rank 1: RuntimeError: deliberate failure on rank 1", "rank 1: Traceback")
    _assert_ended_soon_after_raise(job)


def test_abort_hook_waits_until_the_pipe_is_read(tmp_path):
    """The hook's wait: returns once the pipe's reader took the text, gives up after its limit, and does
    not wait on a file."""
    mpi = pytest.importorskip("refimpl.comm.mpi", reason="mpi4py is not installed")
    r, w = os.pipe()
    try:
        os.write(w, b"rank 1: text")
        t0 = time.monotonic()
        mpi._wait_until_read(w, 0.2)                  # nobody reads: gives up after 0.2 s
        assert 0.2 <= time.monotonic() - t0 < 2.0
        reader = threading.Timer(0.1, os.read, (r, 100))
        t0 = time.monotonic()
        reader.start()
        mpi._wait_until_read(w, 10.0)                 # returns once the reader took the text
        waited = time.monotonic() - t0
        reader.join()
        assert 0.1 <= waited < 5.0
    finally:
        os.close(r)
        os.close(w)
    with open(tmp_path / "err.txt", "wb") as f:
        f.write(b"rank 1: text")
        f.flush()
        t0 = time.monotonic()
        mpi._wait_until_read(f.fileno(), 10.0)
        assert time.monotonic() - t0 < 1.0


@needs_mpi
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds the ranks' processes in /proc")
@pytest.mark.parametrize("P, victim", [(2, 1), (3, 0)])
def test_killed_rank_ends_the_job(P, victim):
    """SIGKILL one rank of ``ringattn run`` in the middle of the ring: the launcher tears the job down, and
    every process of it is gone within END_SECONDS."""
    # Far longer than 2 s on any CPU; rank 0 draws its progress bar once the run has lasted 2 s, so the
    # first output on stderr means the ranks are inside the ring.
    job = start(P, "run", "--seq", "16384", "--backward", "--progress", "--json", mpi4py=False, entry=BIN_RINGATTN)
    try:
        assert job.wait_for_stderr(60), "no progress bar within 60 s"
        ranks = {rank: pid for pid, rank in job.processes().items() if rank is not None}
        assert sorted(ranks) == list(range(P)), ranks
        os.kill(ranks[victim], signal.SIGKILL)
        killed = time.monotonic()
    except BaseException:
        job.kill_all()
        raise
    done = finish(job)
    assert done.returncode != 0, done.describe()
    seconds = done.ended_at - killed
    assert seconds < END_SECONDS, f"the last process exited {seconds:.2f} s after the kill\n{done.describe()}"


# mode, P, fragments of the message every rank must raise (fragments, so that rewording stays possible)
BAD_INPUT = [
    ("nan", 3, ("rank 1: q contains non-finite values", "(0, 0, 0, 0)")),
    ("length", 4, ("rank 1 holds 6 tokens", "N=19", "gives it 5")),
    ("length", 2, ("rank 0 holds 5 tokens", "N=11", "gives it 6")),
    ("dtype", 2, ("ranks disagree on (B, Hq, Hkv, D, dtype", "rank 0: (1, 2, 2, 4, '<f8'",
                  "rank 1: (1, 2, 2, 4, '<f4'")),
    ("empty", 4, ("rank 3: q, k and v must have non-empty dimensions",)),
]


@needs_mpi
@pytest.mark.parametrize("mode, P, fragments", BAD_INPUT)
def test_bad_input_is_rejected_collectively(mode, P, fragments, tmp_path):
    """Every rank raises the same ValueError, so even plain python (no abort on error) cannot hang.

    Run without ``-m mpi4py`` and without the abort hook: had only the rank with the bad shard raised,
    the others would wait for it forever and the job would time out.
    """
    job = mpirun(P, script("fail_check.py"), mode, f"errors={tmp_path}", mpi4py=False, timeout=30)
    _assert_failed(job)
    assert "ValueError" in job.stderr, job.describe()     # the ranks' tracebacks interleave: read the files
    errors = [(tmp_path / f"rank{r}.txt").read_text() if (tmp_path / f"rank{r}.txt").exists() else None
              for r in range(P)]
    assert len(set(errors)) == 1, f"the ranks did not all raise the same error: {errors}"
    assert errors[0].startswith("ValueError: ") and all(f in errors[0] for f in fragments), errors[0]


@needs_mpi
def test_bad_input_aborts_under_mpi4py():
    job = mpirun(3, script("fail_check.py"), "nan")
    _assert_failed(job, *BAD_INPUT[0][2])


@needs_mpi
def test_message_size_mismatch_is_an_error():
    job = mpirun(2, script("fail_check.py"), "size")
    _assert_failed(job, "CommError: message from rank 0 to rank 1 with tag 4 "
                        f"({describe_tag(4)}) is larger than the 64-byte receive buffer")


def test_import_error_without_mpi4py():
    """Without mpi4py, importing the MPI communicator says how to install it."""
    code = "import sys; sys.modules['mpi4py'] = None; import refimpl.comm.mpi"   # None: "not installed"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "ImportError" in done.stderr and "pip install 'ringattn[mpi]'" in done.stderr, done.stderr


# -- the command line under mpiexec -------------------------------------------------------------------

CLI_ARGS = ["run", "--seq", "37", "--heads", "4", "--kv-heads", "2", "--dim", "8", "--dtype", "fp64",
            "--block-q", "4", "--block-k", "8", "--backward", "--json", "--check", "--no-progress"]


@needs_mpi
@pytest.mark.parametrize("P", RANKS)
def test_cli_under_mpiexec_matches_simulation(P, tmp_path):
    """``mpiexec -n P python -m mpi4py -m refimpl run``: checked against the oracle, bitwise like --ranks P."""
    # --ranks P as well: `mpiexec -n 1` is not an MPI launch to the CLI (it simulates --ranks ranks)
    job = mpirun(P, "-m", "refimpl", *CLI_ARGS, "--ranks", P, "--output", tmp_path / "mpi")
    assert job.returncode == 0, job.describe()
    summary = json.loads(job.stdout)
    assert summary["ranks"] == P and summary["check"]["passed"], summary["check"]
    if P > 1:
        assert summary["transport"] == "mpi"
    assert len(summary["bytes_sent"]) == P and all(s["bytes_sent"] >= 0 for s in summary["trace"])
    sim = subprocess.run([sys.executable, "-m", "refimpl", *CLI_ARGS, "--ranks", str(P), "--output",
                          str(tmp_path / "sim")], capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    for name in ("out", "lse", "dq", "dk", "dv"):
        for r in range(P):
            a, b = (np.load(tmp_path / kind / f"{name}.{r}.npy") for kind in ("mpi", "sim"))
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{name} of rank {r}: MPI != simulation"


@needs_mpi
def test_console_script_under_mpiexec():
    """The ``ringattn`` entry point (plain python, no -m mpi4py) runs one rank per process too."""
    job = mpirun(2, *CLI_ARGS, mpi4py=False, entry=BIN_RINGATTN)
    assert job.returncode == 0, job.describe()
    assert json.loads(job.stdout)["transport"] == "mpi"


@needs_mpi
def test_cli_more_ranks_than_tokens():
    job = mpirun(3, "-m", "refimpl", "run", "--seq", "2", "--json")
    _assert_failed(job, "3 ranks exceed --seq 2")


@needs_mpi
def test_cli_mismatched_shard_files(tmp_path):
    """--input shards whose lengths disagree: every rank rejects them, and the job ends non-zero."""
    rng = np.random.default_rng(3)
    lengths = {0: 4, 1: 5, 2: 4}                 # rank 1's q has one token more than its k and v
    for r, n in lengths.items():
        np.save(tmp_path / f"q.{r}.npy", rng.standard_normal((1, n, 2, 4)))
        for name in ("k", "v"):
            np.save(tmp_path / f"{name}.{r}.npy", rng.standard_normal((1, 4, 2, 4)))
    job = mpirun(3, "run", "--seq", "12", "--heads", "2", "--dim", "4", "--dtype", "fp64", "--input", tmp_path,
                 mpi4py=False, entry=BIN_RINGATTN)
    _assert_failed(job, "--input: k.1.npy has shape (1, 4, 2, 4), expected (1, 5, 2, 4)")


@needs_mpi
@pytest.mark.parametrize("first, message", [
    (["--seq", "2"], "ranks disagree on --seq: rank 0: 2, rank 1: 512, rank 2: 512"),
    (["--kv-heads", "4"], "ranks disagree on --kv-heads: rank 0: 4, rank 1: None, rank 2: None"),
    (["--backward"], "ranks disagree on --backward: rank 0: True, rank 1: False, rank 2: False"),
    (["--samples", "8"], "ranks disagree on --samples: rank 0: 8, rank 1: 64, rank 2: 64"),
    (["--dtype", "bf16"], "rank 0: --dtype bf16 needs --device gpu"),
    (["--bogus"], "rank 0: ringattn: error: unrecognized arguments: --bogus"),
])
def test_mismatched_arguments_end_every_rank(first, message):
    """`mpiexec -n 1 ringattn run --seq 2 : -n 2 ringattn run --seq 512` used to hang: the odd rank exited
    through SystemExit and the others waited in a barrier. Now every rank compares the options first."""
    base = ["run", "--seq", "512", "--heads", "2", "--dim", "4", "--no-progress"]
    cmd = [str(MPIEXEC), "-n", "1", str(BIN_RINGATTN), *base, *first, ":", "-n", "2", str(BIN_RINGATTN), *base]
    job = finish(Running(cmd, None), timeout=60)
    assert job.returncode == 2, job.describe()
    _assert_failed(job, message)


# -- layouts and masks under MPI (tests/test_layouts.py has the whole matrix, simulated) ----------------

# name, layout, (B, N, Hq, Hkv, D), causal, block_q, block_k, mask options. No N here is divisible by P or 2P
# for P = 2..4; "segment_ids" draws per-batch documents; the windows stop the ring early on some P.
LAYOUT_CASES = [
    ("zigzag_causal_gqa", "zigzag", (1, 29, 4, 2, 8), True, 4, 3, {}),
    ("striped_causal_mqa", "striped", (2, 23, 3, 1, 5), True, 3, 4, {}),
    ("striped_full", "striped", (1, 31, 2, 2, 8), False, 4, 8, {}),
    ("contiguous_window_causal", "contiguous", (1, 37, 2, 1, 8), True, 4, 3, {"window": [5, -1]}),
    ("zigzag_window", "zigzag", (1, 33, 4, 2, 8), False, 4, 5, {"window": [3, 2]}),
    ("striped_documents", "striped", (2, 30, 2, 2, 8), True, 4, 4, {"segment_ids": True}),
    ("contiguous_documents_window", "contiguous", (1, 41, 2, 2, 8), True, 4, 4,
     {"cu_seqlens": [0, 9, 20, 41], "window": [6, -1]}),
]
LAYOUT_RANKS = (2, 3, 4)


@pytest.fixture(scope="module")
def layout_inputs():
    rng = np.random.default_rng(20261127)
    data = {}
    for name, layout, (B, N, Hq, Hkv, D), causal, bq, bk, masking in LAYOUT_CASES:
        q, k, v = make_qkv(rng, B=B, N=N, Hq=Hq, Hkv=Hkv, D=D)
        masking = dict(masking)
        if masking.pop("segment_ids", False):
            masking["segment_ids"] = rng.integers(0, 3, (B, N))
        data[name] = dict(q=q, k=k, v=v, dout=make_dout(rng, q), layout=layout,
                          options=dict(causal=causal, block_q=bq, block_k=bk, scale=None, **masking))
    return data


@pytest.fixture(scope="module")
def layout_runs(layout_inputs, tmp_path_factory):
    """One ``mpiexec -n P ring_check.py`` job per P over every layout case, run on first use."""
    runs = {}

    def get(P):
        if P not in runs:
            directory = tmp_path_factory.mktemp(f"layouts_p{P}")
            cases = []
            for name, d in layout_inputs.items():
                options = {key: value for key, value in d["options"].items() if key != "segment_ids"}
                cases.append(dict(name=name, layout=d["layout"], **options))
                arrays = {x: d[x] for x in ("q", "k", "v", "dout")}
                if "segment_ids" in d["options"]:
                    arrays["segment_ids"] = d["options"]["segment_ids"]
                np.savez(directory / f"{name}.npz", **arrays)
            (directory / "cases.json").write_text(json.dumps(cases))
            job = mpirun(P, script("ring_check.py"), directory)
            assert job.returncode == 0, job.describe()
            runs[P] = {name: [dict(np.load(directory / f"{name}.rank{r}.npz")) for r in range(P)]
                       for name in layout_inputs}
        return runs[P]

    return get


def _unshard(d, shards, P):
    layout = refimpl.layouts.layout_for(d["layout"], d["q"].shape[1], P)
    return {key: layout.unshard([s[key] for s in shards], axis=2 if key == "lse" else 1)
            for key in ("out", "lse", "dq", "dk", "dv")}


@needs_mpi
@pytest.mark.parametrize("P", LAYOUT_RANKS)
@pytest.mark.parametrize("name", [c[0] for c in LAYOUT_CASES])
def test_layouts_and_masks_under_mpi_match_the_oracle_and_the_simulation(P, name, layout_inputs, layout_runs):
    """Each rank's shard in its layout's order, forward and backward: the oracle to 1e-12, and
    ``simulate_ring`` bit for bit."""
    d = layout_inputs[name]
    got = _unshard(d, layout_runs(P)[name], P)
    masking = {key: value for key, value in d["options"].items() if key not in ("block_q", "block_k")}
    ref = dict(zip(("out", "lse"), refimpl.naive_attention(d["q"], d["k"], d["v"], **masking)))
    ref.update(zip(("dq", "dk", "dv"), refimpl.naive_attention_backward(d["q"], d["k"], d["v"], d["dout"], **masking)))
    sim = refimpl.simulate_ring(d["q"], d["k"], d["v"], ranks=P, dout=d["dout"], layout=d["layout"], **d["options"])
    for key in ref:
        assert_fp64_close(got[key], ref[key], f"{name} P={P} {key}")
        assert np.array_equal(got[key], getattr(sim, key)), f"{name} P={P}: {key} differs from simulate_ring"


@needs_mpi
@pytest.mark.parametrize("P", LAYOUT_RANKS)
def test_layouts_and_masks_under_mpi_send_what_the_schedule_says(P, layout_inputs, layout_runs):
    """Bytes per rank are those of a ring of ``ring_steps`` steps: fewer when a window or the documents leave
    the last steps nothing to see."""
    from refimpl import masks, schedule
    for name, shards in layout_runs(P).items():
        d = layout_inputs[name]
        B, N, Hkv, D = d["k"].shape
        o = d["options"]
        layout = refimpl.layouts.layout_for(d["layout"], N, P)
        mask = masks.mask_for(o["causal"], o.get("window"), o.get("segment_ids"), o.get("cu_seqlens"), B=B, N=N)
        steps = schedule.ring_steps(layout, mask)
        expected = (schedule.ring_bytes(layout, steps, B, Hkv, D, 8)
                    + schedule.ring_bytes(layout, steps, B, Hkv, D, 8, 8))
        for r, s in enumerate(shards):
            assert int(s["bytes_sent"]) == int(s["trace_bytes"].sum()) == expected[r], (name, r)


@needs_mpi
def test_cli_layout_and_window_under_mpiexec_match_simulation(tmp_path):
    """``mpiexec -n 3 ... run --layout zigzag --window 6 -1 --cu-seqlens ...``: checked, bitwise equal to --ranks 3."""
    args = [*CLI_ARGS, "--layout", "zigzag", "--window", "6", "-1", "--cu-seqlens", "0,10,37", "--ranks", "3"]
    job = mpirun(3, "-m", "refimpl", *args, "--output", tmp_path / "mpi")
    assert job.returncode == 0, job.describe()
    summary = json.loads(job.stdout)
    assert summary["transport"] == "mpi" and summary["layout"] == "zigzag" and summary["check"]["passed"]
    sim = subprocess.run([sys.executable, "-m", "refimpl", *args, "--output", str(tmp_path / "sim")],
                         capture_output=True, text=True, timeout=120)
    assert sim.returncode == 0, sim.stderr
    for name in ("out", "lse", "dq", "dk", "dv"):
        for r in range(3):
            a, b = (np.load(tmp_path / kind / f"{name}.{r}.npy") for kind in ("mpi", "sim"))
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{name} of rank {r}: MPI != simulation"


@needs_mpi
def test_progress_counts_every_ranks_tiles():
    """--progress under mpiexec: rank 0 draws the whole job's tiles, which every rank reports to it, and the
    bar ends at 100% (it used to count only rank 0's tiles). The run must last 2 s for the bar to appear."""
    job = mpirun(3, "run", "--seq", "8192", "--backward", "--layout", "contiguous", "--progress", "--json",
                 mpi4py=False, entry=BIN_RINGATTN, timeout=120)
    assert job.returncode == 0, job.describe()
    frames = [f for f in job.stderr.replace("\r", "\n").splitlines() if f.startswith("[")]
    assert frames and frames[-1].split("]")[1].strip().startswith("100.0%"), job.stderr[-500:]
