"""Exercise 1 of ``specs/exercises.md``: merge is associative in exact arithmetic; how far from bitwise is it?

Three partials of real attention rows over three disjoint key sets, from ``tile.attend_tile`` with float32
inputs (o in float32, lse in float64, as in the ring), folded with ``tile.merge`` as (a.b).c and as a.(b.c).
Prints how many outputs differ bitwise between the two groupings and by how much, how far each grouping is
from the float64 oracle, and whether a.b and b.a are bitwise equal.

    python examples/exercises/merge_order.py
"""

import numpy as np

from refimpl import naive_attention, tile
from refimpl.masks import FULL, NoMask

H, D, KEYS = 10, 16, (40, 70, 90)
N = sum(KEYS)


def partials(rng):
    """q (1, N, H, D), k and v (1, N, 1, D) float32 (H query heads read one kv head: H * N rows), and the
    partials (o, lse) of every row over each key set, in working form: (1, 1, H, N, D) and (1, 1, H, N)."""
    q = rng.standard_normal((1, N, H, D)).astype(np.float32)
    k, v = (rng.standard_normal((1, N, 1, D)).astype(np.float32) for _ in range(2))
    qt, ws, rows = tile.q_tile(q, 1, np.float32), tile.Workspace(np.float32), np.arange(N)
    cuts = np.split(np.arange(N), np.cumsum(KEYS)[:-1])
    return (q, k, v), [tile.attend_tile(qt, tile.kv_tile(k[:, c], np.float32), tile.kv_tile(v[:, c], np.float32),
                                        rows, c, NoMask(), FULL, 1 / np.sqrt(D), ws) for c in cuts]


def merged(first, *others):
    """first . others[0] . others[1] ..., left to right, on copies (``tile.merge`` works in place)."""
    o, lse = first[0].copy(), first[1].copy()
    for part in others:
        tile.merge(o, lse, *part)
    return o, lse


def ulps(x, ref):
    """|x - ref| in units of the spacing of x's dtype at the largest |ref| of the row (the last axis for o,
    the element itself for lse): an output near 0 is not judged by its own tiny spacing."""
    size = np.abs(ref).max(axis=-1, keepdims=True) if ref.ndim == 3 else np.abs(ref)
    return np.abs(x.astype(np.float64) - ref) / np.spacing(size.astype(x.dtype)).astype(np.float64)


def main():
    (q, k, v), (a, b, c) = partials(np.random.default_rng(0))
    left, right = merged(merged(a, b), c), merged(a, merged(b, c))
    ref_out, ref_lse = naive_attention(q, k, v)
    ref_o, ref_l = ref_out[0].transpose(1, 0, 2), ref_lse[0]                # (H, N, D), (H, N)
    o_l, o_r, l_l, l_r = left[0][0, 0], right[0][0, 0], left[1][0, 0], right[1][0, 0]
    stats = dict(o_differ=float(np.mean(o_l != o_r)), o_ulps=float(ulps(o_l, o_r.astype(np.float64)).max()),
                 lse_differ=float(np.mean(l_l != l_r)), lse_ulps=float(ulps(l_l, l_r).max()),
                 err_left=float(ulps(o_l, ref_o).max()), err_right=float(ulps(o_r, ref_o).max()),
                 lse_err=max(float(ulps(x.astype(np.float32), ref_l).max()) for x in (l_l, l_r)))
    ab, ba = merged(a, b), merged(b, a)
    stats["commutative"] = bool(np.array_equal(ab[0], ba[0]) and np.array_equal(ab[1], ba[1]))
    print(f"{H * N} rows, D = {D}, keys split {' + '.join(map(str, KEYS))}; o float32, lse float64 (as in the ring)")
    print(f"(a.b).c against a.(b.c): o differs in {100 * stats['o_differ']:.1f}% of its elements, by at most "
          f"{stats['o_ulps']:.0f} float32 ulps")
    print(f"  (ulps of the row's largest |o|); lse in {100 * stats['lse_differ']:.1f}%, by at most "
          f"{stats['lse_ulps']:.0f} float64 ulps")
    print(f"against the float64 oracle: o within {stats['err_left']:.1f} float32 ulps ((a.b).c) and "
          f"{stats['err_right']:.1f} (a.(b.c)); lse, rounded to float32, within {stats['lse_err']:.1f}")
    print(f"a.b and b.a bitwise equal: {stats['commutative']}")
    return stats


if __name__ == "__main__":
    main()
