"""Plain attention: the textbook computation in a low precision, the yardstick of the tolerance rule.

An implementation in float32 (or float16, bfloat16) cannot match the float64 oracle exactly; the question
is whether its error is as small as that precision allows. The yardstick is the error of the obvious
computation in the same precision, written without any of the ring's machinery (no tiles, no merge, no
running lse), as flash-attention's tests do::

    s   = (q k^T) * scale          the whole (N, N) score matrix, in the computing dtype
    p   = exp(s - rowmax(s)) / l   -inf where the mask hides a key
    out = p v,   lse = rowmax + log l
    dv  = p^T dout,   ds = p * (dout v^T - rowsum(dout * out)),   dq = scale ds k,   dk = scale ds^T q

float16 and bfloat16 inputs are computed in float32 (as every backend here does) and the outputs that a
backend returns in the input dtype (out, dq, dk, dv) are rounded to it; lse stays float32. The rule
(``tolerance.py``) compares a result's error with this one's. Memory is O(B * Hq * N^2): small N only.
"""

import numpy as np

from .naive import _fold_heads, _heads


def computing_dtype(dtype):
    """float64 computes in float64; everything narrower computes in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _probabilities(q, k, causal, scale, dt):
    """p (B, Hq, N, N) and lse (B, Hq, N), computed entirely in ``dt``."""
    Hq, N = q.shape[2], q.shape[1]
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh = _heads(k, Hq).astype(dt)
    s = (qh @ kh.transpose(0, 1, 3, 2)) * dt.type(scale)
    if causal:
        s = np.where(np.tril(np.ones((N, N), bool)), s, dt.type(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    return e / l, (m + np.log(l))[..., 0]


def plain_attention(q, k, v, *, causal=False, scale, dtype=np.float32):
    """Textbook attention in ``dtype`` arithmetic (float16/bfloat16 inputs: pass dtype=float32).

    q (B, N, Hq, D), k and v (B, N, Hkv, D) -> out (B, N, Hq, D), lse (B, Hq, N), both in ``dtype``.
    Every row must see at least one key.
    """
    dt = np.dtype(dtype)
    p, lse = _probabilities(q, k, causal, scale, dt)
    out = p @ _heads(v, q.shape[2]).astype(dt)
    return out.transpose(0, 2, 1, 3), lse


def plain_attention_backward(q, k, v, dout, *, causal=False, scale, dtype=np.float32):
    """Textbook attention gradients in ``dtype`` arithmetic. Returns dq (B, N, Hq, D), dk, dv (B, N, Hkv, D)."""
    dt = np.dtype(dtype)
    Hq, Hkv = q.shape[2], k.shape[2]
    p, _ = _probabilities(q, k, causal, scale, dt)
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh, vh = _heads(k, Hq).astype(dt), _heads(v, Hq).astype(dt)
    do = dout.astype(dt).transpose(0, 2, 1, 3)
    out = p @ vh
    dv = p.transpose(0, 1, 3, 2) @ do
    ds = p * (do @ vh.transpose(0, 1, 3, 2) - (do * out).sum(axis=-1, keepdims=True))
    dq = dt.type(scale) * (ds @ kh)
    dk = dt.type(scale) * (ds.transpose(0, 1, 3, 2) @ qh)
    return dq.transpose(0, 2, 1, 3), _fold_heads(dk, Hkv), _fold_heads(dv, Hkv)


def plain_outputs(q, k, v, dout=None, *, causal=False, scale, round_to=None):
    """The plain results a backend with inputs of dtype ``round_to`` (default q's) is compared with, as the
    backend returns them (bfloat16 inputs may be given widened to float32, with ``round_to`` bfloat16).

    Returns {"out", "lse"[, "dq", "dk", "dv"]}: computed in ``computing_dtype(round_to)``, and out, dq, dk,
    dv rounded to ``round_to`` (float16, bfloat16); lse stays in the computing dtype.
    """
    round_to = q.dtype if round_to is None else np.dtype(round_to)
    dt = computing_dtype(round_to)
    out, lse = plain_attention(q, k, v, causal=causal, scale=scale, dtype=dt)
    results = {"out": out, "lse": lse}
    if dout is not None:
        results.update(zip(("dq", "dk", "dv"),
                           plain_attention_backward(q, k, v, dout, causal=causal, scale=scale, dtype=dt)))
    return {name: x if name == "lse" else x.astype(round_to) for name, x in results.items()}
