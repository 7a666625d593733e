"""Ring attention in 40 lines: one head, no GQA, one tile per shard, P ranks simulated hop by hop.

Written for reading (``specs/walkthrough.md`` section 5 maps each line to the module that does the same
with GQA, tiles and dtypes). q, k, v, out, dout and the gradients of rank r are (n_r, D) float64 arrays;
``pos[r]`` holds the global positions of rank r's tokens, so any layout (contiguous, zigzag) works.
Run it to compare it with the float64 oracle: ``python examples/ring_in_40_lines.py``.
"""
import numpy as np


def scores(q, k, q_pos, k_pos, causal):                 # s = (q k^T) / sqrt(D), -inf where hidden
    s = (q @ k.T) / np.sqrt(q.shape[1])
    return np.where(k_pos[None, :] <= q_pos[:, None], s, -np.inf) if causal else s


def attend(q, k, v, q_pos, k_pos, causal):              # one tile -> its partial (o, lse)
    s = scores(q, k, q_pos, k_pos, causal)
    m = np.max(s, axis=1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(m), m, 0.0))     # a row that sees no key: e = 0
    l = e.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l > 0, e @ v / l, 0.0), np.log(l[:, 0]) + m[:, 0]


def merge(o_a, lse_a, o_b, lse_b):                      # partials over disjoint keys -> over their union
    lse = np.logaddexp(lse_a, lse_b)
    safe = np.where(np.isneginf(lse), 0.0, lse)
    return np.exp(lse_a - safe)[:, None] * o_a + np.exp(lse_b - safe)[:, None] * o_b, lse


def ring_forward(q, k, v, pos, causal):                 # lists of P shards -> out, lse per rank
    P = len(q)
    o, lse = [np.zeros_like(x) for x in q], [np.full(len(x), -np.inf) for x in q]
    held = list(range(P))                               # held[r]: whose K/V rank r holds now
    for step in range(P):
        for r, s in enumerate(held):
            o[r], lse[r] = merge(o[r], lse[r], *attend(q[r], k[s], v[s], pos[r], pos[s], causal))
        held = [held[r - 1] for r in range(P)]          # one hop: rank r receives from rank r - 1
    return o, lse


def ring_backward(q, k, v, out, lse, dout, pos, causal):   # -> dq, dk, dv per rank
    P = len(q)
    delta = [np.sum(d * o, axis=1) for d, o in zip(dout, out)]
    dq = [np.zeros_like(x) for x in q]
    held = [(s, np.zeros_like(k[s]), np.zeros_like(v[s])) for s in range(P)]   # K/V owner, its dK, dV
    for step in range(P):
        for r, (s, dk, dv) in enumerate(held):
            p = np.exp(scores(q[r], k[s], pos[r], pos[s], causal) - lse[r][:, None])
            ds = p * (dout[r] @ v[s].T - delta[r][:, None]) / np.sqrt(q[r].shape[1])
            dq[r] += ds @ k[s]
            held[r] = (s, dk + ds.T @ q[r], dv + p.T @ dout[r])
        held = [held[r - 1] for r in range(P)]          # dK/dV travel with K/V; after P hops: home
    return dq, [dk for _, dk, _ in held], [dv for _, _, dv in held]


if __name__ == "__main__":
    import refimpl
    rng = np.random.default_rng(0)
    N, P, D, causal = 11, 3, 4, True                    # uneven shards: 4, 4, 3 tokens
    q, k, v, dout = (rng.standard_normal((1, N, 1, D)) for _ in range(4))
    pos = np.array_split(np.arange(N), P)
    shards = [[x[0, p, 0] for p in pos] for x in (q, k, v, dout)]
    out, lse = ring_forward(*shards[:3], pos, causal)
    dq, dk, dv = ring_backward(*shards[:3], out, lse, shards[3], pos, causal)
    ref_out, ref_lse = refimpl.naive_attention(q, k, v, causal=causal)
    ref_dq, ref_dk, ref_dv = refimpl.naive_attention_backward(q, k, v, dout, causal=causal)
    for name, mine, ref in [("out", out, ref_out[0, :, 0]), ("lse", lse, ref_lse[0, 0]), ("dq", dq, ref_dq[0, :, 0]),
                            ("dk", dk, ref_dk[0, :, 0]), ("dv", dv, ref_dv[0, :, 0])]:
        print(f"{name:<4} max |ring - oracle| = {np.max(np.abs(np.concatenate(mine) - ref)):.1e}")
