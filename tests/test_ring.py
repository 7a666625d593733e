"""Ring attention over P simulated ranks, against the float64 oracle.

``simulate_ring`` shards q, k and v contiguously over P ranks, passes the K/V shards around the ring
(and, for the backward, the dK/dV accumulators with them), and reassembles the result. Whatever P,
causal or not, GQA or not, the answer must be the oracle's: 1e-12 relative in float64, the 2x rule of
``conftest`` in float32.

The trace, byte counts and peak memory are checked against figures computed here from the layout:
which K/V shard each rank holds at each step, how many tiles a causal rank can skip, and how many
bytes each message must carry.
"""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import (assert_2x_rule, assert_fp64_close, make_dout, make_qkv, plain_attention,
                      plain_attention_backward, plain_naive_fp32)
from refimpl import (blockwise_attention, blockwise_attention_backward, naive_attention,
                     naive_attention_backward, simulate_ring)
from refimpl.comm.sim import SimWorld
from refimpl.engine import NumpyEngine
from refimpl.ring import ring_attention, ring_attention_backward
from refimpl.schedule import BACKWARD_DKV, BACKWARD_KV, FORWARD_KV, tag
from test_blockwise import assert_fp16_rule, near_float32_limit

NAMES = ("out", "lse", "dq", "dk", "dv")


def oracle(q, k, v, dout, causal):
    return naive_attention(q, k, v, causal=causal) + naive_attention_backward(q, k, v, dout, causal=causal)


def ring(q, k, v, dout, P, causal, block_q=4, block_k=3):
    r = simulate_ring(q, k, v, ranks=P, causal=causal, dout=dout, block_q=block_q, block_k=block_k, timeout=60)
    return r, (r.out, r.lse, r.dq, r.dk, r.dv)


def shard_lengths(N, P):
    """The contiguous layout, computed independently: the first N % P ranks get one extra token."""
    return [N // P + (r < N % P) for r in range(P)]


# -- correctness --------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,Hq,Hkv,D", [
    pytest.param(2, 37, 2, 2, 3, id="N37"),
    pytest.param(1, 41, 4, 2, 5, id="N41-GQA"),
])
def test_float64_matches_oracle(rng, P, causal, B, N, Hq, Hkv, D):
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    _, ours = ring(q, k, v, dout, P, causal)
    for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
        assert got.dtype == np.float64 and got.shape == ref.shape, name
        assert_fp64_close(got, ref, name)


@pytest.mark.parametrize("P", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_float32_within_twice_plain_float32_error(rng, P, causal):
    q, k, v = make_qkv(rng, 1, 37, 4, 2, 5, dtype=np.float32)
    dout = make_dout(rng, q)
    _, ours = ring(q, k, v, dout, P, causal, block_q=8, block_k=8)
    assert [x.dtype for x in ours] == [np.float32] * 5
    plain = plain_naive_fp32(q, k, v, causal) + plain_attention_backward(q, k, v, dout, causal, dtype=np.float32)
    for name, got, p, ref in zip(NAMES, ours, plain, oracle(q, k, v, dout, causal)):
        assert_2x_rule(got, p, ref, name)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("P", [1, 2, 3])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,N,Hq,Hkv,D,block_q,block_k", [
    pytest.param(1, 64, 2, 1, 16, 16, 16, id="N64-D16-MQA"),
    pytest.param(2, 96, 4, 2, 24, 32, 20, id="N96-D24-GQA"),
    pytest.param(1, 128, 2, 2, 64, 48, 64, id="N128-D64"),
])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_low_precision_within_twice_plain_error(dtype, B, N, Hq, Hkv, D, block_q, block_k, causal, P, seed):
    """All five outputs, float32 by the 2x rule and float16 by its variant (``specs/tolerances.md`` 3.2, 3.3),
    at sizes where the maximum error is a stable statistic (N >= 64, D >= 16; see the property test)."""
    rng = np.random.default_rng([seed, N, D, P])
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=dtype)
    dout = make_dout(rng, q)
    _, ours = ring(q, k, v, dout, P, causal, block_q, block_k)
    plain = plain_attention(q, k, v, causal) + plain_attention_backward(q, k, v, dout, causal)
    for name, got, p, ref in zip(NAMES, ours, plain, oracle(q, k, v, dout, causal)):
        if dtype == np.float16 and name != "lse":
            assert_fp16_rule(got, p.astype(np.float16), ref, name)
        else:
            assert_2x_rule(got, p, ref, name)


