"""The main job, `ringattn run`, driven in-process: its summary, its check, its files and its errors."""

import json
import math
import re

import numpy as np
import pytest

import refimpl as ra
from refimpl import check, cli, inputs, tolerance
from refimpl.layouts import Contiguous


def _no_constants(name):
    raise AssertionError(f"--json wrote {name}, which is not JSON")


def run_json(capsys, *argv):
    code = cli.main(["run", "--json", "--no-progress", *argv])
    return code, json.loads(capsys.readouterr().out, parse_constant=_no_constants)


def errors(summary):
    """{name: relative error} of a summary's check."""
    return {name: v["relative"] for name, v in summary["check"]["outputs"].items()}


def full_inputs(N, B, Hq, Hkv, D, seed, dtype):
    return tuple(inputs.generate(name, B, h, D, 0, N, seed, dtype)
                 for name, h in (("q", Hq), ("k", Hkv), ("v", Hkv), ("dout", Hq)))


@pytest.mark.parametrize("ranks", [1, 3, 4])
def test_full_check_matches_oracle(capsys, ranks):
    code, s = run_json(capsys, "--seq", "150", "--ranks", str(ranks), "--heads", "4", "--kv-heads", "2",
                       "--dim", "8", "--dtype", "fp64", "--backward", "--check", "--block-q", "16", "--block-k", "24")
    assert code == 0
    assert s["check"]["mode"] == "full" and s["check"]["passed"]
    assert set(errors(s)) == {"out", "lse", "dq", "dk", "dv"}
    assert max(errors(s).values()) <= 1e-12
    assert len(s["peak_bytes"]) == len(s["bytes_sent"]) == len(s["per_rank"]) == ranks
    assert len(s["trace"]) == 2 * ranks * ranks
    for r, row in enumerate(s["per_rank"]):          # the per-rank table adds up the trace
        mine = [x for x in s["trace"] if x["rank"] == r]
        assert row["full"] + row["partial"] == sum(x["tiles"] for x in mine)
        assert row["partial"] == sum(x["partial_tiles"] for x in mine)
        assert row["skipped"] == sum(x["skipped"] for x in mine)
        assert row["compute_s"] == pytest.approx(sum(x["compute_s"] for x in mine))


def test_sampled_check_matches_oracle(capsys):
    # B * Hq * N^2 above cli.FULL_CHECK_SCORES: sampled rows, scored shard by shard
    code, s = run_json(capsys, "--seq", "1100", "--ranks", "3", "--heads", "4", "--dim", "8",
                       "--dtype", "fp64", "--backward", "--check")
    assert code == 0 and s["check"]["mode"] == "sampled"
    assert set(errors(s)) == {"out", "lse", "dq"}
    assert max(errors(s).values()) <= 1e-12


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
    assert tolerance.abs_error(o_ref, out)[0] <= 1e-13 * np.abs(out).max()
    assert tolerance.abs_error(lse_ref, lse)[0] <= 1e-13 * np.abs(lse).max()


@pytest.mark.parametrize("seq, full", [(64, True), (1100, False)])
def test_check_fails_when_error_exceeds_tolerance(capsys, monkeypatch, seq, full):
    monkeypatch.setitem(tolerance.RULES, "float32", tolerance.Rule("float32", 0.0, 0.0, False, "exact"))
    monkeypatch.setattr(check, "ALLOWANCE", tolerance.Allowance("none", (), (), 0.0, "none"))
    code, s = run_json(capsys, "--seq", str(seq), "--ranks", "2", "--heads", "4", "--dim", "8", "--check")
    assert code == 1 and not s["check"]["passed"] and (s["check"]["mode"] == "full") == full


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "fp64"])
@pytest.mark.parametrize("seq, ranks", [(1, 1), (3, 3), (1100, 2)])
def test_check_passes_where_gradients_vanish(capsys, dtype, seq, ranks):
    """N = 1 (one key): dq and dk are exactly 0, and a correct run must pass (the check used to divide by 0)."""
    code, s = run_json(capsys, "--seq", str(seq), "--ranks", str(ranks), "--heads", "2", "--dim", "16",
                       "--dtype", dtype, "--backward", "--check")
    assert code == 0, s["check"]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_check_at_logits_of_1e4(tmp_path, capsys, dtype):
    """Scores of about 1e4: the float64 bound includes the rounding of the scores (the fixed 1e-12 failed)."""
    rng = np.random.default_rng(1)
    N, P = 64, 2
    layout = Contiguous(N, P)
    arrays = dict(q=rng.standard_normal((1, N, 2, 16)) * 100, k=rng.standard_normal((1, N, 1, 16)) * 100,
                  v=rng.standard_normal((1, N, 1, 16)), dout=rng.standard_normal((1, N, 2, 16)))
    for name, x in arrays.items():
        for r in range(P):
            np.save(tmp_path / f"{name}.{r}.npy", layout.shard(x, r).astype(dtype))
    code, s = run_json(capsys, "--input", str(tmp_path), "--ranks", str(P), "--backward", "--check",
                       "--block-q", "16", "--block-k", "16")
    assert code == 0, s["check"]


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
    code, s = run_json(capsys, "--ranks", str(P), "--backward", "--check", "--input", str(tmp_path),
                       "--output", str(outdir))
    assert code == 0
    assert (s["seq"], s["heads"], s["dim"], s["dtype"]) == (N, H, D, "fp32")       # from the files
    ref_out, _ = ra.naive_attention(q, k, v, causal=True)
    got = {name: layout.unshard([np.load(outdir / f"{name}.{r}.npy") for r in range(P)], axis=2 if name == "lse" else 1)
           for name in ("out", "lse", "dq", "dk", "dv")}
    assert tolerance.abs_error(got["out"], ref_out)[0] == pytest.approx(s["check"]["outputs"]["out"]["error"])
    manifest = json.loads((outdir / "manifest.json").read_text())
    assert manifest["ranks"] == P and manifest["positions"] == [[0, 30], [30, 60], [60, 90]]
    assert manifest["files"]["dq.2.npy"] == {"shape": [B, 30, H, D], "dtype": "float32"}


