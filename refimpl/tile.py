"""The tile: attention of one block of queries against one block of keys, and the merge of partials.

Everything in this project that computes attention reduces to these three functions:

``attend_tile``           one (q tile, k tile) pair -> a partial (o, lse) over just those keys
``merge``                 fold a partial into a running (o, lse); stable; associative and commutative in
                          exact arithmetic, in floating point bitwise commutative but associative only
                          up to rounding (``specs/algorithm.md`` section 3)
``attend_tile_backward``  the flash-attention-2 backward of one tile, recomputing p from the final lse

A partial (o, lse) over a key set S is the exact attention restricted to S: o = sum_{j in S} p_j v_j with
p normalised over S, and lse = log sum_{j in S} exp(s_j). Two partials over disjoint key sets merge to
the partial over their union::

    lse = log(exp(lse_a) + exp(lse_b))                      (logaddexp: no overflow)
    o   = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b

so the order in which tiles and ring steps arrive only changes rounding, never the result. An empty key
set is the partial (o = 0, lse = -inf), the identity of ``merge``.

Working form. Tiles use a head-grouped layout so that one batched matmul serves GQA without copying
k or v: query head h = g + G * c reads kv head c, where G = Hq / Hkv::

    q, dout tiles   (B, Hkv, G, bq, D)   accumulation dtype, contiguous copies
    k, v tiles      (B, Hkv, 1, bk, D)   views of the (B, N, Hkv, D) shard (float32 copies for float16)
    o               (B, Hkv, G, bq, D)
    lse             (B, Hkv, G, bq)      float64 in the forward, whatever the inputs (see ``merge``)

Both passes visit the heads one at a time and keep one head's (bq, bk) block of scores alive (the
backward two: p and ds), in a reused ``Workspace``.

Scores are ``s = (q k^T) * scale``: the scale multiplies each product, as in the textbook formula. Scaling
q first would round every element of ``scale * q``, an error shared by all the scores of a row, which does
not average out over the keys (it put float32 results over the 2x rule about three times as often:
``specs/tolerances.md`` section 3.2).

A score that overflows the accumulation dtype would turn the softmax into NaN; ``attend_tile`` raises
``OverflowError`` instead (``score_overflow``).
"""

import numpy as np

from .masks import PARTIAL


def score_overflow(dtype, where):
    """The ``OverflowError`` for scores that left the range of ``dtype``; ``where`` names the row."""
    dtype = np.dtype(dtype)
    return OverflowError(f"attention scores overflowed {dtype.name} ({where}): q.k and scale * q.k must stay "
                         f"within +-{np.finfo(dtype).max:.3g}, the largest |score| {dtype.name} can hold "
                         f"(np.finfo({dtype.name}).max); scale q and k down")


class Workspace:
    """Reusable score buffers, one flat allocation per name, grown to the largest tile seen."""

    def __init__(self, dtype):
        self.dtype = np.dtype(dtype)
        self._flat = {}

    def get(self, name, shape):
        need = int(np.prod(shape))
        buf = self._flat.get(name)
        if buf is None or buf.size < need:
            buf = self._flat[name] = np.empty(need, self.dtype)
        return buf[:need].reshape(shape)

    @property
    def nbytes(self):
        return sum(b.nbytes for b in self._flat.values())