@pytest.mark.parametrize("block_q,block_k", [(64, 8), (26, 43)])
def test_float32_example_that_failed_the_property_test(block_q, block_k):
    """A draw of ``test_property_float32_within_twice_plain_float32_error`` that failed once: B = 2, N = 156,
    one head, D = 24, P = 1, seed 6441153, not causal (dv 2.8 and 3.4 times the plain error at these
    blocks). The cause was q multiplied by the scale before q k^T (``refimpl/tile.py`` docstring)."""
    rng = np.random.default_rng(6441153)
    q, k, v = make_qkv(rng, 2, 156, 1, 1, 24, dtype=np.float32)
    dout = make_dout(rng, q)
    _, ours = ring(q, k, v, dout, 1, False, block_q, block_k)
    plain = plain_naive_fp32(q, k, v) + plain_attention_backward(q, k, v, dout)
    for name, got, p, ref in zip(NAMES, ours, plain, oracle(q, k, v, dout, False)):
        assert_2x_rule(got, p, ref, name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_sixteen_ranks(rng, causal):
    q, k, v = make_qkv(rng, 1, 45, 3, 1, 4)
    dout = make_dout(rng, q)
    _, ours = ring(q, k, v, dout, 16, causal, block_q=2, block_k=2)
    for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
        assert_fp64_close(got, ref, name)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_token_per_rank(rng, causal):
    N = 9
    q, k, v = make_qkv(rng, 2, N, 2, 2, 3)
    dout = make_dout(rng, q)
    result, ours = ring(q, k, v, dout, N, causal)
    for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
        assert_fp64_close(got, ref, name)
    assert all(rec.tiles + rec.skipped == 1 for rec in result.trace)


ring_cases = dict(B=st.integers(1, 2), N=st.integers(1, 24),
                  heads=st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2), (3, 1)]), D=st.integers(1, 6),
                  causal=st.booleans(), block_q=st.integers(1, 9), block_k=st.integers(1, 9), data=st.data())


def draw_ring_inputs(B, N, heads, D, dtype, data):
    P = data.draw(st.integers(1, min(16, N)), label="P")
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1), label="seed"))
    q, k, v = make_qkv(rng, B, N, heads[0], heads[1], D, dtype=dtype)
    return P, q, k, v, make_dout(rng, q)


@settings(max_examples=40, deadline=None)
@given(**ring_cases)
def test_property_float64_matches_oracle(B, N, heads, D, causal, block_q, block_k, data):
    P, q, k, v, dout = draw_ring_inputs(B, N, heads, D, np.float64, data)
    _, ours = ring(q, k, v, dout, P, causal, block_q, block_k)
    for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
        if N == 1 and name in ("dq", "dk"):
            # one key: the softmax is the constant 1, so dq and dk are exactly zero and both the oracle
            # and the ring return rounding noise; bound that noise by 1e-12 of one term's natural size
            term = np.abs(q).max() * np.abs(k).max() * np.abs(dout).max() * np.abs(v).max() * D
            assert np.abs(got).max() <= 1e-12 * term, name
        else:
            assert_fp64_close(got, ref, name)


# The 2x rule compares two maximum errors of a few ulps each. On tensors of a handful of entries that
# ratio is dominated by luck (a plain result that happens to round exactly), so the float32 property is
# drawn at sizes where the maximum is a more stable statistic, as in flash-attention's tests; every tiny
# shape is covered above in float64 at 1e-12. (At N < 40, D < 9 about 1% of outputs exceed the rule.)
# Even here about one uniform draw in 250 does, by up to 4.5x, through a row that sees few keys and whose
# gradient cancels: fresh examples (make explore) fail about one run in ten (specs/tolerances.md 3.2).
ring_cases_fp32 = dict(B=st.integers(1, 2), N=st.integers(64, 160),
                       heads=st.sampled_from([(1, 1), (2, 2), (2, 1), (4, 2)]), D=st.integers(16, 64),
                       causal=st.booleans(), block_q=st.integers(8, 64), block_k=st.integers(8, 64), data=st.data())


