"""``CupyEngine``: the ring's engine (``refimpl/engine.py``) on a GPU.

The ring, the schedule, the tile plan, the masks and the messages are refimpl's; this module only decides
where the arrays live (device memory, on the rank's own stream) and how a step's plan is computed:

``kernels="fused"``   the plan goes to one launch of ``flash_forward`` (forward) or ``flash_backward_dq`` +
                      ``flash_backward_dkdv`` (backward), tensor cores for float16/bfloat16, FMA for
                      float32 (``gpu/*.cu``).
``kernels="matmul"``  the plan's tiles one by one as cuBLAS products (``gpu/matmul.py``): the baseline, the
                      float64 path, and the fallback where the fused kernels do not apply (head dim over
                      128, float64); the engine says why in ``describe()``.

The forward kernel has versions side by side (``kernels.FORWARD``); a step runs the one measured fastest
for its plan (``kernels.forward_version``) unless ``forward=`` names one. Accumulators are float32
(float64 for float64 inputs) and the running lse is float64, as in refimpl.
"""

import functools
from collections import OrderedDict

import cupy as cp
import numpy as np

from refimpl import validate
from refimpl.masks import CausalMask, NoMask
from refimpl.schedule import plan_tiles

from . import kernels, matmul
from .device import CupyDevice, sim_world
from .kernels import FORWARD
from .plan import by_key_rows, by_query_rows
from .transport import device_comm

MASK_CODES = {NoMask.name: 0, CausalMask.name: 1}
KERNELS = ("fused", "matmul")


def _is_16bit(dtype):
    return dtype.itemsize == 2


def first_nonfinite(x):
    """Index of the first NaN or +-inf of a host or device array, or None (bfloat16 included)."""
    if isinstance(x, np.ndarray):
        return validate.first_nonfinite(x.astype(np.float32) if x.dtype == validate.BFLOAT16 else x)
    if _is_16bit(x.dtype):
        exponent = 0x7C00 if x.dtype == np.float16 else 0x7F80
        bad = (x.view(cp.uint16) & exponent) == exponent
    else:
        bad = ~cp.isfinite(x)
    if not bool(bad.any()):
        return None
    return tuple(int(i) for i in np.unravel_index(int(cp.argmax(bad.ravel())), x.shape))


