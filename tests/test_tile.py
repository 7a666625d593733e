"""The tile and the merge: the two primitives every other algorithm is built from.

A *partial* (o, lse) over a key set S is attention restricted to S. Two partials over disjoint key sets
merge into the partial over their union; (o = 0, lse = -inf) is the partial over the empty set and the
identity of ``merge``. These tests check those algebraic facts, then check ``attend_tile`` and
``attend_tile_backward`` on single tiles against the float64 oracle restricted to the tile's keys
(the oracle's dense ``mask`` argument hides every key outside the tile).

Working form (see ``refimpl/tile.py``): q and dout tiles are (B, Hkv, G, bq, D), k and v tiles are
(B, Hkv, 1, bk, D), o is (B, Hkv, G, bq, D) and lse is (B, Hkv, G, bq); the tile multiplies q k^T by the scale.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_2x_rule, assert_fp64_close, make_qkv, plain_attention, rel_err
from refimpl import masks, naive_attention, naive_attention_backward, tile

F64 = np.float64
# NaN-producing operations, division by zero and overflow are errors; underflow of exp(-large) is the
# intended, harmless way a tiny probability becomes 0.
STRICT = dict(divide="raise", over="raise", invalid="raise")


# -- converting between the (B, N, H, D) layout and the working form ----------------------------------

def o_to_layout(o):
    """(B, Hkv, G, n, D) -> (B, n, Hq, D); query head h = c * G + g."""
    B, Hkv, G, n, D = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, n, Hkv * G, D)


def lse_to_layout(lse):
    """(B, Hkv, G, n) -> (B, Hq, n)."""
    B, Hkv, G, n = lse.shape
    return lse.reshape(B, Hkv * G, n)


def keys_only(N, cols):
    """A dense oracle mask under which every query sees exactly the keys ``cols``."""
    m = np.zeros((N, N), bool)
    m[:, cols] = True
    return m


def run_tile(q, k, v, rows, cols, causal, scale=None):
    """attend_tile on q[:, rows] against k, v[:, cols] (slices), returned in (B, n, H, D) layout."""
    D, Hkv = q.shape[-1], k.shape[2]
    scale = 1 / np.sqrt(D) if scale is None else scale
    mask = masks.mask_for(causal)
    q_pos, k_pos = np.arange(q.shape[1])[rows], np.arange(k.shape[1])[cols]
    kind = mask.classify(q_pos, k_pos)
    assert kind != masks.EMPTY
    o, lse = tile.attend_tile(tile.q_tile(q[:, rows], Hkv, F64), tile.kv_tile(k[:, cols], F64),
                              tile.kv_tile(v[:, cols], F64), q_pos, k_pos, mask, kind, scale, tile.Workspace(F64))
    return o, lse


# -- merge --------------------------------------------------------------------------------------------

def partials(draw_shape=(2, 3, 4)):
    """Hypothesis strategy: a consistent partial (o, lse); rows with lse = -inf have o = 0."""
    n_rows = int(np.prod(draw_shape))

    @st.composite
    def strategy(draw):
        lse = np.array(draw(st.lists(st.one_of(st.floats(-60, 60), st.just(-np.inf)),
                                     min_size=n_rows, max_size=n_rows)), F64).reshape(draw_shape)
        o = np.array(draw(st.lists(st.floats(-10, 10), min_size=n_rows * 2, max_size=n_rows * 2)),
                     F64).reshape(draw_shape + (2,))
        o[np.isneginf(lse)] = 0.0
        return o, lse
    return strategy()


def merged(a, b):
    o, lse = a[0].copy(), a[1].copy()
    with np.errstate(**STRICT):
        tile.merge(o, lse, b[0], b[1])
    return o, lse


@settings(max_examples=60, deadline=None)
@given(partials(), partials(), partials())
def test_merge_is_associative(a, b, c):
    left = merged(merged(a, b), c)
    right = merged(a, merged(b, c))
    np.testing.assert_array_equal(np.isneginf(left[1]), np.isneginf(right[1]))
    fin = np.isfinite(left[1])
    np.testing.assert_allclose(left[1][fin], right[1][fin], rtol=1e-14, atol=1e-13)
    np.testing.assert_allclose(left[0], right[0], rtol=1e-13, atol=1e-13)


@settings(max_examples=60, deadline=None)
@given(partials(), partials())
def test_merge_is_commutative_bitwise(a, b):
    ab, ba = merged(a, b), merged(b, a)
    np.testing.assert_array_equal(ab[0], ba[0])
    np.testing.assert_array_equal(ab[1], ba[1])


@settings(max_examples=40, deadline=None)
@given(partials())
def test_empty_partial_is_the_identity(a):
    empty = (np.zeros_like(a[0]), np.full_like(a[1], -np.inf))
    for result in (merged(a, empty), merged(empty, a)):
        np.testing.assert_array_equal(result[0], a[0])
        np.testing.assert_array_equal(result[1], a[1])
        assert not np.isnan(result[0]).any()


def test_merge_weights_match_explicit_formula():
    """lse = log(e^a + e^b); o = e^(a-lse) o_a + e^(b-lse) o_b, including very uneven lse."""
    lse_a, lse_b = np.array([0.0, 700.0, -5.0, -np.inf]), np.array([1.0, -700.0, -5.0, 3.0])
    o_a = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [0.0, 0.0]])
    o_b = np.array([[-1.0, 0.5], [7.0, 8.0], [1.0, 2.0], [9.0, -9.0]])
    o, lse = merged((o_a, lse_a), (o_b, lse_b))
    want_lse = np.array([np.log(1 + np.e), 700.0, -5.0 + np.log(2.0), 3.0])
    want_o = np.array([(o_a[0] + np.e * o_b[0]) / (1 + np.e), o_a[1], (o_a[2] + o_b[2]) / 2, o_b[3]])
    np.testing.assert_allclose(lse, want_lse, rtol=1e-15)
    np.testing.assert_allclose(o, want_o, rtol=1e-15)


# -- attend_tile against the oracle -------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(N=st.integers(2, 12), cut=st.data(), causal=st.booleans(), heads=st.sampled_from([(1, 1), (4, 2), (3, 1)]),
       D=st.integers(1, 6), seed=st.integers(0, 2 ** 16))
def test_merging_a_split_key_set_equals_attention_over_the_union(N, cut, causal, heads, D, seed):
    rng = np.random.default_rng(seed)
    q, k, v = make_qkv(rng, B=2, N=N, Hq=heads[0], Hkv=heads[1], D=D)
    j = cut.draw(st.integers(1, N - 1))
    rows = slice(0, N)
    o_run = np.zeros((2, heads[1], heads[0] // heads[1], N, D))
    lse_run = np.full(o_run.shape[:-1], -np.inf)
    with np.errstate(**STRICT):
        for cols in (slice(j, N), slice(0, j)):          # any order: merge is commutative
            o, lse = run_tile(q, k, v, rows, cols, causal)
            # each partial alone is attention restricted to its keys
            want_o, want_lse = naive_attention(q, k, v, causal=causal, mask=keys_only(N, cols))
            assert_fp64_close(o_to_layout(o), want_o, "partial o")
            assert_fp64_close(lse_to_layout(lse), want_lse, "partial lse")
            tile.merge(o_run, lse_run, o, lse)
    want_o, want_lse = naive_attention(q, k, v, causal=causal)
    assert_fp64_close(o_to_layout(o_run), want_o, "merged o")
    assert_fp64_close(lse_to_layout(lse_run), want_lse, "merged lse")


@pytest.mark.parametrize("q_rows,k_cols", [
    (slice(0, 3), slice(5, 9)),     # every key after every query: nothing visible
    (slice(2, 5), slice(3, 7)),     # row 2 sees nothing, rows 3 and 4 see some keys
])
def test_causal_partial_tile_with_hidden_rows(rng, q_rows, k_cols):
    N = 9
    q, k, v = make_qkv(rng, B=1, N=N, Hq=4, Hkv=2, D=3)
    mask = masks.CausalMask()
    q_pos, k_pos = np.arange(N)[q_rows], np.arange(N)[k_cols]
    ws = tile.Workspace(F64)
    with np.errstate(**STRICT):                        # no invalid/divide/overflow, no NaN
        o, lse = tile.attend_tile(tile.q_tile(q[:, q_rows], 2, F64), tile.kv_tile(k[:, k_cols], F64),
                                  tile.kv_tile(v[:, k_cols], F64), q_pos, k_pos, mask, masks.PARTIAL,
                                  1 / np.sqrt(3), ws)
    assert not np.isnan(o).any() and not np.isnan(lse).any()
    hidden = k_pos.min() > q_pos                          # rows that see no key of this tile
    assert np.all(o[..., hidden, :] == 0)
    assert np.all(np.isneginf(lse[..., hidden]))
    want_o, want_lse = naive_attention(q, k, v, causal=True, mask=keys_only(N, k_cols))
    assert rel_err(o_to_layout(o), want_o[:, q_rows]) <= 1e-12
    assert rel_err(lse_to_layout(lse), want_lse[:, :, q_rows]) <= 1e-12
    # and such a tile is the identity when merged into a running partial
    o_run = rng.standard_normal(o.shape)
    lse_run = rng.standard_normal(lse.shape)
    o_before, lse_before = o_run.copy(), lse_run.copy()
    with np.errstate(**STRICT):
        tile.merge(o_run, lse_run, o, lse)
    np.testing.assert_array_equal(o_run[..., hidden, :], o_before[..., hidden, :])
    np.testing.assert_array_equal(lse_run[..., hidden], lse_before[..., hidden])


def test_tile_with_huge_logits_is_finite(rng):
    """|scale q.k| ~ 1e4: the max subtraction keeps exp in range."""
    N = 6
    q, k, v = make_qkv(rng, B=1, N=N, Hq=2, Hkv=1, D=4, magnitude=70.0)
    with np.errstate(**STRICT):
        o, lse = run_tile(q, k, v, slice(0, N), slice(0, N), causal=False, scale=2.0)
    want_o, want_lse = naive_attention(q, k, v, scale=2.0)
    assert np.abs(want_lse).max() > 1e3
    assert_fp64_close(o_to_layout(o), want_o, "o")
    assert_fp64_close(lse_to_layout(lse), want_lse, "lse")


@pytest.mark.parametrize("sign_k,scale,what", [
    (1, 1.0, "inf"),              # q.k = +2e40: the row max is +inf
    (-1, 1.0, "-inf"),            # q.k = -2e40 for every visible key: the row max is -inf on a row that sees keys
    (1, 0.0, "nan"),              # 0 * (q.k = inf): NaN
])
@pytest.mark.parametrize("kind", [masks.FULL, masks.PARTIAL])
def test_tile_raises_on_scores_that_overflow(sign_k, scale, what, kind):
    """float32 q and k of 1e20 are finite, but their scores are not: the tile names the overflow, the
    dtype, its largest value and the row, instead of returning NaN."""
    q = np.full((1, 3, 1, 2), 1e20, np.float32)
    k = np.full((1, 3, 1, 2), sign_k * 1e20, np.float32)
    v = np.ones((1, 3, 1, 2), np.float32)
    pos = np.arange(3)
    mask = masks.mask_for(kind == masks.PARTIAL)      # causal: the tile's first row sees only key 0
    with pytest.raises(OverflowError, match=r"overflowed float32 \(.*query position 0: row max " + what +
                       r"\).*3\.4e\+38.*np\.finfo\(float32\)\.max"):
        tile.attend_tile(tile.q_tile(q, 1, np.float32), tile.kv_tile(k, np.float32), tile.kv_tile(v, np.float32),
                         pos, pos, mask, kind, scale, tile.Workspace(np.float32))


def test_tile_near_the_float32_limit_matches_oracle(rng):
    """Scores up to 1e38, below float32's 3.4e38: no error, and the (one-hot) softmax is right."""
    q, k, v = make_qkv(rng, B=1, N=6, Hq=2, Hkv=1, D=4)
    c = np.sqrt(1e38 / np.einsum("bnhd,bmkd->nm", np.abs(q), np.abs(k)).max())    # |q.k| <= 1e38, partial sums too
    q, k, v = (q * c).astype(np.float32), (k * c).astype(np.float32), v.astype(np.float32)
    o, lse = tile.attend_tile(tile.q_tile(q, 1, np.float32), tile.kv_tile(k, np.float32), tile.kv_tile(v, np.float32),
                              np.arange(6), np.arange(6), masks.NoMask(), masks.FULL, 1.0, tile.Workspace(np.float32))
    want_o, want_lse = naive_attention(q, k, v, scale=1.0)
    assert np.abs(want_lse).max() > 1e37
    plain_o, plain_lse = plain_attention(q, k, v, scale=1.0)
    assert_2x_rule(o_to_layout(o), plain_o, want_o, "o")
    assert_2x_rule(lse_to_layout(lse), plain_lse, want_lse, "lse")


