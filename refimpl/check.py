"""Checking a ring run against the float64 oracle, with the tolerance rule (``tolerance.py``) and the
allowance for the rounding of the scores (``tolerance.SCORE_ROUNDING``), as ``verify`` judges any backend.

Small runs (B * Hq * N^2 at most ``FULL_CHECK_SCORES``) are checked whole: the shards are gathered on
rank 0, which runs the oracle and the plain same-precision computation (``plain.py``) on the full arrays.

At larger N the full oracle cannot run, but the oracle for one query row needs every key and never all
queries at once. So the check samples rows (the first and last row of every shard, and of each of a
zigzag shard's two chunks, where off-by-one errors live, plus evenly spread and random rows), and
computes their exact float64 attention one key shard at a time: each rank scores the sampled rows
against the keys it holds, and the per-shard sums are added up exactly::

    o_r = sum_{j in shard r} exp(s_j - m_r) v_j,   l_r = sum_{j in shard r} exp(s_j - m_r),   m_r = max_j s_j
    M = max_r m_r,   out = sum_r exp(m_r - M) o_r / sum_r exp(m_r - M) l_r,   lse = M + log(sum_r exp(m_r - M) l_r)

The plain computation of the same rows is the textbook one in the run's precision, shard by shard: the
row max M is agreed first (a max is exact), then every rank exponentiates its scores against M and the
per-shard sums are added in rank order, in that precision. That is the textbook computation with its
sums cut into P pieces, which is how any BLAS sums anyway. Only the sampled rows (R x H x D values) ever
travel, so the check holds no full tensor on any rank. The same code runs on one process holding
everything (a single "shard") and under MPI.

In sampled mode ``out``, ``lse`` and ``dq`` are judged; ``dk`` and ``dv`` need every query row and are
judged by the full check only.
"""

import numpy as np

from . import masks, tolerance
from .naive import _heads, _segments, _visible, naive_attention, naive_attention_backward
from .plain import computing_dtype, plain_outputs

FULL_CHECK_SCORES = 1 << 22          # the full oracle runs when B * Hq * N^2 is at most this
ALLOWANCE = tolerance.SCORE_ROUNDING    # the scores' rounding, on top of the 2x rule (specs/tolerances.md 7)


def _judge(name, x, ref, input_dtype, plain, scales):
    """The rule with the allowance; ``Verdict.strict`` says whether the 2x rule alone holds too."""
    verdict = tolerance.judge(name, x, ref, input_dtype=input_dtype, plain=plain, scales=scales)
    return tolerance.with_allowance(verdict, ALLOWANCE, scales)


def sample_rows(layout, samples, seed=0):
    """Sorted global query positions to check: the first and last position of every run of every shard
    (``layouts.Layout.runs``: the ends of a contiguous shard, of both zigzag chunks, of a striped
    shard), plus ``samples`` more."""
    N = layout.N
    edges = [p for r in range(layout.P) for run in layout.runs(r) for p in (range(*run)[0], range(*run)[-1])]
    spread = np.linspace(0, N - 1, num=min(samples, N)).astype(np.int64)
    extra = np.random.default_rng(seed).integers(0, N, size=min(samples, N))
    return np.unique(np.concatenate([edges, spread, extra])).astype(np.int64)


NO_HIDING = (None, None)            # (window, segments) as the oracle's ``_visible`` takes them: none


def _scores(q_rows, rows, k, k_pos, causal, scale, dtype, hide=NO_HIDING):
    """scale * q k^T of the sampled rows against one key shard, in ``dtype``: (B, H, R, n), -inf if hidden
    by ``causal`` or ``hide`` (window, segments)."""
    Hq = q_rows.shape[2]
    s = (q_rows.astype(dtype).transpose(0, 2, 1, 3) @ _heads(k, Hq).astype(dtype).transpose(0, 1, 3, 2))
    s *= dtype.type(scale)
    return np.where(_visible(rows, k_pos, causal, None, *hide), s, dtype.type(-np.inf))


def _partial(q_rows, rows, k, v, k_pos, causal, scale, hide=NO_HIDING):
    """float64 sums of the sampled rows over one key shard: o (B, H, R, D), m and l (B, H, R)."""
    s = _scores(q_rows, rows, k, k_pos, causal, scale, np.dtype(np.float64), hide)
    m = s.max(axis=-1)
    e = np.exp(s - np.where(np.isneginf(m), 0.0, m)[..., None])
    return e @ _heads(v, q_rows.shape[2]), m, e.sum(axis=-1)


def _combine(partials):
    """Add up per-shard (o, m, l) sums exactly: out (B, R, H, D) and lse (B, H, R), float64."""
    M = np.max([m for _, m, _ in partials], axis=0)
    M = np.where(np.isneginf(M), 0.0, M)
    o = sum(np.exp(m - M)[..., None] * o for o, m, _ in partials)
    l = sum(np.exp(m - M) * l for _, m, l in partials)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l[..., None] > 0, o / l[..., None], 0.0).transpose(0, 2, 1, 3), M + np.log(l)


def _dq_partial(q_rows, do_rows, out_rows, lse_rows, rows, k, v, k_pos, causal, scale, dtype, hide=NO_HIDING):
    """sum over one key shard of scale * p (dp - delta) k for the sampled rows, in ``dtype``: (B, H, R, D).

    With float64 and the oracle's out and lse this is the oracle's dq; with the run's precision and the
    plain out and lse, the plain one."""
    Hq = q_rows.shape[2]
    kh, vh = _heads(k, Hq).astype(dtype), _heads(v, Hq).astype(dtype)
    do = do_rows.astype(dtype).transpose(0, 2, 1, 3)
    s = _scores(q_rows, rows, k, k_pos, causal, scale, dtype, hide)
    p = np.exp(s - np.where(np.isneginf(lse_rows), 0, lse_rows).astype(dtype)[..., None])
    delta = np.sum(do * out_rows.astype(dtype).transpose(0, 2, 1, 3), axis=-1, keepdims=True)
    return dtype.type(scale) * ((p * (do @ vh.transpose(0, 1, 3, 2) - delta)) @ kh)


