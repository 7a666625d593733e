"""Golden vectors (``refimpl/vectors.py``) and ``ringattn check`` (``refimpl/conformance.py``).

What is checked:
* generation is deterministic: two runs write the same bytes, and the committed ``specs/vectors`` is what
  ``ringattn vectors`` writes today;
* the manifest describes every array (shape, dtype, sha256), its bounds are the file's, every bound is
  ``(k * plain_error + floor) + allowance`` bitwise and equals verify's (``tolerance.judge`` with
  ``verify.ALLOWANCE``), and every shard is the whole case's rows at its positions;
* a changed, damaged, truncated or missing file is an error that names it (exit status 2);
* ``check --impl refimpl`` passes on the committed vectors; a backend with the seed's bug (chunks
  attended independently) fails with a localised report; ``--results DIR`` reads another program's
  arrays, whole or per rank; the JSON report is strict;
* under ``mpiexec -n 2`` and ``-n 3`` each rank checks its shard with ringattn's per-rank ring and rank 0
  reports exactly the errors of the same ring simulated in one process; a damaged shard on one rank, or
  a backend that raises on one rank, ends every rank (``mpi_helpers.mpirun`` kills a hung job).
"""

import json
import math
import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mpi_helpers import missing, mpirun

from refimpl import cli, conformance, simulate_ring, tolerance, vectors
from refimpl.naive import naive_attention, naive_attention_backward
from refimpl.plain import plain_outputs
from refimpl.verify import ALLOWANCE

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = ROOT / "specs" / "vectors"
INPUT_ARRAYS = ("q", "k", "v", "dout", "mask", "positions")     # generated from seeds: the same on any machine

needs_mpi = pytest.mark.skipif(missing() is not None, reason=str(missing()))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke suite in fp32 and fp64 with the shards of 2 and 3 ranks."""
    directory = tmp_path_factory.mktemp("vectors")
    vectors.generate(directory, suite="smoke", ranks=(2, 3))
    return directory


def _files(directory):
    return {f: (Path(directory) / f).read_bytes() for f in sorted(os.listdir(directory))}


def _strict_json(text):
    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")
    return json.loads(text, parse_constant=refuse)


def _check(capsys, *argv):
    """``ringattn check ARGV`` in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(["check", *map(str, argv)])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


# -- generation ---------------------------------------------------------------------------------------

def test_generation_writes_the_same_bytes_twice(tmp_path, smoke):
    vectors.generate(tmp_path / "again", suite="smoke", ranks=(2, 3))
    assert _files(tmp_path / "again") == _files(smoke)


def test_committed_vectors_are_what_the_generator_writes(tmp_path):
    """specs/vectors is ``ringattn vectors`` with the options its manifest records. The inputs come from
    seeds and are the same bytes everywhere; the float64 answers and the plain errors are sums whose
    order depends on the BLAS kernel. So: inputs bitwise, answers within 1e-12, and the parts of every
    bound that do not depend on the plain computation (k, floor, allowance, S) within 1e-12, always;
    every byte, bounds included, whenever this machine's BLAS reproduces the answers bitwise."""
    committed = vectors.load_manifest(COMMITTED)
    options = {key: committed["generator"][key] for key in ("suite", "dtypes", "ranks", "layout", "seed")}
    fresh = vectors.generate(tmp_path, **options)
    assert [e["file"] for e in fresh["cases"]] == [e["file"] for e in committed["cases"]]
    rounding = []
    for old, new in zip(committed["cases"], fresh["cases"]):
        assert old["params"] == new["params"]
        a, b = vectors.read(COMMITTED, old), vectors.read(tmp_path, new)
        for name in a:
            if name in INPUT_ARRAYS:
                assert old["arrays"][name] == new["arrays"][name], f"{old['file']}: {name} is stale"
            elif name != "bounds" and old["arrays"][name] != new["arrays"][name]:
                scale = vectors.bounds_of(a)[name]["scale"]
                assert tolerance.abs_error(a[name], b[name])[0] <= 1e-12 * scale, f"{old['file']}: {name} is stale"
                rounding.append(f"{old['file']}:{name}")
        for name, bound in vectors.bounds_of(a).items():
            for field in ("k", "floor", "allowance", "scale"):
                assert math.isclose(bound[field], vectors.bounds_of(b)[name][field], rel_tol=1e-12), (
                    f"{old['file']}: the {field} of {name}'s bound is stale")
    if rounding:
        pytest.skip("this machine's BLAS rounds differently from the one that wrote specs/vectors: inputs "
                    f"identical, answers within 1e-12 ({len(rounding)} arrays differ in the last bits)")
    assert _files(tmp_path) == _files(COMMITTED)


