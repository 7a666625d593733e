"""Masks on global positions: tile classification at its exact boundaries, and the transport's progress
hook between tiles (both were off-by-one or no-op mutations the suite did not see); windows and documents
as predicates on (position, segment) pairs, classified exactly, and their argument errors."""

from types import SimpleNamespace

import numpy as np
import pytest

from conftest import make_dout, make_qkv
from refimpl import masks, naive_attention, naive_attention_backward, simulate_ring
from refimpl.comm.sim import SimWorld
from refimpl.plain import plain_outputs
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


# -- windows and documents: every mask is a predicate on global (position, segment) pairs ----------------

def predicate(i, j, b, causal, window, segments):
    """The definition of specs/masks.md, one pair at a time."""
    left, right = window if window is not None else (-1, -1)
    return ((not causal or j <= i) and (left == -1 or j >= i - left) and (right == -1 or j <= i + right)
            and (segments is None or segments[b, i] == segments[b, j]))


def random_mask(rng, N, B=2):
    """Arguments of a random mask: causal or not, a window or not, per-batch ids, cu_seqlens or no documents."""
    causal = bool(rng.integers(2))
    window = None if rng.random() < 0.25 else (int(rng.integers(-1, 8)), int(rng.integers(-1, 8)))
    kind = rng.integers(4)
    segment_ids = rng.integers(0, 3, (B, N)) if kind == 0 else None
    cu_seqlens = None
    if kind == 1:
        cuts = np.sort(rng.choice(np.arange(1, N), size=int(rng.integers(0, 5)), replace=False))
        cu_seqlens = [0, *cuts.tolist(), N]
    return causal, window, segment_ids, cu_seqlens


def random_positions(rng, N):
    """Tile positions as layouts make them: a run, a run with a gap (zigzag), a stride (striped), or any."""
    kind, n = rng.integers(4), int(rng.integers(1, 9))
    if kind == 0:
        start = int(rng.integers(0, N - n + 1))
        return np.arange(start, start + n)
    if kind == 1:
        a, b = sorted(rng.choice(np.arange(N - 1), size=2, replace=False))
        return np.concatenate([np.arange(a, a + 2), np.arange(b + 1, min(N, b + 4))])
    if kind == 2:
        return np.arange(int(rng.integers(0, 4)), N, int(rng.integers(2, 5)))[:n]
    return np.sort(rng.choice(N, size=n, replace=False))


def test_every_mask_is_its_predicate_and_classifies_exactly():
    """visible() is the pair predicate (per batch where the documents differ), counts() its row sums, and
    classify() is EMPTY only when no pair is visible and FULL only when all are, in every batch, also on
    positions with gaps, where the ranges alone cannot tell."""
    rng = np.random.default_rng(11)
    N, B = 40, 2
    for _ in range(1500):
        causal, window, segment_ids, cu_seqlens = random_mask(rng, N, B)
        mask = masks.mask_for(causal, window, segment_ids, cu_seqlens, B=B, N=N)
        segments = (segment_ids if segment_ids is not None else None if cu_seqlens is None
                    else np.repeat(np.arange(len(cu_seqlens) - 1), np.diff(cu_seqlens))[None].repeat(B, 0))
        q_pos, k_pos = random_positions(rng, N), random_positions(rng, N)
        want = np.array([[[predicate(i, j, b, causal, window, segments) for j in k_pos] for i in q_pos]
                         for b in range(B)])
        seen = mask.visible(q_pos, k_pos)
        assert np.array_equal(np.broadcast_to(seen, want.shape), want), (mask.key, q_pos, k_pos)
        assert np.array_equal(np.broadcast_to(mask.counts(q_pos, k_pos), want.shape[:2]), want.sum(axis=2))
        kind = masks.EMPTY if not want.any() else masks.FULL if want.all() else masks.PARTIAL
        assert mask.classify(q_pos, k_pos) == kind, (mask.key, q_pos, k_pos)


@pytest.mark.parametrize("causal, window, name, key", [
    (False, None, "none", ("none", None, None)),
    (True, None, "causal", ("causal", None, 0)),
    (False, (-1, 0), "causal", ("causal", None, 0)),        # the same predicate: the fused GPU kernels' mask
    (True, (-1, 5), "causal", ("causal", None, 0)),         # causal forces right = 0, as in flash-attn
    (True, (7, 3), "window", ("window", 7, 0)),
    (False, (7, -1), "window", ("window", 7, None)),
])
def test_masks_are_normalised(causal, window, name, key):
    mask = masks.mask_for(causal, window)
    assert (mask.name, mask.key) == (name, key)


def test_documents_shared_by_every_batch_give_one_mask_for_all():
    ids = np.array([[0, 0, 1, 1, 1]] * 3)
    mask = masks.mask_for(False, None, ids, B=3, N=5)
    assert mask.segments.shape == (1, 5) and mask.visible(np.arange(5), np.arange(5)).shape == (5, 5)
    assert masks.mask_for(False, None, None, [0, 2, 5], B=3, N=5).digest == mask.digest
    ids[1, 0] = 7
    assert masks.mask_for(False, None, ids, B=3, N=5).visible(np.arange(5), np.arange(5)).shape == (3, 5, 5)


