"""verify: a backend judged on the conformance cases by the one tolerance rule, and failures localised.

The buggy backends here are one float32 textbook kernel with a switch per classic bug; each bug must be
caught, and its report must carry the hint that names it (``refimpl/diagnose.py: HINTS``).
"""

import json
import time

import numpy as np
import pytest

import refimpl
from refimpl import diagnose, tolerance
from refimpl.verify import head_order, verify


def blockwise(q, k, v, *, causal, scale, dout=None):
    """ringattn's own blockwise attention as a backend."""
    out, lse = refimpl.blockwise_attention(q, k, v, causal=causal, scale=scale)
    results = {"out": out, "lse": lse}
    if dout is not None:
        grads = refimpl.blockwise_attention_backward(q, k, v, out, lse, dout, causal=causal, scale=scale)
        results.update(zip(("dq", "dk", "dv"), grads))
    return results


def textbook(q, k, v, *, causal, scale, dout=None, mask=None, bug=None):
    """Attention in q's dtype on whole matrices, q (B, N, Hq, D), with one of these bugs:

    "interleaved"  query head h reads kv head h % Hkv      "overwrite"   dk/dv of a group overwritten
    "diagonal+1"   query i sees key j <= i + 1              "diagonal-1"  query i sees key j < i
    "tail"         rows from N // 16 * 16 on never written  "no_max"      exp(s) without subtracting the max
    "zero_rows"    rows seeing no key divide 0 by 0         "fp16_out"    out rounded through float16
    """
    dt = q.dtype
    B, N, Hq, D = q.shape
    Hkv = k.shape[2]
    G = Hq // Hkv
    kv = np.arange(Hq) % Hkv if bug == "interleaved" else np.arange(Hq) // G
    qh, kh, vh = q.transpose(0, 2, 1, 3), k[:, :, kv].transpose(0, 2, 1, 3), v[:, :, kv].transpose(0, 2, 1, 3)
    i, j = np.arange(N)[:, None], np.arange(N)[None, :]
    visible = np.ones((N, N), bool) if mask is None else mask.copy()
    if causal:
        visible &= j <= i + {"diagonal+1": 1, "diagonal-1": -1}.get(bug, 0)
    s = np.where(visible, (qh @ kh.transpose(0, 1, 3, 2)) * dt.type(scale), dt.type(-np.inf))
    m = np.zeros((B, Hq, N, 1), dt) if bug == "no_max" else s.max(axis=-1, keepdims=True)
    if bug != "zero_rows":
        m = np.where(np.isneginf(m), dt.type(0), m)
    with np.errstate(all="ignore"):
        e = np.exp(s - m)
        l = e.sum(axis=-1, keepdims=True)
        p = e / l if bug == "zero_rows" else np.where(l > 0, e / np.where(l > 0, l, 1), dt.type(0))
        lse = (m + np.log(l))[..., 0]
    o = p @ vh
    if bug == "tail":
        o[:, :, N // 16 * 16:], lse[:, :, N // 16 * 16:] = 0, 0
    out = o.transpose(0, 2, 1, 3)
    if bug == "fp16_out":
        out = out.astype(np.float16).astype(dt)
    results = {"out": out, "lse": lse}
    if dout is None:
        return results
    do = dout.transpose(0, 2, 1, 3)
    with np.errstate(all="ignore"):
        ds = p * (do @ vh.transpose(0, 1, 3, 2) - (do * o).sum(axis=-1, keepdims=True))
    dq = dt.type(scale) * (ds @ kh)
    dk = dt.type(scale) * (ds.transpose(0, 1, 3, 2) @ qh)
    dv = p.transpose(0, 1, 3, 2) @ do
    dk_, dv_ = np.zeros((B, Hkv, N, D), dt), np.zeros((B, Hkv, N, D), dt)
    for h in range(Hq):
        if bug == "overwrite":
            dk_[:, kv[h]], dv_[:, kv[h]] = dk[:, h], dv[:, h]
        else:
            dk_[:, kv[h]] += dk[:, h]
            dv_[:, kv[h]] += dv[:, h]
    results.update(dq=dq.transpose(0, 2, 1, 3), dk=dk_.transpose(0, 2, 1, 3), dv=dv_.transpose(0, 2, 1, 3))
    return results


def buggy(bug):
    def fn(q, k, v, **kwargs):
        return textbook(q, k, v, bug=bug, **kwargs)
    return fn


def hints(report):
    return [r.diagnosis.hint for r in report.failures if r.diagnosis is not None]


# -- a correct backend passes ------------------------------------------------------------------------

def test_blockwise_passes_the_defaults_within_a_minute():
    start = time.perf_counter()
    report = verify(blockwise)
    seconds = time.perf_counter() - start
    assert report.passed, report.text()
    assert seconds < 60
    assert len(report.results) == 2 * (len(refimpl.cases.STANDARD) - 1)    # the mask case is skipped
    assert [name for name, _ in report.skipped] == ["empty-rows-n48-d16"]
    assert "SKIP empty-rows-n48-d16 (needs mask" in report.text()


def test_textbook_float32_passes_every_case_with_the_mask_feature():
    report = verify(textbook, features=("gqa", "mask"), cases="full", dtypes=("fp32", "fp64"))
    assert report.passed, report.text()
    assert not report.skipped


def test_layout_bhnd_transposes_inputs_and_outputs():
    def bhnd(q, k, v, *, causal, scale, dout=None):
        t = (lambda x: np.ascontiguousarray(x.transpose(0, 2, 1, 3)))
        r = blockwise(t(q), t(k), t(v), causal=causal, scale=scale, dout=None if dout is None else t(dout))
        return {n: x if n == "lse" else t(x) for n, x in r.items()}
    assert verify(bhnd, layout="bhnd", cases="smoke").passed
    wrong = verify(bhnd, cases="smoke")
    assert not wrong.passed
    assert "lse has shape (1, 33, 2), expected (1, 2, 33) (layout bnhd)" in wrong.text()


def test_head_order_maps_interleaved_heads_onto_grouped_ones():
    pi = head_order(8, 2, "interleaved")
    assert sorted(pi) == list(range(8))
    assert all(pi[j] // 4 == j % 2 for j in range(8))      # backend head j reads kv j % Hkv = our pi[j] // G
    assert list(head_order(8, 2, "grouped")) == list(range(8))
    assert list(head_order(4, 1, "interleaved")) == list(range(4))


def test_interleaved_backend_passes_with_gqa_interleaved_and_gets_the_gqa_hint_by_default():
    interleaved = buggy("interleaved")
    assert verify(interleaved, gqa="interleaved", cases="standard").passed
    report = verify(interleaved, cases=["gqa-g4-n200-d80"], dtypes=("fp32",))
    assert not report.passed
    diag = report.failures[0].diagnosis
    assert diag.hint == diagnose.HINTS["gqa_interleaved"].format(heads=[1, 3, 4, 6], G=4)
    assert diag.outputs[0].tile_map[0] == "." * 13 and diag.outputs[0].tile_map[1] == "X" * 13
    # MHA and MQA cases cannot tell the conventions apart: they pass
    assert verify(interleaved, cases=["mha-n100-d64", "mqa-causal-n129-d128"]).passed


# -- each classic bug is caught and named --------------------------------------------------------------

def test_dk_dv_overwritten_instead_of_summed():
    report = verify(buggy("overwrite"), cases="standard", dtypes=("fp32",))
    failing = {r.case.name for r in report.failures}
    assert failing == {r.case.name for r in report.results if r.case.Hq != r.case.Hkv}
    assert all(h == diagnose.HINTS["dkdv_sum"].format(G=r.case.Hq // r.case.Hkv)
               for h, r in zip(hints(report), report.failures))
    assert "only failing where: G = Hq / Hkv > 1" in report.text()


def test_causal_off_by_one_that_shows_a_future_key():
    report = verify(buggy("diagonal+1"), cases=["causal-many-tiles-n300-d16", "mha-n100-d64"], dtypes=("fp32",))
    assert [r.case.name for r in report.failures] == ["causal-many-tiles-n300-d16"]
    assert hints(report) == [diagnose.HINTS["causal_diagonal"].format(sign=" (lse above the reference: extra keys)")]
    assert report.pattern() == "only failing where: causal"


def test_causal_off_by_one_that_hides_the_diagonal():
    report = verify(buggy("diagonal-1"), cases=["mha-causal-n130-d40"], dtypes=("fp32",))
    failure = report.failures[0]
    assert failure.diagnosis.hint == diagnose.HINTS["diagonal_hidden"]
    lse = {o.name: o for o in failure.diagnosis.outputs}["lse"]
    assert lse.first_nonfinite == (0, 0, 0) and lse.nonfinite_value == -np.inf and lse.nonfinite_rows == [(0, 0)]
    assert "lse has a non-finite value -inf at [0, 0, 0] where the reference is finite" in failure.problems


def test_dropped_tail_tile():
    report = verify(buggy("tail"), cases=["mha-n100-d64"], dtypes=("fp32",))
    assert hints(report) == [diagnose.HINTS["tail"].format(
        first=96, last=99, before=95, sign=" (lse below the reference: missing keys)")]
    out = report.failures[0].diagnosis.outputs[0]
    assert out.tile_map == ["......X", "......X"] and out.failing_rows == [(96, 99)]


def test_missing_max_subtraction_is_nan_at_large_logits_only():
    report = verify(buggy("no_max"), cases=["mha-n100-d64", "logits1e2-causal-n96-d64"], dtypes=("fp32",))
    assert [r.case.name for r in report.failures] == ["logits1e2-causal-n96-d64"]
    hint = hints(report)[0]
    assert hint.startswith("NaN/inf at large logits") and "missing max subtraction" in hint
    assert report.failures[0].diagnosis.outputs[0].first_nonfinite is not None


def test_nan_on_rows_that_see_no_key():
    report = verify(buggy("zero_rows"), cases=["empty-rows-n48-d16"], features=("mask",), dtypes=("fp32",))
    assert hints(report) == [diagnose.HINTS["empty_rows"]]


def test_a_rounding_problem_is_not_called_a_wrong_formula():
    report = verify(buggy("fp16_out"), cases=["mha-n100-d64"], dtypes=("fp32",))
    assert not report.passed
    assert hints(report)[0].startswith("every failing output is within")


# -- whatever the backend does, verify reports it --------------------------------------------------------

def run_smoke(fn, **kwargs):
    return verify(fn, cases=["mha-n33-d16"], dtypes=("fp32",), **kwargs)


def test_an_exception_in_fn_is_a_failed_case():
    def boom(q, k, v, **kwargs):
        raise RuntimeError("kernel launch failed")
    report = run_smoke(boom)
    assert not report.passed
    assert "fn raised RuntimeError: kernel launch failed (at " in report.text()
    json.loads(report.to_json())


@pytest.mark.parametrize("change, message", [
    (lambda r: 3, "fn returned a int, expected a mapping with 'out'"),
    (lambda r: {k: x for k, x in r.items() if k != "dk"}, "dk is missing from what fn returned"),
    (lambda r: {**r, "dq": r["dq"][:, :-1]}, "dq has shape (1, 32, 2, 16), expected (1, 33, 2, 16)"),
    (lambda r: {**r, "out": r["out"].astype(np.float64)}, "out has dtype float64, expected float32"),
    (lambda r: {**r, "lse": r["lse"].astype(np.float64)}, "lse has dtype float64, expected float32"),
    (lambda r: {**r, "dv": np.full_like(r["dv"], np.nan)}, "dv has a non-finite value nan at [0, 0, 0, 0]"),
    (lambda r: {**r, "out": object()}, "out: cannot read a object as a numeric array"),
])
def test_what_fn_returns_wrong_is_a_failed_case_with_a_message(change, message):
    report = run_smoke(lambda q, k, v, **kw: change(blockwise(q, k, v, **kw)))
    assert not report.passed
    assert message in report.text()
    json.loads(report.to_json(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))


class DLPackOnly:
    """An array that offers only the DLPack protocol (as a torch or JAX array on the host does)."""
    def __init__(self, x):
        self._x = x

    def __dlpack__(self, **kwargs):
        return self._x.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._x.__dlpack_device__()


class ArrayOnly:
    def __init__(self, x):
        self._x = x

    def __array__(self, dtype=None, copy=None):
        return self._x


@pytest.mark.parametrize("wrap", [DLPackOnly, ArrayOnly])
def test_arrays_through_dlpack_or_array(wrap):
    report = run_smoke(lambda q, k, v, **kw: {n: wrap(x) for n, x in blockwise(q, k, v, **kw).items()})
    assert report.passed, report.text()


def test_only_the_keywords_a_case_needs():
    seen = []

    def forward_only(q, k, v, *, causal, scale):          # no dout, no mask: must never get them
        seen.append((causal, scale))
        return {"out": blockwise(q, k, v, causal=causal, scale=scale)["out"]}
    report = verify(forward_only, backward=False, provides=("out",), cases="smoke")
    assert report.passed, report.text()
    assert all(set(r.verdicts) == {"out"} for r in report.results)
    assert len(seen) == 6


def test_lse_may_be_left_out():
    report = run_smoke(lambda q, k, v, **kw: {n: x for n, x in blockwise(q, k, v, **kw).items() if n != "lse"},
                       provides=("out", "dq", "dk", "dv"))
    assert report.passed and set(report.results[0].verdicts) == {"out", "dq", "dk", "dv"}


def test_nothing_run_is_not_a_pass():
    report = verify(blockwise, cases=["empty-rows-n48-d16"])
    assert not report.passed and report.skipped == [("empty-rows-n48-d16", ["mask"])]


def test_json_report_is_strict_and_complete():
    report = verify(buggy("no_max"), cases=["logits1e2-causal-n96-d64"], dtypes=("fp32",))
    text = report.to_json()
    d = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))
    r = d["results"][0]
    assert r["passed"] is False and r["params"]["N"] == 96
    assert r["outputs"]["out"]["error"] == "inf"
    assert r["diagnosis"]["hint"].startswith("NaN/inf at large logits")
    assert d["options"]["layout"] == "bnhd"


# -- bad arguments to verify itself ------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(layout="nbhd"), "layout must be one of 'bnhd', 'bhnd', got 'nbhd'"),
    (dict(gqa="modulo"), "gqa must be one of 'grouped', 'interleaved'"),
    (dict(provides=("lse",)), "provides must include 'out'"),
    (dict(provides=("out", "grad")), "provides has unknown entries ['grad']"),
    (dict(provides=("out", "lse")), "backward=True but provides"),
    (dict(dtypes="fp32"), "dtypes must be a sequence of names"),
    (dict(dtypes=("fp8",)), "dtypes has unknown entries ['fp8']"),
    (dict(features=("paged",)), "features has unknown entries ['paged']"),
    (dict(cases="huge"), "cases must be one of smoke, standard, full"),
    (dict(cases=["no-such-case"]), "unknown case 'no-such-case'"),
    (dict(backward="yes"), "backward must be True or False"),
    (dict(seed=-1), "seed must be a non-negative int"),
])
def test_bad_arguments_are_value_errors_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=None) as e:
        verify(blockwise, **kwargs)
    assert message in str(e.value)


