"""The float64 oracle: attention computed the obvious way, with the whole score matrix in memory.

This is the only module allowed to build a score matrix. It is the ground truth that every other
implementation (blockwise, ring, MPI, GPU, foreign backends) is tested against, so it is written for
clarity, not speed, and always computes in float64 whatever the input dtype::

    s   = scale * q k^T                       (B, Hq, Nq, Nk), -inf where the mask hides a key
    lse = log sum_j exp(s_ij)                 (B, Hq, Nq)
    p   = exp(s - lse)                        softmax over visible keys
    out = p v                                 (B, Nq, Hq, D)

The mask is the conjunction of ``causal`` (j <= i), a sliding ``window`` (i - left <= j <= i + right,
flash-attn's window_size, -1 = unbounded), documents (``segment_ids`` (B, N): equal ids see each other;
or ``cu_seqlens``: document d is positions cu_seqlens[d] .. cu_seqlens[d+1]-1) and an explicit dense
``mask``, written here from those definitions, on global positions (``specs/masks.md``); only the checks
of the arguments are shared with ``masks.py``.

A row with no visible key has out = 0, lse = -inf, and contributes no gradient. A visible score beyond
the float64 range (``|scale * q . k| > np.finfo(np.float64).max``) is an OverflowError, never an inf or
NaN lse. For float16 and float32 inputs only a huge ``scale`` can reach it: their q . k (at most
D * 3.4e38^2) fits float64 with room to spare.
"""

import numpy as np

from . import masks, validate


def _heads(x, Hq):
    """(B, N, Hkv, D) -> (B, Hq, N, D) float64; query head h reads kv head h // (Hq / Hkv)."""
    group = Hq // x.shape[2]
    return np.repeat(x.astype(np.float64).transpose(0, 2, 1, 3), group, axis=1)


def _fold_heads(g, Hkv):
    """(B, Hq, N, D) gradient of repeated kv heads -> (B, N, Hkv, D), summed over each group."""
    B, Hq, N, D = g.shape
    return g.reshape(B, Hkv, Hq // Hkv, N, D).sum(axis=2).transpose(0, 2, 1, 3)


def _visible(q_pos, k_pos, causal, mask, window=None, segments=None):
    """True where query q_pos[i] may attend to key k_pos[j]: (Nq, Nk) bool, or (Bs, 1, Nq, Nk) with
    ``segments`` (Bs, N) ids, Bs = 1 or B; broadcastable to the (B, Hq, Nq, Nk) scores.

    ``window`` is (left, right) with None for an unbounded side (``masks.check_window``)."""
    visible = np.ones((len(q_pos), len(k_pos)), dtype=bool) if mask is None else mask
    i, j = q_pos[:, None], k_pos[None, :]
    if causal:
        visible = visible & (k_pos[None, :] <= q_pos[:, None])
    left, right = (None, None) if window is None else window
    if left is not None:
        visible = visible & (j >= i - left)
    if right is not None:
        visible = visible & (j <= i + right)
    if segments is not None:
        visible = (visible & (segments[:, q_pos, None] == segments[:, None, k_pos]))[:, None]
    return visible


def _segments(segment_ids, cu_seqlens, B, N):
    """The documents as (Bs, N) ids, from segment_ids (B, N) or cu_seqlens (document d: cu[d] .. cu[d+1]-1),
    or None. The arguments are checked by ``masks.check_segments``."""
    masks.check_segments(segment_ids, cu_seqlens, B, N)
    if cu_seqlens is not None:
        cu = np.asarray(cu_seqlens)
        return np.repeat(np.arange(len(cu) - 1), np.diff(cu))[None]
    return segment_ids


def _check_mask(mask, Nq, Nk):
    if mask is None:
        return None
    validate.check_unmasked("mask", mask)
    if not isinstance(mask, np.ndarray) or mask.dtype != bool:
        raise TypeError(f"mask must be a bool numpy.ndarray of shape ({Nq}, {Nk}), got {type(mask).__name__}"
                        f"{'' if not isinstance(mask, np.ndarray) else ' of dtype ' + str(mask.dtype)}")
    if mask.shape != (Nq, Nk):
        raise ValueError(f"mask must have shape ({Nq}, {Nk}) (True = visible), got {mask.shape}")
    return mask


def _check_rows(rows, N):
    """Query positions: a 1-d int array or sequence of ints in [0, N) -> int64 array. Nothing is rounded."""
    validate.check_unmasked("rows", rows)
    positions = np.asarray(rows)
    if positions.size and positions.dtype.kind not in "iu":   # empty: a list [] has NumPy's float dtype
        raise TypeError(f"rows must be integer positions (an int array or a sequence of ints), "
                        f"got dtype {positions.dtype}")
    if positions.ndim != 1 or (positions.size and (positions.min() < 0 or positions.max() >= N)):
        raise ValueError(f"rows must be a 1-d array of positions in [0, {N}), got {rows!r}")
    return positions.astype(np.int64)


def _probabilities(q, k, visible, scale):
    """q (B, Hq, Nq, D), k (B, Hq, Nk, D) float64 -> p (B, Hq, Nq, Nk), lse (B, Hq, Nq).

    A visible score that is not finite (``scale * q . k`` beyond the float64 range) is an OverflowError:
    it would make lse inf or NaN (inf - inf).
    """
    with np.errstate(over="ignore", invalid="ignore"):
        s = scale * (q @ k.transpose(0, 1, 3, 2))
    bad = np.argwhere(visible & ~np.isfinite(s))
    if len(bad):
        raise OverflowError(f"scale * q k^T overflows float64 at visible score (b, h, row, key) = "
                            f"{tuple(int(i) for i in bad[0])}: its magnitude exceeds "
                            f"np.finfo(np.float64).max = {np.finfo(np.float64).max:.6g}; "
                            "reduce scale or the size of q and k")
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)          # fully hidden rows: exp(-inf - 0) = 0, no NaN
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = (m + np.log(l))[..., 0]
        p = np.where(l > 0, e / l, 0.0)
    return p, lse


