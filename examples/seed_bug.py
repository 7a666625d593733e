"""The seed's bug, re-created: "ring" attention that attends each chunk of the sequence on its own.

``RingDilatedAttentionProduction`` (../shared/seed/) split the sequence into ``ring_size`` chunks and ran
full attention inside each chunk; no K/V ever travelled around a ring, so a query saw only the keys of
its own chunk. This adapter does exactly that, with a correct kernel inside each chunk
(``refimpl.blockwise_attention``), so the missing ring is the only bug. ``verify`` catches it and the
report shows where: under causal, the first chunk's rows are right and every later row is wrong.

    python examples/seed_bug.py
"""

import numpy as np

import refimpl

RING_SIZE = 4


def chunked(q, k, v, *, causal, scale, dout=None, ring_size=RING_SIZE):
    """q (B, N, Hq, D), k, v (B, N, Hkv, D) -> the outputs of attention within each of ``ring_size``
    contiguous chunks (the first N % ring_size chunks one row longer), concatenated."""
    pieces = []
    for rows in np.array_split(np.arange(q.shape[1]), ring_size):
        if rows.size == 0:
            continue
        qc, kc, vc = (np.ascontiguousarray(x[:, rows]) for x in (q, k, v))
        out, lse = refimpl.blockwise_attention(qc, kc, vc, causal=causal, scale=scale)
        piece = {"out": out, "lse": lse}
        if dout is not None:
            grads = refimpl.blockwise_attention_backward(qc, kc, vc, out, lse, np.ascontiguousarray(dout[:, rows]),
                                                         causal=causal, scale=scale)
            piece.update(zip(("dq", "dk", "dv"), grads))
        pieces.append(piece)
    return {name: np.concatenate([p[name] for p in pieces], axis=2 if name == "lse" else 1) for name in pieces[0]}


def main():
    report = refimpl.verify(chunked)
    print(report.text())
    return report


if __name__ == "__main__":
    raise SystemExit(0 if main().passed else 1)