def test_manifest_describes_every_array(smoke):
    text = (smoke / vectors.MANIFEST).read_text()
    manifest = _strict_json(text)
    assert manifest["format"] == vectors.FORMAT
    assert manifest["outputs"] == list(vectors.OUTPUTS)
    assert len(manifest["cases"]) == 3 * 2
    for entry in manifest["cases"]:
        params = entry["params"]
        assert {"B", "N", "Hq", "Hkv", "D", "causal", "scale", "dtype"} <= set(params)
        arrays = vectors.read(smoke, entry)
        with np.load(smoke / entry["file"]) as raw:
            assert list(raw.files) == list(entry["arrays"])
        for name, x in arrays.items():
            assert entry["arrays"][name] == {"shape": list(x.shape), "dtype": x.dtype.name,
                                             "sha256": vectors.sha256(x)}
        B, N, Hq, Hkv, D = (params[key] for key in ("B", "N", "Hq", "Hkv", "D"))
        assert arrays["q"].shape == arrays["out"].shape == arrays["dq"].shape == (B, N, Hq, D)
        assert arrays["k"].shape == arrays["dv"].shape == (B, N, Hkv, D)
        assert arrays["lse"].shape == (B, Hq, N)
        assert arrays["out"].dtype == np.float64 and arrays["q"].dtype.name == {"fp32": "float32",
                                                                                "fp64": "float64"}[params["dtype"]]
        assert entry["bounds"] == vectors.bounds_of(arrays)
        for bound in entry["bounds"].values():
            assert bound["bound"] == (bound["k"] * bound["plain_error"] + bound["floor"]) + bound["allowance"]
        out, lse = naive_attention(arrays["q"], arrays["k"], arrays["v"], causal=params["causal"],
                                   scale=params["scale"])
        assert np.array_equal(out, arrays["out"]) and np.array_equal(lse, arrays["lse"])


def test_bounds_are_the_tolerance_rule(smoke):
    """A checker comparing error with the stored bound gives the verdict of verify: tolerance.judge with
    verify's allowance for foreign backends."""
    entry = next(e for e in vectors.load_manifest(smoke)["cases"] if e["params"]["dtype"] == "fp32")
    a, p = vectors.read(smoke, entry), entry["params"]
    plain = plain_outputs(a["q"], a["k"], a["v"], a["dout"], causal=p["causal"], scale=p["scale"])
    scales = tolerance.Scales.of(a["q"], a["k"], a["v"], a["dout"], scale=p["scale"])
    for name, bound in entry["bounds"].items():
        verdict = tolerance.with_allowance(tolerance.judge(name, plain[name], a[name], input_dtype=np.float32,
                                                           plain=plain[name], scales=scales), ALLOWANCE, scales)
        assert (bound["bound"], bound["plain_error"], bound["scale"]) == (verdict.bound, verdict.plain_error,
                                                                          verdict.scale)
        assert bound["k"] == 2.0 and bound["allowance"] > 0