def _plain_rows(comm, gathered_q, rows, k, v, k_pos, causal, scale, dtype, hide=NO_HIDING):
    """The textbook computation of the sampled rows in ``dtype``, shard by shard: out (B, R, H, D), lse."""
    s = _scores(gathered_q, rows, k, k_pos, causal, scale, dtype, hide)
    M = np.max(comm.allgather(s.max(axis=-1)), axis=0)
    e = np.exp(s - M[..., None])
    parts = comm.allgather((e @ _heads(v, gathered_q.shape[2]).astype(dtype), e.sum(axis=-1)))
    o, l = sum(o_r for o_r, _ in parts), sum(l_r for _, l_r in parts)       # in rank order, in ``dtype``
    return (o / l[..., None]).transpose(0, 2, 1, 3), M + np.log(l)


def full_verdicts(q, k, v, results, *, causal, scale, dout=None, input_dtype=None, window=None, segment_ids=None,
                  cu_seqlens=None):
    """Judge every output of a run on whole arrays: q (B, N, Hq, D), k, v (B, N, Hkv, D), results
    {"out", "lse"[, "dq", "dk", "dv"]} in natural order, under the mask of ``causal``, ``window``,
    ``segment_ids``, ``cu_seqlens`` (``naive_attention``). ``input_dtype`` is the run's dtype when the
    inputs given here were widened for the oracle (bfloat16 to float32); default q's. Returns
    {name: Verdict}."""
    input_dtype = q.dtype if input_dtype is None else np.dtype(input_dtype)
    masking = dict(causal=causal, window=window, segment_ids=segment_ids, cu_seqlens=cu_seqlens)
    refs = dict(zip(("out", "lse"), naive_attention(q, k, v, scale=scale, **masking)))
    if dout is not None:
        refs.update(zip(("dq", "dk", "dv"), naive_attention_backward(q, k, v, dout, scale=scale, **masking)))
    plain = plain_outputs(q, k, v, dout, scale=scale, round_to=input_dtype, **masking)
    scales = tolerance.Scales.of(q, k, v, dout, scale=scale)
    return {name: _judge(name, results[name], refs[name], input_dtype, plain[name], scales) for name in refs}


def sampled_verdicts(comm, rows, pos, q, k, v, results, *, causal, scale, dout=None, input_dtype=None, window=None,
                     segment_ids=None, cu_seqlens=None):
    """Judge out, lse (and dq) of this run on the sampled global ``rows``, against the float64 oracle.

    Every rank of ``comm`` calls this with its own shard: positions ``pos`` (any layout, shard order),
    inputs q, k, v (and dout), and the ring's results {"out", "lse"[, "dq"]} for that shard;
    ``input_dtype`` and the mask as for ``full_verdicts`` (segment_ids: (B, N), the whole sequence's).
    Returns {name: Verdict} on every rank.
    """
    input_dtype = q.dtype if input_dtype is None else np.dtype(input_dtype)
    N = sum(comm.allgather(len(pos)))
    hide = masks.check_window(window), _segments(segment_ids, cu_seqlens, q.shape[0], N)
    sorter = np.argsort(pos)
    at = np.minimum(np.searchsorted(pos, rows, sorter=sorter), len(pos) - 1)
    mine = pos[sorter[at]] == rows                                   # the sampled rows this rank holds
    local = sorter[at[mine]]                                         # ... and where they are in its shard
    back = np.argsort(np.concatenate(comm.allgather(np.flatnonzero(mine))))   # gathered order -> rows' order

    def gathered(x, axis=1):
        """Every rank's sampled rows of x, in the order of ``rows``."""
        return np.take(np.concatenate(comm.allgather(np.take(x, local, axis=axis)), axis=axis), back, axis=axis)

    q_rows = gathered(q)
    refs = dict(zip(("out", "lse"), _combine(comm.allgather(_partial(q_rows, rows, k, v, pos, causal, scale,
                                                                      hide)))))
    dt = computing_dtype(q.dtype)
    plain = dict(zip(("out", "lse"), _plain_rows(comm, q_rows, rows, k, v, pos, causal, scale, dt, hide)))
    if dout is not None:
        do_rows = gathered(dout)
        refs["dq"] = sum(comm.allgather(_dq_partial(q_rows, do_rows, refs["out"], refs["lse"], rows, k, v, pos,
                                                    causal, scale, np.dtype(np.float64), hide))).transpose(0, 2, 1, 3)
        stored_out = plain["out"].astype(input_dtype)            # the backward is given out as the run returns it
        plain["dq"] = sum(comm.allgather(_dq_partial(q_rows, do_rows, stored_out, plain["lse"], rows, k, v, pos,
                                                     causal, scale, dt, hide))).transpose(0, 2, 1, 3)
    plain = {name: x if name == "lse" else x.astype(input_dtype) for name, x in plain.items()}
    scales = tolerance.Scales.of(q, k, v, dout, scale=scale)
    for other in comm.allgather(scales):
        scales = scales.combine(other)
    return {name: _judge(name, gathered(results[name], axis=2 if name == "lse" else 1), refs[name], input_dtype,
                         plain[name], scales) for name in refs}
