"""Bad input fails loudly and the same way at every entry point.

Each public function validates its arguments before computing anything: a ``ValueError`` (wrong shape
or value) or ``TypeError`` (wrong type or dtype) whose message names the offending argument. Nothing is
broadcast, truncated, cast or turned from NaN into plausible numbers.
"""

import math

import numpy as np
import pytest

from conftest import make_qkv
from refimpl import (blockwise_attention, blockwise_attention_backward, naive_attention,
                     naive_attention_backward, naive_rows, ring_attention, ring_attention_backward,
                     simulate_ring)
from refimpl.comm.sim import SimWorld
from refimpl.layouts import Contiguous

B, N, Hq, Hkv, D = 2, 6, 4, 2, 3


def inputs(dtype=np.float64):
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=dtype)
    return q, k, v, rng.standard_normal(q.shape).astype(dtype)


# Every entry point, called as f(q, k, v, dout, **options). The backward of blockwise attention is fed
# a valid out and lse computed from valid inputs of the right shapes, so only the argument under test
# is wrong.
def call_naive(q, k, v, dout, **kw):
    return naive_attention(q, k, v, **kw)


def call_naive_backward(q, k, v, dout, **kw):
    return naive_attention_backward(q, k, v, dout, **kw)


def call_blockwise(q, k, v, dout, **kw):
    return blockwise_attention(q, k, v, block_q=2, block_k=3, **kw)


def call_blockwise_backward(q, k, v, dout, **kw):
    four_d = getattr(q, "ndim", 0) == 4
    out = np.zeros(q.shape, q.dtype) if four_d else np.zeros((B, N, Hq, D))
    lse = np.zeros((q.shape[0], q.shape[2], q.shape[1])) if four_d else np.zeros((B, Hq, N))
    return blockwise_attention_backward(q, k, v, out, lse, dout, block_q=2, block_k=3, **kw)


def call_ring(q, k, v, dout, **kw):
    kw.setdefault("ranks", 3)
    return simulate_ring(q, k, v, dout=dout, timeout=10, block_q=2, block_k=3, **kw)


ALL = [call_naive, call_naive_backward, call_blockwise, call_blockwise_backward, call_ring]
WITH_DOUT = [call_naive_backward, call_blockwise_backward, call_ring]


def test_valid_inputs_pass_and_agree_with_the_oracle():
    """The baseline every other test perturbs is itself valid and correct."""
    q, k, v, dout = inputs()
    want_out, want_lse = naive_attention(q, k, v)
    want_grads = naive_attention_backward(q, k, v, dout)
    r = call_ring(q, k, v, dout)
    out, lse = call_blockwise(q, k, v, dout)
    for got, want in ((r.out, want_out), (r.lse, want_lse), (out, want_out), (lse, want_lse),
                      (r.dq, want_grads[0]), (r.dk, want_grads[1]), (r.dv, want_grads[2])):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12 * np.abs(want).max())


# -- shapes -------------------------------------------------------------------------------------------

def with_changed(arrays, which, shape):
    q, k, v, dout = arrays
    named = dict(q=q, k=k, v=v, dout=dout)
    for name in which:
        named[name] = np.zeros(shape, named[name].dtype)
    return named["q"], named["k"], named["v"], named["dout"]


SHAPE_ERRORS = [
    pytest.param("q", (B, N, Hq), r"q must have 4 dimensions", id="q-3d"),
    pytest.param("k", (B, N, Hkv), r"k must have 4 dimensions", id="k-3d"),
    pytest.param("kv", (B + 1, N, Hkv, D), r"k has batch size 3 but q has 2", id="batch"),
    pytest.param("kv", (B, N + 1, Hkv, D), r"k has sequence length 7 but q has 6", id="seq-len"),
    pytest.param("kv", (B, N, Hkv, D + 1), r"k has head dim 4 but q has 3", id="head-dim"),
    pytest.param("kv", (B, N, 3, D), r"q has 4 heads.*3 heads of k and v", id="Hq%Hkv"),
    pytest.param("v", (B, N, Hkv, D + 1), r"k and v must have the same shape", id="k-v-shapes"),
]


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("which,shape,message", SHAPE_ERRORS)
def test_shape_errors(fn, which, shape, message):
    names = ["k", "v"] if which == "kv" else [which]
    q, k, v, dout = with_changed(inputs(), names, shape)
    with pytest.raises(ValueError, match=message):
        fn(q, k, v, dout)


