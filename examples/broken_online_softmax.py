"""A blockwise (online-softmax) kernel with one classic bug: the running output is not rescaled.

Online softmax visits the keys a block at a time and keeps, per query row, the running max m, the
running sum l and the running output o. When a block raises the max from m to m', everything summed so
far was weighted by exp(s - m) and must be re-weighted by exp(m - m')::

    m' = max(m, rowmax(s))
    l  = l * exp(m - m') + rowsum(exp(s - m'))
    o  = o * exp(m - m') + exp(s - m') v          <- this kernel forgets the factor on o

lse = m + log l stays right, so does dv (p is recomputed from lse); out is wrong wherever a later block
raised the max, and dq and dk with it (through delta = rowsum(dout * out)). ``verify`` catches it and the
hint names the rescale.

    python examples/broken_online_softmax.py
"""

import numpy as np

import refimpl

BLOCK = 16


def _scores(q, k, scale, causal, rows, cols):
    """(B, H, len(rows), len(cols)) float32 scores of query rows against key cols, -inf where hidden."""
    G = q.shape[2] // k.shape[2]
    qh = q[:, rows].transpose(0, 2, 1, 3)
    kh = np.repeat(k[:, cols], G, axis=2).transpose(0, 2, 1, 3)
    s = (qh @ kh.transpose(0, 1, 3, 2)) * np.float32(scale)
    if causal:
        s = np.where(cols[None, :] <= rows[:, None], s, np.float32(-np.inf))
    return s


def forward(q, k, v, *, causal, scale):
    """float32 inputs q (B, N, Hq, D), k, v (B, N, Hkv, D) -> out (B, N, Hq, D), lse (B, Hq, N)."""
    B, N, Hq, D = q.shape
    G = Hq // k.shape[2]
    rows = np.arange(N)
    m = np.full((B, Hq, N, 1), -np.inf, np.float32)
    l = np.zeros((B, Hq, N, 1), np.float32)
    o = np.zeros((B, Hq, N, D), np.float32)
    for start in range(0, N, BLOCK):
        cols = np.arange(start, min(start + BLOCK, N))
        s = _scores(q, k, scale, causal, rows, cols)
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        safe = np.where(np.isneginf(m_new), np.float32(0), m_new)     # rows that saw no key yet
        p = np.exp(s - safe)
        l = l * np.exp(m - safe) + p.sum(axis=-1, keepdims=True)
        o = o + p @ np.repeat(v[:, cols], G, axis=2).transpose(0, 2, 1, 3)     # BUG: o * exp(m - safe) missing
        m = m_new
    out = (o / l).transpose(0, 2, 1, 3)
    return out.astype(q.dtype), (m + np.log(l))[..., 0]


def backward(q, k, v, out, lse, dout, *, causal, scale):
    """The flash-attention-2 gradients from out and lse (correct; whole matrices for brevity)."""
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    pos = np.arange(N)
    p = np.exp(_scores(q, k, scale, causal, pos, pos) - lse[..., None])
    do = dout.transpose(0, 2, 1, 3)
    vh = np.repeat(v, G, axis=2).transpose(0, 2, 1, 3)
    kh = np.repeat(k, G, axis=2).transpose(0, 2, 1, 3)
    delta = (do * out.transpose(0, 2, 1, 3)).sum(axis=-1, keepdims=True)
    ds = p * (do @ vh.transpose(0, 1, 3, 2) - delta)
    dq = np.float32(scale) * (ds @ kh)
    dk = np.float32(scale) * (ds.transpose(0, 1, 3, 2) @ q.transpose(0, 2, 1, 3))
    dv = p.transpose(0, 1, 3, 2) @ do

    def fold(g):                                    # (B, Hq, N, D) -> (B, N, Hkv, D), summed over each group
        return g.reshape(B, Hkv, G, N, D).sum(axis=2).transpose(0, 2, 1, 3)
    return dq.transpose(0, 2, 1, 3), fold(dk), fold(dv)


def attention(q, k, v, *, causal, scale, dout=None):
    out, lse = forward(q, k, v, causal=causal, scale=scale)
    results = {"out": out, "lse": lse}
    if dout is not None:
        results.update(zip(("dq", "dk", "dv"), backward(q, k, v, out, lse, dout, causal=causal, scale=scale)))
    return results


def main():
    report = refimpl.verify(attention, dtypes=("fp32",))
    print(report.text())
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main().passed else 1)