@settings(max_examples=30, deadline=None)
@given(**ring_cases_fp32)
def test_property_float32_within_twice_plain_float32_error(B, N, heads, D, causal, block_q, block_k, data):
    P, q, k, v, dout = draw_ring_inputs(B, N, heads, D, np.float32, data)
    _, ours = ring(q, k, v, dout, P, causal, block_q, block_k)
    plain = plain_naive_fp32(q, k, v, causal) + plain_attention_backward(q, k, v, dout, causal, dtype=np.float32)
    for name, got, p, ref in zip(NAMES, ours, plain, oracle(q, k, v, dout, causal)):
        assert_2x_rule(got, p, ref, name)


# -- scores that overflow -------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 3])
def test_scores_that_overflow_raise(rng, P):
    """float32 q and k of about 1e20: OverflowError naming float32 and its largest value, not NaN."""
    q, k, v = make_qkv(rng, 1, 12, 2, 1, 4, dtype=np.float32, magnitude=1e20)
    with pytest.raises(OverflowError, match=r"overflowed float32 .*3\.4e\+38"):
        simulate_ring(q, k, v, ranks=P, causal=True, block_q=2, block_k=3, timeout=60)


class LseCorruptingEngine(NumpyEngine):
    """An engine whose forward steps leave one lse entry non-finite, as an overflowing GPU kernel could."""
    value = np.nan

    def attend(self, o, lse, *args, **kwargs):
        plan = super().attend(o, lse, *args, **kwargs)
        lse[0, 1, -1] = self.value
        return plan


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")      # later merges into the corrupted entry
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_a_non_finite_lse_from_any_engine_raises(rng, monkeypatch, value):
    """Whatever the engine computed, the ring never returns a non-finite lse (every row sees a key)."""
    monkeypatch.setattr(LseCorruptingEngine, "value", value)
    q, k, v = make_qkv(rng, 1, 12, 2, 1, 4, dtype=np.float32)
    with pytest.raises(OverflowError, match=rf"overflowed float32 \(rank \d: lse {value} at batch 0, query head 1, "
                                            r"query position \d+\).*3\.4e\+38"):
        simulate_ring(q, k, v, ranks=2, block_q=4, block_k=4, engine=LseCorruptingEngine, timeout=60)


@pytest.mark.parametrize("P", [1, 3])
def test_scores_just_below_the_float32_limit(rng, P):
    q, k, v = near_float32_limit(rng, 1, 24, 2, 1, 8)
    result = simulate_ring(q, k, v, ranks=P, causal=True, scale=1.0, block_q=5, block_k=7, timeout=60)
    want_out, want_lse = naive_attention(q, k, v, causal=True, scale=1.0)
    plain_out, plain_lse = plain_attention(q, k, v, causal=True, scale=1.0)
    assert_2x_rule(result.out, plain_out, want_out, "out")
    assert_2x_rule(result.lse, plain_lse, want_lse, "lse")


def test_deterministic(rng):
    q, k, v = make_qkv(rng, 1, 29, 4, 2, 3)
    dout = make_dout(rng, q)
    _, first = ring(q, k, v, dout, 5, True)
    _, second = ring(q, k, v, dout, 5, True)
    for name, a, b in zip(NAMES, first, second):
        np.testing.assert_array_equal(a, b, err_msg=name)
    for name, got, ref in zip(NAMES, first, oracle(q, k, v, dout, True)):
        assert_fp64_close(got, ref, name)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_one_rank_is_blockwise_bitwise(rng, dtype, causal):
    q, k, v = make_qkv(rng, 2, 23, 4, 2, 5, dtype=dtype)
    dout = make_dout(rng, q)
    _, ours = ring(q, k, v, dout, 1, causal, block_q=5, block_k=4)
    out, lse = blockwise_attention(q, k, v, causal=causal, block_q=5, block_k=4)
    grads = blockwise_attention_backward(q, k, v, out, lse, dout, causal=causal, block_q=5, block_k=4)
    for name, a, b in zip(NAMES, ours, (out, lse) + grads):
        assert a.dtype == b.dtype, name
        np.testing.assert_array_equal(a, b, err_msg=name)
    if dtype == np.float64:
        for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
            assert_fp64_close(got, ref, name)


