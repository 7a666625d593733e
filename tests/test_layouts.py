"""Layouts (contiguous, zigzag, striped) and masks (window, documents) in the ring, against the float64 oracle.

A layout is only the positions each rank holds (``refimpl/layouts.py``); a mask only a predicate on global
positions (``refimpl/masks.py``). So every combination must give the oracle's answer, forward and
backward, for every P, with N divisible by neither P nor 2P, and GQA and MQA heads; the ring must stop
early exactly when the mask leaves every later step useless; the work per rank must balance as
``specs/schedule.md`` derives; and the command line, the shard files and the sampled check must follow the
layout's positions. The positions are checked against formulas written here, independently of the module.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_2x_rule, assert_fp64_close, make_dout, make_qkv
from refimpl import (check, cli, inputs, masks, naive_attention, naive_attention_backward, ring_attention,
                     schedule, simulate_ring, tolerance)
from refimpl import ring as ring_module
from refimpl.comm.sim import SimWorld
from refimpl.layouts import LAYOUTS, layout_for
from refimpl.plain import plain_outputs

NAMES = ("out", "lse", "dq", "dk", "dv")


def expected_positions(layout, N, P, r):
    """Rank r's positions, from each layout's definition (specs/schedule.md section 1)."""
    def chunk(c, pieces):
        base, extra = divmod(N, pieces)
        start = c * base + min(c, extra)
        return np.arange(start, start + base + (c < extra))
    if layout == "contiguous":
        return chunk(r, P)
    if layout == "zigzag":
        return np.concatenate([chunk(r, 2 * P), chunk(2 * P - 1 - r, 2 * P)])
    return np.arange(r, N, P)


# -- positions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_positions_follow_the_definitions(layout):
    for N in range(1, 41):
        for P in range(1, N + 1):
            cut = layout_for(layout, N, P)
            held = [cut.positions(r) for r in range(P)]
            for r, pos in enumerate(held):
                assert pos.dtype == np.int64 and np.array_equal(pos, expected_positions(layout, N, P, r)), (N, P, r)
                assert len(pos) == cut.length(r) >= 1, (N, P, r)             # every rank holds a token
                assert (np.diff(pos) > 0).all(), (N, P, r)                     # shard order: increasing
            assert np.array_equal(np.sort(np.concatenate(held)), np.arange(N)), (N, P)
            lengths = [len(pos) for pos in held]
            assert max(lengths) - min(lengths) <= 1, (layout, N, P, lengths)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("N, P", [(23, 4), (5, 4), (9, 9), (37, 8)])
def test_shard_and_unshard_are_inverse(layout, N, P):
    x = np.random.default_rng(0).standard_normal((2, 3, N))
    cut = layout_for(layout, N, P)
    shards = [cut.shard(x, r, axis=2) for r in range(P)]
    for r, shard in enumerate(shards):
        assert np.array_equal(shard, x[:, :, expected_positions(layout, N, P, r)])
    assert np.array_equal(cut.unshard(shards, axis=2), x)


def test_unknown_layout_is_a_clear_error(rng):
    q, k, v = make_qkv(rng, N=8)
    message = "layout must be one of 'contiguous', 'zigzag', 'striped', got 'zigzig'"
    with pytest.raises(ValueError, match=message):
        layout_for("zigzig", 8, 2)
    with pytest.raises(ValueError, match=message):
        simulate_ring(q, k, v, ranks=2, layout="zigzig")
    with pytest.raises(ValueError, match="rank 0: " + message):         # every rank raises it, none waits
        SimWorld(2, timeout=10).run(lambda comm: ring_attention(q[:, :4], k[:, :4], v[:, :4], comm, layout="zigzig"))
    with pytest.raises(cli.UsageError, match="invalid choice: 'zigzig'"):
        cli.parser().parse_args(["run", "--layout", "zigzig"])


def test_ranks_must_agree_on_the_layout(rng):
    q, k, v = make_qkv(rng, N=8)
    with pytest.raises(ValueError, match="ranks disagree on .*layout.*'zigzag'.*'striped'"):
        SimWorld(2, timeout=10).run(lambda comm: ring_attention(
            q[:, :4], k[:, :4], v[:, :4], comm, layout=("zigzag", "striped")[comm.rank]))


def test_a_shard_of_another_layout_is_rejected(rng):
    """N = 6 over 4 ranks: contiguous shards hold 2, 2, 1, 1 tokens, zigzag ones 1, 1, 2, 2."""
    q, k, v = make_qkv(rng, N=6)
    cut = layout_for("contiguous", 6, 4)
    with pytest.raises(ValueError, match="rank 0 holds 2 tokens, but the zigzag layout of N=6 over 4 ranks gives it 1"):
        SimWorld(4, timeout=10).run(lambda comm: ring_attention(
            *(cut.shard(x, comm.rank) for x in (q, k, v)), comm, layout="zigzag"))


# -- the ring against the oracle ---------------------------------------------------------------------------

def masking(kind, rng, B, N):
    """The mask arguments of each kind the ring must handle (segment ids unsorted, per batch)."""
    segments = rng.integers(0, 3, (B, N))
    return {"none": dict(causal=False),
            "causal": dict(causal=True),
            "window": dict(causal=False, window=(4, 2)),
            "causal+window": dict(causal=True, window=(5, -1)),
            "segments": dict(causal=False, segment_ids=segments),
            "window+segments": dict(causal=True, window=(6, 3), segment_ids=segments),
            "documents": dict(causal=True, cu_seqlens=[0, 7, 8, 30, N])}[kind]


MASKS = ("none", "causal", "window", "causal+window", "segments", "window+segments", "documents")


@pytest.mark.parametrize("P", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", MASKS)
@pytest.mark.parametrize("Hq, Hkv", [(4, 2), (3, 1)], ids=["GQA", "MQA"])
def test_float64_matches_oracle(rng, P, layout, kind, Hq, Hkv):
    B, N = 2, 37                                       # 37 is prime: no P or 2P divides it
    q, k, v = make_qkv(rng, B, N, Hq, Hkv, D=4)
    dout = make_dout(rng, q)
    m = masking(kind, rng, B, N)
    refs = naive_attention(q, k, v, **m) + naive_attention_backward(q, k, v, dout, **m)
    got = simulate_ring(q, k, v, ranks=P, dout=dout, block_q=4, block_k=3, layout=layout, timeout=60, **m)
    for name, ref in zip(NAMES, refs):
        assert_fp64_close(getattr(got, name), ref, f"{layout} {kind} P={P} {name}")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", ["causal", "window+segments", "documents"])
def test_float32_within_twice_plain_float32_error(rng, layout, kind):
    B, N = 1, 37
    q, k, v = make_qkv(rng, B, N, 4, 2, D=8, dtype=np.float32)
    dout = make_dout(rng, q)
    m = masking(kind, rng, B, N)
    scale = 1 / np.sqrt(8)
    refs = naive_attention(q, k, v, scale=scale, **m) + naive_attention_backward(q, k, v, dout, scale=scale, **m)
    plain = plain_outputs(q, k, v, dout, scale=scale, **m)
    got = simulate_ring(q, k, v, ranks=3, dout=dout, block_q=8, block_k=8, layout=layout, timeout=60, **m)
    for name, ref in zip(NAMES, refs):
        assert_2x_rule(getattr(got, name), plain[name], ref, f"{layout} {kind} {name}")


@settings(max_examples=60, deadline=None)
@given(N=st.integers(2, 40), P=st.integers(1, 8), layout=st.sampled_from(list(LAYOUTS)),
       heads=st.sampled_from([(2, 2), (4, 2), (3, 1)]),
       causal=st.booleans(), left=st.integers(-1, 9), right=st.integers(-1, 9), window=st.booleans(),
       documents=st.sampled_from(["none", "segment_ids", "cu_seqlens"]), block_q=st.integers(1, 9),
       block_k=st.integers(1, 9), data=st.data())
def test_property_every_layout_and_mask_matches_oracle(N, P, layout, heads, causal, left, right, window, documents,
                                                       block_q, block_k, data):
    P = min(P, N)
    rng = np.random.default_rng(data.draw(st.integers(0, 2 ** 32 - 1)))
    B = 2
    q, k, v = make_qkv(rng, B, N, heads[0], heads[1], D=3)
    dout = make_dout(rng, q)
    m = dict(causal=causal, window=(left, right) if window else None)
    if documents == "segment_ids":
        m["segment_ids"] = rng.integers(0, 3, (B, N))
    elif documents == "cu_seqlens":
        m["cu_seqlens"] = [0] + sorted(rng.choice(np.arange(1, N), size=min(N - 1, 3), replace=False).tolist()) + [N]
    refs = naive_attention(q, k, v, **m) + naive_attention_backward(q, k, v, dout, **m)
    got = simulate_ring(q, k, v, ranks=P, dout=dout, block_q=block_q, block_k=block_k, layout=layout, timeout=60, **m)
    scales = tolerance.Scales.of(q, k, v, dout, scale=1 / np.sqrt(3))     # a token alone in its document: dq = 0
    for name, ref in zip(NAMES, refs):
        verdict = tolerance.judge(name, getattr(got, name), ref, input_dtype=np.float64, scales=scales)
        assert verdict.passed, verdict.line()
    # a fully masked tile is never computed: every tile the ring ran holds a visible pair
    mask = masks.mask_for(causal, m["window"], m.get("segment_ids"), m.get("cu_seqlens"), B=B, N=N)
    cut = layout_for(layout, N, P)
    for rec in got.trace:
        plan = schedule.plan_tiles(cut.positions(rec.rank), cut.positions(rec.kv_shard), mask, block_q, block_k)
        for qs, cols in plan.rows:
            for ks, _ in cols:
                assert mask.visible(cut.positions(rec.rank)[qs], cut.positions(rec.kv_shard)[ks]).any()


def test_ring_attention_takes_and_returns_the_layouts_shard_order(rng):
    """Each rank gives rows at its positions (striped: r, r + P, ...) and gets its rows back in that order."""
    B, N, P = 1, 23, 4
    q, k, v = make_qkv(rng, B, N, 2, 2, D=4)
    out, lse = naive_attention(q, k, v, causal=True, window=(6, -1))

    def rank(comm):
        pos = np.arange(comm.rank, N, P)
        return pos, ring_attention(q[:, pos], k[:, pos], v[:, pos], comm, causal=True, window=(6, -1),
                                   layout="striped", block_q=2, block_k=3)
    for pos, result in SimWorld(P, timeout=60).run(rank):
        assert_fp64_close(result.out, out[:, pos], "out")
        assert_fp64_close(result.lse, lse[:, :, pos], "lse")


# -- stopping early ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout, window, steps", [
    ("contiguous", (5, -1), 2),     # shards of 5-6 tokens: a query sees back into the previous shard only
    ("contiguous", (12, -1), 4),    # ... into the three before
    ("striped", (2, -1), 3),        # token t sees t-2, t-1, t: the shards r-2 .. r
    ("zigzag", (2, -1), 8),         # the high chunk's predecessor is the next rank's: the last step
])
def test_the_ring_stops_when_every_later_step_is_useless(rng, layout, window, steps):
    B, N, P, Hkv, D = 1, 45, 8, 2, 4
    q, k, v = make_qkv(rng, B, N, 2, Hkv, D)
    dout = make_dout(rng, q)
    got = simulate_ring(q, k, v, ranks=P, causal=True, window=window, dout=dout, layout=layout, block_q=2,
                        block_k=2, timeout=60)
    ref = naive_attention(q, k, v, causal=True, window=window)
    assert_fp64_close(got.out, ref[0], "out")
    assert sorted({rec.step for rec in got.trace}) == list(range(steps))
    cut = layout_for(layout, N, P)
    assert schedule.ring_steps(cut, masks.mask_for(True, window)) == steps
    sent = schedule.ring_bytes(cut, steps, B, Hkv, D, 8) + schedule.ring_bytes(cut, steps, B, Hkv, D, 8, 8)
    assert got.bytes_sent == sent.tolist()
    if steps < P:
        full = schedule.ring_bytes(cut, P, B, Hkv, D, 8) + schedule.ring_bytes(cut, P, B, Hkv, D, 8, 8)
        assert (sent < full).all()


def test_stopping_early_changes_no_bit(rng, monkeypatch):
    """The steps left out compute no tile: the same results as a ring made to run them all."""
    q, k, v = make_qkv(rng, 1, 40, 2, 2, 4)
    dout = make_dout(rng, q)
    options = dict(ranks=5, causal=True, window=(3, -1), dout=dout, block_q=4, block_k=4, timeout=60)
    short = simulate_ring(q, k, v, **options)
    assert max(rec.step for rec in short.trace) == 1
    monkeypatch.setattr(ring_module, "steps_needed", lambda layout, mask, rank: layout.P)
    full = simulate_ring(q, k, v, **options)
    assert max(rec.step for rec in full.trace) == 4
    for name in NAMES:
        assert np.array_equal(getattr(short, name), getattr(full, name)), name


# -- balance ----------------------------------------------------------------------------------------------

def contiguous_causal_ratio(N, P):
    """specs/schedule.md section 3: the busiest contiguous rank's causal work over the mean, for P | N."""
    n = N // P
    return (n * (2 * P - 1) + 1) / (n * P + 1)