def test_shards_are_the_rows_at_their_positions(smoke):
    for entry in vectors.load_manifest(smoke)["cases"]:
        whole = vectors.read(smoke, entry)
        N = entry["params"]["N"]
        for P in (2, 3):
            shards = [s for s in entry["shards"] if s["ranks"] == P]
            assert [s["rank"] for s in shards] == list(range(P))
            covered = []
            for s in shards:
                part = vectors.read(smoke, s)
                positions = part["positions"]
                assert s["positions"] == [[int(positions[0]), int(positions[-1]) + 1]]     # contiguous: one run
                covered += positions.tolist()
                for name in vectors.INPUTS + vectors.OUTPUTS:
                    axis = 2 if name == "lse" else 1
                    assert np.array_equal(part[name], np.take(whole[name], positions, axis=axis)), (s["file"], name)
                assert np.array_equal(part["bounds"], whole["bounds"])
            assert covered == list(range(N))
            assert [len(vectors.read(smoke, s)["positions"]) for s in shards] == [
                N // P + (r < N % P) for r in range(P)]


# -- damaged files --------------------------------------------------------------------------------------

@pytest.fixture
def copy(tmp_path, smoke):
    target = tmp_path / "copy"
    shutil.copytree(smoke, target)
    return target


def test_changed_array_is_a_sha256_mismatch(copy, capsys):
    entry = vectors.load_manifest(copy)["cases"][0]
    arrays = vectors.read(copy, entry)
    arrays["out"][0, 3, 1, 2] += 1e-9                       # a valid file, one value changed
    vectors.write_npz(copy / entry["file"], arrays)
    with pytest.raises(vectors.VectorsError, match=f"{entry['file']}: sha256 mismatch in array out"):
        vectors.read(copy, entry)
    code, _, err = _check(capsys, "--vectors", copy, "--impl", "refimpl")
    assert code == 2 and f"{entry['file']}: sha256 mismatch in array out" in err


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_file_is_named(copy, capsys, damage):
    entry = vectors.load_manifest(copy)["cases"][1]
    path = copy / entry["file"]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate"
                     else data[:3000] + bytes([data[3000] ^ 1]) + data[3001:])
    code, _, err = _check(capsys, "--vectors", copy, "--impl", "refimpl")
    assert code == 2 and f"{path} is damaged" in err, err


def test_missing_file_and_manifest_are_named(copy, capsys):
    entry = vectors.load_manifest(copy)["cases"][2]
    (copy / entry["file"]).unlink()
    code, _, err = _check(capsys, "--vectors", copy, "--impl", "refimpl")
    assert code == 2 and f"{copy / entry['file']} does not exist, but manifest.json lists it" in err
    (copy / vectors.MANIFEST).unlink()
    code, _, err = _check(capsys, "--vectors", copy, "--impl", "refimpl")
    assert code == 2 and "manifest.json does not exist" in err


def test_generate_refuses_a_directory_of_other_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(vectors.VectorsError, match="not empty and holds no manifest.json"):
        vectors.generate(tmp_path)


def test_generate_replaces_a_previous_set(tmp_path):
    vectors.generate(tmp_path, dtypes=("fp32",), ranks=(2,))
    vectors.generate(tmp_path, dtypes=("fp64",))
    assert sorted(os.listdir(tmp_path)) == sorted(
        [vectors.MANIFEST] + [e["file"] for e in vectors.load_manifest(tmp_path)["cases"]])


# -- ringattn check -------------------------------------------------------------------------------------

def test_check_refimpl_passes_on_the_committed_vectors(capsys):
    code, out, _ = _check(capsys, "--vectors", COMMITTED, "--impl", "refimpl")
    assert code == 0, out
    assert out.count("PASS ") == 6 and "PASSED: 6 of 6 cases pass" in out


def chunked_backend(q, k, v, *, causal, scale):
    """The seed's bug: two halves of the sequence attended independently, nothing passed between them."""
    half = q.shape[1] // 2
    parts = [naive_attention(q[:, s], k[:, s], v[:, s], causal=causal, scale=scale)
             for s in (slice(0, half), slice(half, None))]
    return {"out": np.concatenate([o for o, _ in parts], axis=1), "lse": np.concatenate([l for _, l in parts], axis=2)}


def test_check_localises_a_broken_backend(capsys):
    code, out, _ = _check(capsys, "--vectors", COMMITTED, "--impl", "test_vectors:chunked_backend",
                          "--case", "gqa-causal-n50-d16", "--dtype", "fp64", "--outputs", "out", "lse")
    assert code == 1
    assert "FAIL fp64 gqa-causal-n50-d16" in out and "FAILED: 0 of 1 cases pass" in out
    assert "rows 25..49" in out                            # causal: the first half sees all it should
    assert "chunks attended independently" in out          # the hint


def _write_results(vectors_dir, results_dir, P=None, spoil=None):
    """ringattn's results for every case file (and every rank's shard of P) as another program would
    write them: DIR/STEM.NAME.npy. ``spoil`` changes one value of the whole case's out."""
    os.makedirs(results_dir, exist_ok=True)
    for entry in vectors.load_manifest(vectors_dir)["cases"]:
        a, p = vectors.read(vectors_dir, entry), entry["params"]
        results = conformance.ring_backend(a["q"], a["k"], a["v"], causal=p["causal"], scale=p["scale"],
                                           dout=a["dout"])
        if spoil is not None:
            results["out"][spoil] += 1e-3
        units = [(entry["file"], None)] + [(s["file"], vectors.read(vectors_dir, s)["positions"])
                                           for s in entry["shards"] if s["ranks"] == P]
        for file, positions in units:
            for name, x in results.items():
                if positions is not None:
                    x = np.take(x, positions, axis=2 if name == "lse" else 1)
                np.save(Path(results_dir) / f"{file[:-len('.npz')]}.{name}.npy", x)