def test_missing_input_file_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--no-progress", "--ranks", "1", "--input", str(tmp_path)])
    assert exc.value.code == 2
    assert re.search(r"--input: .*q\.0\.npy does not exist", capsys.readouterr().err)


def _save_shards(directory, P, N=1000, B=1, Hq=4, Hkv=2, D=16, dtype=np.float32):
    layout = Contiguous(N, P)
    for name, h in (("q", Hq), ("k", Hkv), ("v", Hkv), ("dout", Hq)):
        x = inputs.generate(name, B, h, D, 0, N, 5, dtype)
        for r in range(P):
            np.save(directory / f"{name}.{r}.npy", layout.shard(x, r))


def test_input_files_set_the_problem(tmp_path, capsys):
    """N=1000, D=16 files with default flags (it used to die with an IndexError): shapes come from the files."""
    _save_shards(tmp_path, 2)
    code, s = run_json(capsys, "--ranks", "2", "--input", str(tmp_path), "--check")
    assert code == 0 and (s["seq"], s["heads"], s["kv_heads"], s["dim"]) == (1000, 4, 2, 16)


@pytest.mark.parametrize("argv, message", [
    (["--dim", "32"], "--dim 32 contradicts the --input files, which hold dim 16"),
    (["--heads", "8"], "--heads 8 contradicts the --input files, which hold heads 4"),
    (["--dtype", "fp64"], "--dtype fp64 contradicts the --input files, which hold dtype fp32"),
    (["--seq", "999"], "--seq 999 contradicts the --input files, which hold seq 1000"),
    (["--ranks", "3"], "--input: .*q\\.2\\.npy does not exist"),
    (["--ranks", "1"], "holds shards for ranks 0..1, but this run has 1 ranks"),
])
def test_flags_that_contradict_input_files_are_errors(tmp_path, capsys, argv, message):
    """Never a false PASS or FAIL: --dim 32 on D=16 data used to FAIL, a wrong --heads to PASS."""
    _save_shards(tmp_path, 2)
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--no-progress", "--input", str(tmp_path), *(["--ranks", "2"] if "--ranks" not in argv else []),
                  *argv])
    assert exc.value.code == 2
    assert re.search(message, capsys.readouterr().err)


@pytest.mark.parametrize("N, message", [
    (1000, "the shards hold [499, 501] tokens, but the contiguous layout"),
    # N = 1001 over 2 ranks is [501, 500]: shards of [500, 501] hold the right lengths in the wrong order,
    # so rank 1's positions would be off by one
    (1001, "the shards hold [500, 501] tokens, but the contiguous layout of N=1001 over 2 ranks gives [501, 500]"),
])
def test_input_shards_must_follow_the_layout(tmp_path, capsys, N, message):
    _save_shards(tmp_path, 2, N=N)
    for name in ("q", "k", "v", "dout"):            # move one token from rank 0's shard to rank 1's
        a, b = np.load(tmp_path / f"{name}.0.npy"), np.load(tmp_path / f"{name}.1.npy")
        np.save(tmp_path / f"{name}.0.npy", a[:, :-1])
        np.save(tmp_path / f"{name}.1.npy", np.concatenate([a[:, -1:], b], axis=1))
    with pytest.raises(SystemExit):
        cli.main(["run", "--no-progress", "--ranks", "2", "--input", str(tmp_path)])
    assert message in capsys.readouterr().err


def _run_into(directory, *argv):
    return cli.main(["run", "--no-progress", "--seq", "64", "--heads", "2", "--dim", "4", "--output", str(directory),
                     *argv])


def test_output_refuses_another_runs_files(tmp_path, capsys):
    assert _run_into(tmp_path, "--ranks", "4", "--backward") == 0
    with pytest.raises(SystemExit) as exc:
        _run_into(tmp_path, "--ranks", "2")
    assert exc.value.code == 2 and "pass --overwrite" in capsys.readouterr().err


