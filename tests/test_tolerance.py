"""The tolerance rule (refimpl/tolerance.py) itself: what it passes, what it fails, and why."""

import math

import numpy as np
import pytest

from refimpl import tolerance
from refimpl.plain import plain_outputs


def test_error_is_absolute_and_the_bound_relative_to_the_output_scale():
    """A result 1e-6 off on outputs of size 1e3 passes in float32 (relative 1e-9); 1e-3 off fails. With an
    absolute measure in place of the normwise one, the first would fail or the second pass."""
    ref = np.full((2, 3), 1000.0)
    plain = ref + 1e-4
    ok = tolerance.judge("out", ref + 1e-6, ref, input_dtype=np.float32, plain=plain)
    bad = tolerance.judge("out", ref + 1e-3, ref, input_dtype=np.float32, plain=plain)
    assert ok.passed and ok.bound == pytest.approx(2e-4 + 1e-7 * 1000)
    assert not bad.passed and bad.error == pytest.approx(1e-3)
    small = tolerance.judge("out", ref / 1e6 + 1e-6, ref / 1e6, input_dtype=np.float32, plain=ref / 1e6)
    assert not small.passed                  # 1e-6 on outputs of size 1e-3 is a relative 1e-3: a failure


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_results_fail(bad):
    ref = np.ones((2, 4))
    x = ref.copy()
    x[1, 2] = bad
    v = tolerance.judge("dq", x, ref, input_dtype=np.float64)
    assert not v.passed and v.error == math.inf and v.worst == (1, 2) and v.nonfinite == (1, 2)


def test_matching_minus_inf_counts_zero_and_a_mismatch_fails():
    ref = np.array([[0.5, -np.inf]])
    assert tolerance.judge("lse", ref.copy(), ref, input_dtype=np.float64).error == 0
    assert not tolerance.judge("lse", np.array([[0.5, 0.0]]), ref, input_dtype=np.float64).passed
    assert not tolerance.judge("lse", np.array([[-np.inf, -np.inf]]), ref, input_dtype=np.float64).passed


def test_only_minus_inf_matches():
    """-inf is a row that sees no key; +inf is an overflow, an error against -inf and against +inf alike."""
    for x, ref in (([0.5, np.inf], [0.5, -np.inf]), ([np.inf, -np.inf], [np.inf, -np.inf])):
        v = tolerance.judge("lse", np.array([x]), np.array([ref]), input_dtype=np.float64)
        assert not v.passed and v.error == math.inf


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        tolerance.judge("out", np.zeros(3), np.zeros(4), input_dtype=np.float64)


def test_low_precision_needs_the_plain_result():
    with pytest.raises(ValueError, match="plain"):
        tolerance.judge("out", np.zeros(3), np.zeros(3), input_dtype=np.float32)


def test_rules_per_dtype():
    assert tolerance.rule_for("out", np.float32).k == 2
    assert tolerance.rule_for("lse", np.float16).dtype == "float32"     # lse of a float16 backend is float32
    assert tolerance.rule_for("dq", np.float16).dtype == "float16"
    assert tolerance.rule_for("out", np.float64).k == 0
    with pytest.raises(ValueError, match="name"):
        tolerance.rule_for("o", np.float32)
    with pytest.raises(ValueError, match="dtype"):
        tolerance.rule_for("out", np.int32)


def test_float16_floor_is_half_an_ulp_at_the_scale():
    ref = np.array([1.5, -0.25])
    v = tolerance.judge("out", ref, ref, input_dtype=np.float16, plain=ref)
    assert v.bound == float(np.spacing(np.float16(1.5))) / 2


def test_bfloat16_rule():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    ref = np.array([1.5, -0.25])
    # bfloat16 has 8 significant bits: numbers in [1, 2) are 2^-7 apart, so the floor at 1.5 is 2^-8
    assert tolerance.judge("dv", ref + 2 ** -9, ref, input_dtype=ml_dtypes.bfloat16, plain=ref).passed
    v = tolerance.judge("dv", ref + 2 ** -7, ref, input_dtype=ml_dtypes.bfloat16, plain=ref)
    assert v.dtype == "bfloat16" and v.bound == 2 ** -8 and not v.passed
    assert tolerance.half_ulp("bfloat16", 1.5) == 2 ** -8


