"""Ring attention on one rank: the forward and backward loops over a communicator.

Each rank holds one shard of q, k and v (its positions come from the layout). K/V shards travel around
the ring; q, the output and the softmax statistics never move::

    forward, rank r, step t = 0 .. P-1 (at t = 0 the current K/V is the rank's own):
        post  irecv(next K/V <- r-1), isend(current K/V -> r+1)        (not on the last step)
        fold  attention(q_r, current K/V) into (o, lse)                 the tiles overlap the messages
        wait  both, then the received buffer becomes the current one

The next shard is posted *before* the current one is computed, so the transfer hides behind the tiles
by construction. Two K/V buffers alternate: one is read by the tiles and the send, the other is written
by the receive.

The backward does the same walk with two more buffers: each K/V shard travels with the dK/dV accumulated
for it so far. At step t a rank receives that accumulator from r-1 while it computes its own contribution
into a scratch buffer, adds the two, and passes the sum on. After P steps every accumulator has visited
every rank and arrives back at the rank that owns its K/V, complete. (At step 0 there is nothing to
receive: the rank computes its contribution to its own shard straight into the accumulator.)

Stopping early. When the mask leaves every rank nothing to see in the K/V shards of the steps from T on
(a window, documents: ``schedule.ring_steps``), every rank runs only the steps 0 .. T-1: T - 1 K/V hops,
and the backward sends each accumulator, after its T-th step, straight home to its owner
(``schedule.return_to``; for T = P that is the next rank, as above). The skipped steps would have
computed no tile, so the results are the full ring's.

Where the arrays live and how a step's tiles are computed is the ``engine``'s business (``engine.py``): the
NumPy engine by default, a CuPy one from ``gpu/``. The loop below is the same for both.

The message protocol (what travels, sizes, tags and order) is in ``specs/protocol.md``.
"""

import time
from dataclasses import dataclass

import numpy as np

from . import layouts, masks, validate
from .blockwise import BLOCK_K, BLOCK_Q
from .engine import NumpyEngine
from .schedule import (BACKWARD_DKV, BACKWARD_KV, FORWARD_KV, StepRecord, kv_source, recv_from, return_from,
                       return_to, send_to, steps_needed, tag)
from .tile import score_overflow


@dataclass
class ShardForward:
    out: object              # (B, n, Hq, D), q's dtype, an array of the engine (numpy.ndarray by default)
    lse: object              # (B, Hq, n), accumulation dtype
    trace: list              # StepRecord per step
    peak_bytes: int          # bytes of the arrays this rank held at once (inputs, buffers, one tile)


@dataclass
class ShardBackward:
    dq: object               # (B, n, Hq, D)
    dk: object               # (B, n, Hkv, D)
    dv: object               # (B, n, Hkv, D)
    trace: list
    peak_bytes: int