def test_check_results_directory(tmp_path, smoke, capsys):
    _write_results(smoke, tmp_path / "ok", P=3)
    code, out, _ = _check(capsys, "--vectors", smoke, "--results", tmp_path / "ok", "--dtype", "fp32")
    assert code == 0 and "PASSED: 3 of 3 cases pass" in out
    code, out, _ = _check(capsys, "--vectors", smoke, "--results", tmp_path / "ok", "--ranks", "3", "--dtype", "fp32")
    assert code == 0 and "(3 ranks, contiguous layout)" in out and "PASSED: 3 of 3 cases pass" in out
    missing_file = tmp_path / "ok" / "mha-n33-d16.fp32.contiguous-3.rank1.dq.npy"
    missing_file.unlink()
    code, out, _ = _check(capsys, "--vectors", smoke, "--results", tmp_path / "ok", "--ranks", "3", "--dtype", "fp32")
    assert code == 1 and f"rank 1: {missing_file} does not exist" in out

    _write_results(smoke, tmp_path / "spoilt", spoil=(0, 30, 1, 5))
    code, out, _ = _check(capsys, "--vectors", smoke, "--results", tmp_path / "spoilt", "--dtype", "fp32",
                          "--case", "mha-n33-d16")
    assert code == 1
    assert "worst at (0, 30, 1, 5)" in out and "head=1, row=30" in out


def test_check_json_is_strict(tmp_path, smoke, capsys):
    _write_results(smoke, tmp_path)
    spoilt = tmp_path / "mha-n33-d16.fp64.lse.npy"
    lse = np.load(spoilt)
    lse[0, 1, 7] = np.nan
    np.save(spoilt, lse)
    code, out, _ = _check(capsys, "--vectors", smoke, "--results", tmp_path, "--json")
    report = _strict_json(out)
    assert code == 1 and report["passed"] is False
    case = next(c for c in report["cases"] if c["file"] == "mha-n33-d16.fp64.npz")
    assert case["status"] == "fail" and case["outputs"]["lse"]["error"] == "inf"
    assert case["outputs"]["lse"]["nonfinite"] == [0, 1, 7]
    assert [c["status"] for c in report["cases"]].count("pass") == 5


@pytest.mark.parametrize("argv, message", [
    (["--impl", "refimpl", "--ranks", "2"], "a per-rank backend runs under mpiexec -n 2"),
    (["--results", "R", "--ranks", "4"], "has no contiguous shards for 4 ranks; write them with ringattn vectors "
                                         "--ranks 4"),
    (["--impl", "refimpl", "--case", "no-such-case"], "has no case ['no-such-case']"),
    (["--impl", "no_such_module:fn"], "cannot import no_such_module"),
    (["--impl", "refimpl.cases"], "--impl must be MODULE:FUNCTION or refimpl"),
    (["--impl", "refimpl", "--results", "R"], "not allowed with argument"),
])
def test_check_usage_errors(smoke, capsys, argv, message):
    code, _, err = _check(capsys, "--vectors", smoke, *argv)
    assert code == 2 and message in err, err


def test_check_skips_and_lists_what_the_backend_lacks(tmp_path, capsys):
    vectors.generate(tmp_path, suite="standard", dtypes=("fp32",))
    code, out, _ = _check(capsys, "--vectors", tmp_path, "--impl", "refimpl", "--case", "empty-rows-n48-d16",
                          "mha-n33-d16")
    assert "SKIP fp32 empty-rows-n48-d16" in out and "needs mask" in out
    assert code == 0 and "PASSED: 1 of 1 cases pass, 1 skipped" in out