@pytest.mark.parametrize("P", [2, 4, 8])
@pytest.mark.parametrize("extra", [0, 3])
def test_causal_work_balances_on_zigzag_and_striped(P, extra):
    N = 64 * P + extra
    mask = masks.mask_for(True)
    for layout in ("zigzag", "striped"):
        work = schedule.work(layout_for(layout, N, P), mask)
        assert work.sum() == N * (N + 1) // 2                      # every visible pair once
        assert schedule.imbalance(work) <= 1.05, (layout, P, N, schedule.imbalance(work))
    work = schedule.work(layout_for("contiguous", N, P), mask)
    if extra == 0:
        assert schedule.imbalance(work) == pytest.approx(contiguous_causal_ratio(N, P), rel=1e-12)
    else:
        assert schedule.imbalance(work) == pytest.approx(contiguous_causal_ratio(N, P), rel=0.02)


def test_work_counts_visible_pairs_per_rank_and_step(rng):
    """work[r, t] is the number of visible pairs between rank r's queries and the K/V it holds at step t."""
    N, P = 29, 3
    segments = rng.integers(0, 2, (2, N))
    for layout in LAYOUTS:
        cut = layout_for(layout, N, P)
        for mask in (masks.mask_for(True, (4, -1)), masks.mask_for(False, None, segments, B=2, N=N)):
            work = schedule.work(cut, mask)
            for r in range(P):
                for t in range(P):
                    seen = mask.visible(cut.positions(r), cut.positions(schedule.kv_source(r, t, P)))
                    assert work[r, t] == seen.sum(), (layout, r, t)


