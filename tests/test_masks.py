"""Masks on global positions: tile classification at its exact boundaries, and the transport's progress
hook between tiles (both were off-by-one or no-op mutations the suite did not see)."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_qkv

from refimpl import masks
from refimpl.comm.sim import SimWorld
from refimpl.ring import ring_attention


def positions(start, n):
    return np.arange(start, start + n)


@pytest.mark.parametrize("q0, k0, want", [
    (8, 4, masks.FULL),       # last key 7 < first query 8
    (7, 4, masks.FULL),       # last key 7 == first query 7: the diagonal is visible, still full
    (6, 4, masks.PARTIAL),    # key 7 is hidden from query 6
    (4, 4, masks.PARTIAL),    # the diagonal tile
    (0, 3, masks.PARTIAL),    # first key 3 == last query 3: one visible pair
    (0, 4, masks.EMPTY),      # first key 4 > last query 3
])
def test_causal_classification_at_the_boundaries(q0, k0, want):
    q_pos, k_pos = positions(q0, 4), positions(k0, 4)
    mask = masks.CausalMask()
    assert mask.classify(q_pos, k_pos) == want
    visible = mask.visible(q_pos, k_pos)
    assert want == (masks.FULL if visible.all() else masks.EMPTY if not visible.any() else masks.PARTIAL)


def test_mpi_progress_probes_the_transport():
    """MPIComm.progress is one MPI_Iprobe: what moves a rendezvous message while the ranks compute."""
    pytest.importorskip("mpi4py")
    from refimpl.comm.mpi import MPIComm
    probes = []
    fake = SimpleNamespace(comm=SimpleNamespace(Iprobe=lambda source, tag: probes.append((source, tag))),
                           MPI=SimpleNamespace(ANY_SOURCE=-1, ANY_TAG=-2))
    MPIComm.progress(fake)
    assert probes == [(-1, -2)]


def test_the_ring_calls_progress_after_every_tile():
    rng = np.random.default_rng(4)
    q, k, v = make_qkv(rng, 1, 24, 2, 2, 4)
    calls = []

    def rank(comm):
        comm.progress = lambda: calls.append(comm.rank)
        n = 24 // comm.size
        shard = [np.ascontiguousarray(x[:, comm.rank * n:(comm.rank + 1) * n]) for x in (q, k, v)]
        return ring_attention(*shard, comm, causal=True, block_q=4, block_k=4)

    results = SimWorld(3).run(rank)
    tiles = [sum(rec.tiles for rec in r.trace) for r in results]
    assert [calls.count(r) for r in range(3)] == tiles