def grouped(x, Hkv):
    """View a (B, n, Hq, D) block in working form (B, Hkv, G, n, D), without copying."""
    B, n, Hq, D = x.shape
    return x.reshape(B, n, Hkv, Hq // Hkv, D).transpose(0, 2, 3, 1, 4)


def grouped_rows(lse, Hkv):
    """View a (B, Hq, n) block of lse in working form (B, Hkv, G, n), without copying."""
    B, Hq, n = lse.shape
    return lse.reshape(B, Hkv, Hq // Hkv, n)


def q_tile(x, Hkv, dtype):
    """A contiguous working-form copy of a (B, bq, Hq, D) block: (B, Hkv, G, bq, D), in ``dtype``."""
    view = grouped(x, Hkv)
    t = np.empty(view.shape, dtype)
    np.copyto(t, view)
    return t


def kv_tile(x, dtype):
    """A (B, bk, Hkv, D) block as (B, Hkv, 1, bk, D), cast to the accumulation dtype (a view if it is one)."""
    return x.transpose(0, 2, 1, 3)[:, :, None].astype(dtype, copy=False)


def _hidden(q_pos, k_pos, mask, kind, B):
    """(B, 1, 1, bq, bk) bool, True where the mask hides a key (a broadcast view of one (bq, bk) mask unless
    the mask differs by batch: documents per batch); None on a full tile (nothing to hide)."""
    if kind != PARTIAL:
        return None
    hidden = ~mask.visible(q_pos, k_pos)                 # (bq, bk), or (B, bq, bk)
    return np.broadcast_to(hidden.reshape((-1, 1, 1) + hidden.shape[-2:]), (B, 1, 1) + hidden.shape[-2:])


def _scores(q, k, scale, hidden, out):
    """out = (q k^T) * scale for a working-form tile (any leading dims), with hidden pairs set to -inf."""
    np.matmul(q, k.swapaxes(-1, -2), out=out)
    np.multiply(out, scale, out=out)
    if hidden is not None:
        np.copyto(out, -np.inf, where=hidden)
    return out


def attend_tile(q, k, v, q_pos, k_pos, mask, kind, scale, ws):
    """Partial attention of a q tile over a k/v tile.

    q (B, Hkv, G, bq, D); k, v (B, Hkv, 1, bk, D); q_pos (bq,), k_pos (bk,) global positions; ``kind``
    is the tile's class from ``mask.classify`` (empty tiles are never passed in).
    Returns o (B, Hkv, G, bq, D) in the accumulation dtype and lse (B, Hkv, G, bq) in float64. A row
    that sees no key of this tile gets o = 0, lse = -inf.

    The heads are visited one at a time so that a head's (bq, bk) scores stay in cache through the
    passes over them (scores, scale, max, subtract, exp, p v); the row sums l are a matrix-vector
    product. A row max that is NaN or +inf, or -inf on a row that sees a key of the tile, means a score
    overflowed: ``OverflowError`` (checked per row, on the maxima only).
    """
    B, Hkv, G, bq, D = q.shape
    s = ws.get("s", (bq, k.shape[3]))
    ones = np.ones(k.shape[3], s.dtype)
    hidden = _hidden(q_pos, k_pos, mask, kind, B)
    sees_a_key = None if hidden is None else ~hidden.all(axis=-1)
    o = np.empty(q.shape[:4] + (v.shape[4],), s.dtype)
    m, l = np.empty(q.shape[:4], s.dtype), np.empty(q.shape[:4], s.dtype)
    with np.errstate(over="ignore", invalid="ignore"):          # an overflow is caught below, per row
        for b, c, g in np.ndindex(B, Hkv, G):
            _scores(q[b, c, g], k[b, c, 0], scale, None if hidden is None else hidden[b, 0, 0], s)
            row_max = np.max(s, axis=1, out=m[b, c, g])
            finite = np.isfinite(row_max)
            if not finite.all():
                overflowed = ~finite if sees_a_key is None else ~finite & sees_a_key[b, 0, 0]
                if overflowed.any():
                    i = int(np.argmax(overflowed))
                    raise score_overflow(s.dtype, f"batch {b}, query head {c * G + g}, query position "
                                                  f"{q_pos[i]}: row max {row_max[i]}")
                row_max[~finite] = 0.0                     # a row hidden from the whole tile: exp(-inf - 0) = 0
            np.subtract(s, row_max[:, None], out=s)
            np.exp(s, out=s)                             # s now holds p * l, unnormalised probabilities
            np.matmul(s, ones, out=l[b, c, g])
            np.matmul(s, v[b, c, 0], out=o[b, c, g])
    with np.errstate(divide="ignore"):
        lse = m.astype(np.float64) + np.log(l.astype(np.float64))      # l = 0 -> lse = -inf
    np.divide(o, np.where(l > 0, l, 1)[..., None], out=o)              # l = 0: o is 0 already
    return o, lse


def merge(o_acc, lse_acc, o, lse):
    """Fold the partial (o, lse) into (o_acc, lse_acc), in place. Shapes (..., n, D) and (..., n).

    lse and lse_acc should be float64. The weights exp(lse_a - lse) depend on a difference of two
    numbers of size |lse|; in float32 each weight would carry an error of about |lse| ulps, several
    times the error of plain float32 attention. In float64 the weights are exact to float32 precision,
    and o (float32 for float16/float32 inputs) takes one rounding per merge.
    """
    new = np.logaddexp(lse_acc, lse)
    safe = np.where(np.isneginf(new), 0.0, new)   # both empty: weights exp(-inf) = 0, not NaN
    o_acc *= np.exp(lse_acc - safe).astype(o_acc.dtype)[..., None]
    o_acc += np.exp(lse - safe).astype(o_acc.dtype)[..., None] * o
    lse_acc[...] = new
    return o_acc, lse_acc


def attend_tile_backward(q, k, v, dout, lse, delta, q_pos, k_pos, mask, kind, scale, ws):
    """Gradient contributions of one tile, recomputing p = exp(s - lse) from the *final* lse.

    q, dout (B, Hkv, G, bq, D); k, v (B, Hkv, 1, bk, D);
    lse, delta (B, Hkv, G, bq), with delta = rowsum(dout * out) and lse = 0 on rows that see no key.
    Returns dq (B, Hkv, G, bq, D) *without* the factor ``scale`` (the caller applies it once per row
    block), and dk, dv (B, Hkv, bk, D) summed over the G query heads of each kv head::

        s  = (q k^T) * scale    p  = exp(s - lse)       dv = p^T dout       dp = dout v^T
        ds = p * (dp - delta)   dq = ds k               dk = (ds^T q) * scale

    As in ``attend_tile``, the heads are visited one at a time, so that a head's p and ds, (bq, bk)
    each, stay in cache through the passes over them.
    """
    B, Hkv, G, bq, D = q.shape
    bk = k.shape[3]
    hidden = _hidden(q_pos, k_pos, mask, kind, B)
    p, ds = ws.get("p", (bq, bk)), ws.get("ds", (bq, bk))
    dq = np.empty(q.shape, p.dtype)
    dk, dv = np.empty((B, Hkv, bk, D), p.dtype), np.empty((B, Hkv, bk, D), p.dtype)
    for b, c, g in np.ndindex(B, Hkv, G):
        _scores(q[b, c, g], k[b, c, 0], scale, None if hidden is None else hidden[b, 0, 0], p)
        np.subtract(p, lse[b, c, g, :, None], out=p)
        np.exp(p, out=p)
        np.matmul(dout[b, c, g], v[b, c, 0].T, out=ds)
        np.subtract(ds, delta[b, c, g, :, None], out=ds)
        np.multiply(ds, p, out=ds)
        np.matmul(ds, k[b, c, 0], out=dq[b, c, g])
        if g == 0:                                       # dk, dv: the sum over the G heads of kv head c
            np.matmul(p.T, dout[b, c, g], out=dv[b, c])
            np.matmul(ds.T, q[b, c, g], out=dk[b, c])
        else:
            dv[b, c] += p.T @ dout[b, c, g]
            dk[b, c] += ds.T @ q[b, c, g]
    np.multiply(dk, scale, out=dk)
    return dq, dk, dv
