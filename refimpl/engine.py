"""The engine: where one rank's arrays live, and how one ring step's tiles are computed.

The ring (``ring.py``) is written once. All it asks of the hardware is this small interface, handed to
it as ``engine=``; everything else (the schedule, the messages, the fold order) stays in the ring::

    zeros, full, empty     allocate the accumulators and the message buffers
    attend                 one forward step: fold attention of the q shard over one K/V shard into (o, lse)
    attend_backward        one backward step: add that pair's gradient contributions into (dq, dk, dv)
    row_terms              delta = rowsum(dout * out) and lse with -inf -> 0, once per backward
    finish                 wait until the step's tiles are done; return the seconds they took
    cast, to_host          the returned arrays in the input dtype; a host (NumPy) copy for checking
    wrap                   the communicator for this engine's buffers (GPU: direct or host-staged)

Both steps receive the global positions of their rows and the mask, plan their tiles with
``schedule.plan_tiles`` and return that ``StepPlan``, so every engine visits the same tiles and reports the
same trace. ``attend`` may return before the tiles are done (a GPU engine only enqueues them): the ring
waits for its messages first, then calls ``finish``, so transfers overlap the compute.

``NumpyEngine`` is the reference: ``blockwise.attend_shard`` on the CPU. The GPU engines
(``gpu/engine.py``) implement the same methods with CuPy. The engine also says which arrays and dtypes it
accepts (``array_type``, ``dtypes``) and how to find a non-finite entry (``first_nonfinite``), which
``validate`` uses to check inputs without knowing where they live.

An engine holds per-rank state (a workspace, a stream), so each rank makes its own: ``simulate_ring``
takes a factory (``engine=NumpyEngine``) and calls it once per rank.
"""

import time

import numpy as np

from . import tile, validate
from .blockwise import attend_shard, attend_shard_backward, row_terms
from .comm.sim import SimWorld


class NumpyEngine:
    """One rank's CPU engine: NumPy arrays, ``blockwise.attend_shard`` per step, one reused workspace."""

    name = "numpy"
    array_type = np.ndarray
    dtypes = validate.FLOAT_DTYPES
    first_nonfinite = staticmethod(validate.first_nonfinite)
    sim_world = SimWorld                     # (P, timeout) -> the world of simulated ranks for these arrays

    def __init__(self):
        self._workspace = None               # ((phase, dtype), Workspace) of the last step's kind
        self._seconds = 0.0

    def describe(self):
        """What the report prints about where the run happened."""
        return {"engine": self.name, "device": "cpu"}

    def wrap(self, comm):
        """The communicator the ring uses for this engine's buffers: host arrays go as they are."""
        return comm

    # -- arrays -----------------------------------------------------------------------------------
    def asarray(self, x):
        """A host array as this engine's array (here: itself, memory maps included)."""
        return x

    def zeros(self, shape, dtype):
        return np.zeros(shape, dtype)

    def full(self, shape, value, dtype):
        return np.full(shape, value, dtype)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def cast(self, x, dtype, copy=False):
        """``x`` in ``dtype``: ``x`` itself when it already is, unless ``copy``."""
        return x.astype(dtype, copy=copy)

    def to_host(self, x):
        return x

    @property
    def workspace_bytes(self):
        return 0 if self._workspace is None else self._workspace[1].nbytes

    def _scores(self, phase, dtype):
        """The score buffers of a forward or backward step, reused from step to step; a step of the other
        phase (a new call) starts a fresh one, so a rank never holds both."""
        if self._workspace is None or self._workspace[0] != (phase, np.dtype(dtype)):
            self._workspace = ((phase, np.dtype(dtype)), tile.Workspace(dtype))
        return self._workspace[1]

    # -- one step ---------------------------------------------------------------------------------
    def attend(self, o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile=None):
        """Fold q (B, nq, Hq, D) over k, v (B, nk, Hkv, D) into o (B, nq, Hq, D), lse (B, Hq, nq)."""
        t0 = time.perf_counter()
        plan = attend_shard(o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k,
                            self._scores("forward", o.dtype), on_tile)
        self._seconds = time.perf_counter() - t0
        return plan

    def attend_backward(self, dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                        block_k, on_tile=None):
        """Add the contributions of q against k, v to dq (B, nq, Hq, D) and dk, dv (B, nk, Hkv, D)."""
        t0 = time.perf_counter()
        plan = attend_shard_backward(dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale,
                                     block_q, block_k, self._scores("backward", dq.dtype), on_tile)
        self._seconds = time.perf_counter() - t0
        return plan

    def row_terms(self, out, dout, lse, block_q):
        return row_terms(out, dout, lse, block_q)

    def finish(self):
        """Seconds the last step's tiles took (they are done: NumPy computes when called)."""
        return self._seconds
