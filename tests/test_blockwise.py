"""Blockwise attention (online softmax over tiles) against the float64 oracle.

The tile loop must give the oracle's answer whatever the block sizes: blocks that do not divide N, a
block larger than N, blocks of one token, GQA and MQA, odd head dims, causal or not. In float64 the
relative error is at most 1e-12. In float32 and float16 it is held to the 2x rule of ``conftest``:
no worse than twice the error of plain textbook attention in the same precision.

It must also keep its promise on memory: at most one tile of scores (B * Hq * block_q * block_k
elements) per workspace buffer, however long the sequence.
"""

import numpy as np
import pytest

from conftest import (assert_2x_rule, assert_fp64_close, half_ulp, make_dout, make_qkv, plain_attention,
                      plain_attention_backward, plain_naive_fp32, rel_err)
from refimpl import (blockwise_attention, blockwise_attention_backward, naive_attention,
                     naive_attention_backward, tile)


def oracle(q, k, v, dout, causal, scale=None):
    """Forward and backward of the float64 oracle, on the inputs as given (any float dtype)."""
    out, lse = naive_attention(q, k, v, causal=causal, scale=scale)
    grads = naive_attention_backward(q, k, v, dout, causal=causal, scale=scale)
    return (out, lse) + grads


def blockwise(q, k, v, dout, causal, block_q, block_k, scale=None):
    out, lse = blockwise_attention(q, k, v, causal=causal, scale=scale, block_q=block_q, block_k=block_k)
    grads = blockwise_attention_backward(q, k, v, out, lse, dout, causal=causal, scale=scale,
                                         block_q=block_q, block_k=block_k)
    return (out, lse) + grads


NAMES = ("out", "lse", "dq", "dk", "dv")

# (B, N, Hq, Hkv, D, block_q, block_k)
SHAPES = [
    pytest.param(2, 37, 2, 2, 3, 5, 7, id="blocks-do-not-divide-N"),
    pytest.param(1, 10, 2, 2, 4, 16, 64, id="blocks-larger-than-N"),
    pytest.param(1, 7, 2, 1, 3, 1, 1, id="block-of-one"),
    pytest.param(1, 9, 2, 2, 4, 1, 9, id="block_q-1"),
    pytest.param(1, 9, 2, 2, 4, 9, 1, id="block_k-1"),
    pytest.param(2, 23, 4, 2, 5, 4, 6, id="GQA"),
    pytest.param(1, 19, 3, 1, 3, 7, 3, id="MQA"),
    pytest.param(1, 16, 2, 1, 1, 4, 5, id="D-1"),
    pytest.param(1, 13, 2, 2, 17, 3, 8, id="D-17"),
    pytest.param(1, 12, 2, 2, 80, 5, 5, id="D-80"),
    pytest.param(1, 12, 2, 2, 8, 256, 1024, id="default-sized-blocks"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,Hq,Hkv,D,block_q,block_k", SHAPES)
def test_float64_matches_oracle(rng, causal, B, N, Hq, Hkv, D, block_q, block_k):
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    ours = blockwise(q, k, v, dout, causal, block_q, block_k)
    want = oracle(q, k, v, dout, causal)
    for name, got, ref in zip(NAMES, ours, want):
        assert got.dtype == np.float64, name
        assert got.shape == ref.shape, name
        assert_fp64_close(got, ref, name)


def test_float64_custom_scale(rng):
    q, k, v = make_qkv(rng, 1, 21, 4, 2, 6)
    dout = make_dout(rng, q)
    for name, got, ref in zip(NAMES, blockwise(q, k, v, dout, True, 4, 5, scale=1.7),
                              oracle(q, k, v, dout, True, scale=1.7)):
        assert_fp64_close(got, ref, name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,Hq,Hkv,D,block_q,block_k", [
    pytest.param(2, 37, 2, 2, 5, 5, 7, id="N37-bq5-bk7"),
    pytest.param(1, 24, 4, 2, 17, 8, 3, id="GQA-D17"),
    pytest.param(1, 20, 2, 2, 80, 32, 32, id="one-tile-D80"),
    pytest.param(2, 96, 2, 1, 8, 16, 8, id="N96-bk8"),
])
def test_float32_within_twice_plain_float32_error(rng, causal, B, N, Hq, Hkv, D, block_q, block_k):
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=np.float32)
    dout = make_dout(rng, q)
    ours = blockwise(q, k, v, dout, causal, block_q, block_k)
    assert [x.dtype for x in ours] == [np.float32] * 5
    plain = plain_naive_fp32(q, k, v, causal) + plain_attention_backward(q, k, v, dout, causal, dtype=np.float32)
    for name, got, p, ref in zip(NAMES, ours, plain, oracle(q, k, v, dout, causal)):
        assert_2x_rule(got, p, ref, name)


