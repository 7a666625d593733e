"""The examples in examples/ run, and verify says about each what its docstring claims."""

import importlib.util
from pathlib import Path

import pytest

from refimpl import diagnose

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_torch_sdpa_passes(capsys):
    pytest.importorskip("torch")
    report = load("torch_sdpa").main()
    assert report.passed, report.text()
    assert not report.skipped                                # GQA and the mask cases run too
    assert {r.dtype for r in report.results} == {"fp32", "fp64"}
    assert "PASSED" in capsys.readouterr().out


def test_seed_bug_is_caught_and_localised(capsys):
    report = load("seed_bug").main()
    assert not report.passed and not any(r.passed for r in report.results)
    printed = capsys.readouterr().out
    assert "FAILED: 0 of 24 runs pass" in printed
    for r in report.failures:
        hint = r.diagnosis.hint
        assert "chunks attended independently" in hint, (r.case.name, hint)
        if r.case.causal:                                    # the first chunk's rows see all they should
            out = r.diagnosis.outputs[0]
            assert out.name == "out" and out.failing_rows[0][0] >= -(-r.case.N // 4), out.failing_rows
    assert "only rows 13..49 wrong, rows 0..12 right" in printed       # gqa-causal-n50-d16: chunks of 13, 13, 12, 12


def test_broken_online_softmax_is_caught_and_the_hint_names_the_rescale(capsys):
    report = load("broken_online_softmax").main()
    assert not any(r.passed for r in report.results)
    for r in report.failures:
        assert r.verdicts["lse"].passed and r.verdicts["dv"].passed
        assert r.diagnosis.hint.startswith("lse right, out and dq wrong"), r.diagnosis.hint
        if r.case.causal:                                    # rows that see one key block only are right
            out = r.diagnosis.outputs[0]
            assert out.failing_rows[0][0] >= 16 and " wrong on rows " in r.diagnosis.hint
            assert all(row.startswith(".") for row in out.tile_map)
    assert "the rescale of the running output" in capsys.readouterr().out
    assert diagnose.HINTS["rescale"].split(":")[1].strip().startswith("the rescale")
