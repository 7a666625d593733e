"""The performance model (refimpl/model.py, specs/model.md): its work formulas against the tile plans the ring
runs, its time, memory and hiding condition, the presets, the Ring Attention paper's table, and the command."""

import importlib.util
import itertools
import json
import math
import sys
from dataclasses import replace
from unittest import mock

import numpy as np
import pytest

import refimpl as ra
from refimpl import cli, model
from refimpl.layouts import Contiguous
from refimpl.masks import mask_for
from refimpl.schedule import kv_source, plan_tiles


def positions(layout, N, P, r):
    """The global positions of rank r, straight from each layout's definition."""
    if layout == "contiguous":
        return Contiguous(N, P).positions(r)
    if layout == "striped":
        return np.arange(r, N, P)
    starts = np.concatenate([[0], np.cumsum(model.chunk_lengths(N, 2 * P))])
    last = 2 * P - 1 - r
    return np.concatenate([np.arange(starts[r], starts[r + 1]), np.arange(starts[last], starts[last + 1])])


def planned(layout, N, P, r, t, causal, bq, bk):
    """(tiles, computed pairs, visible pairs) of rank r at step t, from ``schedule.plan_tiles``."""
    mask = mask_for(causal)
    q_pos, k_pos = positions(layout, N, P, r), positions(layout, N, P, kv_source(r, t, P))
    plan = plan_tiles(q_pos, k_pos, mask, bq, bk)
    area = sum((qs.stop - qs.start) * (ks.stop - ks.start) for qs, cols in plan.rows for ks, _ in cols)
    return plan.computed, area, int(mask.visible(q_pos, k_pos).sum())


CASES = [(N, P, bq, bk) for N, P, bq, bk in itertools.product([3, 7, 37, 64, 100], [1, 2, 3, 5], [1, 4, 16], [2, 5, 16])
         if P <= N]


@pytest.mark.parametrize("layout", model.LAYOUTS)
@pytest.mark.parametrize("causal", [True, False])
def test_work_per_rank_and_step_matches_plan_tiles(layout, causal):
    # every (rank, step) of small problems: tiles, computed pairs and visible pairs; uneven shards, tiles that
    # straddle zigzag's two chunks and zigzag's empty second chunks (N < 2P) included
    checked = 0
    for N, P, bq, bk in CASES:
        problem = model.Problem(N, P, dtype="fp32", causal=causal, layout=layout, block_q=bq, block_k=bk)
        for t in range(P):
            work = model.step_work(problem, t)
            for r in range(P):
                assert (work.tiles[r], work.area[r], work.visible[r]) == planned(layout, N, P, r, t, causal, bq, bk), \
                    (N, P, bq, bk, t, r)
                checked += 1
    assert checked > 1000


def test_contiguous_tiles_match_the_runs_trace():
    # what the ring itself reports: tiles per (rank, step) in simulate_ring's trace
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 90, 2, 4)) for _ in range(3))
    result = ra.simulate_ring(q, k, v, ranks=4, causal=True, block_q=8, block_k=12)
    problem = model.Problem(90, 4, heads=2, kv_heads=2, dim=4, dtype="fp64", block_q=8, block_k=12)
    for rec in result.trace:
        assert rec.tiles == model.step_work(problem, rec.step).tiles[rec.rank]


def test_shard_lengths_follow_the_layouts():
    assert list(model.shard_lengths("contiguous", 10, 4)) == Contiguous(10, 4).lengths
    assert list(model.shard_lengths("striped", 10, 4)) == [len(range(r, 10, 4)) for r in range(4)]
    # zigzag: chunks r and 2P-1-r of 2P chunks (the first N % 2P one token longer; empty when N < 2P - r)
    assert list(model.chunk_lengths(11, 6)) == [2, 2, 2, 2, 2, 1]
    assert list(model.shard_lengths("zigzag", 11, 3)) == [2 + 1, 2 + 2, 2 + 2]
    assert list(model.shard_lengths("zigzag", 5, 4)) == [1 + 0, 1 + 0, 1 + 0, 1 + 1]