# -- inputs, shard files, the sampled check, the command line ---------------------------------------------

def test_inputs_are_the_same_global_tensors_in_every_layout():
    whole = inputs.generate("q", 2, 3, 4, 0, 300, 7, np.float64)
    for layout in LAYOUTS:
        cut = layout_for(layout, 300, 7)
        shards = [inputs.generate_at("q", 2, 3, 4, cut.positions(r), 7, np.float64) for r in range(7)]
        assert np.array_equal(cut.unshard(shards), whole), layout


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_sampled_check_follows_the_positions(rng, layout):
    """Each rank contributes the sampled rows it holds; a result with two rows swapped fails."""
    B, N, P = 1, 40, 3
    q, k, v = make_qkv(rng, B, N, 2, 2, 4)
    cut = layout_for(layout, N, P)
    ring = simulate_ring(q, k, v, ranks=P, causal=True, window=(9, -1), layout=layout, timeout=60)
    rows = check.sample_rows(cut, 8)
    for r in range(P):
        for run in cut.runs(r):
            assert range(*run)[0] in rows and range(*run)[-1] in rows

    def verdicts(out):
        def rank(comm):
            results = dict(out=cut.shard(out, comm.rank), lse=cut.shard(ring.lse, comm.rank, axis=2))
            shards = (cut.shard(x, comm.rank) for x in (q, k, v))
            return check.sampled_verdicts(comm, rows, cut.positions(comm.rank), *shards, results, causal=True,
                                          window=(9, -1), scale=0.5)
        return SimWorld(P, timeout=60).run(rank)[0]
    assert all(v.passed for v in verdicts(ring.out).values())
    swapped = ring.out.copy()
    swapped[:, [rows[1], rows[2]]] = swapped[:, [rows[2], rows[1]]]
    assert not verdicts(swapped)["out"].passed


