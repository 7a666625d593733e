"""Dilated attention (LongNet, ``specs/dilated.md``): the oracle against the definition, the tiles against
the oracle, and the seed's scenario scaled down.

* ``naive_dilated_attention`` against ``definition``, a Python loop over the definition that combines the
  branches with LongNet's Eq. 10 weights (each branch's softmax denominator), not with a multiset; its
  backward against central finite differences.
* ``dilated_attention`` and its backward against the oracle: float64 within 1e-12 relative, float32 within
  the 2x rule (``refimpl.tolerance.judge``) against a plain float32 computation from the oracle's dense
  multiplicity matrix.
* Memory: score buffers never exceed one tile, the scores computed are those of the selected rows only
  (about N w / r^2 per head and branch), and working memory grows linearly with N.
"""

import itertools
import math
import tracemalloc

import numpy as np
import pytest

from conftest import _expand_heads, _fold, assert_fp64_close, make_dout, make_qkv
from refimpl import (dilated_attention, dilated_attention_backward, naive_attention, naive_attention_backward,
                     naive_dilated_attention, naive_dilated_attention_backward, naive_dilated_rows, tile, tolerance)
from refimpl.dilated import branches, gathers, head_group_bounds, head_offsets, multiplicity

NAMES = ("out", "lse", "dq", "dk", "dv")


# -- the definition, as a loop --------------------------------------------------------------------------