@pytest.mark.parametrize("fn", WITH_DOUT)
@pytest.mark.parametrize("shape", [(B, N, Hq, D + 1), (B, N, Hq), (B, N - 1, Hq, D)])
def test_dout_wrong_shape(fn, shape):
    q, k, v, _ = inputs()
    expected = r"dout must have shape \(2, 6, 4, 3\)" if len(shape) == 4 else r"dout must have 4 dimensions"
    with pytest.raises(ValueError, match=expected):
        fn(q, k, v, np.zeros(shape))


# -- dtypes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_integer_dtype_is_a_type_error(fn, name):
    arrays = dict(zip("q k v dout".split(), inputs()))
    arrays[name] = arrays[name].astype(np.int32)
    with pytest.raises(TypeError, match=rf"{name} must have a float16, float32 or float64 dtype, got int32"):
        fn(*arrays.values())


@pytest.mark.parametrize("fn", ALL)
def test_mixed_dtypes_are_a_type_error(fn):
    q, k, v, dout = inputs()
    with pytest.raises(TypeError, match=r"q, k and v must share one dtype, got float64, float32 and float64"):
        fn(q, k.astype(np.float32), v, dout)


@pytest.mark.parametrize("fn", ALL)
def test_lists_are_a_type_error(fn):
    q, k, v, dout = inputs()
    with pytest.raises(TypeError, match=r"q must be a numpy.ndarray, got list"):
        fn(q.tolist(), k, v, dout)


def test_ring_dout_dtype_must_match():
    q, k, v, dout = inputs()
    with pytest.raises(TypeError, match=r"dout must have q's dtype float64, got float32"):
        call_ring(q, k, v, dout.astype(np.float32))


# -- ranks and blocks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ranks,error,message", [
    (0, ValueError, r"ranks must be at least 1, got 0"),
    (-2, ValueError, r"ranks must be at least 1, got -2"),
    (N + 1, ValueError, r"ranks=7 exceeds the sequence length N=6"),
    (2.0, TypeError, r"ranks must be an int, got float"),
    ("2", TypeError, r"ranks must be an int, got str"),
    (True, TypeError, r"ranks must be an int, got bool"),
])
def test_bad_ranks(ranks, error, message):
    q, k, v, dout = inputs()
    with pytest.raises(error, match=message):
        simulate_ring(q, k, v, ranks=ranks)


def run_with_blocks(kind, **blocks):
    q, k, v, dout = inputs()
    if kind == "blockwise":
        return blockwise_attention(q, k, v, **blocks)
    if kind == "blockwise_backward":
        return blockwise_attention_backward(q, k, v, np.zeros(q.shape), np.zeros((B, Hq, N)), dout, **blocks)
    return simulate_ring(q, k, v, ranks=2, dout=dout, timeout=10, **blocks)


@pytest.mark.parametrize("kind", ["blockwise", "blockwise_backward", "ring"])
@pytest.mark.parametrize("arg", ["block_q", "block_k"])
@pytest.mark.parametrize("value,error,message", [
    (0, ValueError, "must be a positive number of tokens, got 0"),
    (-3, ValueError, "must be a positive number of tokens, got -3"),
    (2.5, TypeError, "must be an int, got float"),
    (None, TypeError, "must be an int, got NoneType"),
    (True, TypeError, "must be an int, got bool"),
])
def test_bad_block_sizes(kind, arg, value, error, message):
    with pytest.raises(error, match=rf"{arg} {message}"):
        run_with_blocks(kind, **{arg: value})


