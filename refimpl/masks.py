"""Masks on global token positions, and the classification of a tile as empty, partial or full.

A mask answers one question: may the query at global position i see the key at global position j?
Because it is phrased on *global positions*, the same mask serves every layout and every ring step: a
rank never needs to know how the sequence was cut, only which positions its q rows and the current k
rows hold. Every mask here is one predicate (``specs/masks.md``)::

    visible(b, i, j) =  i - left <= j <= i + right          the band
                   and  seg[b, i] == seg[b, j]               documents, when given

with ``left`` and ``right`` each a count of tokens or unbounded (None):

    NoMask       left = right = unbounded                    bidirectional attention
    CausalMask   left = unbounded, right = 0                 j <= i
    Window       flash-attn's window_size=(left, right), -1 = unbounded; causal forces right = 0
    Documents    a band within each document: segment_ids (B, N), or cu_seqlens (one packing for every batch)

Every band holds j = i and every token is in its own document, so every query sees at least itself: no
row is ever fully masked, and every lse is finite.

``classify`` lets the tile loop skip work::

    EMPTY    no (i, j) pair in the tile is visible: skip it, compute nothing
    FULL     every pair is visible: compute it without building a mask
    PARTIAL  some pairs are visible: compute it and hide the others with -inf

It first looks only at the position ranges of the tile, which settle the band exactly whenever one side
is unbounded (causal, no mask) or both position sets are runs without gaps. A tile they leave open (a
window over zigzag or striped positions; documents) is settled by counting each query's visible keys
(``counts``: two binary searches per query, no (bq, bk) array), so a classification is always exact:
EMPTY only when nothing is visible, FULL only when everything is. With per-batch documents a tile is
EMPTY or FULL only if it is so in every batch; ``visible`` then returns one (bq, bk) mask per batch.
"""

import hashlib

import numpy as np

from . import validate

EMPTY, PARTIAL, FULL = "empty", "partial", "full"


def _by_counts(counts, nk):
    """The class of a tile from its visible keys per query, (..., nq): none, all nk, or some."""
    if not counts.any():
        return EMPTY
    return FULL if (counts == nk).all() else PARTIAL


class Window:
    """Query i sees key j iff i - left <= j <= i + right; ``None`` is unbounded on that side."""

    name = "window"

    def __init__(self, left, right):
        self.left, self.right = left, right

    @property
    def local(self):
        """True when a query sees only keys within a bounded distance, so that whole K/V shards may be
        useless to every rank (``schedule.ring_steps``). With an unbounded side, the query at N-1 (or 0)
        sees every key."""
        return self.left is not None and self.right is not None

    @property
    def key(self):
        """A hashable summary: equal keys, equal masks."""
        return (self.name, self.left, self.right)

    def visible(self, q_pos, k_pos):
        """(len(q_pos), len(k_pos)) bool, True where the key is visible."""
        d = k_pos[None, :] - q_pos[:, None]
        seen = np.ones(d.shape, dtype=bool)
        if self.left is not None:
            seen &= d >= -self.left
        if self.right is not None:
            seen &= d <= self.right
        return seen

    def counts(self, q_pos, k_pos):
        """(len(q_pos),) int: how many keys of ``k_pos`` each query sees."""
        keys = np.sort(k_pos)
        lo = 0 if self.left is None else np.searchsorted(keys, q_pos - self.left, side="left")
        hi = len(keys) if self.right is None else np.searchsorted(keys, q_pos + self.right, side="right")
        return np.broadcast_to(hi - lo, q_pos.shape)

    def classify(self, q_pos, k_pos):
        """EMPTY, PARTIAL or FULL, exactly: from the ranges of j - i when they settle it, else by counting."""
        left, right = self.left, self.right
        nearest = k_pos.min() - q_pos.max()                   # j - i ranges over [nearest, farthest]
        if right is not None and nearest > right:
            return EMPTY
        farthest = k_pos.max() - q_pos.min()
        if left is not None and farthest < -left:
            return EMPTY
        if (left is None or nearest >= -left) and (right is None or farthest <= right):
            return FULL
        # Some difference in [nearest, farthest] lies in the band. The pair that makes the extreme
        # difference exists, so one unbounded side settles it; so do gapless runs, which make every
        # difference in between.
        if left is None or right is None or (_gapless(q_pos) and _gapless(k_pos)):
            return PARTIAL
        return _by_counts(self.counts(q_pos, k_pos), len(k_pos))