@pytest.mark.parametrize("layout", model.LAYOUTS)
def test_formulas_hold_at_scale(layout):
    # N = 1e8 over P = 4096: every visible pair counted once over all ranks and steps, in exact integers (the
    # useful FLOPs are 4 B Hq D times their sum), and a finite prediction
    N, P = 10 ** 8, 4096
    p = model.predict(model.Problem(N, P, layout=layout), model.preset("h100", "bf16"))
    assert p.forward.useful_flops == 4 * 8 * 64 * (N * (N + 1) // 2)
    assert 0 < p.forward.efficiency <= 1 and math.isfinite(p.forward.time_s)
    assert p.tokens_per_rank == (N // P, N // P + 1)


def test_non_causal_total_is_every_pair():
    problem = model.Problem(1000, 7, causal=False, layout="zigzag")
    assert sum(int(model.step_work(problem, t).visible.sum()) for t in range(7)) == 1000 ** 2


def test_balance_of_the_layouts():
    hw = model.preset("h100", "bf16")
    runs = {layout: model.predict(model.Problem(1 << 20, 64, layout=layout), hw) for layout in model.LAYOUTS}
    # contiguous causal: rank P-1 computes every step, so about twice the mean; zigzag and striped balance it
    assert runs["contiguous"].imbalance == pytest.approx(2 * 64 / 65, rel=0.01)
    assert runs["zigzag"].imbalance < 1.01 and runs["striped"].imbalance < 1.01
    assert runs["zigzag"].forward.time_s < 0.6 * runs["contiguous"].forward.time_s


# -- time -----------------------------------------------------------------------------------------

def custom(flops=1e12, bandwidth=1e9, latency=0.0):
    return model.Hardware("custom", flops, bandwidth, latency)


def test_step_time_is_the_longer_of_compute_and_messages():
    # non-causal, balanced: C = 4 B Hq D n^2 / F every step, M = L + 2 B n Hkv D s_in / W on steps 0..P-2
    problem = model.Problem(4096, 4, heads=8, kv_heads=2, dim=64, dtype="fp16", causal=False)
    hw = custom(flops=1e13, bandwidth=1e9, latency=1e-5)
    p = model.predict(problem, hw)
    n = 1024
    compute = 4 * 8 * 64 * n * n / 1e13
    message = 1e-5 + 2 * n * 2 * 64 * 2 / 1e9           # only the 2 KV heads travel
    for step in p.forward.steps[:-1]:
        assert step.compute_s == pytest.approx(compute) and step.comm_s == pytest.approx(message)
        assert step.time_s == pytest.approx(max(compute, message))
    assert p.forward.steps[-1].comm_s == 0                # the last step sends nothing
    assert p.forward.time_s == pytest.approx(3 * max(compute, message) + compute)
    assert p.forward.exposed_comm_s == pytest.approx(3 * max(0, message - compute))


def test_gqa_sends_only_kv_heads():
    hw = custom()
    mha = model.predict(model.Problem(4096, 4, heads=8, kv_heads=8, causal=False), hw)
    gqa = model.predict(model.Problem(4096, 4, heads=8, kv_heads=2, causal=False), hw)
    assert gqa.forward.steps[0].comm_s == pytest.approx(mha.forward.steps[0].comm_s / 4)
    assert gqa.forward.compute_s == pytest.approx(mha.forward.compute_s)


def test_backward_costs_and_messages():
    problem = model.Problem(4096, 4, dtype="bf16", causal=False)
    hw = custom(flops=1e15, bandwidth=1e9)                 # communication-bound, no latency
    p = model.predict(problem, hw, backward=True)
    n, kv, dkv = 1024, 2 * 1024 * 8 * 64 * 2, 2 * 1024 * 8 * 64 * 4
    assert p.backward.compute_s == pytest.approx(2.5 * p.forward.compute_s)
    # the K/V of step t and the dK/dV accumulator of step t-1 share the link; the last one returns exposed
    assert [s.comm_s * 1e9 for s in p.backward.steps] == pytest.approx([kv, kv + dkv, kv + dkv, dkv])
    assert p.backward.time_s == pytest.approx((kv + 2 * (kv + dkv) + dkv + dkv) / 1e9 + 0 * n)


def test_hiding_condition_agrees_with_the_steps():
    # at n* the balanced step's compute equals its messages; above it they hide, below they do not
    hw = custom(flops=2e12, bandwidth=5e9, latency=2e-5)
    for layout, causal in (("contiguous", False), ("zigzag", True), ("striped", True)):
        problem = model.Problem(64, 8, layout=layout, causal=causal, dtype="fp32", block_q=1, block_k=1)
        for phase in ("forward", "backward"):
            star = model.hide_tokens(problem, hw, phase)
            for n, hidden in ((int(star * 1.05), True), (int(star * 0.95), False)):
                p = model.predict(replace(problem, seq=8 * n), hw, backward=True)
                middle = getattr(p, phase).steps[3]         # a step with another rank's shard, 0 < t < P-1
                assert (middle.compute_s >= middle.comm_s) == hidden, (layout, phase, n, star)


def test_paper_condition_is_the_model_in_the_papers_setting():
    # c >= F/B: no mask, bf16 (2 bytes), MHA, no latency, one host's K/V block per step
    for flops, bandwidth in ((312e12, 300e9), (989e12, 50e9), (1.0, 1.0)):
        assert model.paper_block_size(flops, bandwidth) == pytest.approx(flops / bandwidth, rel=1e-12)


def test_paper_table_reproduced():
    rows = {row["spec"]: row for row in model.paper_rows()}
    for name, row in rows.items():
        if name == "A100 InfiniBand":
            # the paper prints 24.5 and 149.5 (x1e3); its own 312 TF / 12.5 GB/s give 24.96 and 149.76
            assert row["block"] == pytest.approx(24960) and row["seq"] == pytest.approx(149760)
            assert abs(row["block"] / row["paper_block"] - 1) < 0.021
            assert abs(row["seq"] / row["paper_seq"] - 1) < 0.002
            continue
        assert round(row["block"] / 1e3, 1) == row["paper_block"] / 1e3, name
        assert round(row["seq"] / 1e3, 1) == row["paper_seq"] / 1e3, name


# -- memory ---------------------------------------------------------------------------------------

def test_memory_matches_the_spec_table():
    # specs/memory.md section 7: B=1, H=8, D=64, fp32, default blocks
    for N, P, forward, backward in ((16384, 4, 69_599_232, 155_582_464), (131072, 8, 272_105_472, 609_746_944),
                                    (1 << 20, 4, 4_322_230_272, 9_693_036_544)):
        m = model.memory_bytes(model.Problem(N, P, dtype="fp32"))
        assert (m["forward"], m["backward"]) == (forward, backward)


@pytest.mark.parametrize("dtype, Hkv, N, P", [("fp64", 2, 50, 3), ("fp32", 4, 64, 4), ("fp16", 1, 41, 2)])
def test_memory_matches_the_rings_accounting(dtype, Hkv, N, P):
    rng = np.random.default_rng(1)
    np_dtype = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}[dtype]
    q = rng.standard_normal((2, N, 4, 8)).astype(np_dtype)
    k, v = (rng.standard_normal((2, N, Hkv, 8)).astype(np_dtype) for _ in range(2))
    problem = model.Problem(N, P, batch=2, heads=4, kv_heads=Hkv, dim=8, dtype=dtype, block_q=8, block_k=16)
    m = model.memory_bytes(problem)
    forward = ra.simulate_ring(q, k, v, ranks=P, causal=True, block_q=8, block_k=16)
    assert max(forward.peak_bytes) == m["forward"]
    both = ra.simulate_ring(q, k, v, ranks=P, causal=True, block_q=8, block_k=16, dout=q.copy())
    assert max(both.peak_bytes) == max(m["forward"], m["backward"])


# -- hardware -------------------------------------------------------------------------------------

def test_presets_carry_their_figures_and_sources():
    h100, a100 = model.preset("h100", "bf16"), model.preset("a100", "bf16")
    assert (h100.flops, h100.bandwidth, h100.memory) == (989e12, 450e9, 80 * 2 ** 30)
    assert (a100.flops, a100.bandwidth) == (312e12, 300e9)
    assert model.preset("h100-ndr", "bf16").bandwidth == model.preset("a100-ndr", "fp16").bandwidth == 50e9
    assert model.preset("h100", "fp32").flops == 67e12 and model.preset("a100", "fp64").flops == 19.5e12
    for name in model.PRESETS:
        hw = model.preset(name, "bf16")
        assert "datasheet" in hw.source and "nominal" in hw.source.lower()
        assert hw.efficiency == (1.0, 1.0) and hw.cores is None
    with pytest.raises(ValueError, match="hardware must be one of"):
        model.preset("v100", "bf16")


def test_shared_cores():
    dedicated = custom()
    assert dedicated.share(3, 4) == 1.0
    sim = model.Hardware("cpu", 1e11, 1e10, 0.0, cores=2, available=2.0, transport="simulated")
    assert sim.share(1, 4) == 1.0                               # one busy rank, idle cores
    assert sim.share(4, 4) == pytest.approx(0.5)                # four simulated ranks, two at a time
    mpi = replace(sim, transport="mpi")
    assert mpi.share(1, 4) == 1.0 and mpi.share(4, 4) == pytest.approx(0.5)  # waiting MPI ranks yield
    # other work: one process got 1.2 of the 2 cores, so 2 / 1.2 - 1 = 2/3 of a session competes
    assert replace(sim, available=1.2).share(1, 4) == 1.0
    assert replace(sim, available=1.2).share(2, 2) == pytest.approx(0.6)      # the ranks' one session splits 1.2
    assert replace(sim, available=1.2).share(4, 4) == pytest.approx(0.3)      # two at a time, at 0.6 each
    assert replace(mpi, available=1.2).share(2, 2) == pytest.approx(2 / (2 / 3 + 2))   # a session per rank


def test_calibration_measures_this_cpu():
    hw = model.calibrate(model.Problem(256, 1, heads=2, dim=16, dtype="fp32", block_q=64, block_k=128), "mpi")
    assert hw.flops > 1e8 and 0 < min(hw.efficiency) and max(hw.efficiency) <= 1
    assert hw.cores >= 1 and 0 < hw.available <= hw.cores and hw.transport == "mpi"
    assert hw.bandwidth > 0 and hw.latency >= 0 and "measured" in hw.source
    with pytest.raises(ValueError, match="bf16"):
        model.calibrate(model.Problem(256, 1, dtype="bf16"))


def test_bad_problems_are_named():
    with pytest.raises(ValueError, match="ranks must be a positive integer"):
        model.Problem(10, 0)
    with pytest.raises(ValueError, match="heads 8 must be a multiple of kv_heads 3"):
        model.Problem(10, 1, kv_heads=3)
    with pytest.raises(ValueError, match="seq 3 is too short for 4 ranks"):
        model.Problem(3, 4, layout="zigzag")
    with pytest.raises(ValueError, match="bandwidth must be a positive"):
        model.Hardware("x", 1e12, 0.0, 0.0)


# -- the command ----------------------------------------------------------------------------------

def _no_constants(name):
    raise AssertionError(f"--json wrote {name}, which is not JSON")


def test_one_command_answer(capsys):
    assert cli.main(["model", "--seq", "1048576", "--ranks", "64", "--hardware", "h100", "--layout", "zigzag"]) == 0
    out = capsys.readouterr().out
    assert "N=1,048,576 over P=64 ranks (zigzag, 16,384 tokens per rank)" in out and "bf16" in out
    assert "forward:" in out and "memory per rank" in out and "80 GiB" in out


def test_json_is_strict_and_complete(capsys):
    assert cli.main(["model", "--seq", "65536", "--ranks", "8", "--hardware", "h100-ndr", "--kv-heads", "2",
                     "--backward", "--json"]) == 0
    d = json.loads(capsys.readouterr().out, parse_constant=_no_constants)
    assert d["problem"]["kv_heads"] == 2 and d["hardware"]["bandwidth"] == 50e9
    assert len(d["forward"]["steps"]) == len(d["backward"]["steps"]) == 8
    assert d["time_s"] == pytest.approx(d["forward"]["time_s"] + d["backward"]["time_s"])
    assert set(d["memory"]) == {"forward", "backward"}


def test_custom_figures_and_overrides(capsys):
    assert cli.main(["model", "--flops", "1e15", "--bandwidth", "1e11", "--latency", "5e-6", "--json",
                     "--no-causal"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["hardware"]["flops"], d["hardware"]["bandwidth"], d["hardware"]["latency"]) == (1e15, 1e11, 5e-6)
    assert cli.main(["model", "--flops", "1e15", "--bandwidth", "1e11", "--efficiency", "0.25", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hardware"]["efficiency"] == [0.25, 0.25] and d["hardware"]["latency"] == 0
    assert cli.main(["model", "--hardware", "h100", "--bandwidth", "25e9", "--efficiency", "0.5", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["hardware"]["bandwidth"] == 25e9 and d["hardware"]["efficiency"] == [0.5, 0.5]
    assert "--bandwidth" in d["hardware"]["name"]


def test_cpu_command(capsys):
    assert cli.main(["model", "--hardware", "cpu", "--transport", "mpi", "--seq", "2048", "--ranks", "4",
                     "--heads", "2", "--dim", "16", "--block-q", "64", "--block-k", "128", "--backward"]) == 0
    out = capsys.readouterr().out
    assert "fp32" in out and "shared by mpi ranks of one BLAS thread" in out
    assert "measured: sgemm" in out and "backward:" in out


@pytest.mark.parametrize("argv, message", [
    (["--seq", "1024"], "give --hardware"),
    (["--flops", "1e12"], "give --hardware"),
    (["--hardware", "cpu", "--dtype", "bf16"], "bf16"),
    (["--hardware", "h100", "--efficiency", "2"], "--efficiency must be a fraction"),
    (["--hardware", "h100", "--transport", "mpi"], "--transport describes the ranks sharing this CPU"),
    (["--hardware", "h100", "--seq", "10", "--ranks", "11", "--layout", "zigzag"], "too short"),
    (["--hardware", "h100", "--heads", "8", "--kv-heads", "3"], "multiple of kv_heads"),
])
def test_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["model", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_numbers_are_parse_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["model", "--hardware", "h100", "--latency", "-1"])
    assert "expected a finite number >= 0" in capsys.readouterr().err


def test_paper_table_command(capsys):
    assert cli.main(["model", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "A100 NVLink" in out and "TPU v5e" in out and "2310.01889" in out


def test_png(capsys, tmp_path):
    path = tmp_path / "model.png"
    argv = ["model", "--hardware", "h100", "--seq", "4096", "--ranks", "16", "--png", str(path)]
    if importlib.util.find_spec("matplotlib") is None:
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert "pip install matplotlib" in capsys.readouterr().err
        assert not path.exists()
    else:
        assert cli.main(argv) == 0
        assert path.stat().st_size > 1000


def test_png_draws_both_sweeps(monkeypatch, tmp_path):
    # the figure's data, whether or not matplotlib is installed: a stand-in records what is drawn
    fig, left, right = mock.MagicMock(), mock.MagicMock(), mock.MagicMock()
    pyplot = mock.MagicMock()
    pyplot.subplots.return_value = (fig, (left, right))
    matplotlib = mock.MagicMock(pyplot=pyplot)
    monkeypatch.setitem(sys.modules, "matplotlib", matplotlib)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    problem = model.Problem(4096, 16)
    model.plot(problem, model.preset("h100", "bf16"), tmp_path / "x.png")
    fig.savefig.assert_called_once()
    assert [c.kwargs["label"] for c in left.plot.call_args_list] == list(model.LAYOUTS)
    for axis in (left, right):
        for call in axis.plot.call_args_list:
            xs, ys = call.args
            assert len(xs) == len(ys) > 5 and all(0 < y <= 1 for y in ys)
    assert max(right.plot.call_args_list[0].args[0]) == 4096         # P up to N