def test_numpy_integer_blocks_and_ranks_are_accepted():
    q, k, v, dout = inputs()
    r = simulate_ring(q, k, v, ranks=np.int64(2), block_q=np.int32(2), block_k=np.int64(4))
    want_out, want_lse = naive_attention(q, k, v)
    np.testing.assert_allclose(r.out, want_out, rtol=0, atol=1e-12)
    np.testing.assert_allclose(r.lse, want_lse, rtol=0, atol=1e-12)


# -- non-finite values --------------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs_are_rejected(fn, name, bad):
    arrays = dict(zip("q k v dout".split(), inputs()))
    arrays[name][1, 4, 1, 2] = bad
    with pytest.raises(ValueError, match=rf"{name} contains non-finite values \(first at index \(1, 4, 1, 2\)\)"):
        fn(*arrays.values())


@pytest.mark.parametrize("fn", WITH_DOUT)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_dout_is_rejected(fn, bad):
    q, k, v, dout = inputs()
    dout[0, 1, 3, 0] = bad
    with pytest.raises(ValueError, match=r"dout contains non-finite values"):
        fn(q, k, v, dout)


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_non_finite_detected_in_low_precision(dtype):
    q, k, v, dout = inputs(dtype)
    k[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"k contains non-finite values \(first at index \(0, 0, 0, 0\)\)"):
        blockwise_attention(q, k, v)


@pytest.mark.parametrize("fn", ALL)
@pytest.mark.parametrize("scale", [math.nan, math.inf, -math.inf, np.float32(np.nan)], ids=["nan", "inf", "-inf", "f32-nan"])
def test_non_finite_scale_is_rejected(fn, scale):
    q, k, v, dout = inputs()
    with pytest.raises(ValueError, match=r"scale must be finite"):
        fn(q, k, v, dout, scale=scale)


@pytest.mark.parametrize("fn", ALL)
def test_non_number_scale_is_a_type_error(fn):
    q, k, v, dout = inputs()
    with pytest.raises(TypeError, match=r"scale must be a real number or None, got str"):
        fn(q, k, v, dout, scale="0.5")


# -- the extra inputs of the blockwise backward: out and lse ------------------------------------------

def blockwise_backward_with(out=None, lse=None):
    q, k, v, dout = inputs()
    good_out, good_lse = naive_attention(q, k, v)
    out = good_out if out is None else out
    lse = good_lse if lse is None else lse
    return blockwise_attention_backward(q, k, v, out, lse, dout, block_q=2, block_k=3)


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_non_finite_out_is_rejected(bad):
    out = naive_attention(*inputs()[:3])[0]
    out[0, 2, 1, 0] = bad
    with pytest.raises(ValueError, match=r"out contains non-finite values \(first at index \(0, 2, 1, 0\)\)"):
        blockwise_backward_with(out=out)


LSE_NOT_FINITE = (r"lse contains non-finite values \(first at index \(1, 3, 5\): {}\); with no mask or causal "
                  r"every query row sees at least one key, so the forward's lse is finite")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "+inf", "-inf"])
def test_non_finite_lse_is_rejected(bad):
    lse = naive_attention(*inputs()[:3])[1]
    lse[1, 3, 5] = bad
    with pytest.raises(ValueError, match=LSE_NOT_FINITE.format(bad)):
        blockwise_backward_with(lse=lse)


@pytest.mark.parametrize("causal", [False, True])
def test_all_minus_inf_lse_is_rejected_by_both_backwards(causal):
    """An lse of all -inf used to be accepted and gave wrong gradients (every row read as 'sees no key').

    The forward never returns -inf under the masks these paths take: causal row i sees key i.
    """
    q, k, v, dout = inputs()
    out, lse = blockwise_attention(q, k, v, causal=causal)
    assert np.isfinite(lse).all()
    with pytest.raises(ValueError, match=r"lse contains non-finite values \(first at index \(0, 0, 0\): -inf\)"):
        blockwise_attention_backward(q, k, v, out, np.full_like(lse, -np.inf), dout, causal=causal)

    layout = Contiguous(N, 2)

    def rank_main(comm):
        shard = [layout.shard(x, comm.rank) for x in (q, k, v, dout)]
        fwd = ring_attention(*shard[:3], comm, causal=causal)
        assert np.isfinite(fwd.lse).all()
        lse = fwd.lse.copy()
        lse[0, 1, -1] = -np.inf
        return ring_attention_backward(*shard[:3], fwd.out, lse, shard[3], comm, causal=causal)

    with pytest.raises(ValueError, match=r"rank 0: lse contains non-finite values \(first at index \(0, 1, 2\): -inf\)"):
        SimWorld(2, 10).run(rank_main)


