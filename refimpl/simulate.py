"""``simulate_ring``: P ranks of ring attention in one process, on full-sequence arrays.

It shards the inputs with the chosen layout (``layouts.py``: contiguous, zigzag or striped), runs
``ring_attention`` (and, given ``dout``, ``ring_attention_backward``) on P threads over the in-process
communicator, and puts the shards back in natural token order, whatever the layout. The per-rank
functions are exactly the ones ``mpiexec`` runs, so the simulation and an MPI run of the same P and
layout produce bitwise-identical results.

``engine`` is an engine class, instantiated once per rank on that rank's thread (``refimpl/engine.py``):
``NumpyEngine`` by default; ``gpu.CupyEngine`` runs every rank on one GPU, each on its own stream, and
its ``sim_world`` moves device arrays between them.
"""

import threading
from dataclasses import dataclass
from typing import Optional

from . import validate
from .blockwise import BLOCK_K, BLOCK_Q
from .engine import NumpyEngine
from .layouts import layout_for
from .masks import mask_for
from .ring import ring_attention, ring_attention_backward


@dataclass
class RingResult:
    """Arrays of the engine's kind: numpy.ndarray for the NumPy engine, cupy.ndarray for a GPU one."""
    out: object                           # (B, N, Hq, D), q's dtype, natural order
    lse: object                           # (B, Hq, N), accumulation dtype
    trace: list                           # StepRecord for every (phase, step, rank)
    peak_bytes: list                      # per rank, the bytes of the arrays it held at once
    bytes_sent: list                      # per rank, bytes of all messages it sent
    dq: Optional[object] = None           # given dout: (B, N, Hq, D)
    dk: Optional[object] = None           # (B, N, Hkv, D)
    dv: Optional[object] = None


class _TileCounter:
    """Thread-safe tile counter for progress reporting across the simulated ranks."""

    def __init__(self, callback):
        self.callback, self.done, self.lock = callback, 0, threading.Lock()

    def __call__(self):
        with self.lock:
            self.done += 1
            self.callback(self.done)


def simulate_ring(q, k, v, *, ranks, causal=False, scale=None, dout=None, block_q=BLOCK_Q, block_k=BLOCK_K,
                  timeout=600.0, progress=None, engine=NumpyEngine, layout="contiguous", window=None, segment_ids=None,
                  cu_seqlens=None):
    """Ring attention over ``ranks`` simulated ranks, the sequence cut by ``layout``.

    q (B, N, Hq, D), k and v (B, N, Hkv, D); dout (B, N, Hq, D) optional; host arrays, or arrays of the
    engine, in natural token order. The mask: ``causal``, ``window`` (left, right), ``segment_ids`` (B, N)
    or ``cu_seqlens``, as for ``ring_attention``. Returns a ``RingResult``, in natural order too.
    ``progress``, if given, is called with the running count of tiles computed over all ranks. ``timeout``, a positive finite number of seconds, bounds any single wait on
    a message (deadlocks are reported at once regardless). ``engine()`` makes one rank's engine; the
    class says which inputs it takes (``array_type``, ``dtypes``, ``first_nonfinite``) and makes the
    world of ranks (``sim_world``), which checks ``timeout`` before any rank starts.
    """
    B, N, Hq, Hkv, D = validate.check_qkv(q, k, v, engine)
    P = validate.check_ranks(ranks, N)
    if dout is not None:
        validate.check_like("dout", dout, (B, N, Hq, D), engine=engine)
        if dout.dtype != q.dtype:
            raise TypeError(f"dout must have q's dtype {q.dtype}, got {dout.dtype}")
    cut = layout_for(layout, N, P)
    mask_for(causal, window, segment_ids, cu_seqlens, B=B, N=N)          # bad mask arguments: before any rank starts
    on_tile = _TileCounter(progress) if progress is not None else None
    options = dict(causal=causal, scale=scale, block_q=block_q, block_k=block_k, on_tile=on_tile, layout=layout,
                   window=window, segment_ids=segment_ids, cu_seqlens=cu_seqlens)

    def rank_main(comm):
        eng = engine()
        comm = eng.wrap(comm)
        shard = [eng.asarray(cut.shard(x, comm.rank)) for x in (q, k, v)]
        forward = ring_attention(*shard, comm, engine=eng, **options)
        backward = None
        if dout is not None:
            backward = ring_attention_backward(*shard, forward.out, forward.lse,
                                               eng.asarray(cut.shard(dout, comm.rank)), comm, engine=eng,
                                               **options)
        return forward, backward, comm.bytes_sent

    results = engine.sim_world(P, timeout).run(rank_main)
    forwards = [f for f, _, _ in results]
    result = RingResult(
        out=cut.unshard([f.out for f in forwards]),
        lse=cut.unshard([f.lse for f in forwards], axis=2),
        trace=[rec for f, b, _ in results for rec in f.trace + (b.trace if b else [])],
        peak_bytes=[max(f.peak_bytes, b.peak_bytes if b else 0) for f, b, _ in results],
        bytes_sent=[sent for _, _, sent in results])
    if dout is not None:
        result.dq, result.dk, result.dv = (cut.unshard([getattr(b, g) for _, b, _ in results])
                                           for g in ("dq", "dk", "dv"))
    return result
