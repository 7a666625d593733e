"""The float64 oracle, checked against things that do not share its code.

Everything else in the suite is measured against ``naive_attention`` and ``naive_attention_backward``,
so they are checked here independently:

* the backward against central finite differences of the scalar loss L = sum(out * W);
* lse against scipy's logsumexp of scores computed with einsum;
* the dense ``mask`` argument, including a row that sees no key at all;
* ``naive_rows`` against the matching rows of the full oracle.
"""

import numpy as np
import pytest
from scipy.special import logsumexp

from conftest import FP64_RTOL, assert_fp64_close, make_qkv
from refimpl import naive_attention, naive_attention_backward, naive_rows


def numerical_grads(q, k, v, W, *, causal=False, scale=None, mask=None, h=1e-6):
    """Central finite differences of L = sum(out * W) with respect to every entry of q, k and v."""
    def loss(q_, k_, v_):
        out, _ = naive_attention(q_, k_, v_, causal=causal, scale=scale, mask=mask)
        return float(np.sum(out * W))

    grads = []
    for which in range(3):
        args = [q.copy(), k.copy(), v.copy()]
        x = args[which]
        g = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            orig = x[idx]
            x[idx] = orig + h
            plus = loss(*args)
            x[idx] = orig - h
            minus = loss(*args)
            x[idx] = orig
            g[idx] = (plus - minus) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (4, 2), (3, 1)])
def test_backward_matches_finite_differences(rng, causal, Hq, Hkv):
    q, k, v = make_qkv(rng, B=1, N=5, Hq=Hq, Hkv=Hkv, D=3)
    W = rng.standard_normal(q.shape)
    dq, dk, dv = naive_attention_backward(q, k, v, W, causal=causal)
    nq, nk, nv = numerical_grads(q, k, v, W, causal=causal)
    for name, got, want in (("dq", dq, nq), ("dk", dk, nk), ("dv", dv, nv)):
        assert got.dtype == np.float64 and got.shape == want.shape
        # central differences with h = 1e-6 are good to ~1e-9 on O(1) quantities
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8, err_msg=name)


def test_backward_matches_finite_differences_custom_scale_and_mask(rng):
    q, k, v = make_qkv(rng, B=2, N=4, Hq=2, Hkv=1, D=2)
    mask = rng.random((4, 4)) < 0.6
    mask[np.arange(4), np.arange(4)] = True            # every row sees at least itself
    W = rng.standard_normal(q.shape)
    dq, dk, dv = naive_attention_backward(q, k, v, W, scale=0.7, mask=mask, causal=True)
    nq, nk, nv = numerical_grads(q, k, v, W, scale=0.7, mask=mask, causal=True)
    for got, want in ((dq, nq), (dk, nk), (dv, nv)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)


def independent_scores(q, k, scale, causal):
    """scale * q.k for every (b, h, i, j), GQA by explicit head index, -inf where causal hides j > i."""
    Hq, Hkv = q.shape[2], k.shape[2]
    kv_head = np.arange(Hq) // (Hq // Hkv)
    s = scale * np.einsum("bihd,bjhd->bhij", q, k[:, :, kv_head])
    if causal:
        N = q.shape[1]
        s = np.where(np.arange(N)[None, :] <= np.arange(N)[:, None], s, -np.inf)
    return s


@pytest.mark.parametrize("causal", [False, True])
def test_forward_matches_independent_softmax(rng, causal):
    q, k, v = make_qkv(rng, B=2, N=7, Hq=4, Hkv=2, D=5)
    out, lse = naive_attention(q, k, v, causal=causal)
    s = independent_scores(q, k, 1 / np.sqrt(5), causal)
    want_lse = logsumexp(s, axis=-1)
    p = np.exp(s - want_lse[..., None])
    kv_head = np.arange(4) // 2
    want_out = np.einsum("bhij,bjhd->bihd", p, v[:, :, kv_head])
    assert out.dtype == lse.dtype == np.float64
    assert out.shape == q.shape and lse.shape == (2, 4, 7)
    assert_fp64_close(lse, want_lse, "lse")
    assert_fp64_close(out, want_out, "out")


