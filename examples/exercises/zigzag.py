"""Exercise 4 of ``specs/exercises.md``: the zigzag layout's ``positions(rank)``, checked.

Zigzag cuts N tokens into 2P chunks, as ``Contiguous(N, 2P)`` cuts them (the first N % 2P chunks one token
longer), and gives rank r chunks r and 2P-1-r, in increasing position order. Under a causal mask a chunk
near the start (little work) is paired with one near the end (much work), so every rank gets about the
same number of visible (query, key) pairs; contiguous shards give the last rank about twice the mean.

    python examples/exercises/zigzag.py                     checks the reference answer below
    python examples/exercises/zigzag.py mymodule:MyZigzag   checks yours: MyZigzag(N, P).positions(rank)

The check compares your positions with the reference for every N <= 40 and 2P <= N, checks that the ranks'
positions together are 0..N-1 exactly once, runs ``examples/ring_in_40_lines.py`` on your layout against
the float64 oracle, and prints the causal work per rank of both layouts.
"""

import importlib
import sys
from pathlib import Path

import numpy as np

import refimpl
from refimpl.layouts import Contiguous

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import ring_in_40_lines  # noqa: E402


class Zigzag:
    """The reference answer: rank r holds chunks r and 2P-1-r of 2P."""

    def __init__(self, N, P):
        self.P, self.chunks = P, Contiguous(N, 2 * P)

    def positions(self, rank):
        return np.concatenate([self.chunks.positions(rank), self.chunks.positions(2 * self.P - 1 - rank)])


def causal_work(positions):
    """Visible (query, key) pairs of a rank's queries under a causal mask: query i sees i + 1 keys."""
    return int(np.sum(np.asarray(positions) + 1))


def check(layout):
    """Raises AssertionError on the first wrong answer; prints the ring's error and the balance."""
    for N in range(2, 41):
        for P in range(1, N // 2 + 1):
            mine = [np.asarray(layout(N, P).positions(r)) for r in range(P)]
            for r, pos in enumerate(mine):
                want = Zigzag(N, P).positions(r)
                if pos.dtype.kind not in "iu" or not np.array_equal(pos, want):
                    raise AssertionError(f"N={N}, P={P}, rank {r}: positions {pos.tolist()}, "
                                         f"expected {want.tolist()}")
            if not np.array_equal(np.sort(np.concatenate(mine)), np.arange(N)):
                raise AssertionError(f"N={N}, P={P}: the ranks' positions are not 0..{N - 1} exactly once")
    rng = np.random.default_rng(0)
    N, P = 13, 3
    q, k, v, dout = (rng.standard_normal((1, N, 1, 4)) for _ in range(4))
    pos = [np.asarray(layout(N, P).positions(r)) for r in range(P)]
    shards = [[x[0, p, 0] for p in pos] for x in (q, k, v, dout)]
    out, lse = ring_in_40_lines.ring_forward(*shards[:3], pos, True)
    dq, dk, dv = ring_in_40_lines.ring_backward(*shards[:3], out, lse, shards[3], pos, True)
    order = np.concatenate(pos)                       # shard order -> natural order: x[order] = shards

    def natural(per_rank):
        x = np.concatenate(per_rank)
        y = np.empty_like(x)
        y[order] = x
        return y

    got = [natural(x) for x in (out, lse, dq, dk, dv)]
    ref_out, ref_lse = refimpl.naive_attention(q, k, v, causal=True)
    grads = refimpl.naive_attention_backward(q, k, v, dout, causal=True)
    want = [ref_out[0, :, 0], ref_lse[0, 0], *(g[0, :, 0] for g in grads)]
    worst = max(float(np.max(np.abs(a - b))) for a, b in zip(got, want))
    print(f"positions right for every N <= 40, 2P <= N; ring_in_40_lines on it, N={N}, P={P}, causal: "
          f"max |ring - oracle| = {worst:.1e}")
    if worst > 1e-12:
        raise AssertionError("the ring on this layout does not match the oracle")
    N = 1024
    print(f"causal work per rank at N = {N}, max / mean (1.00 is perfect balance):")
    for P in (2, 4, 8):
        ratios = []
        for cut in (Contiguous(N, P), layout(N, P)):
            work = [causal_work(cut.positions(r)) for r in range(P)]
            ratios.append(max(work) / np.mean(work))
        print(f"  P = {P}: contiguous {ratios[0]:.2f}, zigzag {ratios[1]:.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        module, name = sys.argv[1].split(":")
        sys.path.insert(0, ".")
        check(getattr(importlib.import_module(module), name))
    else:
        check(Zigzag)