class NoMask(Window):
    """Every query sees every key (bidirectional attention)."""

    name = "none"

    def __init__(self):
        super().__init__(None, None)

    def classify(self, q_pos, k_pos):
        return FULL


class CausalMask(Window):
    """Query i sees key j iff j <= i, in global positions."""

    name = "causal"

    def __init__(self):
        super().__init__(None, 0)


def _gapless(pos):
    return pos.max() - pos.min() + 1 == len(pos)


class Documents:
    """The band ``within`` (a ``Window``), inside each document only: visible iff same segment and in the band.

    ``segments`` (Bs, N) int64, Bs = 1 when every batch has the same documents (cu_seqlens), else B.
    """

    name = "documents"
    local = True             # a document may end before the next K/V shard starts

    def __init__(self, segments, within):
        self.segments, self.within = segments, within
        self.digest = hashlib.sha256(segments.tobytes() + str(segments.shape).encode()).hexdigest()[:16]

    @property
    def key(self):
        return (self.name, self.digest) + self.within.key

    def visible(self, q_pos, k_pos):
        """(len(q_pos), len(k_pos)) bool when every batch has the same documents, else (Bs, nq, nk)."""
        same = self.segments[:, q_pos, None] == self.segments[:, None, k_pos]
        seen = same & self.within.visible(q_pos, k_pos)
        return seen[0] if len(seen) == 1 else seen

    def counts(self, q_pos, k_pos):
        """(Bs, len(q_pos)) int: how many keys each query sees, per batch.

        Each document is moved 3N positions away from the next (its position plus 3N times its index
        among the tile's segment ids); a band reaches at most N to either side, so it never crosses into
        another document and the band's own count is the answer."""
        N = self.segments.shape[1]
        left = None if self.within.left is None else min(self.within.left, N)
        right = None if self.within.right is None else min(self.within.right, N)
        band = Window(N if left is None else left, N if right is None else right)
        per_batch = []
        for seg in self.segments:
            _, index = np.unique(np.concatenate([seg[q_pos], seg[k_pos]]), return_inverse=True)
            spread = index.reshape(-1).astype(np.int64) * 3 * N
            per_batch.append(band.counts(q_pos + spread[:len(q_pos)], k_pos + spread[len(q_pos):]))
        return np.stack(per_batch)

    def classify(self, q_pos, k_pos):
        """EMPTY, PARTIAL or FULL in every batch at once, exactly."""
        band = self.within.classify(q_pos, k_pos)
        if band == EMPTY:
            return EMPTY
        seg_q, seg_k = self.segments[:, q_pos], self.segments[:, k_pos]
        if (seg_q.max(axis=1) < seg_k.min(axis=1)).all() or (seg_k.max(axis=1) < seg_q.min(axis=1)).all():
            return EMPTY                              # the tile's segment ranges are apart in every batch
        one = seg_q.min(axis=1)
        if ((seg_q.max(axis=1) == one) & (seg_k.min(axis=1) == one) & (seg_k.max(axis=1) == one)).all():
            return band                               # one document holds the whole tile in every batch
        return _by_counts(self.counts(q_pos, k_pos), len(k_pos))


# -- arguments ------------------------------------------------------------------------------------------

def check_window(window):
    """``window`` as (left, right), each an int >= 0 or None (unbounded); None for no window.

    The form is flash-attn's ``window_size``: a pair of ints, -1 meaning unbounded on that side."""
    if window is None:
        return None
    if (not isinstance(window, (tuple, list)) or len(window) != 2
            or not all(isinstance(w, (int, np.integer)) and not isinstance(w, (bool, np.bool_)) for w in window)):
        raise TypeError(f"window must be a pair (left, right) of ints (flash-attn's window_size; -1 = unbounded "
                        f"on that side), got {window!r}")
    if any(w < -1 for w in window):
        raise ValueError(f"window must be (left, right) with each side >= 0, or -1 for unbounded, got {window!r}")
    return tuple(None if w == -1 else int(w) for w in window)