def test_lse_with_large_logits_and_custom_scale(rng):
    q, k, v = make_qkv(rng, B=1, N=6, Hq=2, Hkv=2, D=3, magnitude=30.0)
    _, lse = naive_attention(q, k, v, scale=3.0)
    want = logsumexp(independent_scores(q, k, 3.0, False), axis=-1)
    assert np.isfinite(lse).all()
    assert_fp64_close(lse, want, "lse")


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_oracle_computes_in_float64_for_any_input_dtype(rng, dtype):
    q, k, v = make_qkv(rng, N=6, dtype=dtype)
    out, lse = naive_attention(q, k, v, causal=True)
    want_out, want_lse = naive_attention(*(x.astype(np.float64) for x in (q, k, v)), causal=True)
    assert out.dtype == lse.dtype == np.float64
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)


def test_mask_with_fully_hidden_row(rng):
    """Row 2 sees no key: out = 0, lse = -inf, no gradient, and it adds nothing to dk or dv."""
    N = 5
    q, k, v = make_qkv(rng, B=1, N=N, Hq=2, Hkv=1, D=3)
    mask = rng.random((N, N)) < 0.7
    mask[np.arange(N), np.arange(N)] = True
    mask[2, :] = False
    out, lse = naive_attention(q, k, v, mask=mask)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    assert np.all(out[:, 2] == 0)
    assert np.all(np.isneginf(lse[:, :, 2]))
    assert np.isfinite(np.delete(lse, 2, axis=2)).all()

    # the other rows: softmax over exactly the visible keys
    s = independent_scores(q, k, 1 / np.sqrt(3), False)
    s = np.where(mask, s, -np.inf)
    rows = [0, 1, 3, 4]
    want_lse = logsumexp(s[:, :, rows], axis=-1)
    assert_fp64_close(lse[:, :, rows], want_lse, "lse")
    p = np.exp(s[:, :, rows] - want_lse[..., None])
    want_out = np.einsum("bhij,bjhd->bihd", p, v[:, :, [0, 0]])
    assert_fp64_close(out[:, rows], want_out, "out")

    # gradients: the hidden row has dq = 0, and its dout cannot reach dk or dv
    dout = rng.standard_normal(q.shape)
    dq, dk, dv = naive_attention_backward(q, k, v, dout, mask=mask)
    assert np.all(dq[:, 2] == 0)
    dout2 = dout.copy()
    dout2[:, 2] = rng.standard_normal(dout2[:, 2].shape) * 100
    dq2, dk2, dv2 = naive_attention_backward(q, k, v, dout2, mask=mask)
    np.testing.assert_array_equal(dk2, dk)
    np.testing.assert_array_equal(dv2, dv)
    np.testing.assert_array_equal(dq2, dq)
    # and moving q in the hidden row changes nothing at all
    q3 = q.copy()
    q3[:, 2] += 5.0
    out3, _ = naive_attention(q3, k, v, mask=mask)
    _, dk3, dv3 = naive_attention_backward(q3, k, v, dout, mask=mask)
    np.testing.assert_array_equal(out3, out)
    np.testing.assert_array_equal(dk3, dk)
    np.testing.assert_array_equal(dv3, dv)


def test_mask_gradients_match_finite_differences_with_hidden_row(rng):
    N = 4
    q, k, v = make_qkv(rng, B=1, N=N, Hq=2, Hkv=2, D=2)
    mask = np.ones((N, N), bool)
    mask[1, :] = False
    W = rng.standard_normal(q.shape)
    got = naive_attention_backward(q, k, v, W, mask=mask)
    want = numerical_grads(q, k, v, W, mask=mask)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-8)