class CupyEngine:
    """One rank's GPU engine: device arrays on the current GPU, work on the rank's own stream."""

    name = "gpu"
    array_type = (np.ndarray, cp.ndarray)   # what simulate_ring takes: host arrays are uploaded per shard
    dtypes = validate.INPUT_DTYPES
    first_nonfinite = staticmethod(first_nonfinite)
    sim_world = staticmethod(sim_world)

    def __init__(self, kernels="fused", forward=None):
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if forward is not None and forward not in FORWARD:
            raise ValueError(f"forward must be one of {sorted(FORWARD)} or None, got {forward!r}")
        self.kernels, self.forward = kernels, forward
        self.array_type = cp.ndarray        # what the ring takes: this rank's shards, on the device
        self.device = cp.cuda.Device()
        self.stream = cp.cuda.Stream(non_blocking=True)
        self.stream.use()                   # this thread's current stream: every op of the rank runs on it
        self._events = (cp.cuda.Event(), cp.cuda.Event())
        self._plans = OrderedDict()         # the last PLANS steps' plans, device tables and k positions
        self.fallback = None                # why a step ran on the matmul path although fused was asked for
        self.transport = None
        self.workspace_bytes = 0

    @classmethod
    def configured(cls, **options):
        """This engine class with ``options`` bound, for ``simulate_ring(engine=...)``."""
        return type(cls.__name__, (cls,), {"__init__": functools.partialmethod(cls.__init__, **options)})

    def describe(self):
        props = cp.cuda.runtime.getDeviceProperties(self.device.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info = {"engine": self.name, "device": f"{name} (device {self.device.id})", "kernels": self.kernels}
        if self.forward:
            info["forward"] = self.forward
        if self.fallback:
            info["kernels"] = f"matmul ({self.fallback})"
        if self.transport is not None:
            info["messages"] = {"path": self.transport.path, "reason": self.transport.reason}
        return info

    def wrap(self, comm):
        wrapped = device_comm(comm, CupyDevice())
        self.transport = wrapped.decision
        return wrapped

    # -- arrays -----------------------------------------------------------------------------------
    def asarray(self, x):
        """A host or device array as a C-contiguous array on this engine's device."""
        if isinstance(x, cp.ndarray):
            return cp.ascontiguousarray(x)
        x = np.ascontiguousarray(x)
        if x.dtype == validate.BFLOAT16:
            return cp.asarray(x.view(np.uint16)).view(x.dtype)
        return cp.asarray(x)

    def zeros(self, shape, dtype):
        return cp.zeros(shape, dtype)

    def full(self, shape, value, dtype):
        return cp.full(shape, value, dtype)

    def empty(self, shape, dtype):
        return cp.empty(shape, dtype)

    def cast(self, x, dtype, copy=False):
        """``x`` in ``dtype`` (16-bit types rounded to nearest even); the result is complete on return."""
        dtype = np.dtype(dtype)
        if x.dtype == dtype:
            y = x.copy() if copy else x
        elif _is_16bit(dtype) and x.dtype == np.float32:
            y = cp.empty(x.shape, dtype)
            f = kernels.function("convert.cu", "narrow", dtype.name, 0)
            kernels.launch_1d(f, x.size, (cp.ascontiguousarray(x), y, kernels.i64(x.size)))
        else:
            y = x.astype(dtype)
        self.stream.synchronize()
        return y

    def widened(self, x, acc):
        """``x`` in the accumulation dtype: itself when it already is."""
        if x.dtype == acc:
            return x
        if _is_16bit(x.dtype):
            y = cp.empty(x.shape, np.float32)
            f = kernels.function("convert.cu", "widen", x.dtype.name, 0)
            kernels.launch_1d(f, x.size, (cp.ascontiguousarray(x), y, kernels.i64(x.size)))
            return y                                    # 16-bit inputs accumulate in float32
        return x.astype(acc)

    def to_host(self, x):
        if x.dtype == validate.BFLOAT16:
            return cp.asnumpy(x.view(cp.uint16)).view(x.dtype)
        return cp.asnumpy(x)

    # -- one step ---------------------------------------------------------------------------------
    def _use_fused(self, q, mask):
        if self.kernels != "fused":
            return False
        reason = kernels.supports(q.dtype.name, q.shape[3])
        if reason is None and mask.name not in MASK_CODES:
            reason = f"the fused kernels have no {mask.name!r} mask"
        if reason is not None:
            self.fallback = reason
        return reason is None

    PLANS = 64

    def _step(self, q_pos, k_pos, mask, block_q, block_k):
        """The step's ``StepPlan`` and a dict for its device arrays, cached: a training loop (or a benchmark)
        repeats the same steps, and planning in Python must not come between the kernels. A hit is
        checked position by position, never trusted to a hash."""
        key = (hash(q_pos.tobytes()), hash(k_pos.tobytes()), mask.key, block_q, block_k)   # mask.key: name and parameters
        hit = self._plans.pop(key, None)
        if hit is None or not (np.array_equal(hit[0], q_pos) and np.array_equal(hit[1], k_pos)):
            plan = plan_tiles(q_pos, k_pos, mask, block_q, block_k)
            hit = (np.array(q_pos), np.array(k_pos), plan,
                   {"q_pos": cp.asarray(q_pos, np.int64), "k_pos": cp.asarray(k_pos, np.int64)})
        self._plans[key] = hit
        while len(self._plans) > self.PLANS:
            self._plans.popitem(last=False)
        return hit[2], hit[3]

    @staticmethod
    def _table(cached, name, build):
        if name not in cached:
            table = build()
            cached[name] = (table.n_cta, cp.asarray(table.cta), cp.asarray(table.tiles))
        return cached[name]

    def _begin(self):
        self._events[0].record(self.stream)

    def _end(self, plan, on_tile):
        self._events[1].record(self.stream)
        if on_tile is not None:
            for _ in range(plan.computed):
                on_tile()

    def attend(self, o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile=None):
        """Enqueue one forward step; returns its plan at once (``finish`` waits for the tiles)."""
        plan, cached = self._step(q_pos, k_pos, mask, block_q, block_k)
        self._begin()
        if self._use_fused(q, mask):
            elem, D = q.dtype.name, q.shape[3]
            version = self.forward or kernels.forward_version(elem, plan)
            rows = kernels.rows_per_cta(version)
            n_cta, cta, tiles = self._table(cached, f"by_q{rows}", lambda: by_query_rows(plan, rows))
            if n_cta:
                smem = kernels.smem_bytes("flash_forward", elem, D, version)
                f = kernels.function("flash_forward.cu", "flash_forward", elem, D, smem, version)
                B, nq, Hq, _ = q.shape
                f((n_cta, B * Hq), (32 * kernels.NWARPS,),
                  (q, k, v, o, lse, cached["q_pos"], cached["k_pos"], cta, tiles, np.int32(nq),
                   np.int32(k.shape[1]), np.int32(Hq), np.int32(k.shape[2]), np.int32(D), np.float32(scale),
                   np.int32(MASK_CODES[mask.name])), shared_mem=smem)
            self._end(plan, on_tile)
            return plan
        acc = o.dtype
        self.workspace_bytes = max(self.workspace_bytes, 3 * matmul.score_bytes(plan, q.shape[0], q.shape[2], acc))
        matmul.attend(o, lse, self.widened(q, acc), self.widened(k, acc), self.widened(v, acc), q_pos, k_pos,
                      mask, scale, plan, on_tile)
        self._end(plan, None)
        return plan

    def attend_backward(self, dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                        block_k, on_tile=None):
        """Enqueue one backward step; returns its plan at once."""
        plan, cached = self._step(q_pos, k_pos, mask, block_q, block_k)
        self._begin()
        if self._use_fused(q, mask):
            rows = kernels.rows_per_cta()
            elem, D = q.dtype.name, q.shape[3]
            B, nq, Hq, _ = q.shape
            nk, Hkv = k.shape[1], k.shape[2]
            positions = (cached["q_pos"], cached["k_pos"])
            sizes = (np.int32(nq), np.int32(nk), np.int32(Hq), np.int32(Hkv), np.int32(D), np.float32(scale),
                     np.int32(MASK_CODES[mask.name]))
            n_cta, cta, tiles = self._table(cached, f"by_q{rows}", lambda: by_query_rows(plan, rows))
            if n_cta:
                smem = kernels.smem_bytes("flash_backward_dq", elem, D)
                f = kernels.function("flash_backward.cu", "flash_backward_dq", elem, D, smem)
                f((n_cta, B * Hq), (32 * kernels.NWARPS,),
                  (q, k, v, dout, lse, delta, dq) + positions + (cta, tiles) + sizes, shared_mem=smem)
            n_cta, cta, tiles = self._table(cached, f"by_k{rows}", lambda: by_key_rows(plan, rows))
            if n_cta:
                smem = kernels.smem_bytes("flash_backward_dkdv", elem, D)
                f = kernels.function("flash_backward.cu", "flash_backward_dkdv", elem, D, smem)
                f((n_cta, B * Hkv), (32 * kernels.NWARPS,),
                  (q, k, v, dout, lse, delta, dk, dv) + positions + (cta, tiles) + sizes, shared_mem=smem)
            self._end(plan, on_tile)
            return plan
        acc = dq.dtype
        self.workspace_bytes = max(self.workspace_bytes, 4 * matmul.score_bytes(plan, q.shape[0], q.shape[2], acc))
        matmul.attend_backward(dq, dk, dv, self.widened(q, acc), self.widened(k, acc), self.widened(v, acc),
                               self.widened(dout, acc), lse, delta, q_pos, k_pos, mask, scale, plan, on_tile)
        self._end(plan, None)
        return plan

    def row_terms(self, out, dout, lse, block_q):
        """delta = rowsum(dout * out) (B, Hq, n) and lse with -inf -> 0, both in lse's dtype."""
        acc = lse.dtype
        if acc == np.float32:
            B, n, H, D = out.shape
            delta = cp.empty(lse.shape, np.float32)
            f = kernels.function("convert.cu", "row_delta", out.dtype.name, 0)
            rows_per_block = 8
            f((-(-B * n * H // rows_per_block),), (32 * rows_per_block,),
              (out, dout, delta, np.int32(B), np.int32(n), np.int32(H), np.int32(D)))
        else:
            delta = cp.einsum("bnhd,bnhd->bhn", out.astype(acc), dout.astype(acc))
        return delta, cp.where(lse == -np.inf, acc.type(0), lse)

    def finish(self):
        """Wait for the step's tiles; the seconds they took on the device."""
        self._events[1].synchronize()
        return cp.cuda.get_elapsed_time(*self._events) / 1e3