class _Ring:
    """What every rank agrees on before the first message: shapes, dtype, mask, scale, block sizes, layout,
    and how many steps the ring runs.

    Each rank validates its own arguments; the outcomes and settings are gathered, so every rank raises
    the same error when any rank's input is bad, and no rank starts a ring its peers will not join. The
    mask's arrays (segment_ids, cu_seqlens) are compared by a digest (``masks.fingerprint``). A mask that
    may make whole steps useless (``mask.local``) costs one more allgather: each rank's ``steps_needed``.
    """

    def __init__(self, comm, engine, q, k, v, causal, scale, block_q, block_k, layout, window, segment_ids,
                 cu_seqlens, backward=None):
        def local():
            B, n, Hq, Hkv, D = validate.check_qkv(q, k, v, engine)
            if backward is not None:
                validate.check_backward(*backward, q, (B, n, Hq, D), engine)
            masks.check_segments(segment_ids, cu_seqlens, B)
            settings = (B, Hq, Hkv, D, q.dtype.str, bool(causal), validate.check_scale(scale, D),
                        validate.check_block("block_q", block_q), validate.check_block("block_k", block_k),
                        layouts.check_name(layout), masks.fingerprint(window, segment_ids, cu_seqlens))
            return settings, n

        everyone = validate.collective(comm, local)
        settings = [e[0] for e in everyone]
        if len(set(settings)) > 1:
            raise ValueError("ranks disagree on (B, Hq, Hkv, D, dtype, causal, scale, block_q, block_k, layout, "
                             "(window, segment_ids digest, cu_seqlens digest)): "
                             + ", ".join(f"rank {r}: {s}" for r, s in enumerate(settings)))
        lengths = [e[1] for e in everyone]
        self.P, self.rank, self.engine = comm.size, comm.rank, engine
        self.layout = layouts.layout_for(layout, sum(lengths), self.P)
        for r, n in enumerate(lengths):
            if n != self.layout.length(r):
                raise ValueError(f"rank {r} holds {n} tokens, but the {layout} layout of N={self.layout.N} "
                                 f"over {self.P} ranks gives it {self.layout.length(r)}")
        self.B, self.Hq, self.Hkv, self.D, _, causal, self.scale, self.block_q, self.block_k, _, _ = settings[0]
        self.mask = masks.mask_for(causal, window, segment_ids, cu_seqlens, B=self.B, N=self.layout.N)
        self.acc = validate.accumulation_dtype(q.dtype)
        self.q_pos = self.layout.positions(self.rank)
        self.n_max = max(lengths)
        self.steps = self.P
        if self.mask.local:
            self.steps = max(comm.allgather(steps_needed(self.layout, self.mask, self.rank)))

    def buffer(self, dtype):
        """A flat buffer big enough for the largest (2, B, n, Hkv, D) K/V (or dK/dV) message."""
        return self.engine.empty(2 * self.B * self.n_max * self.Hkv * self.D, dtype)

    def rotate(self, comm, bufs, current, step, kind):
        """Post step ``step``'s K/V exchange: ``current`` goes on to rank + 1 while the shard for step + 1
        arrives from rank - 1 into the other buffer of ``bufs``. Returns (that buffer, the requests);
        on the last step nothing travels and ``current`` stays."""
        if step + 1 == self.steps:
            return current, []
        following = self.packed(bufs[(step + 1) % 2], kv_source(self.rank, step + 1, self.P))
        return following, [comm.irecv(following, recv_from(self.rank, self.P), tag(kind, step)),
                           comm.isend(current, send_to(self.rank, self.P), tag(kind, step))]

    def packed(self, flat, owner):
        """View the front of a flat buffer as the (2, B, n, Hkv, D) message of ``owner``'s shard."""
        n = self.layout.length(owner)
        return flat[: 2 * self.B * n * self.Hkv * self.D].reshape(2, self.B, n, self.Hkv, self.D)


def _between_tiles(comm, on_tile):
    """Called after every tile: lets the transport move the in-flight K/V along, then reports progress."""
    def tick():
        comm.progress()
        if on_tile is not None:
            on_tile()
    return tick


def _nbytes(*arrays):
    return sum(a.nbytes for a in arrays)


def ring_attention(q, k, v, comm, *, causal=False, scale=None, block_q=BLOCK_Q, block_k=BLOCK_K, on_tile=None,
                   engine=None, layout="contiguous", window=None, segment_ids=None, cu_seqlens=None):
    """Forward ring attention on this rank.

    q (B, n, Hq, D), k and v (B, n, Hkv, D): this rank's shard of ``layout`` ("contiguous", "zigzag" or
    "striped", ``layouts.py``), in shard order: row i is the token at global position
    ``layout_for(layout, N, P).positions(rank)[i]`` (increasing positions), as arrays of ``engine``
    (default: a new ``NumpyEngine``). Every rank of ``comm`` must call this together, with the same
    layout and mask. Returns a ``ShardForward`` with out (B, n, Hq, D) and lse (B, Hq, n) for this shard,
    rows in the same order.

    The mask (``masks.py``, ``specs/masks.md``) combines ``causal``, ``window`` = (left, right) (query i sees
    keys i-left .. i+right, -1 = unbounded) and documents: ``segment_ids`` (B, N) ints or ``cu_seqlens``,
    given whole (the sequence's, on global positions) on every rank. Every row sees at least its own key,
    so every lse is finite; one that is not means a score overflowed the accumulation dtype, whatever the
    engine: ``OverflowError``.
    """
    engine = NumpyEngine() if engine is None else engine
    ring = _Ring(comm, engine, q, k, v, causal, scale, block_q, block_k, layout, window, segment_ids, cu_seqlens)
    P, r = ring.P, ring.rank
    tick = _between_tiles(comm, on_tile)
    o = engine.zeros(q.shape, ring.acc)
    lse = engine.full((ring.B, ring.Hq, len(ring.q_pos)), -np.inf, np.float64)   # float64: see tile.merge
    bufs = [ring.buffer(k.dtype), ring.buffer(k.dtype)]
    current = ring.packed(bufs[0], r)
    current[0], current[1] = k, v
    trace = []
    for step in range(ring.steps):
        src = kv_source(r, step, P)
        following, requests = ring.rotate(comm, bufs, current, step, FORWARD_KV)
        t0 = time.perf_counter()
        plan = engine.attend(o, lse, q, current[0], current[1], ring.q_pos, ring.layout.positions(src),
                             ring.mask, ring.scale, ring.block_q, ring.block_k, tick)
        comm.waitall(requests)
        step_s, compute_s = time.perf_counter() - t0, engine.finish()
        trace.append(StepRecord("forward", step, r, r, src, plan.computed, plan.skipped,
                                current.nbytes if requests else 0, compute_s, max(0.0, step_s - compute_s),
                                plan.partial, plan.scores))
        current = following
    bad = engine.first_nonfinite(lse)
    if bad is not None:
        b, h, i = bad
        raise score_overflow(ring.acc, f"rank {r}: lse {float(lse[bad])} at batch {b}, query head {h}, "
                                       f"query position {ring.q_pos[i]}")
    out, lse_out = engine.cast(o, q.dtype), engine.cast(lse, ring.acc)
    peak = (_nbytes(q, k, v, o, lse, *bufs) + engine.workspace_bytes + (0 if out is o else out.nbytes)
            + (0 if lse_out is lse else lse_out.nbytes))
    return ShardForward(out, lse_out, trace, peak)