# -- attend_tile_backward against the oracle ----------------------------------------------------------

def tile_backward(q, k, v, dout, rows, cols, causal, scale):
    """Gradient contributions of the tile (q rows, k cols), given the oracle's *final* lse and out."""
    N, Hkv = q.shape[1], k.shape[2]
    out, lse = naive_attention(q, k, v, causal=causal, scale=scale)
    delta = np.einsum("bnhd,bnhd->bhn", out, dout)
    mask = masks.mask_for(causal)
    q_pos, k_pos = np.arange(N)[rows], np.arange(N)[cols]
    kind = mask.classify(q_pos, k_pos)
    dq, dk, dv = tile.attend_tile_backward(
        tile.q_tile(q[:, rows], Hkv, F64), tile.kv_tile(k[:, cols], F64), tile.kv_tile(v[:, cols], F64),
        tile.q_tile(dout[:, rows], Hkv, F64), tile.grouped_rows(lse[:, :, rows], Hkv),
        tile.grouped_rows(delta[:, :, rows], Hkv), q_pos, k_pos, mask, kind, scale, tile.Workspace(F64))
    # dq comes without the factor scale; dk, dv are (B, Hkv, bk, D)
    return scale * o_to_layout(dq), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (3, 1)])
def test_tile_backward_matches_oracle(rng, causal, Hq, Hkv):
    N, D, scale = 10, 3, 0.6
    q, k, v = make_qkv(rng, B=2, N=N, Hq=Hq, Hkv=Hkv, D=D)
    dout = rng.standard_normal(q.shape)
    want_dq, want_dk, want_dv = naive_attention_backward(q, k, v, dout, causal=causal, scale=scale)

    # all query rows against a key tile: dk, dv of those keys are complete
    dq_sum = np.zeros_like(q)
    for cols in (slice(0, 4), slice(4, 10)):
        dq, dk, dv = tile_backward(q, k, v, dout, slice(0, N), cols, causal, scale)
        assert_fp64_close(dk, want_dk[:, cols], "dk")
        assert_fp64_close(dv, want_dv[:, cols], "dv")
        dq_sum += dq
    assert_fp64_close(dq_sum, want_dq, "dq summed over key tiles")

    # a query tile against all keys: dq of those rows is complete
    rows = slice(6, 10)
    dq, _, _ = tile_backward(q, k, v, dout, rows, slice(0, N), causal, scale)
    assert_fp64_close(dq, want_dq[:, rows], "dq of a row tile")