BAD_MASKS = [
    (dict(window=5), TypeError, r"window must be a pair \(left, right\) of ints \(flash-attn's window_size"),
    (dict(window=(1, 2, 3)), TypeError, "window must be a pair"),
    (dict(window=(1.0, 2)), TypeError, "window must be a pair"),
    (dict(window=(True, 2)), TypeError, "window must be a pair"),
    (dict(window=(-2, 0)), ValueError, r"window must be \(left, right\) with each side >= 0, or -1 for unbounded"),
    (dict(segment_ids=np.zeros((2, 9), np.int64)), ValueError, r"segment_ids must have shape \(B, N\) = \(2, 10\)"),
    (dict(segment_ids=np.zeros((1, 10), np.int64)), ValueError, r"segment_ids must have shape \(B, N\) = \(2, "),
    (dict(segment_ids=np.zeros(10, np.int64)), ValueError, r"segment_ids must have shape \(B, N\)"),
    (dict(segment_ids=np.zeros((2, 10))), TypeError, "segment_ids must be an integer numpy.ndarray of shape"),
    (dict(segment_ids=[[0] * 10] * 2), TypeError, "segment_ids must be an integer numpy.ndarray"),
    (dict(cu_seqlens=[0, 4, 4, 10]), ValueError, "cu_seqlens must start at 0 and increase strictly"),
    (dict(cu_seqlens=[1, 4, 10]), ValueError, "cu_seqlens must start at 0"),
    (dict(cu_seqlens=[0, 4, 9]), ValueError, "cu_seqlens must end at the sequence length N=10"),
    (dict(cu_seqlens=[0.0, 10.0]), TypeError, "cu_seqlens must be a 1-d sequence of at least two ints"),
    (dict(cu_seqlens=[0, 5, 10], segment_ids=np.zeros((2, 10), np.int64)), ValueError,
     "pass segment_ids or cu_seqlens, not both"),
]


@pytest.mark.parametrize("kwargs, error, message", BAD_MASKS)
def test_bad_mask_arguments_are_clear_errors_everywhere(kwargs, error, message):
    """The same error from the mask, the oracle, the plain yardstick, the simulation and every ring rank."""
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, B=2, N=10)
    with pytest.raises(error, match=message):
        masks.mask_for(False, B=2, N=10, **kwargs)
    with pytest.raises(error, match=message):
        naive_attention(q, k, v, **kwargs)
    with pytest.raises(error, match=message):
        plain_outputs(q, k, v, scale=0.5, **kwargs)
    with pytest.raises(error, match=message):
        simulate_ring(q, k, v, ranks=2, timeout=10, **kwargs)
    with pytest.raises(error, match=message):
        SimWorld(2, timeout=10).run(lambda comm: ring_attention(q[:, 5 * comm.rank:5 * comm.rank + 5],
                                                                k[:, 5 * comm.rank:5 * comm.rank + 5],
                                                                v[:, 5 * comm.rank:5 * comm.rank + 5], comm,
                                                                layout="contiguous", **kwargs))


def test_ranks_must_agree_on_the_documents():
    rng = np.random.default_rng(0)
    q, k, v = make_qkv(rng, N=8)
    ids = [np.zeros((1, 8), np.int64), np.ones((1, 8), np.int64)]
    with pytest.raises(ValueError, match="ranks disagree on"):
        SimWorld(2, timeout=10).run(lambda comm: ring_attention(q[:, :4], k[:, :4], v[:, :4], comm,
                                                                segment_ids=ids[comm.rank]))


def test_per_batch_documents_in_the_tiles():
    """Two batches with different documents: each batch's rows see only their own documents, in every tile
    (a PARTIAL tile may be empty for one batch and not for the other)."""
    rng = np.random.default_rng(5)
    q, k, v = make_qkv(rng, B=2, N=12, Hq=2, Hkv=1)
    dout = make_dout(rng, q)
    ids = np.array([[0] * 6 + [1] * 6, [0, 1] * 6])
    ref = naive_attention(q, k, v, segment_ids=ids) + naive_attention_backward(q, k, v, dout, segment_ids=ids)
    for b in range(2):                       # the oracle itself, batch by batch, against one-batch documents
        one = naive_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], segment_ids=ids[b:b + 1])
        assert np.array_equal(one[0], ref[0][b:b + 1])
    got = simulate_ring(q, k, v, ranks=3, dout=dout, segment_ids=ids, block_q=3, block_k=2, timeout=10)
    for name, want in zip(("out", "lse", "dq", "dk", "dv"), ref):
        assert np.max(np.abs(getattr(got, name) - want)) <= 1e-12 * np.max(np.abs(want)), name