def ring_attention_backward(q, k, v, out, lse, dout, comm, *, causal=False, scale=None, block_q=BLOCK_Q,
                            block_k=BLOCK_K, on_tile=None, engine=None, layout="contiguous", window=None,
                            segment_ids=None, cu_seqlens=None):
    """Backward ring attention on this rank.

    q, k, v, ``layout`` and the mask as for ``ring_attention``; out (B, n, Hq, D) and lse (B, Hq, n) are what it
    returned on this rank (out in q's dtype, lse in the accumulation dtype); dout (B, n, Hq, D) in q's
    dtype, every array in shard order. Returns a ``ShardBackward`` with dq, dk, dv for this rank's shard,
    in shard order and the input dtype.
    """
    engine = NumpyEngine() if engine is None else engine
    ring = _Ring(comm, engine, q, k, v, causal, scale, block_q, block_k, layout, window, segment_ids, cu_seqlens,
                 backward=(out, dout, lse))
    P, r, acc, T = ring.P, ring.rank, ring.acc, ring.steps
    tick = _between_tiles(comm, on_tile)
    delta, lse_safe = engine.row_terms(out, dout, lse, ring.block_q)
    dq = engine.zeros(q.shape, acc)
    kv_bufs = [ring.buffer(k.dtype), ring.buffer(k.dtype)]
    grad_bufs = [ring.buffer(acc), ring.buffer(acc)]      # the travelling dK/dV accumulators
    scratch = ring.buffer(acc)                             # this rank's contribution at one step
    current = ring.packed(kv_bufs[0], r)
    current[0], current[1] = k, v
    grad_send = None
    trace = []
    for step in range(T):
        src = kv_source(r, step, P)
        following, requests = ring.rotate(comm, kv_bufs, current, step, BACKWARD_KV)
        grad = ring.packed(grad_bufs[step % 2], src)
        if step == 0:
            grad[...] = 0
            local = grad
        else:
            grad_recv = comm.irecv(grad, recv_from(r, P), tag(BACKWARD_DKV, step - 1))
            local = ring.packed(scratch, src)
            local[...] = 0
        t0 = time.perf_counter()
        plan = engine.attend_backward(dq, local[0], local[1], q, current[0], current[1], dout, lse_safe, delta,
                                      ring.q_pos, ring.layout.positions(src), ring.mask, ring.scale,
                                      ring.block_q, ring.block_k, tick)
        if step > 0:
            comm.wait(grad_recv)
            grad += local
        if grad_send is not None:
            comm.wait(grad_send)          # frees the other accumulator buffer for the next receive
        onward = send_to(r, P) if step + 1 < T else return_to(r, T, P)     # the last: home to its owner
        grad_send = comm.isend(grad, onward, tag(BACKWARD_DKV, step))
        comm.waitall(requests)
        step_s, compute_s = time.perf_counter() - t0, engine.finish()
        trace.append(StepRecord("backward", step, r, r, src, plan.computed, plan.skipped,
                                grad.nbytes + (current.nbytes if requests else 0), compute_s,
                                max(0.0, step_s - compute_s), plan.partial, plan.scores))
        current = following
    mine = ring.packed(grad_bufs[T % 2], r)
    comm.wait(comm.irecv(mine, return_from(r, T, P), tag(BACKWARD_DKV, T - 1)))
    comm.wait(grad_send)
    dk, dv = engine.cast(mine[0], k.dtype, copy=True), engine.cast(mine[1], v.dtype, copy=True)
    dq_out = engine.cast(dq, q.dtype)
    peak = (_nbytes(q, k, v, out, lse, dout, delta, lse_safe, dq, scratch, *kv_bufs, *grad_bufs)
            + engine.workspace_bytes + _nbytes(dk, dv) + (0 if dq_out is dq else dq_out.nbytes))
    return ShardBackward(dq_out, dk, dv, trace, peak)