def test_fn_must_be_callable():
    with pytest.raises(ValueError, match="fn must be callable"):
        verify("refimpl:blockwise_attention")


# -- the allowance and diagnose on their own -------------------------------------------------------------

def test_allowance_adds_two_float32_ulps_of_sigma_times_the_scale():
    x = np.ones((1, 2, 1, 4))
    s = tolerance.Scales.of(x, x, x, x, scale=0.5)
    ulp = float(np.finfo(np.float32).eps)
    assert s.sigma == 2.0
    assert tolerance.SCORE_ROUNDING.extra("dv", "float32", s, 3.0) == 2 * ulp * 3 * 3.0
    assert tolerance.SCORE_ROUNDING.extra("lse", "float16", s, 3.0) == 2 * ulp * 3
    assert tolerance.SCORE_ROUNDING.extra("dv", "float64", s, 3.0) == 0.0
    v = tolerance.judge("out", x.astype(np.float32), x, input_dtype=np.float32, plain=x.astype(np.float32), scales=s)
    assert tolerance.with_allowance(v, tolerance.SCORE_ROUNDING, s).bound == v.bound + 2 * ulp * 3 * 1.0


def test_diagnose_json_writes_non_finite_numbers_as_strings():
    ref = np.zeros((1, 4, 1, 2))
    x = ref.copy()
    x[0, 2, 0, 1] = np.inf
    v = tolerance.judge("out", x, ref, input_dtype=np.float64)
    d = diagnose.diagnose({"out": x}, {"out": ref}, {"out": v}, Hq=1, Hkv=1, block=2)
    data = json.loads(json.dumps(d.to_dict(), allow_nan=False))
    assert data["outputs"][0]["error"] == "inf"
    assert data["outputs"][0]["first_nonfinite"] == {"index": [0, 2, 0, 1], "value": "inf"}
    assert data["outputs"][0]["tile_map"] == [".X"]
    assert "first non-finite: out[0, 2, 0, 1] = inf" in d.text()
    with pytest.raises(ValueError, match="block must be a positive number of rows"):
        diagnose.diagnose({}, {}, {}, Hq=1, Hkv=1, block=0)


def test_strict_judges_by_the_2x_rule_alone():
    default, strict = run_smoke(blockwise), run_smoke(blockwise, strict=True)
    assert "the 2x rule alone (strict)" in strict.text()
    for name, v in strict.results[0].verdicts.items():
        d = default.results[0].verdicts[name]
        assert v.allowance == 0 < d.allowance and v.bound == pytest.approx(d.bound - d.allowance, rel=1e-12)


def test_diagnose_fails_the_rows_the_verdict_fails():
    """pass = error <= bound, row by row as for the whole output: a row exactly at the bound passes."""
    from dataclasses import replace
    ref = np.zeros((1, 4, 1, 2))
    x = ref.copy()
    x[0, 1, 0, 0], x[0, 3, 0, 1] = 0.5, 1.0
    v = replace(tolerance.judge("out", x, ref, input_dtype=np.float64), bound=0.5)
    out = diagnose.diagnose({"out": x}, {"out": ref}, {"out": v}, Hq=1, Hkv=1, block=2).outputs[0]
    assert out.failing_rows == [(3, 3)] and out.tile_map == [".X"]
