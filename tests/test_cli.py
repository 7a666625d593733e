"""The main job, `ringattn run`, driven in-process: its summary, its check, its files and its errors."""

import json

import numpy as np
import pytest

import refimpl as ra
from refimpl import check, cli, inputs
from refimpl.layouts import Contiguous


def run_json(capsys, *argv):
    code = cli.main(["run", "--json", "--no-progress", *argv])
    return code, json.loads(capsys.readouterr().out)


def full_inputs(N, B, Hq, Hkv, D, seed, dtype):
    return tuple(inputs.generate(name, B, h, D, 0, N, seed, dtype)
                 for name, h in (("q", Hq), ("k", Hkv), ("v", Hkv), ("dout", Hq)))


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_full_check_matches_oracle(capsys, ranks):
    code, s = run_json(capsys, "--seq", "150", "--ranks", str(ranks), "--heads", "4", "--kv-heads", "2",
                       "--dim", "8", "--dtype", "fp64", "--backward", "--check", "--block-q", "16", "--block-k", "24")
    assert code == 0
    assert s["check"]["mode"] == "full" and s["check"]["passed"]
    assert set(s["check"]["errors"]) == {"out", "lse", "dq", "dk", "dv"}
    assert max(s["check"]["errors"].values()) <= 1e-12
    assert len(s["peak_bytes"]) == len(s["bytes_sent"]) == ranks
    assert len(s["trace"]) == 2 * ranks * ranks


def test_sampled_check_matches_oracle(capsys):
    # B * Hq * N^2 above cli.FULL_CHECK_SCORES: sampled rows, scored shard by shard
    code, s = run_json(capsys, "--seq", "1100", "--ranks", "3", "--heads", "4", "--dim", "8",
                       "--dtype", "fp64", "--backward", "--check")
    assert code == 0 and s["check"]["mode"] == "sampled"
    assert set(s["check"]["errors"]) == {"out", "lse", "dq"}
    assert max(s["check"]["errors"].values()) <= 1e-12


def test_sampled_errors_agree_with_naive_rows():
    # the shard-by-shard oracle of check.py is the plain oracle restricted to the sampled rows
    rng = np.random.default_rng(3)
    N, P = 97, 4
    q, k, v = (rng.standard_normal((2, N, h, 5)) for h in (4, 2, 2))
    layout = Contiguous(N, P)
    rows = check.sample_rows(layout, 10)
    out, lse = ra.naive_rows(q, k, v, rows, causal=True)
    for r in range(P):  # every shard's first and last row is sampled
        assert layout.starts[r] in rows and layout.starts[r + 1] - 1 in rows
    partials = [check._partial(q[:, rows], rows, layout.shard(k, r), layout.shard(v, r), layout.positions(r),
                               True, 5 ** -0.5) for r in range(P)]
    o_ref, lse_ref = check._combine(partials)
    assert check.relative_error(o_ref, out) <= 1e-13
    assert check.relative_error(lse_ref, lse) <= 1e-13


def test_check_fails_when_error_exceeds_tolerance(capsys, monkeypatch):
    monkeypatch.setitem(check.TOLERANCE, "float32", 0.0)
    code, s = run_json(capsys, "--seq", "64", "--ranks", "2", "--heads", "2", "--dim", "4", "--check")
    assert code == 1 and not s["check"]["passed"]


def test_inputs_identical_for_every_rank_count():
    whole = inputs.generate("k", 2, 3, 4, 0, 300, 7, np.float64)
    for P in (1, 2, 3, 7):
        layout = Contiguous(300, P)
        parts = [inputs.generate("k", 2, 3, 4, int(layout.starts[r]), int(layout.starts[r + 1]), 7, np.float64)
                 for r in range(P)]
        assert np.array_equal(np.concatenate(parts, axis=1), whole)


def test_input_and_output_directories(tmp_path, capsys):
    N, P, B, H, D = 90, 3, 1, 2, 4
    q, k, v, dout = full_inputs(N, B, H, H, D, 11, np.float32)
    layout = Contiguous(N, P)
    for name, x in zip(("q", "k", "v", "dout"), (q, k, v, dout)):
        for r in range(P):
            np.save(tmp_path / f"{name}.{r}.npy", layout.shard(x, r))
    outdir = tmp_path / "out"
    code, s = run_json(capsys, "--seq", str(N), "--ranks", str(P), "--heads", str(H), "--dim", str(D),
                       "--backward", "--check", "--input", str(tmp_path), "--output", str(outdir))
    assert code == 0
    ref_out, ref_lse = ra.naive_attention(q, k, v, causal=True)
    got = {name: layout.unshard([np.load(outdir / f"{name}.{r}.npy") for r in range(P)], axis=2 if name == "lse" else 1)
           for name in ("out", "lse", "dq", "dk", "dv")}
    assert check.relative_error(got["out"], ref_out) == pytest.approx(s["check"]["errors"]["out"])
    refs = ra.naive_attention_backward(q, k, v, dout, causal=True)
    for name, ref in zip(("dq", "dk", "dv"), refs):
        assert check.relative_error(got[name], ref) <= check.TOLERANCE["float32"]


def test_missing_input_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"--input: .*q\.0\.npy does not exist"):
        cli.main(["run", "--no-progress", "--seq", "8", "--ranks", "1", "--input", str(tmp_path)])


@pytest.mark.parametrize("argv, message", [
    (["--heads", "6", "--kv-heads", "4"], "--heads 6 must be a multiple of --kv-heads 4"),
    (["--ranks", "9", "--seq", "8"], "9 ranks exceed --seq 8"),
    (["--block-q", "0"], "--block-q: expected a positive integer"),
])
def test_bad_arguments_exit_with_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_human_report(capsys):
    assert cli.main(["run", "--no-progress", "--seq", "64", "--ranks", "2", "--heads", "2", "--dim", "4"]) == 0
    text = capsys.readouterr().out
    assert "forward schedule" in text and "kv1" in text and "PASS" in text
    assert "naive attention's score matrix" in text


def test_help_lists_options():
    text = cli.parser()._subparsers._group_actions[0].choices["run"].format_help()
    for option in ("--ranks", "--seq", "--heads", "--kv-heads", "--dim", "--dtype", "--causal", "--block-q",
                   "--block-k", "--seed", "--check", "--json", "--backward", "--input", "--output"):
        assert option in text


def test_device_gpu_without_a_gpu_is_a_usage_error(capsys):
    """Where CuPy or a CUDA device is missing (CI), --device gpu says so; tests/gpu runs it where one exists."""
    try:
        import cupy
        if cupy.cuda.runtime.getDeviceCount() > 0:
            pytest.skip("a GPU is present: tests/gpu/test_gpu_mpi.py runs --device gpu")
    except Exception:                    # noqa: BLE001 - no CuPy or no driver: the case under test
        pass
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--device", "gpu", "--seq", "64"])
    assert exc.value.code == 2
    assert "--device gpu needs CuPy and a CUDA GPU" in capsys.readouterr().err


def test_bf16_needs_the_gpu(capsys):
    pytest.importorskip("ml_dtypes")
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--dtype", "bf16", "--seq", "64"])
    assert exc.value.code == 2
    assert "--dtype bf16 needs --device gpu" in capsys.readouterr().err