@pytest.mark.parametrize("block_k", [4, 256])
def test_float32_error_does_not_grow_with_the_number_of_key_blocks(rng, block_k):
    """Online softmax over 64 key blocks must stay as accurate as one big softmax in float32.

    (A flash-attention style accumulator, running max m and unnormalised sum l in float32, stays
    within about 1.2x of the plain error here.)
    """
    q, k, v = make_qkv(rng, 1, 256, 3, 1, 4, dtype=np.float32)
    out, lse = blockwise_attention(q, k, v, block_q=256, block_k=block_k)
    want_out, want_lse = naive_attention(q, k, v)
    plain_out, plain_lse = plain_naive_fp32(q, k, v)
    assert_2x_rule(out, plain_out, want_out, "out")
    assert_2x_rule(lse, plain_lse, want_lse, "lse")


def natural_grad_scale(scale, other, dout, v):
    """The size of one term of dq (other = k) or dk (other = q): scale |other| |dout| |v| D."""
    return scale * np.abs(other).max() * np.abs(dout).max() * np.abs(v).max() * v.shape[-1]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float64_huge_logits(rng, causal):
    """|scale q.k| up to ~1e4: no overflow, and the softmax (nearly one-hot here) is still right.

    out, lse and dv must meet 1e-12 (with little margin at these logits: ``specs/tolerances.md``
    section 4). dq and dk flow through a saturated softmax: their exact values are below float64
    resolution (max|dq| can be 1e-14 while one term is 1e3), so the relative measure is meaningless;
    they are held to 1e-12 of the natural size of one term instead.
    """
    q, k, v = make_qkv(rng, 1, 17, 2, 1, 4, magnitude=100.0)
    dout = make_dout(rng, q)
    want = oracle(q, k, v, dout, causal)
    assert np.abs(want[1]).max() > 5e3
    ours = blockwise(q, k, v, dout, causal, 4, 3)
    for name in ("out", "lse", "dv"):
        i = NAMES.index(name)
        assert_fp64_close(ours[i], want[i], name)
    for name, other in (("dq", k), ("dk", q)):
        i = NAMES.index(name)
        bound = 1e-12 * max(np.abs(want[i]).max(), natural_grad_scale(0.5, other, dout, v))
        err = np.abs(ours[i] - want[i]).max()
        assert err <= bound, f"{name}: error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,Hq,Hkv,D,block_q,block_k", [
    pytest.param(1, 17, 2, 1, 4, 4, 3, id="N17-D4"),
    pytest.param(1, 64, 2, 1, 16, 16, 16, id="N64-D16"),
    pytest.param(2, 96, 4, 2, 24, 32, 20, id="N96-D24-GQA"),
])
def test_huge_logits(rng, dtype, causal, B, N, Hq, Hkv, D, block_q, block_k):
    """|scale q.k| up to ~1e4 in float32 and float16: no overflow, no NaN, and lse within the 2x rule.

    out and the gradients are not held to the 2x rule at these logits: it is not a stable statistic
    there, and the backward starts from the forward's lse rounded to float32 and from its out in the
    input dtype (``specs/tolerances.md`` section 4 gives the causes and the measured ratios).
    """
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=dtype, magnitude=100.0)     # scale q.k ~ 1e4 * N(0, 1)
    dout = make_dout(rng, q)
    want = oracle(q, k, v, dout, causal)
    assert np.abs(want[1]).max() > 5e3
    ours = blockwise(q, k, v, dout, causal, block_q, block_k)
    for name, got in zip(NAMES, ours):
        assert np.isfinite(got).all(), name
    assert_2x_rule(ours[1], plain_attention(q, k, v, causal, dtype=np.float32)[1], want[1], "lse")


def offset_qkv(rng, B, N, Hq, Hkv, D, dtype):
    """Logits of about +-1e4 that are NOT saturated: every key is c + tiny noise, every query +-c + noise,
    so lse ~ +-1e4 while the softmax spreads over many keys."""
    u = rng.standard_normal(D)
    c = 100 * D ** 0.25 * u / np.linalg.norm(u)
    q = rng.choice([-1.0, 1.0], (B, N, Hq, 1)) * c + rng.standard_normal((B, N, Hq, D))
    k = c + 0.01 * rng.standard_normal((B, N, Hkv, D))
    v = rng.standard_normal((B, N, Hkv, D))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_huge_unsaturated_logits_forward(rng, causal):
    """With lse ~ 1e4, float32 lse values carry ~5e-4 absolute rounding: merging partials must not
    multiply that into the output."""
    q, k, v = offset_qkv(rng, 1, 17, 2, 1, 5, np.float32)
    out, lse = blockwise_attention(q, k, v, causal=causal, block_q=4, block_k=3)
    want_out, want_lse = naive_attention(q, k, v, causal=causal)
    assert np.abs(want_lse).max() > 5e3
    plain_out, plain_lse = plain_naive_fp32(q, k, v, causal)
    assert_2x_rule(out, plain_out, want_out, "out")
    assert_2x_rule(lse, plain_lse, want_lse, "lse")


# -- scores that overflow the accumulation dtype ------------------------------------------------------

