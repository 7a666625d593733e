"""The tile plan as the fused kernels read it (gpu/plan.py), checked on the CPU.

The kernels must run exactly the tiles ``plan_tiles`` kept, with their kinds: the forward and dq walk them
by query rows, dk/dv by key rows. Every (tile, CTA row range) is checked against the plan.
"""

import numpy as np
import pytest

from gpu.kernels import forward_version
from gpu.plan import KIND, by_key_rows, by_query_rows
from refimpl.layouts import Contiguous
from refimpl.masks import mask_for
from refimpl.schedule import kv_source, plan_tiles


def _tiles(plan):
    return {(qs.start, qs.stop, ks.start, ks.stop, KIND[kind]) for qs, cols in plan.rows for ks, kind in cols}


def _cases():
    for N, P, bq, bk, causal in [(301, 3, 96, 80, True), (301, 3, 96, 80, False), (1000, 4, 64, 256, True),
                                 (17, 2, 5, 3, True), (64, 1, 64, 64, True)]:
        layout = Contiguous(N, P)
        for r in range(P):
            for t in range(P):
                yield layout.positions(r), layout.positions(kv_source(r, t, P)), mask_for(causal), bq, bk


@pytest.mark.parametrize("rows_per_cta", [64, 16])
def test_query_table_runs_every_planned_tile_once(rows_per_cta):
    for q_pos, k_pos, mask, bq, bk in _cases():
        plan = plan_tiles(q_pos, k_pos, mask, bq, bk)
        table = by_query_rows(plan, rows_per_cta)
        seen = []
        covered = np.zeros(len(q_pos), int)
        for row0, row_end, first, end in table.cta:
            assert 0 < row_end - row0 <= rows_per_cta
            covered[row0:row_end] += 1
            for k0, k1, kind in table.tiles[first:end]:
                block = next(qs for qs, _ in plan.rows if qs.start <= row0 < qs.stop)
                assert row_end <= block.stop
                seen.append((block.start, block.stop, k0, k1, kind))
        assert set(seen) == _tiles(plan)
        planned_rows = np.zeros(len(q_pos), int)
        for qs, _ in plan.rows:
            planned_rows[qs] = 1
        assert np.array_equal(covered, planned_rows), "every planned row in exactly one CTA"


def test_key_table_is_the_transposed_plan():
    for q_pos, k_pos, mask, bq, bk in _cases():
        plan = plan_tiles(q_pos, k_pos, mask, bq, bk)
        table = by_key_rows(plan, 64)
        seen = set()
        for row0, row_end, first, end in table.cta:
            entries = table.tiles[first:end]
            assert list(entries[:, 0]) == sorted(entries[:, 0]), "query tiles ascending"
            for q0, q1, kind in entries:
                block = next(ks for _, cols in plan.rows for ks, _ in cols if ks.start <= row0 < ks.stop)
                assert row_end <= block.stop
                seen.add((q0, q1, block.start, block.stop, kind))
        assert seen == _tiles(plan)


def test_empty_plan_has_no_ctas():
    plan = plan_tiles(np.arange(10), np.arange(20, 30), mask_for(True), 4, 4)
    assert by_query_rows(plan, 64).n_cta == 0 and by_key_rows(plan, 64).n_cta == 0
    assert by_query_rows(plan, 64).cta.shape == (0, 4) and by_key_rows(plan, 64).tiles.shape == (0, 3)


def test_forward_version_follows_the_plan():
    """Unmasked steps take the version measured fastest without a mask, masked ones the other."""
    full = plan_tiles(np.arange(100, 200), np.arange(0, 100), mask_for(True), 32, 32)
    diagonal = plan_tiles(np.arange(100), np.arange(100), mask_for(True), 32, 32)
    unmasked = plan_tiles(np.arange(100), np.arange(100), mask_for(False), 32, 32)
    assert forward_version("bfloat16", full) == forward_version("float16", unmasked) == "m32n32"
    assert forward_version("bfloat16", diagonal) == "m16n32"
    assert forward_version("float32", full) == "m16n32"