def _forward(q, k, v, q_pos, k_pos, causal, scale, mask, window=None, segments=None):
    Hq = q.shape[2]
    qh, kh, vh = q.astype(np.float64).transpose(0, 2, 1, 3), _heads(k, Hq), _heads(v, Hq)
    p, lse = _probabilities(qh, kh, _visible(q_pos, k_pos, causal, mask, window, segments), scale)
    return (p @ vh).transpose(0, 2, 1, 3), lse


def naive_attention(q, k, v, *, causal=False, scale=None, mask=None, window=None, segment_ids=None,
                    cu_seqlens=None):
    """Exact attention in float64.

    q (B, N, Hq, D), k and v (B, N, Hkv, D) -> out (B, N, Hq, D) float64, lse (B, Hq, N) float64.
    ``window`` (left, right), ``segment_ids`` (B, N) ints or ``cu_seqlens`` (increasing from 0 to N), and
    ``mask``, an optional (N, N) bool array, True where a query may see a key, are all combined with
    ``causal``. Memory is O(B * Hq * N^2): use it for small N, or ``naive_rows`` for sampled rows.
    """
    B, N, _, _, D = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, D)
    pos = np.arange(N)
    return _forward(q, k, v, pos, pos, causal, scale, _check_mask(mask, N, N), masks.check_window(window),
                    _segments(segment_ids, cu_seqlens, B, N))


def naive_rows(q, k, v, rows, *, causal=False, scale=None, window=None, segment_ids=None, cu_seqlens=None):
    """Exact float64 attention for the query rows ``rows`` (global positions: an int array or a sequence of
    ints; floats and bools are a TypeError) only; the mask arguments as for ``naive_attention``.

    Returns out (B, len(rows), Hq, D) and lse (B, Hq, len(rows)). Memory is O(B * Hq * len(rows) * N),
    which is how the ring's output is checked at sequence lengths where the full oracle cannot run.
    """
    B, N, _, _, D = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, D)
    rows = _check_rows(rows, N)
    return _forward(q[:, rows], k, v, rows, np.arange(N), causal, scale, None, masks.check_window(window),
                    _segments(segment_ids, cu_seqlens, B, N))


def naive_attention_backward(q, k, v, dout, *, causal=False, scale=None, mask=None, window=None, segment_ids=None,
                             cu_seqlens=None):
    """Analytic gradients of ``naive_attention`` in float64 (the same mask arguments).

    Returns dq (B, N, Hq, D), dk and dv (B, N, Hkv, D), all float64::

        dv   = p^T dout
        dp   = dout v^T
        ds   = p * (dp - rowsum(dout * out))
        dq   = scale * ds k,    dk = scale * ds^T q

    Gradients of the kv heads shared by a GQA group are summed over the group.
    """
    B, N, Hq, Hkv, D = validate.check_qkv(q, k, v)
    validate.check_like("dout", dout, (B, N, Hq, D))
    validate.check_finite("dout", dout)
    scale = validate.check_scale(scale, D)
    pos = np.arange(N)
    qh, kh, vh = q.astype(np.float64).transpose(0, 2, 1, 3), _heads(k, Hq), _heads(v, Hq)
    do = dout.astype(np.float64).transpose(0, 2, 1, 3)
    visible = _visible(pos, pos, causal, _check_mask(mask, N, N), masks.check_window(window),
                       _segments(segment_ids, cu_seqlens, B, N))
    p, _ = _probabilities(qh, kh, visible, scale)
    out = p @ vh
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - np.sum(do * out, axis=-1, keepdims=True))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(0, 1, 3, 2) @ qh)
    return dq.transpose(0, 2, 1, 3), _fold_heads(dk, Hkv), _fold_heads(dv, Hkv)