def test_vanishing_gradient_is_judged_against_its_terms():
    """N = 1: dq is exactly 0 in the oracle. Without scales the floor would be 1e-7 of nothing."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 1, 2, 8)).astype(np.float32) for _ in range(4))
    scales = tolerance.Scales.of(q, k, v, dout, scale=8 ** -0.5)
    zero = np.zeros((1, 1, 2, 8))
    noisy = zero + 1e-8
    assert tolerance.judge("dq", noisy, zero, input_dtype=np.float32, plain=zero, scales=scales).passed
    assert not tolerance.judge("dq", noisy + 1e-3, zero, input_dtype=np.float32, plain=zero, scales=scales).passed



def test_gradient_cancelled_to_rounding_is_judged_against_its_terms():
    """Equal v rows: dq cancels, and the float64 oracle holds only its own rounding (about 1e-16 T, not 0).
    S is then T, as for an exact 0; against S = max |ref| (1e-7 S, with the plain result exact here) a float32
    run's 1e-8 would fail a bound below 1e-20."""
    rng = np.random.default_rng(0)
    q, k, v, dout = (rng.standard_normal((1, 4, 2, 8)).astype(np.float32) for _ in range(4))
    scales = tolerance.Scales.of(q, k, v, dout, scale=8 ** -0.5)
    rounding = np.full((1, 4, 2, 8), 1e-16 * scales.term("dq"))
    assert tolerance.output_scale("dq", rounding, scales) == scales.term("dq")
    v = tolerance.judge("dq", rounding + 1e-8, rounding, input_dtype=np.float32, plain=rounding, scales=scales)
    assert v.passed and v.scale == scales.term("dq")

def test_float64_bound_grows_with_the_logits():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 16, 1, 8)) for _ in range(3))
    small = tolerance.Scales.of(q, k, v, scale=8 ** -0.5)
    large = tolerance.Scales.of(q * 100, k * 100, v, scale=8 ** -0.5)
    assert large.sigma == pytest.approx(1e4 * small.sigma)
    ref = np.ones(3)
    b_small = tolerance.judge("lse", ref, ref, input_dtype=np.float64, scales=small).bound
    b_large = tolerance.judge("lse", ref, ref, input_dtype=np.float64, scales=large).bound
    assert b_small < 2e-12 < 1e-10 < b_large


def test_scales_combine_over_shards():
    rng = np.random.default_rng(1)
    q, k, v, dout = (rng.standard_normal((1, 10, 2, 4)) for _ in range(4))
    whole = tolerance.Scales.of(q, k, v, dout, scale=0.5)
    parts = [tolerance.Scales.of(q[:, s], k[:, s], v[:, s], dout[:, s], scale=0.5) for s in (slice(0, 4), slice(4, 10))]
    assert parts[0].combine(parts[1]) == whole


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_plain_outputs_are_rounded_like_the_backend(dtype):
    rng = np.random.default_rng(2)
    q, k, v, dout = (rng.standard_normal((1, 6, 2, 4)).astype(dtype) for _ in range(4))
    plain = plain_outputs(q, k, v, dout, causal=True, scale=0.5)
    assert plain["out"].dtype == dtype and plain["dq"].dtype == dtype and plain["lse"].dtype == np.float32


def test_verdict_line_and_dict():
    ref = np.ones((1, 2, 2))
    v = tolerance.judge("out", ref * 1.1, ref, input_dtype=np.float64)
    assert "FAIL" in v.line() and "worst at" in v.line()
    d = v.to_dict()
    assert d["passed"] is False and d["worst"] == (0, 0, 0) and d["ratio"] > 1