def test_tile_backward_grid_sums_to_oracle(rng):
    """Summing the contributions of a 3 x 3 grid of causal tiles (empty ones skipped) gives the oracle."""
    N, scale = 9, 0.5
    q, k, v = make_qkv(rng, B=1, N=N, Hq=4, Hkv=1, D=2)
    dout = rng.standard_normal(q.shape)
    dq_sum, dk_sum, dv_sum = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    blocks = [slice(0, 3), slice(3, 6), slice(6, 9)]
    mask = masks.CausalMask()
    skipped = 0
    for rows in blocks:
        for cols in blocks:
            if mask.classify(np.arange(N)[rows], np.arange(N)[cols]) == masks.EMPTY:
                skipped += 1
                continue
            dq, dk, dv = tile_backward(q, k, v, dout, rows, cols, True, scale)
            dq_sum[:, rows] += dq
            dk_sum[:, cols] += dk
            dv_sum[:, cols] += dv
    assert skipped == 3
    for got, want, name in zip((dq_sum, dk_sum, dv_sum),
                               naive_attention_backward(q, k, v, dout, causal=True, scale=scale), "dq dk dv".split()):
        assert_fp64_close(got, want, name)


# -- masks --------------------------------------------------------------------------------------------

@settings(max_examples=80, deadline=None)
@given(q0=st.integers(0, 20), nq=st.integers(1, 6), k0=st.integers(0, 20), nk=st.integers(1, 6),
       causal=st.booleans())
def test_classify_agrees_with_visible(q0, nq, k0, nk, causal):
    mask = masks.mask_for(causal)
    q_pos, k_pos = np.arange(q0, q0 + nq), np.arange(k0, k0 + nk)
    vis = mask.visible(q_pos, k_pos)
    want = masks.EMPTY if not vis.any() else masks.FULL if vis.all() else masks.PARTIAL
    assert mask.classify(q_pos, k_pos) == want
    np.testing.assert_array_equal(vis, (k_pos[None, :] <= q_pos[:, None]) | (not causal))