def masked_oracle(q, k, v, *, causal, scale, dout=None, mask=None):
    """The float64 oracle as a backend that takes a dense mask (a perfect fp32 backend, returned as float64)."""
    out, lse = naive_attention(q, k, v, causal=causal, scale=scale, mask=mask)
    dq, dk, dv = naive_attention_backward(q, k, v, dout, causal=causal, scale=scale, mask=mask)
    return {"out": out, "lse": lse, "dq": dq, "dk": dk, "dv": dv}


def test_mask_case_files_and_shards(tmp_path, capsys):
    vectors.generate(tmp_path, suite=["empty-rows-n48-d16"], dtypes=("fp32",), ranks=(3,))
    entry = vectors.load_manifest(tmp_path)["cases"][0]
    whole = vectors.read(tmp_path, entry)
    assert whole["mask"].shape == (48, 48) and whole["mask"].dtype == bool
    hidden = ~whole["mask"].any(axis=1)
    assert np.isneginf(whole["lse"][:, :, hidden]).all() and not whole["out"][:, hidden].any()
    assert np.isfinite(vectors.read(tmp_path, entry)["bounds"]).all()
    for s in entry["shards"]:
        part = vectors.read(tmp_path, s)
        assert np.array_equal(part["mask"], whole["mask"][part["positions"]])
    code, out, _ = _check(capsys, "--vectors", tmp_path, "--impl", "test_vectors:masked_oracle", "--features", "mask")
    assert code == 0 and "PASS fp32 empty-rows-n48-d16" in out, out


def test_help_is_true_to_the_code(capsys):
    for command in ("vectors", "check"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "--help" in out
    assert cli.parser().parse_args(["vectors", "--out", "D"]).dtypes == list(vectors.DEFAULT_DTYPES)


# -- under mpiexec ------------------------------------------------------------------------------------------

@needs_mpi
@pytest.mark.parametrize("P", [2, 3])
def test_sharded_check_under_mpiexec(smoke, P):
    """Each rank checks its shard with ringattn's per-rank ring; rank 0's report holds exactly the errors
    of the same ring simulated in one process (bitwise the same computation)."""
    job = mpirun(P, "-m", "refimpl", "check", "--vectors", smoke, "--impl", "refimpl", "--json")
    assert job.returncode in (0, 1), job.describe()
    report = _strict_json(job.stdout)
    assert report["ranks"] == P and len(report["cases"]) == 6
    for case in report["cases"]:
        entry = next(e for e in vectors.load_manifest(smoke)["cases"] if e["file"] == case["file"])
        a, p = vectors.read(smoke, entry), entry["params"]
        ring = simulate_ring(a["q"], a["k"], a["v"], ranks=P, causal=p["causal"], scale=p["scale"], dout=a["dout"],
                             block_q=conformance.REFIMPL_TILE, block_k=conformance.REFIMPL_TILE)
        for name, bound in vectors.bounds_of(a).items():
            expected = conformance.judge(name, getattr(ring, name), a[name], bound, p["dtype"])
            assert case["outputs"][name]["error"] == expected.error, (case["file"], name)
        assert len(case["ranks"]) == P
    assert job.returncode == (0 if report["passed"] else 1)


@needs_mpi
def test_damaged_shard_on_one_rank_ends_every_rank(copy):
    shard = next(s for s in vectors.load_manifest(copy)["cases"][0]["shards"] if s["ranks"] == 3 and s["rank"] == 2)
    path = copy / shard["file"]
    path.write_bytes(path.read_bytes()[:1000])
    job = mpirun(3, "-m", "refimpl", "check", "--vectors", copy, "--impl", "refimpl", timeout=60)
    assert job.returncode == 2, job.describe()
    assert f"rank 2: {path} is damaged" in job.stderr, job.describe()


@needs_mpi
def test_backend_raising_on_one_rank_ends_the_job(smoke, tmp_path):
    (tmp_path / "flaky.py").write_text(textwrap.dedent("""
        from refimpl.conformance import ring_rank_backend

        def backend(q, k, v, *, comm, **options):
            if comm.rank == 1:
                raise RuntimeError("deliberate failure on rank 1")
            return ring_rank_backend(q, k, v, comm=comm, **options)
    """))
    job = mpirun(2, "-m", "refimpl", "check", "--vectors", smoke, "--impl", "flaky:backend", cwd=tmp_path, timeout=60)
    assert job.returncode != 0, job.describe()
    assert "deliberate failure on rank 1" in job.stderr and "the backend raised on" in job.stderr, job.describe()