def check_segments(segment_ids, cu_seqlens, B, N=None):
    """The documents as (Bs, N) int64 segment ids (Bs = 1 when every batch has the same), or None.

    ``segment_ids`` (B, N) integers: equal ids attend to each other, whatever their order. ``cu_seqlens``
    (D + 1,) integers: document d holds positions cu_seqlens[d] .. cu_seqlens[d+1]-1, so it must start
    at 0, increase strictly and end at N. With ``N=None`` (a rank that does not know N yet) everything but
    the length is checked, and None returned."""
    if segment_ids is not None and cu_seqlens is not None:
        raise ValueError("pass segment_ids or cu_seqlens, not both")
    if segment_ids is not None:
        validate.check_unmasked("segment_ids", segment_ids)
        if not isinstance(segment_ids, np.ndarray) or segment_ids.dtype.kind not in "iu":
            raise TypeError(f"segment_ids must be an integer numpy.ndarray of shape (B, N), got "
                            f"{type(segment_ids).__name__}"
                            + (f" of dtype {segment_ids.dtype}" if isinstance(segment_ids, np.ndarray) else ""))
        if segment_ids.ndim != 2 or segment_ids.shape[0] != B or (N is not None and segment_ids.shape[1] != N):
            raise ValueError(f"segment_ids must have shape (B, N) = ({B}, {'N' if N is None else N}), "
                             f"got {segment_ids.shape}")
        if N is None:
            return None
        ids = segment_ids.astype(np.int64)
        return ids[:1] if (ids == ids[:1]).all() else ids
    if cu_seqlens is not None:
        validate.check_unmasked("cu_seqlens", cu_seqlens)
        cu = np.asarray(cu_seqlens)
        if cu.dtype.kind not in "iu" or cu.ndim != 1 or len(cu) < 2:
            raise TypeError(f"cu_seqlens must be a 1-d sequence of at least two ints (0, end of document 0, ..., "
                            f"N), got {cu_seqlens!r}")
        if cu[0] != 0 or (np.diff(cu) <= 0).any():
            raise ValueError(f"cu_seqlens must start at 0 and increase strictly (every document holds a token), "
                             f"got {cu.tolist()}")
        if N is not None and cu[-1] != N:
            raise ValueError(f"cu_seqlens must end at the sequence length N={N}, got {cu.tolist()}")
        if N is None:
            return None
        return (np.searchsorted(cu, np.arange(N), side="right") - 1).astype(np.int64)[None]
    return None


def mask_for(causal, window=None, segment_ids=None, cu_seqlens=None, *, B=None, N=None):
    """The mask of these arguments: ``NoMask``, ``CausalMask``, a ``Window``, or ``Documents`` around one.

    ``window`` (left, right) in flash-attn's convention; ``causal`` forces right = 0. ``segment_ids``
    (B, N) or ``cu_seqlens`` need B and N. Bad arguments raise a ValueError or TypeError naming them.
    """
    if (segment_ids is not None or cu_seqlens is not None) and N is None:
        raise TypeError("mask_for: documents (segment_ids, cu_seqlens) need the sequence length N")
    left, right = check_window(window) or (None, None)
    if causal:
        right = 0
    band = NoMask() if (left, right) == (None, None) else CausalMask() if (left, right) == (None, 0) \
        else Window(left, right)
    segments = check_segments(segment_ids, cu_seqlens, B, N)
    return band if segments is None else Documents(segments, band)


def fingerprint(window, segment_ids, cu_seqlens):
    """A small hashable summary of the mask arguments, so ranks can compare them without sending them."""
    def digest(x):
        if x is None:
            return None
        x = np.ascontiguousarray(x)
        return hashlib.sha256(x.tobytes() + str((x.shape, x.dtype.str)).encode()).hexdigest()[:16]
    return check_window(window), digest(segment_ids), digest(cu_seqlens)