# -- what the ring did: trace, bytes, memory ----------------------------------------------------------

@pytest.mark.parametrize("P", [1, 3, 4])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_trace_covers_every_phase_step_rank(rng, P, causal):
    N, block_q, block_k = 22, 3, 4
    q, k, v = make_qkv(rng, 1, N, 2, 1, 3)
    dout = make_dout(rng, q)
    result, ours = ring(q, k, v, dout, P, causal, block_q, block_k)
    for name, got, ref in zip(NAMES, ours, oracle(q, k, v, dout, causal)):
        assert_fp64_close(got, ref, name)

    keys = [(rec.phase, rec.step, rec.rank) for rec in result.trace]
    assert sorted(keys) == sorted((ph, t, r) for ph in ("forward", "backward") for t in range(P) for r in range(P))
    lengths = shard_lengths(N, P)
    starts = np.cumsum([0] + lengths)
    for rec in result.trace:
        assert rec.q_shard == rec.rank
        assert rec.kv_shard == (rec.rank - rec.step) % P
        n_q, n_k = lengths[rec.rank], lengths[rec.kv_shard]
        total = -(-n_q // block_q) * -(-n_k // block_k)
        assert rec.tiles + rec.skipped == total
        if not causal or rec.kv_shard < rec.rank:
            assert (rec.tiles, rec.skipped) == (total, 0)       # every key visible: nothing to skip
        elif rec.kv_shard > rec.rank:
            assert (rec.tiles, rec.skipped) == (0, total)       # every key in the future: skip all
        else:
            # the diagonal shard: count the tiles with at least one visible (i, j) pair, j <= i
            pos = np.arange(starts[rec.rank], starts[rec.rank + 1])
            visible = sum(1 for i0 in range(0, n_q, block_q) for j0 in range(0, n_k, block_k)
                          if pos[j0] <= pos[min(i0 + block_q, n_q) - 1])
            assert rec.tiles == visible


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("P", [1, 2, 3, 5])
def test_bytes_sent_match_the_protocol(rng, dtype, P):
    """Forward: P-1 K/V messages per rank. Backward: P-1 more K/V messages and P dK/dV messages
    (the accumulator for each shard visits every rank and comes home), the latter in the accumulation
    dtype. A message for shard s carries k and v: 2 * B * n_s * Hkv * D elements."""
    B, N, Hq, Hkv, D = 2, 17, 4, 2, 3
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D, dtype=dtype)
    dout = make_dout(rng, q)
    lengths = shard_lengths(N, P)
    item = np.dtype(dtype).itemsize
    acc_item = 8 if dtype == np.float64 else 4

    def kv_bytes(shard, itemsize):
        return 2 * B * lengths[shard] * Hkv * D * itemsize

    forward_only = simulate_ring(q, k, v, ranks=P, block_q=4, block_k=4)
    with_backward = simulate_ring(q, k, v, ranks=P, dout=dout, block_q=4, block_k=4)
    for r in range(P):
        fwd = sum(kv_bytes((r - t) % P, item) for t in range(P - 1))
        bwd = fwd + sum(kv_bytes((r - t) % P, acc_item) for t in range(P))
        assert forward_only.bytes_sent[r] == fwd
        assert with_backward.bytes_sent[r] == fwd + bwd
    # the per-step trace agrees with the totals
    for result in (forward_only, with_backward):
        for r in range(P):
            assert sum(rec.bytes_sent for rec in result.trace if rec.rank == r) == result.bytes_sent[r]
    # and the run is correct
    want_out, want_lse = naive_attention(q, k, v)
    if dtype == np.float64:
        assert_fp64_close(with_backward.out, want_out, "out")
        assert_fp64_close(with_backward.lse, want_lse, "lse")