def test_lse_wrong_shape_is_rejected():
    with pytest.raises(ValueError, match=r"lse must have shape \(2, 4, 6\)"):
        blockwise_backward_with(lse=np.zeros((B, N, Hq)))


def test_valid_backward_inputs_give_the_oracle_gradients():
    q, k, v, dout = inputs()
    got = blockwise_backward_with()
    for g, w in zip(got, naive_attention_backward(q, k, v, dout)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12 * np.abs(w).max())


# -- NumPy masked arrays ------------------------------------------------------------------------------

def call_naive_rows(q, k, v, dout, **kw):
    return naive_rows(q, k, v, [0, 5], **kw)


def call_ring_attention(q, k, v, dout, **kw):
    """ring_attention and ring_attention_backward themselves, on 2 simulated ranks given their shards."""
    layout = Contiguous(N, 2)

    def rank_main(comm):
        shard = [layout.shard(x, comm.rank) for x in (q, k, v, dout)]
        fwd = ring_attention(*shard[:3], comm, block_q=2, block_k=3, **kw)
        return ring_attention_backward(*shard[:3], fwd.out, fwd.lse, shard[3], comm, block_q=2, block_k=3, **kw)

    return SimWorld(2, 10).run(rank_main)


def hiding_nan(x, index):
    """x as a masked array whose one masked entry holds NaN: np.sum skips it, so it passed the finite check."""
    x = np.ma.masked_array(x.copy(), mask=np.zeros(x.shape, bool))
    x.data[index] = np.nan
    x.mask[index] = True
    return x


@pytest.mark.parametrize("fn,name", [(fn, name) for fn in ALL + [call_naive_rows, call_ring_attention]
                                     for name in ("q", "k", "v", "dout")
                                     if name != "dout" or fn in WITH_DOUT + [call_ring_attention]])
def test_masked_arrays_are_a_type_error(fn, name):
    """A NaN under a mask used to pass every check (blockwise and ring returned NaN in out)."""
    arrays = dict(zip("q k v dout".split(), inputs()))
    arrays[name] = hiding_nan(arrays[name], (0, 1, 1, 0))
    with pytest.raises(TypeError, match=rf"{name} must not be a numpy masked array .*"
                                        rf"pass {name}\.filled\(value\)"):
        fn(*arrays.values())


@pytest.mark.parametrize("name", ["out", "lse"])
def test_masked_out_or_lse_is_a_type_error(name):
    good = dict(zip(("out", "lse"), naive_attention(*inputs()[:3])))
    with pytest.raises(TypeError, match=rf"{name} must not be a numpy masked array"):
        blockwise_backward_with(**{name: hiding_nan(good[name], (0,) * good[name].ndim)})


@pytest.mark.parametrize("name", ["out", "dout", "lse"])
def test_backward_inputs_of_the_wrong_dtype_are_type_errors(name):
    """out and dout must be in q's dtype and lse in the accumulation dtype: float32 passed for float64 would
    otherwise be computed silently at the lower precision."""
    q, k, v, dout = inputs(np.float64)
    out, lse = blockwise_attention(q, k, v)
    named = dict(out=out, dout=dout, lse=lse)
    named[name] = named[name].astype(np.float32)
    with pytest.raises(TypeError, match=rf"{name} must have dtype float64, got float32"):
        blockwise_attention_backward(q, k, v, named["out"], named["lse"], named["dout"])
