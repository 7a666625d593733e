"""Checking a ring run against the float64 oracle at sizes where the full oracle cannot run.

The oracle for one query row needs every key, but never all queries at once. So the check samples rows
(the first and last row of every shard, where off-by-one errors live, plus evenly spread rows), and
computes their exact float64 attention one key shard at a time: each rank scores the sampled rows
against the keys it holds, and the per-shard sums are added up exactly::

    o_r = sum_{j in shard r} exp(s_j - m_r) v_j,   l_r = sum_{j in shard r} exp(s_j - m_r),   m_r = max_j s_j
    M = max_r m_r,   out = sum_r exp(m_r - M) o_r / sum_r exp(m_r - M) l_r,   lse = M + log(sum_r exp(m_r - M) l_r)

Only the sampled rows (R x H x D values) ever travel, so the check holds no full tensor on any rank. The
same code runs on one process holding everything (a single "shard") and under MPI.
"""

import numpy as np

from .naive import _heads, _visible

# --check thresholds on the relative error max|x - ref| / max|ref| against the float64 oracle. The tests
# apply the stricter rule "at most 2x the error of a plain same-precision computation" (specs/tolerances.md).
# bfloat16 (GPU engine only) has 8 significant bits to float16's 11: its threshold is 8x float16's.
TOLERANCE = {"float64": 1e-12, "float32": 2e-5, "float16": 5e-3, "bfloat16": 4e-2}


def sample_rows(layout, samples, seed=0):
    """Sorted global query positions to check: every shard's first and last row, plus ``samples`` more."""
    N = layout.N
    edges = [int(p) for r in range(layout.P) for p in (layout.starts[r], layout.starts[r + 1] - 1)]
    spread = np.linspace(0, N - 1, num=min(samples, N)).astype(np.int64)
    extra = np.random.default_rng(seed).integers(0, N, size=min(samples, N))
    return np.unique(np.concatenate([edges, spread, extra])).astype(np.int64)


def _partial(q_rows, rows, k, v, k_pos, causal, scale):
    """float64 sums of the sampled rows over one key shard: o (B, H, R, D), m and l (B, H, R)."""
    Hq = q_rows.shape[2]
    s = scale * (q_rows.astype(np.float64).transpose(0, 2, 1, 3) @ _heads(k, Hq).transpose(0, 1, 3, 2))
    s = np.where(_visible(rows, k_pos, causal, None), s, -np.inf)
    m = s.max(axis=-1)
    e = np.exp(s - np.where(np.isneginf(m), 0.0, m)[..., None])
    return e @ _heads(v, Hq), m, e.sum(axis=-1)


def _combine(partials):
    """Add up per-shard (o, m, l) sums exactly: out (B, R, H, D) and lse (B, H, R), float64."""
    M = np.max([m for _, m, _ in partials], axis=0)
    M = np.where(np.isneginf(M), 0.0, M)
    o = sum(np.exp(m - M)[..., None] * o for o, m, _ in partials)
    l = sum(np.exp(m - M) * l for _, m, l in partials)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l[..., None] > 0, o / l[..., None], 0.0).transpose(0, 2, 1, 3), M + np.log(l)


def _dq_partial(q_rows, do_rows, out_rows, lse_rows, rows, k, v, k_pos, causal, scale):
    """float64 sum over one key shard of scale * p (dp - delta) k for the sampled rows: (B, H, R, D)."""
    Hq = q_rows.shape[2]
    kh, vh = _heads(k, Hq), _heads(v, Hq)
    do = do_rows.astype(np.float64).transpose(0, 2, 1, 3)
    s = scale * (q_rows.astype(np.float64).transpose(0, 2, 1, 3) @ kh.transpose(0, 1, 3, 2))
    p = np.where(_visible(rows, k_pos, causal, None), np.exp(s - np.where(np.isneginf(lse_rows), 0, lse_rows)[..., None]), 0.0)
    delta = np.sum(do * out_rows.transpose(0, 2, 1, 3), axis=-1, keepdims=True)
    return scale * ((p * (do @ vh.transpose(0, 1, 3, 2) - delta)) @ kh)


def relative_error(x, ref):
    """max |x - ref| / max |ref| over entries where ref is finite (lse = -inf rows must match exactly)."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    finite = np.isfinite(ref)
    if not np.array_equal(np.isfinite(x), finite) or not np.array_equal(x[~finite], ref[~finite]):
        return float("inf")
    scale = np.abs(ref[finite]).max() if finite.any() else 0.0
    return float(np.abs(x[finite] - ref[finite]).max() / scale) if scale > 0 else float(np.abs(x[finite]).max())


def sampled_errors(comm, rows, pos, q, k, v, out, lse, *, causal, scale, dout=None, dq=None):
    """Errors of this run's out, lse (and dq) on the sampled ``rows``, against the float64 oracle.

    Every rank of ``comm`` calls this with its own contiguous shard: positions ``pos``, inputs q, k, v,
    and the ring's out, lse (and dout, dq). Returns {"out": err, "lse": err[, "dq": err]} on every rank.
    """
    mine = (rows >= pos[0]) & (rows <= pos[-1])
    local = rows[mine] - pos[0]

    def gathered(x, axis=1):
        return np.concatenate(comm.allgather(np.take(x, local, axis=axis)), axis=axis)

    q_rows = gathered(q)
    out_ref, lse_ref = _combine(comm.allgather(_partial(q_rows, rows, k, v, pos, causal, scale)))
    errors = {"out": relative_error(gathered(out), out_ref), "lse": relative_error(gathered(lse, axis=2), lse_ref)}
    if dout is not None:
        dq_ref = sum(comm.allgather(_dq_partial(q_rows, gathered(dout), out_ref, lse_ref, rows, k, v, pos,
                                                causal, scale)))
        errors["dq"] = relative_error(gathered(dq), dq_ref.transpose(0, 2, 1, 3))
    return errors