def test_peak_bytes(rng):
    B, N, Hq, Hkv, D, P = 1, 512, 2, 1, 4, 4
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D)
    dout = make_dout(rng, q)
    result = simulate_ring(q, k, v, ranks=P, causal=True, dout=dout, block_q=32, block_k=32)
    assert len(result.peak_bytes) == P
    naive_scores = B * Hq * N * N * 8
    n = N // P
    for peak in result.peak_bytes:
        assert isinstance(peak, (int, np.integer)) and peak > 0
        # at least the rank's own q, k, v shards are held
        assert peak >= 8 * B * n * (Hq + 2 * Hkv) * D
        assert peak < naive_scores
    for name, got, ref in zip(NAMES, (result.out, result.lse, result.dq, result.dk, result.dv),
                              oracle(q, k, v, dout, True)):
        assert_fp64_close(got, ref, name)


def test_forward_only_has_no_gradients(rng):
    q, k, v = make_qkv(rng, 1, 10, 2, 2, 3)
    result = simulate_ring(q, k, v, ranks=3, causal=True, block_q=2, block_k=2)
    assert result.dq is None and result.dk is None and result.dv is None
    assert {rec.phase for rec in result.trace} == {"forward"}
    want_out, want_lse = naive_attention(q, k, v, causal=True)
    assert_fp64_close(result.out, want_out, "out")
    assert_fp64_close(result.lse, want_lse, "lse")


def test_progress_counts_every_computed_tile(rng):
    q, k, v = make_qkv(rng, 1, 20, 2, 2, 3)
    dout = make_dout(rng, q)
    seen = []
    result = simulate_ring(q, k, v, ranks=4, causal=True, dout=dout, block_q=2, block_k=3, progress=seen.append)
    total = sum(rec.tiles for rec in result.trace)
    assert seen == list(range(1, total + 1))
    assert_fp64_close(result.out, naive_attention(q, k, v, causal=True)[0], "out")


def test_a_ring_that_stops_early_returns_each_accumulator_to_its_owner(rng):
    """A window that leaves every rank nothing to see after step 1 (T = 2 of P = 4): one K/V hop per call, and
    the backward's last dK/dV message goes from rank r straight to the owner of the shard it holds, r - 1,
    instead of around the rest of the ring (specs/schedule.md section 5)."""
    q, k, v = make_qkv(rng, 1, 40, 2, 2, 3)
    dout = make_dout(rng, q)
    options = dict(causal=True, window=(4, -1), layout="contiguous", block_q=4, block_k=4)
    sends = []

    def rank(comm):
        isend = comm.isend
        comm.isend = lambda buf, dest, t: (sends.append((comm.rank, dest, t)), isend(buf, dest, t))[1]
        shard = [x[:, 10 * comm.rank:10 * comm.rank + 10] for x in (q, k, v, dout)]
        forward = ring_attention(*shard[:3], comm, **options)
        backward = ring_attention_backward(*shard[:3], forward.out, forward.lse, shard[3], comm, **options)
        return forward.out, backward.dk
    results = SimWorld(4, timeout=60).run(rank)
    assert sorted(sends) == sorted([(r, (r + 1) % 4, tag(FORWARD_KV, 0)) for r in range(4)]
                                   + [(r, (r + 1) % 4, tag(BACKWARD_KV, 0)) for r in range(4)]
                                   + [(r, (r + 1) % 4, tag(BACKWARD_DKV, 0)) for r in range(4)]
                                   + [(r, (r - 1) % 4, tag(BACKWARD_DKV, 1)) for r in range(4)])
    out = np.concatenate([o for o, _ in results], axis=1)
    dk = np.concatenate([g for _, g in results], axis=1)
    assert_fp64_close(out, naive_attention(q, k, v, causal=True, window=(4, -1))[0], "out")
    assert_fp64_close(dk, naive_attention_backward(q, k, v, dout, causal=True, window=(4, -1))[1], "dk")