def test_mask_combines_with_causal(rng):
    N = 6
    q, k, v = make_qkv(rng, N=N)
    mask = rng.random((N, N)) < 0.5
    mask[np.arange(N), np.arange(N)] = True
    out, lse = naive_attention(q, k, v, causal=True, mask=mask)
    want = naive_attention(q, k, v, mask=mask & np.tril(np.ones((N, N), bool)))
    np.testing.assert_array_equal(out, want[0])
    np.testing.assert_array_equal(lse, want[1])


def test_all_true_mask_equals_no_mask(rng):
    q, k, v = make_qkv(rng, N=6, Hq=4, Hkv=2)
    out, lse = naive_attention(q, k, v, mask=np.ones((6, 6), bool))
    want = naive_attention(q, k, v)
    np.testing.assert_array_equal(out, want[0])
    np.testing.assert_array_equal(lse, want[1])


@pytest.mark.parametrize("causal", [False, True])
def test_naive_rows_equals_rows_of_full_oracle(rng, causal):
    q, k, v = make_qkv(rng, B=2, N=11, Hq=4, Hkv=2, D=3)
    out, lse = naive_attention(q, k, v, causal=causal)
    rows = np.array([0, 10, 3, 3, 7])                      # any order, repeats allowed
    r_out, r_lse = naive_rows(q, k, v, rows, causal=causal)
    assert r_out.shape == (2, 5, 4, 3) and r_lse.shape == (2, 4, 5)
    assert_fp64_close(r_out, out[:, rows], "out", rtol=FP64_RTOL)
    assert_fp64_close(r_lse, lse[:, :, rows], "lse", rtol=FP64_RTOL)


@pytest.mark.parametrize("rows", [[11], [-1], [[0, 1]]])
def test_naive_rows_rejects_bad_rows(rng, rows):
    q, k, v = make_qkv(rng, N=11)
    with pytest.raises(ValueError, match="rows"):
        naive_rows(q, k, v, np.array(rows))


def test_mask_must_be_bool_of_shape_n_by_n(rng):
    q, k, v = make_qkv(rng, N=4)
    with pytest.raises(ValueError, match="mask"):
        naive_attention(q, k, v, mask=np.ones((4, 5), bool))
    with pytest.raises(TypeError, match="mask"):
        naive_attention(q, k, v, mask=np.ones((4, 4), np.int8))


@pytest.mark.parametrize("rows", [[1.5, 2.7], np.array([1.0, 2.0]), [1, 2.0], [True, False], np.array([True]),
                                  ["1"]], ids=["floats", "float-array", "mixed", "bools", "bool-array", "str"])
def test_naive_rows_must_be_integers(rng, rows):
    """[1.5, 2.7] used to become rows [1, 2]: nothing is rounded, and bools are not positions."""
    q, k, v = make_qkv(rng, N=11)
    with pytest.raises(TypeError, match=r"rows must be integer positions \(an int array or a sequence of ints\)"):
        naive_rows(q, k, v, rows)


def test_naive_rows_takes_any_integer_dtype_and_empty_rows(rng):
    q, k, v = make_qkv(rng, N=11)
    want_out, want_lse = naive_rows(q, k, v, np.array([3, 0, 10], np.int64))
    for rows in ([3, 0, 10], (np.int32(3), 0, 10), np.array([3, 0, 10], np.uint8)):
        out, lse = naive_rows(q, k, v, rows)
        np.testing.assert_array_equal(out, want_out)
        np.testing.assert_array_equal(lse, want_lse)
    out, lse = naive_rows(q, k, v, [])
    assert out.shape == (1, 0, 2, 4) and lse.shape == (1, 2, 0)


def test_masked_rows_and_mask_are_type_errors(rng):
    q, k, v = make_qkv(rng, N=4)
    with pytest.raises(TypeError, match=r"rows must not be a numpy masked array.*rows\.filled\(value\)"):
        naive_rows(q, k, v, np.ma.masked_array([0, 3], mask=[False, True]))
    with pytest.raises(TypeError, match=r"mask must not be a numpy masked array.*mask\.filled\(value\)"):
        naive_attention(q, k, v, mask=np.ma.masked_array(np.ones((4, 4), bool)))


# -- scores beyond the float64 range ------------------------------------------------------------------

