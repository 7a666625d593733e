"""Plain attention: the textbook computation in a low precision, the yardstick of the tolerance rule.

An implementation in float32 (or float16, bfloat16) cannot match the float64 oracle exactly; the question
is whether its error is as small as that precision allows. The yardstick is the error of the obvious
computation in the same precision, written without any of the ring's machinery (no tiles, no merge, no
running lse), as flash-attention's tests do::

    s   = (q k^T) * scale          the whole (N, N) score matrix, in the computing dtype
    p   = exp(s - rowmax(s)) / l   -inf where the mask hides a key
    out = p v,   lse = rowmax + log l
    p   = exp(s - lse)             the backward recomputes p from the forward's lse, as stored
    dv  = p^T dout,   ds = p * (dout v^T - rowsum(dout * out)),   dq = scale ds k,   dk = scale ds^T q

The backward's p comes from the lse the forward returns, in the computing dtype (float32 for every
narrower input), because that is the contract of a backward: it is given out and lse, not the
probabilities. That lse is rounded to float32, by half an ulp of |lse|, and every probability of its
row inherits the rounding: a relative error of about eps |lse|, which at logits of 1e4 (|lse| ~ 1e4) is
6e-4, while e / l on a row that one key dominates is exact. No backward that takes a float32 lse can
avoid it, so the yardstick makes it too, and nowhere else (as the GPU rule of specs/tolerances.md 3.5
rounds p where tensor cores must).

float16 and bfloat16 inputs are computed in float32 (as every backend here does) and the outputs that a
backend returns in the input dtype (out, dq, dk, dv) are rounded to it; lse stays float32. The rule
(``tolerance.py``) compares a result's error with this one's. Memory is O(B * Hq * N^2): small N only.
"""

import numpy as np

from . import masks
from .naive import _fold_heads, _heads, _segments, _visible


def computing_dtype(dtype):
    """float64 computes in float64; everything narrower computes in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _scores(q, k, causal, scale, dt, mask, hide):
    """s (B, Hq, N, N) in ``dt``, -inf where causal, the dense ``mask`` (True = visible) or ``hide`` (the
    window and documents: ``_hiding``) hides a key."""
    Hq, N = q.shape[2], q.shape[1]
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh = _heads(k, Hq).astype(dt)
    s = (qh @ kh.transpose(0, 1, 3, 2)) * dt.type(scale)
    pos = np.arange(N)
    visible = _visible(pos, pos, causal, mask, *hide)
    return s if visible.all() else np.where(visible, s, dt.type(-np.inf))


def _hiding(q, window, segment_ids, cu_seqlens):
    """(window, segments) as the oracle's ``_visible`` takes them, the arguments checked."""
    return masks.check_window(window), _segments(segment_ids, cu_seqlens, q.shape[0], q.shape[1])


def _probabilities(q, k, causal, scale, dt, mask, hide):
    """p (B, Hq, N, N) and lse (B, Hq, N), computed entirely in ``dt``; a row that sees no key gets p = 0
    and lse = -inf."""
    s = _scores(q, k, causal, scale, dt, mask, hide)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), dt.type(0), m)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l > 0, e / l, dt.type(0)), (m + np.log(l))[..., 0]


def plain_attention(q, k, v, *, causal=False, scale, dtype=np.float32, mask=None, window=None, segment_ids=None,
                    cu_seqlens=None):
    """Textbook attention in ``dtype`` arithmetic (float16/bfloat16 inputs: pass dtype=float32).

    q (B, N, Hq, D), k and v (B, N, Hkv, D) -> out (B, N, Hq, D), lse (B, Hq, N), both in ``dtype``.
    ``mask``: an optional dense (N, N) bool array, True = visible; it, ``window``, ``segment_ids`` and
    ``cu_seqlens`` are combined with ``causal`` as the oracle combines them (``naive_attention``).
    """
    dt = np.dtype(dtype)
    p, lse = _probabilities(q, k, causal, scale, dt, mask, _hiding(q, window, segment_ids, cu_seqlens))
    out = p @ _heads(v, q.shape[2]).astype(dt)
    return out.transpose(0, 2, 1, 3), lse


def plain_attention_backward(q, k, v, dout, *, causal=False, scale, dtype=np.float32, out_dtype=None, mask=None,
                             window=None, segment_ids=None, cu_seqlens=None):
    """Textbook attention gradients in ``dtype`` arithmetic, p recomputed from the forward's ``dtype`` lse,
    and delta from the forward's out as stored (rounded to ``out_dtype``, default ``dtype``); the mask
    arguments as for ``plain_attention``. Returns dq (B, N, Hq, D), dk, dv (B, N, Hkv, D)."""
    dt = np.dtype(dtype)
    Hq, Hkv = q.shape[2], k.shape[2]
    hide = _hiding(q, window, segment_ids, cu_seqlens)
    p, lse = _probabilities(q, k, causal, scale, dt, mask, hide)
    out = (p @ _heads(v, Hq).astype(dt)).astype(dt if out_dtype is None else out_dtype).astype(dt)
    lse = np.where(np.isneginf(lse), dt.type(0), lse)                    # rows that see no key: p = exp(-inf) = 0
    p = np.exp(_scores(q, k, causal, scale, dt, mask, hide) - lse[..., None])  # from the lse, as a backward is given
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh, vh = _heads(k, Hq).astype(dt), _heads(v, Hq).astype(dt)
    do = dout.astype(dt).transpose(0, 2, 1, 3)
    dv = p.transpose(0, 1, 3, 2) @ do
    ds = p * (do @ vh.transpose(0, 1, 3, 2) - (do * out).sum(axis=-1, keepdims=True))
    dq = dt.type(scale) * (ds @ kh)
    dk = dt.type(scale) * (ds.transpose(0, 1, 3, 2) @ qh)
    return dq.transpose(0, 2, 1, 3), _fold_heads(dk, Hkv), _fold_heads(dv, Hkv)


def plain_outputs(q, k, v, dout=None, *, causal=False, scale, round_to=None, mask=None, window=None,
                  segment_ids=None, cu_seqlens=None):
    """The plain results a backend with inputs of dtype ``round_to`` (default q's) is compared with, as the
    backend returns them (bfloat16 inputs may be given widened to float32, with ``round_to`` bfloat16);
    ``mask``, ``window``, ``segment_ids`` and ``cu_seqlens`` as for ``plain_attention``.

    Returns {"out", "lse"[, "dq", "dk", "dv"]}: computed in ``computing_dtype(round_to)``, and out, dq, dk,
    dv rounded to ``round_to`` (float16, bfloat16); lse stays in the computing dtype.
    """
    round_to = q.dtype if round_to is None else np.dtype(round_to)
    dt = computing_dtype(round_to)
    masking = dict(causal=causal, mask=mask, window=window, segment_ids=segment_ids, cu_seqlens=cu_seqlens)
    out, lse = plain_attention(q, k, v, scale=scale, dtype=dt, **masking)
    results = {"out": out, "lse": lse}
    if dout is not None:
        results.update(zip(("dq", "dk", "dv"),
                           plain_attention_backward(q, k, v, dout, scale=scale, dtype=dt, out_dtype=round_to,
                                                    **masking)))
    return {name: x if name == "lse" else x.astype(round_to) for name, x in results.items()}