@pytest.mark.parametrize("dtype,magnitude,scale,largest", [
    pytest.param(np.float32, 1e20, None, r"3\.4e\+38", id="float32-q-k-1e20"),
    pytest.param(np.float64, 1.0, 1e308, r"1\.8e\+308", id="float64-scale-1e308"),
])
def test_scores_that_overflow_raise(rng, dtype, magnitude, scale, largest):
    """Finite inputs whose scores leave the dtype's range: an OverflowError naming the overflow, the dtype
    and its largest value, never a NaN output."""
    q, k, v = make_qkv(rng, 1, 16, 2, 1, 8, dtype=dtype, magnitude=magnitude)
    name = np.dtype(dtype).name
    with pytest.raises(OverflowError, match=rf"overflowed {name} .*{largest}.*np\.finfo\({name}\)\.max"):
        blockwise_attention(q, k, v, causal=True, scale=scale, block_q=4, block_k=4)


def near_float32_limit(rng, B, N, Hq, Hkv, D):
    """float32 q, k, v whose scores reach 1e37 to 1e38, below float32's 3.4e38: every product q_d k_d and
    every partial sum of q.k stays below 1e38."""
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    c = np.sqrt(1e38 / np.einsum("bnhd,bmgd->nm", np.abs(q), np.abs(k)).max())
    return (q * c).astype(np.float32), (k * c).astype(np.float32), v.astype(np.float32)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scores_just_below_the_float32_limit(rng, causal):
    q, k, v = near_float32_limit(rng, 1, 24, 2, 1, 8)
    dout = make_dout(rng, q)
    ours = blockwise(q, k, v, dout, causal, 5, 7, scale=1.0)
    want = oracle(q, k, v, dout, causal, scale=1.0)
    assert np.abs(want[1]).max() > 1e37
    plain_out, plain_lse = plain_attention(q, k, v, causal, scale=1.0)
    assert_2x_rule(ours[0], plain_out, want[0], "out")
    assert_2x_rule(ours[1], plain_lse, want[1], "lse")
    for name, got in zip(NAMES[2:], ours[2:]):
        assert np.isfinite(got).all(), name


# -- float16 inputs: float16 outputs, float32 accumulation --------------------------------------------

def assert_fp16_rule(got, plain, ref, name):
    """err(ours) <= 2 err(plain) + half an fp16 ulp at the reference's magnitude."""
    e, e_plain = rel_err(got, ref) * np.abs(ref).max(), rel_err(plain, ref) * np.abs(ref).max()
    bound = 2 * e_plain + half_ulp(np.float16, np.abs(ref).max())
    assert e <= bound, f"{name}: error {e:.3e} > 2 x plain {e_plain:.3e} + half ulp (bound {bound:.3e})"


@pytest.mark.parametrize("magnitude", [1.0, 3.0], ids=["logits~1", "logits~10"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float16_forward_within_output_rounding(rng, causal, magnitude):
    """Plain path: float16 inputs, everything computed in float32, the output rounded to float16."""
    q, k, v = make_qkv(rng, 2, 29, 4, 2, 8, dtype=np.float16, magnitude=magnitude)
    out, lse = blockwise_attention(q, k, v, causal=causal, block_q=6, block_k=5)
    assert out.dtype == np.float16 and lse.dtype == np.float32
    want_out, want_lse = naive_attention(q, k, v, causal=causal)
    plain_out, plain_lse = plain_attention(q, k, v, causal, dtype=np.float32)
    assert_fp16_rule(out, plain_out.astype(np.float16), want_out, "out")
    assert_2x_rule(lse, plain_lse, want_lse, "lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float16_backward_within_output_rounding(rng, causal):
    q, k, v = make_qkv(rng, 1, 21, 2, 1, 8, dtype=np.float16)
    dout = make_dout(rng, q)
    ours = blockwise(q, k, v, dout, causal, 4, 6)
    assert [x.dtype for x in ours] == [np.float16, np.float32, np.float16, np.float16, np.float16]
    want = oracle(q, k, v, dout, causal)
    plain = plain_attention_backward(q, k, v, dout, causal, dtype=np.float32)
    for name, got, p, ref in zip(NAMES[2:], ours[2:], plain, want[2:]):
        assert_fp16_rule(got, p.astype(np.float16), ref, name)


# -- memory: one tile of scores -----------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_workspace_never_holds_more_than_one_tile(rng, monkeypatch, causal):
    B, N, Hq, Hkv, D, block_q, block_k = 2, 41, 4, 2, 3, 6, 5
    requests = []
    original = tile.Workspace.get

    def recording_get(self, name, shape):
        requests.append((name, tuple(shape)))
        return original(self, name, shape)

    monkeypatch.setattr(tile.Workspace, "get", recording_get)
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    ours = blockwise(q, k, v, dout, causal, block_q, block_k)
    for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
        assert_fp64_close(got, ref, name)      # the recorded run is a correct run

    one_tile = block_q * block_k                # one head's tile: forward and backward visit the heads in turn
    assert {name for name, _ in requests} == {"s", "p", "ds"}
    for name, shape in requests:
        assert int(np.prod(shape)) <= one_tile, (name, shape)
    assert max(int(np.prod(s)) for _, s in requests) == one_tile
    assert one_tile < B * Hq * N * N // 20     # the bound is meaningful: far below the full score matrix