OVERFLOW = r"scale \* q k\^T overflows float64 .*np\.finfo\(np\.float64\)\.max = 1\.79769e\+308"


@pytest.mark.parametrize("call", ["naive_attention", "naive_rows", "naive_attention_backward"])
@pytest.mark.parametrize("case", ["scale=1e308", "scale=-1e308", "q,k=1e160"])
def test_float64_score_overflow_is_an_error(rng, call, case):
    """These used to give lse = inf or NaN (inf - inf) for finite float64 input."""
    q, k, v = make_qkv(rng, B=1, N=4, Hq=2, D=3)
    scale = {"scale=1e308": 1e308, "scale=-1e308": -1e308}.get(case)
    if case == "q,k=1e160":
        q, k = q * 1e160, k * 1e160
    run = {"naive_attention": lambda: naive_attention(q, k, v, scale=scale),
           "naive_rows": lambda: naive_rows(q, k, v, [2, 0], scale=scale),
           "naive_attention_backward": lambda: naive_attention_backward(q, k, v, rng.standard_normal(q.shape),
                                                                        scale=scale)}[call]
    with pytest.raises(OverflowError, match=OVERFLOW):
        run()


def test_overflow_of_a_hidden_score_is_harmless(rng):
    """Only visible scores count: key 3 overflows against rows 0..2, which causal hides from it."""
    q, k, v = make_qkv(rng, B=1, N=4, Hq=1, D=2)
    q[:, :3] = 1e200                                   # q_i . k_j ~ 1e200 for j <= i < 3
    q[:, 3] = 0.0                                      # row 3 sees key 3 with score 0
    k_huge = k.copy()
    k_huge[:, 3] = 1e200                               # q_i . k_3 = 2e400 for i < 3
    with pytest.raises(OverflowError, match=OVERFLOW):
        naive_attention(q, k_huge, v)
    out, lse = naive_attention(q, k_huge, v, causal=True)
    want_out, want_lse = naive_attention(q, k, v, causal=True)
    np.testing.assert_array_equal(out, want_out)
    np.testing.assert_array_equal(lse, want_lse)


@pytest.mark.parametrize("dtype,exponent", [(np.float32, 66), (np.float16, 12)])
def test_low_precision_inputs_too_large_for_their_dtype_products(rng, dtype, exponent):
    """q, k ~ 2^66 ~ 7e19 in float32 (2^12 in float16): q_i k_j overflows float32 (float16), not float64.

    The oracle computes in float64, so its answer is finite and correct: checked against scipy on scores
    from einsum, and (since scaling q and k by 2^e and scale by 2^-2e changes no score) the gradients are
    the unscaled problem's times 2^-e, exactly.
    """
    a, b, v = make_qkv(rng, B=1, N=6, Hq=2, D=4, dtype=dtype)
    q, k = a * dtype(2.0 ** exponent), b * dtype(2.0 ** exponent)
    with np.errstate(over="ignore"):
        assert np.isinf(np.abs(q).max() * np.abs(k).max())            # q_i . k_j overflows dtype
    scale = 2.0 ** (-2 * exponent) / np.sqrt(4)
    out, lse = naive_attention(q, k, v, causal=True, scale=scale)
    s = independent_scores(q.astype(np.float64), k.astype(np.float64), scale, True)
    want_lse = logsumexp(s, axis=-1)
    want_out = np.einsum("bhij,bjhd->bihd", np.exp(s - want_lse[..., None]), v.astype(np.float64))
    assert_fp64_close(lse, want_lse, "lse")
    assert_fp64_close(out, want_out, "out")

    dout = rng.standard_normal(q.shape)
    got = naive_attention_backward(q, k, v, dout, causal=True, scale=scale)
    want = naive_attention_backward(a, b, v, dout, causal=True)
    for name, g, w, factor in zip(("dq", "dk", "dv"), got, want, (2.0 ** -exponent, 2.0 ** -exponent, 1.0)):
        assert_fp64_close(g, w * factor, name)
