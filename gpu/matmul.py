"""The plain GPU tile engine: each planned tile as cuBLAS products (``cupy.matmul``) and elementwise ops.

This is ``refimpl/tile.py`` on the device, with all the heads of a tile in one batched product: the same
scores, the same row max, the same float64 ``lse`` and merge weights, the same backward formulas. It is
the baseline the fused kernels are measured against, their fallback (head dims over 128, and float64),
and, with float64 inputs, a float64 GPU oracle: DGEMM tiles, so 10^6 tokens take minutes, not days.

Working form as in ``refimpl/tile.py``: q, dout tiles (B, Hkv, G, bq, D); k, v tiles (B, Hkv, 1, bk, D);
scores (B, Hkv, G, bq, bk). Inputs arrive already in the accumulation dtype (``widened``).
"""

import cupy as cp
import numpy as np

from refimpl.masks import PARTIAL


def _grouped(x, Hkv):
    """(B, n, Hq, D) -> (B, Hkv, G, n, D), a view."""
    B, n, Hq, D = x.shape
    return x.reshape(B, n, Hkv, Hq // Hkv, D).transpose(0, 2, 3, 1, 4)


def _ungrouped(x):
    """(B, Hkv, G, n, D) -> (B, n, Hq, D)."""
    B, Hkv, G, n, D = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(B, n, Hkv * G, D)


def _kv(x):
    """(B, bk, Hkv, D) -> (B, Hkv, 1, bk, D), a view."""
    return x.transpose(0, 2, 1, 3)[:, :, None]


def _scores(qt, kt, scale, hidden):
    """(q k^T) * scale, as in refimpl/tile.py (the scale multiplies the scores, not q), -inf where hidden."""
    s = cp.matmul(qt, kt.swapaxes(-1, -2))
    s *= s.dtype.type(scale)
    return s if hidden is None else cp.where(hidden, s.dtype.type(-np.inf), s)


def _hidden(mask, q_pos, k_pos, kind):
    """(bq, bk) bool on the device, True where the mask hides a key, or (Bs, 1, 1, bq, bk) for documents
    that differ per batch (the scores are (B, Hkv, G, bq, bk)); None on a full tile."""
    if kind != PARTIAL:
        return None
    visible = mask.visible(q_pos, k_pos)
    return ~cp.asarray(visible if visible.ndim == 2 else visible[:, None, None])


def attend(o, lse, q, k, v, q_pos, k_pos, mask, scale, plan, on_tile):
    """Fold the plan's tiles into o (B, nq, Hq, D) and the float64 lse (B, Hq, nq); inputs widened."""
    Hkv, acc = k.shape[2], o.dtype
    for qs, cols in plan.rows:
        qt = _grouped(q[:, qs], Hkv)
        o_run = _grouped(o[:, qs], Hkv).copy()
        lse_run = lse[:, :, qs].reshape(qt.shape[:4]).copy()
        for ks, kind in cols:
            s = _scores(qt, _kv(k[:, ks]), scale, _hidden(mask, q_pos[qs], k_pos[ks], kind))
            m = s.max(axis=-1)
            m = cp.where(m == -np.inf, m.dtype.type(0), m)         # a row hidden from the tile: exp(-inf) = 0
            s = cp.exp(s - m[..., None])
            l = s.sum(axis=-1)
            ot = cp.matmul(s, _kv(v[:, ks])) / cp.where(l > 0, l, l.dtype.type(1))[..., None]
            lt = m.astype(cp.float64) + cp.log(l.astype(cp.float64))
            new = cp.logaddexp(lse_run, lt)
            safe = cp.where(new == -np.inf, 0.0, new)
            o_run *= cp.exp(lse_run - safe).astype(acc)[..., None]
            o_run += cp.exp(lt - safe).astype(acc)[..., None] * ot
            lse_run = new
            if on_tile is not None:
                on_tile()
        o[:, qs] = _ungrouped(o_run)
        lse[:, :, qs] = lse_run.reshape(lse.shape[0], -1, lse_run.shape[-1])


def attend_backward(dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, plan, on_tile):
    """Add the plan's gradient contributions; q, k, v, dout widened, lse and delta (B, Hq, nq) in acc."""
    B, Hkv, acc = k.shape[0], k.shape[2], dq.dtype
    for qs, cols in plan.rows:
        qt = _grouped(q[:, qs], Hkv)
        dot = _grouped(dout[:, qs], Hkv)
        G, bq, D = qt.shape[2], qt.shape[3], qt.shape[4]
        lse_t = lse[:, :, qs].reshape(B, Hkv, G, bq)
        delta_t = delta[:, :, qs].reshape(B, Hkv, G, bq)
        dq_rows = cp.zeros(qt.shape, acc)
        for ks, kind in cols:
            kt, vt = _kv(k[:, ks]), _kv(v[:, ks])
            p = cp.exp(_scores(qt, kt, scale, _hidden(mask, q_pos[qs], k_pos[ks], kind)) - lse_t[..., None])
            bk = p.shape[-1]
            p_rows = p.reshape(B, Hkv, G * bq, bk)
            dv[:, ks] += cp.matmul(p_rows.swapaxes(-1, -2), dot.reshape(B, Hkv, G * bq, D)).transpose(0, 2, 1, 3)
            ds = (cp.matmul(dot, vt.swapaxes(-1, -2)) - delta_t[..., None]) * p
            dq_rows += cp.matmul(ds, kt)
            dk[:, ks] += (cp.matmul(ds.reshape(B, Hkv, G * bq, bk).swapaxes(-1, -2), qt.reshape(B, Hkv, G * bq, D))
                          * acc.type(scale)).transpose(0, 2, 1, 3)
            if on_tile is not None:
                on_tile()
        dq[:, qs] += _ungrouped(dq_rows * acc.type(scale))


def score_bytes(plan, B, Hq, acc):
    """The largest score block this engine allocates for a plan (a few of them live at once)."""
    biggest = max((sl.stop - sl.start) * (ks.stop - ks.start) for sl, cols in plan.rows for ks, _ in cols) \
        if plan.rows else 0
    return B * Hq * biggest * np.dtype(acc).itemsize