def test_overwrite_leaves_no_stale_files(tmp_path):
    """A 4-rank backward run, then a 2-rank forward run: no out.2, out.3 or dq/dk/dv left behind."""
    assert _run_into(tmp_path, "--ranks", "4", "--backward") == 0
    assert _run_into(tmp_path, "--ranks", "2", "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lse.0.npy", "lse.1.npy", "manifest.json",
                                                         "out.0.npy", "out.1.npy"]
    assert json.loads((tmp_path / "manifest.json").read_text())["ranks"] == 2


def test_a_failed_write_leaves_no_manifest(tmp_path, monkeypatch):
    """One rank fails while writing: the set has no manifest, so it is visibly incomplete."""
    from refimpl import shardfiles
    real = shardfiles.write_partial

    def failing(directory, rank, results):
        if rank == 1:
            raise OSError("disk full (simulated)")
        real(directory, rank, results)
    monkeypatch.setattr(shardfiles, "write_partial", failing)
    with pytest.raises(OSError, match="disk full"):
        _run_into(tmp_path, "--ranks", "2")
    assert not (tmp_path / "manifest.json").exists()
    assert not any(p.name.endswith(".npy") for p in tmp_path.iterdir())     # only hidden .partial files


def test_json_is_strict():
    assert cli._strict({"a": [float("inf"), -math.inf, math.nan, 1.5], "b": (2,)}) == \
        {"a": ["inf", "-inf", "nan", 1.5], "b": [2]}


@pytest.mark.parametrize("argv, message", [
    (["--heads", "6", "--kv-heads", "4"], "--heads 6 must be a multiple of --kv-heads 4"),
    (["--ranks", "9", "--seq", "8"], "9 ranks exceed --seq 8"),
    (["--block-q", "0"], "--block-q: expected a positive integer"),
    (["--seed", "-1"], "--seed: expected a non-negative integer, got -1"),
    (["--timeout", "0"], "--timeout: expected a positive, finite number of seconds, got 0"),
    (["--timeout", "-1"], "--timeout: expected a positive, finite number of seconds, got -1"),
    (["--timeout", "nan"], "--timeout: expected a positive, finite number of seconds, got nan"),
])
def test_bad_arguments_exit_with_message(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_dtype_takes_numpy_names(capsys):
    code, s = run_json(capsys, "--seq", "64", "--heads", "2", "--dim", "4", "--dtype", "float64", "--check")
    assert code == 0 and s["dtype"] == "fp64"


def test_human_report(capsys):
    assert cli.main(["run", "--no-progress", "--seq", "64", "--ranks", "2", "--heads", "2", "--dim", "4"]) == 0
    text = capsys.readouterr().out
    assert "forward schedule" in text and "kv1" in text and "PASS" in text
    assert "naive attention's score matrix" in text
    assert "memory per rank, accounted" in text and "peak RSS of the process" in text
    assert "rank   full partial skipped  compute s" in text and "imbalance: the busiest rank computed" in text


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


def test_sampled_plain_rows_agree_with_the_plain_computation():
    """The yardstick of the sampled check, computed shard by shard over P ranks, is the textbook float32
    computation of those rows: one row max for every shard (a max per rank would rescale the shards' sums
    differently, and a wrong yardstick passes everything)."""
    from refimpl.comm.sim import SimWorld
    from refimpl.plain import plain_attention
    rng = np.random.default_rng(5)
    N, P, scale = 97, 4, 5 ** -0.5
    q, k, v = (rng.standard_normal((2, N, h, 5)).astype(np.float32) for h in (4, 2, 2))
    layout = Contiguous(N, P)
    rows = check.sample_rows(layout, 10)

    def rank(comm):
        r = comm.rank
        return check._plain_rows(comm, q[:, rows], rows, layout.shard(k, r), layout.shard(v, r),
                                 layout.positions(r), True, scale, np.dtype(np.float32))

    out, lse = SimWorld(P).run(rank)[0]
    plain_out, plain_lse = plain_attention(q, k, v, causal=True, scale=scale)
    assert tolerance.abs_error(out, plain_out[:, rows])[0] <= 1e-5 * np.abs(plain_out).max()
    assert tolerance.abs_error(lse, plain_lse[:, :, rows])[0] <= 1e-5 * np.abs(plain_lse).max()


def test_overwrite_removes_the_old_manifest_first(tmp_path, monkeypatch):
    """A reader must never see a manifest next to a half-removed set: it goes before any array."""
    import os
    from refimpl import shardfiles
    assert _run_into(tmp_path, "--ranks", "2", "--backward") == 0
    removed, real = [], os.remove
    monkeypatch.setattr(os, "remove", lambda path: (removed.append(os.path.basename(path)), real(path)))
    shardfiles.clear(str(tmp_path))
    assert removed[0] == "manifest.json" and len(removed) == 11 and not list(tmp_path.iterdir())