def definition(q, k, v, segments, rates, causal=False, offsets="paper", mode="longnet", scale=None):
    """out (B, N, Hq, D), lse (B, Hq, N) in float64, by a loop over heads, rows and branches.

    Each branch that selects row p gives a partial (lse_i, o_i) over the selected keys of p's segment;
    the partials combine with weights alpha_i = Z_i / sum_j Z_j, Z_i = exp(lse_i) (LongNet Eq. 10).
    """
    B, N, Hq, D = q.shape
    G = Hq // k.shape[2]
    scale = 1 / math.sqrt(D) if scale is None else scale
    out, lse = np.zeros((B, N, Hq, D)), np.full((B, Hq, N), -np.inf)
    sizes = [Hq // len(rates) + (i < Hq % len(rates)) for i in range(len(rates))]
    for b, j, p in itertools.product(range(B), range(Hq), range(N)):
        if mode == "head_groups":
            i = next(i for i in range(len(rates)) if j < sum(sizes[:i + 1]))
            uses = [(i, i % rates[i])]
        else:
            uses = [(i, j % r if offsets == "paper" else j // math.ceil(Hq / r)) for i, r in enumerate(rates)]
        partials = []
        for i, o in uses:
            w, r = segments[i], rates[i]
            a = p - p % w
            chosen = [t for t in range(a, min(a + w, N)) if (t - a) % r == o]
            if p not in chosen:
                continue
            keys = [t for t in chosen if t <= p or not causal]
            s = np.array([scale * float(q[b, p, j].astype(np.float64) @ k[b, t, j // G].astype(np.float64))
                          for t in keys])
            e = np.exp(s - s.max())
            partials.append((s.max() + math.log(e.sum()),
                             sum(e_t * v[b, t, j // G].astype(np.float64) for e_t, t in zip(e, keys)) / e.sum()))
        if partials:
            total = np.logaddexp.reduce([lse_i for lse_i, _ in partials])
            out[b, p, j] = sum(math.exp(lse_i - total) * o_i for lse_i, o_i in partials)
            lse[b, j, p] = total
    return out, lse


def options(segments, rates, causal=False, offsets="paper", mode="longnet"):
    return dict(segment_lengths=segments, dilation_rates=rates, causal=causal, offsets=offsets, mode=mode)


# (B, N, Hq, Hkv, D, segments, rates)
CASES = [
    pytest.param(1, 16, 2, 2, 3, (4, 8), (1, 2), id="divides"),
    pytest.param(2, 23, 4, 2, 3, (5, 8, 16), (1, 2, 4), id="N-not-divisible-GQA"),
    pytest.param(1, 19, 6, 3, 2, (7, 6), (3, 4), id="w-not-divisible-by-r"),
    pytest.param(1, 13, 3, 1, 4, (4, 40), (6, 2), id="rate-above-segment-MQA-segment-above-N"),
    pytest.param(1, 15, 4, 2, 3, (6, 6, 15), (2, 2, 1), id="repeated-branch"),
    pytest.param(1, 21, 5, 5, 2, (3, 7, 11), (1, 2, 3), id="uneven-head-groups"),
]
CONVENTIONS = [("paper", "longnet"), ("torchscale", "longnet"), ("paper", "head_groups")]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("offsets,mode", CONVENTIONS)
@pytest.mark.parametrize("B,N,Hq,Hkv,D,segments,rates", CASES)
def test_oracle_is_the_definition(rng, causal, offsets, mode, B, N, Hq, Hkv, D, segments, rates):
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    out, lse = naive_dilated_attention(q, k, v, **options(segments, rates, causal, offsets, mode))
    want_out, want_lse = definition(q, k, v, segments, rates, causal, offsets, mode)
    assert np.array_equal(np.isneginf(lse), np.isneginf(want_lse))
    assert_fp64_close(out, want_out, "out")
    assert_fp64_close(lse, want_lse, "lse")


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("offsets,mode", CONVENTIONS)
def test_oracle_backward_is_the_gradient(rng, causal, offsets, mode):
    """Central differences of L = sum(dout * out) through the oracle's forward, every input entry."""
    B, N, Hq, Hkv, D, segments, rates = 1, 11, 4, 2, 2, (4, 6, 6), (1, 2, 2)   # two branches select alike
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    opts = options(segments, rates, causal, offsets, mode)
    grads = naive_dilated_attention_backward(q, k, v, dout, **opts)
    step = 1e-6
    for x, g, name in zip((q, k, v), grads, ("dq", "dk", "dv")):
        numeric = np.zeros_like(x)
        for index in np.ndindex(x.shape):
            values = []
            for sign in (1, -1):
                x[index] += sign * step
                values.append(np.sum(dout * naive_dilated_attention(q, k, v, **opts)[0]))
                x[index] -= sign * step
            numeric[index] = (values[0] - values[1]) / (2 * step)
        assert np.max(np.abs(g - numeric)) <= 1e-7 * np.max(np.abs(numeric)), name


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_branch_over_the_whole_sequence_is_attention(rng, causal):
    q, k, v = make_qkv(rng, 2, 13, 4, 2, 3)
    dout = make_dout(rng, q)
    for segments, rates, extra in [((13,), (1,), 0.0), ((64,), (1,), 0.0), ((13, 20), (1, 1), math.log(2))]:
        opts = options(segments, rates, causal)
        out, lse = naive_dilated_attention(q, k, v, **opts)
        want_out, want_lse = naive_attention(q, k, v, causal=causal)
        assert_fp64_close(out, want_out, "out")
        assert_fp64_close(lse, want_lse + extra, "lse")       # a key given by two branches counts twice
        for name, g, want in zip(NAMES[2:], naive_dilated_attention_backward(q, k, v, dout, **opts),
                                 naive_attention_backward(q, k, v, dout, causal=causal)):
            assert_fp64_close(g, want, name)


def test_unselected_positions_get_zero_and_minus_infinity(rng):
    q, k, v = make_qkv(rng, 1, 12, 2, 2, 3)
    for fn in (naive_dilated_attention, dilated_attention):
        out, lse = fn(q, k, v, **options((12,), (2,)))
        for h in range(2):                                      # paper offsets: head h selects t = h mod 2
            hidden = np.arange(12) % 2 != h
            assert np.all(np.isneginf(lse[0, h, hidden])) and np.all(np.isfinite(lse[0, h, ~hidden]))
            assert np.all(out[0, hidden, h] == 0)


def test_no_padding_key_enters_the_last_short_segment(rng):
    q, k, v = make_qkv(rng, 1, 11, 2, 2, 3)
    out, lse = naive_dilated_attention(q, k, v, **options((4,), (1,)))
    last_out, last_lse = naive_attention(q[:, 8:], k[:, 8:], v[:, 8:])   # the 3 real keys, nothing padded
    assert_fp64_close(out[:, 8:], last_out, "out")
    assert_fp64_close(lse[:, :, 8:], last_lse, "lse")


def test_offset_conventions_and_head_groups():
    assert head_offsets(6, 4, "torchscale") == [0, 0, 1, 1, 2, 2]
    assert head_offsets(6, 4, "paper") == [0, 1, 2, 3, 0, 1]
    assert head_group_bounds(5, 3) == [(0, 2), (2, 4), (4, 5)]      # not the library's overlapping ranges
    assert head_group_bounds(16, 3) == [(0, 6), (6, 11), (11, 16)]


def test_head_groups_is_each_group_alone_without_renormalisation(rng):
    """Group i's heads output branch i alone, offset i mod r_i: on its selected rows, plain attention of those
    rows, not divided by the number of groups; elsewhere 0 and -inf."""
    N, segments, rates = 20, (4, 8, 20), (1, 2, 3)
    q, k, v = make_qkv(rng, 1, N, 5, 5, 3)
    out, lse = naive_dilated_attention(q, k, v, **options(segments, rates, mode="head_groups"))
    seen = np.zeros((N, 5), bool)
    for i, (start, stop) in enumerate(head_group_bounds(5, 3)):
        heads, w, r = slice(start, stop), segments[i], rates[i]
        for a in range(0, N, w):
            rows = slice(a + i % r, min(a + w, N), r)
            want_out, want_lse = naive_attention(q[:, rows, heads], k[:, rows, heads], v[:, rows, heads])
            assert_fp64_close(out[:, rows, heads], want_out, f"group {i} out")
            assert_fp64_close(lse[:, heads, rows], want_lse, f"group {i} lse")
            seen[rows, heads] = True
    assert np.all(out[:, ~seen] == 0) and np.all(np.isneginf(lse.transpose(0, 2, 1)[:, ~seen]))


def test_sampled_rows_are_the_oracle_rows(rng):
    q, k, v = make_qkv(rng, 2, 17, 4, 2, 3)
    opts = options((5, 8), (1, 2), causal=True)
    out, lse = naive_dilated_attention(q, k, v, **opts)
    rows = [16, 0, 7]
    row_out, row_lse = naive_dilated_rows(q, k, v, rows, **opts)
    assert_fp64_close(row_out, out[:, rows], "out")
    assert np.array_equal(row_lse, lse[:, :, rows])


# -- on tiles, against the oracle ----------------------------------------------------------------------

def tiled(q, k, v, dout, opts, **blocks):
    out, lse = dilated_attention(q, k, v, **opts, **blocks)
    return (out, lse) + dilated_attention_backward(q, k, v, out, lse, dout, **opts, **blocks)


def oracle(q, k, v, dout, opts):
    return naive_dilated_attention(q, k, v, **opts) + naive_dilated_attention_backward(q, k, v, dout, **opts)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("offsets,mode", CONVENTIONS)
@pytest.mark.parametrize("B,N,Hq,Hkv,D,segments,rates", CASES + [
    pytest.param(1, 64, 8, 2, 4, (16, 32, 64), (1, 2, 4), id="seed-like-GQA"),
    pytest.param(2, 50, 6, 6, 3, (8, 50), (2, 3), id="seed-like-MHA"),
])
@pytest.mark.parametrize("block_q,block_k", [(3, 4), (512, 1024)], ids=["small-blocks", "default-blocks"])
def test_float64_matches_oracle(rng, causal, offsets, mode, B, N, Hq, Hkv, D, segments, rates, block_q, block_k):
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    opts = options(segments, rates, causal, offsets, mode)
    for name, got, want in zip(NAMES, tiled(q, k, v, dout, opts, block_q=block_q, block_k=block_k),
                               oracle(q, k, v, dout, opts)):
        assert got.dtype == np.float64 and got.shape == want.shape, name
        assert_fp64_close(got, want, name)


def test_float64_custom_scale(rng):
    q, k, v = make_qkv(rng, 1, 21, 4, 2, 5)
    dout = make_dout(rng, q)
    opts = dict(options((6, 12), (1, 3), causal=True), scale=0.37)
    for name, got, want in zip(NAMES, tiled(q, k, v, dout, opts, block_q=4, block_k=3), oracle(q, k, v, dout, opts)):
        assert_fp64_close(got, want, name)


def plain_float32(q, k, v, dout, counts, scale):
    """The textbook multiset computation in float32 from the oracle's multiplicity (Hq, N, N): the yardstick
    of the 2x rule. The backward recomputes p from the float32 lse, as a backward is given it."""
    dt, Hq, Hkv = np.dtype(np.float32), q.shape[2], k.shape[2]
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh, vh = _expand_heads(k.astype(dt), Hq), _expand_heads(v.astype(dt), Hq)
    do = dout.astype(dt).transpose(0, 2, 1, 3)
    s = np.where(counts > 0, (qh @ kh.transpose(0, 1, 3, 2)) * dt.type(scale), dt.type(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    e = counts.astype(dt) * np.exp(s - np.where(np.isneginf(m), dt.type(0), m))
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p, lse = np.where(l > 0, e / l, dt.type(0)), (m + np.log(l))[..., 0]
    out = p @ vh
    p = counts.astype(dt) * np.exp(s - np.where(np.isneginf(lse), dt.type(0), lse)[..., None])
    ds = p * (do @ vh.transpose(0, 1, 3, 2) - (do * out).sum(axis=-1, keepdims=True))
    grads = (dt.type(scale) * (ds @ kh), _fold(dt.type(scale) * (ds.transpose(0, 1, 3, 2) @ qh), Hkv),
             _fold(p.transpose(0, 1, 3, 2) @ do, Hkv))
    return (out.transpose(0, 2, 1, 3), lse, grads[0].transpose(0, 2, 1, 3)) + grads[1:]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("offsets,mode", CONVENTIONS)
@pytest.mark.parametrize("B,N,Hq,Hkv,D,segments,rates", [
    pytest.param(1, 96, 4, 2, 16, (16, 32, 96), (1, 2, 4), id="seed-like"),
    pytest.param(2, 45, 6, 3, 8, (10, 45, 45), (1, 3, 3), id="repeated-N-not-divisible"),
])
def test_float32_within_twice_plain_float32_error(rng, causal, offsets, mode, B, N, Hq, Hkv, D, segments, rates):
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=np.float32)
    dout = make_dout(rng, q)
    opts = options(segments, rates, causal, offsets, mode)
    scale = 1 / math.sqrt(D)
    counts = multiplicity(np.arange(N), np.arange(N), branches(Hq, segments, rates, offsets, mode), causal)
    ours = tiled(q, k, v, dout, opts, block_q=8, block_k=16)
    yardstick = plain_float32(q, k, v, dout, counts, scale)
    scales = tolerance.Scales.of(q, k, v, dout, scale=scale)
    for name, got, plain, ref in zip(NAMES, ours, yardstick, oracle(q, k, v, dout, opts)):
        assert got.dtype == np.float32, name
        verdict = tolerance.judge(name, got, ref, input_dtype=np.float32, plain=plain, scales=scales)
        assert verdict.passed, verdict.line()


def test_float16_within_the_rule_with_float32_accumulation(rng):
    """float16 inputs: outputs in float16 (lse float32), judged by the float16 rule against the plain float32
    computation rounded to float16, as ``plain.plain_outputs`` does for dense attention."""
    B, N, Hq, Hkv, D, segments, rates = 1, 24, 2, 1, 4, (8, 24), (1, 2)
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=np.float16)
    dout = make_dout(rng, q)
    opts = options(segments, rates)
    counts = multiplicity(np.arange(N), np.arange(N), branches(Hq, segments, rates), False)
    yardstick = plain_float32(q, k, v, dout, counts, 1 / math.sqrt(D))
    scales = tolerance.Scales.of(q, k, v, dout, scale=1 / math.sqrt(D))
    for name, got, plain, ref in zip(NAMES, tiled(q, k, v, dout, opts, block_q=5, block_k=3), yardstick,
                                     oracle(q, k, v, dout, opts)):
        assert got.dtype == (np.float32 if name == "lse" else np.float16), name
        plain = plain if name == "lse" else plain.astype(np.float16)
        verdict = tolerance.judge(name, got, ref, input_dtype=np.float16, plain=plain, scales=scales)
        assert verdict.passed, verdict.line()


# -- the backward's lse ------------------------------------------------------------------------------

def test_backward_takes_minus_infinity_only_where_nothing_is_selected(rng):
    q, k, v = make_qkv(rng, 1, 12, 2, 2, 3)
    dout = make_dout(rng, q)
    opts = options((12,), (2,))
    out, lse = dilated_attention(q, k, v, **opts)
    dilated_attention_backward(q, k, v, out, lse, dout, **opts)         # the forward's lse is accepted
    for index, value in [((0, 0, 1), 0.5), ((0, 0, 0), -np.inf), ((0, 1, 3), np.nan)]:
        bad = lse.copy()
        bad[index] = value
        with pytest.raises(ValueError, match=r"lse must be finite where a branch selects the row"):
            dilated_attention_backward(q, k, v, out, bad, dout, **opts)


# -- argument checks -------------------------------------------------------------------------------

def call(fn, q, k, v, **opts):
    if fn is dilated_attention_backward:
        return fn(q, k, v, q, np.zeros((1, q.shape[2], q.shape[1])), q, **opts)
    if fn is naive_dilated_attention_backward:
        return fn(q, k, v, q, **opts)
    return fn(q, k, v, **opts)


@pytest.mark.parametrize("fn", [naive_dilated_attention, naive_dilated_attention_backward, dilated_attention,
                                dilated_attention_backward])
@pytest.mark.parametrize("changes,error,message", [
    (dict(segment_lengths=[4, 0]), ValueError, r"segment_lengths\[1\] must be a positive int, got 0"),
    (dict(dilation_rates=[1, 1.5]), TypeError, r"dilation_rates\[1\] must be an int, got float"),
    (dict(dilation_rates=[True, 2]), TypeError, r"dilation_rates\[0\] must be an int, got bool"),
    (dict(segment_lengths="48"), TypeError, r"segment_lengths must be a list or tuple of positive ints"),
    (dict(segment_lengths=[], dilation_rates=[]), ValueError, r"segment_lengths must hold at least one value"),
    (dict(dilation_rates=[1]), ValueError, r"segment_lengths has 2 values but dilation_rates has 1"),
    (dict(offsets="zigzag"), ValueError, r"offsets must be one of 'paper', 'torchscale', got 'zigzag'"),
    (dict(mode="ring"), ValueError, r"mode must be one of 'longnet', 'head_groups', got 'ring'"),
    (dict(mode=None), TypeError, r"mode must be one of"),
    (dict(mode="head_groups", offsets="torchscale"), ValueError, r"offsets='torchscale' applies to mode='longnet'"),
    (dict(mode="head_groups", segment_lengths=[4, 4, 4], dilation_rates=[1, 1, 1]), ValueError,
     r"each of the 3 branches its own group of query heads, but q has only Hq=2"),
])
def test_bad_options_name_the_argument(rng, fn, changes, error, message):
    q, k, v = make_qkv(rng, 1, 8, 2, 2, 3)
    opts = dict(options([4, 8], [1, 2]), **changes)
    with pytest.raises(error, match=message):
        call(fn, q, k, v, **opts)


# -- memory and work -------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_scores_are_one_tile_and_only_the_selected_rows(rng, monkeypatch, causal):
    """Every score buffer is at most one (block_q x block_k) tile per head group, and the scores computed
    are those of the gathered rows: sum over work items of (rows)^2 x heads, about N w / r^2 per head and
    branch, not the N w of a branch padded back to its segment (the seed's bug)."""
    B, N, Hq, Hkv, D, segments, rates = 1, 256, 4, 4, 4, (32, 64, 128), (1, 2, 4)
    block_q, block_k = 8, 16
    requests, scores = [], [0]
    original_get, original_tile = tile.Workspace.get, tile.attend_tile

    def recording_get(self, name, shape):
        requests.append((name, tuple(shape)))
        return original_get(self, name, shape)

    def counting_tile(q, k, *args):
        scores[0] += q.shape[0] * q.shape[1] * q.shape[2] * q.shape[3] * k.shape[3]
        return original_tile(q, k, *args)

    monkeypatch.setattr(tile.Workspace, "get", recording_get)
    monkeypatch.setattr(tile, "attend_tile", counting_tile)
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    opts = options(segments, rates, causal)
    for name, got, want in zip(NAMES, tiled(q, k, v, dout, opts, block_q=block_q, block_k=block_k),
                               oracle(q, k, v, dout, opts)):
        assert_fp64_close(got, want, name)      # the recorded run is a correct run
    for name, shape in requests:
        assert int(np.prod(shape)) <= B * Hq * block_q * block_k, (name, shape)
    gathered = sum(len(range(N)[rows]) ** 2 * len(range(Hq)[heads])
                   for rows, heads, _ in gathers(branches(Hq, segments, rates), N, Hkv))
    assert gathered == sum(Hq * N * w // r ** 2 for w, r in zip(segments, rates))
    if causal:      # whole tiles above the diagonal are skipped
        assert gathered / 2 <= scores[0] < gathered
    else:
        assert scores[0] == gathered


def working_bytes(fn, outputs):
    """Peak traced bytes of ``fn()`` above what was traced when it started, minus its ``outputs``
    (indices into its result: the arrays that must exist anyway)."""
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    result = fn()
    return tracemalloc.get_traced_memory()[1] - baseline - sum(result[i].nbytes for i in outputs), result


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("segments,rates", [((256, 512, 1024), (1, 2, 4)), ((1024,), (1,))],
                         ids=["seed-branches", "seed-8K-segments"])
def test_working_memory_grows_linearly_with_N(causal, segments, rates):
    """The seed's scenario scaled down (N/8, segments/8, blocks/8, H=2, D=16, float32): working memory (peak
    minus q, k, v and out; minus q, k, v, out, lse, dout and dq, dk, dv in the backward) per token does not
    grow with N; at the largest N it is a few bytes per (token x head), the per-row arrays (lse, delta), and
    far below one segment's score matrix per head, which the seed built."""
    rng = np.random.default_rng(0)
    H, D = 2, 16
    per_token = {}
    for N in (2048, 4096, 8192):
        tracemalloc.start()
        try:
            q, k, v, dout = (rng.standard_normal((1, N, H, D), dtype=np.float32) for _ in range(4))
            opts = dict(options(segments, rates, causal), block_q=64, block_k=128)
            forward, (out, lse) = working_bytes(lambda: dilated_attention(q, k, v, **opts), [0])
            backward, _ = working_bytes(lambda: dilated_attention_backward(q, k, v, out, lse, dout, **opts),
                                        [0, 1, 2])
        finally:
            tracemalloc.stop()
        seed_scores = (N // max(segments)) * H * max(segments) ** 2 * 4
        assert forward < seed_scores / 8 and backward < seed_scores / 8, (N, forward, backward, seed_scores)
        per_token[N] = (forward / N, backward / N)
    for phase in (0, 1):
        for small, large in ((2048, 4096), (4096, 8192)):
            assert per_token[large][phase] <= 1.1 * per_token[small][phase], (phase, per_token)
        assert per_token[8192][phase] <= 32 * H, (phase, per_token)    # a few per-row arrays, no w-sized ones