def run_cli(*args, cwd=None):
    result = subprocess.run([sys.executable, "-m", "refimpl", "run", "--no-progress", "--json", *map(str, args)],
                            capture_output=True, text=True, timeout=300, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("layout", ["zigzag", "striped"])
def test_cli_output_files_hold_each_ranks_positions(layout, tmp_path):
    N, P = 37, 3
    summary = run_cli("--seq", N, "--heads", 2, "--dim", 4, "--dtype", "fp64", "--ranks", P, "--layout", layout,
                      "--window", 7, -1, "--backward", "--check", "--block-q", 4, "--block-k", 4, "--output", tmp_path)
    assert summary["check"]["passed"] and summary["layout"] == layout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["layout"] == layout and "positions" not in manifest
    cut = layout_for(layout, N, P)
    for r in range(P):
        assert np.array_equal(np.concatenate([np.arange(*run) for run in manifest["ranges"][r]]), cut.positions(r))
    q, k, v, dout = (inputs.generate(name, 1, 2, 4, 0, N, 0, np.float64) for name in ("q", "k", "v", "dout"))
    ref = simulate_ring(q, k, v, ranks=P, causal=True, window=(7, -1), dout=dout, layout=layout, block_q=4, block_k=4)
    for name in NAMES:
        stitched = np.zeros_like(getattr(ref, name))
        for r in range(P):
            pos = np.concatenate([np.arange(*run) for run in manifest["ranges"][r]])
            stitched[(slice(None),) * (2 if name == "lse" else 1) + (pos,)] = np.load(tmp_path / f"{name}.{r}.npy")
        assert np.array_equal(stitched, getattr(ref, name)), name


def test_cli_input_files_in_a_layouts_order(tmp_path, rng):
    """--input shards hold the layout's positions, named by --layout; lengths of another layout are refused."""
    N, P = 30, 4
    q, k, v = make_qkv(rng, 1, N, 2, 2, 4)
    cut = layout_for("zigzag", N, P)
    for name, x in zip("qkv", (q, k, v)):
        for r in range(P):
            np.save(tmp_path / f"{name}.{r}.npy", cut.shard(x, r))
    summary = run_cli("--input", tmp_path, "--ranks", P, "--layout", "zigzag", "--check", "--output",
                      tmp_path / "out")
    assert summary["check"]["passed"]
    out = cut.unshard([np.load(tmp_path / "out" / f"out.{r}.npy") for r in range(P)])
    assert_fp64_close(out, naive_attention(q, k, v, causal=True)[0], "out")
    wrong = subprocess.run([sys.executable, "-m", "refimpl", "run", "--input", str(tmp_path), "--ranks", str(P)],
                           capture_output=True, text=True, timeout=120)
    assert wrong.returncode == 2
    assert ("the shards hold [7, 7, 8, 8] tokens, but the contiguous layout of N=30 over 4 ranks gives [8, 8, 7, 7]"
            in wrong.stderr), wrong.stderr


@pytest.mark.parametrize("args, message", [
    (["--window", "3", "-2"], "--window: window must be (left, right) with each side >= 0, or -1 for unbounded"),
    (["--cu-seqlens", "0,5,3,64"], "--cu-seqlens: cu_seqlens must start at 0 and increase strictly"),
    (["--cu-seqlens", "0,5,60"], "--cu-seqlens: cu_seqlens must end at the sequence length N=64"),
])
def test_cli_rejects_a_bad_mask(args, message):
    result = subprocess.run([sys.executable, "-m", "refimpl", "run", "--seq", "64", *args], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_cli_reports_the_early_stop():
    result = subprocess.run([sys.executable, "-m", "refimpl", "run", "--no-progress", "--seq", "400", "--heads", "2",
                             "--dim", "8", "--ranks", "4", "--layout", "contiguous", "--window", "20", "-1",
                             "--block-q", "32", "--block-k", "32", "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the ring stopped after 2 of 4 steps: " in result.stdout and "saved (67%)" in result.stdout
    assert "   2.. not run" in result.stdout


# -- ringattn trace: the plan, printed and drawn ----------------------------------------------------------

@pytest.mark.parametrize("layout, window, cu_seqlens", [("contiguous", (6, -1), None), ("zigzag", None, None),
                                                         ("striped", (3, 2), [0, 10, 37])])
def test_the_planned_trace_is_the_runs_trace(rng, layout, window, cu_seqlens):
    """``schedule.plan_ring`` (what ``ringattn trace`` prints) is what the ring then records, step by step."""
    B, N, P, Hkv, D = 1, 37, 4, 1, 4
    q, k, v = make_qkv(rng, B, N, 2, Hkv, D)
    run = simulate_ring(q, k, v, ranks=P, causal=True, window=window, cu_seqlens=cu_seqlens, layout=layout,
                        block_q=3, block_k=4, timeout=60)
    mask = masks.mask_for(True, window, None, cu_seqlens, B=B, N=N)
    planned = schedule.plan_ring(layout_for(layout, N, P), mask, 3, 4, 2 * B * Hkv * D * 8)
    fields = ("step", "rank", "kv_shard", "tiles", "skipped_tiles", "bytes_sent", "partial_tiles", "scores")
    assert ([tuple(getattr(x, f) for f in fields) for x in sorted(planned, key=lambda x: (x.step, x.rank))]
            == [tuple(getattr(x, f) for f in fields) for x in sorted(run.trace, key=lambda x: (x.step, x.rank))])


def test_trace_command_prints_the_plan(capsys):
    code = cli.main(["trace", "--seq", "400", "--ranks", "4", "--heads", "2", "--dim", "8", "--layout", "contiguous",
                     "--window", "20", "-1", "--block-q", "32", "--block-k", "32"])
    text = capsys.readouterr().out
    assert code == 0
    assert "ranks=4 contiguous  N=400 B=1 Hq=2 Hkv=2 D=8 fp32 causal, window (20, -1)  tiles 32x32" in text
    assert "   0       kv0 7/9 12.5 KiB      kv1 7/9 12.5 KiB" in text and "   2.. not run" in text
    assert "the ring stops after 2 of 4 steps: forward and backward send" in text and "saved (60%)" in text


def test_trace_command_json_balance(capsys):
    assert cli.main(["trace", "--seq", "1024", "--ranks", "8", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["layout"] == cli.DEFAULT_LAYOUT == "zigzag" and s["steps"] == 8 and len(s["trace"]) == 64
    assert s["imbalance"] == pytest.approx(1.0) and np.sum(s["work"]) == 1024 * 1025 // 2
    assert cli.main(["trace", "--seq", "1024", "--ranks", "8", "--json", "--layout", "contiguous"]) == 0
    assert json.loads(capsys.readouterr().out)["imbalance"] == pytest.approx(contiguous_causal_ratio(1024, 8))


def test_the_default_layout_is_zigzag_for_generated_inputs():
    assert run_cli("--seq", 64, "--heads", 2, "--dim", 4, "--ranks", 2)["layout"] == "zigzag"


def test_picture_cells_are_the_plan():
    """Every cell of the picture belongs to the rank, step and tile the ring computes it in: per (rank, step),
    the computed cells are the plan's score elements, and the visible ones its work."""
    from refimpl import plot
    N, P = 37, 4
    mask = masks.mask_for(True, (9, -1))
    for layout in LAYOUTS:
        cut = layout_for(layout, N, P)
        rank, step, state, tile, seen = plot.cells(cut, mask, 3, 4, np.arange(N))
        records = schedule.plan_ring(cut, mask, 3, 4, 1)
        for rec in records:
            mine = (rank == rec.rank) & (step == rec.step)
            assert np.sum(mine & (state == plot.COMPUTED)) == rec.scores, (layout, rec.rank, rec.step)
            assert np.sum(mine & seen) == schedule.work(cut, mask)[rec.rank, rec.step]
        assert not (seen & (state != plot.COMPUTED)).any()          # every visible pair is computed
        assert (state == plot.NOT_RUN).sum() == sum((step >= records[-1].step + 1).ravel())


def test_picture_needs_matplotlib(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # as if it were not installed
    with pytest.raises(SystemExit) as exc:
        cli.main(["trace", "--seq", "32", "--png", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "needs matplotlib: pip install 'ringattn[plot]'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", ["png", "svg"])
def test_picture_is_drawn(tmp_path, suffix):
    pytest.importorskip("matplotlib")
    path = tmp_path / f"schedule.{suffix}"
    assert cli.main(["trace", "--seq", "32", "--ranks", "4", "--block-q", "4", "--block-k", "4",
                     f"--{suffix}", str(path), "--json"]) == 0
    assert path.stat().st_size > 1000
