"""How a sequence of N tokens is cut into P shards, one per rank.

A layout is nothing but the global positions each rank holds. The ring and the tiles only ever see
positions, so a new layout is a new ``runs`` method, not a new loop. Three are defined
(``specs/schedule.md`` section 1 has the formulas and why the last two balance causal work)::

    contiguous   rank r holds one run of consecutive tokens; the first N % P ranks hold one token more
    zigzag       the sequence is cut as contiguous into 2P chunks (the first N % 2P chunks one token
                 longer); rank r holds chunks r and 2P-1-r
    striped      rank r holds the tokens t = r mod P: r, r + P, r + 2P, ... < N

No divisibility is needed: with 1 <= P <= N every rank holds at least one token (zigzag's chunk r is
never empty; its chunk 2P-1-r is empty when N < 2P - r). Shard lengths differ by at most one token.

**Shard order.** A rank's arrays hold its tokens in increasing position order: row i of rank r's shard is
the token at ``positions(r)[i]``. Each layout describes its positions as runs, Python ``range`` triples
(start, stop, step), which ``shard`` turns into slices: a view for contiguous and striped shards, a copy
of two slices for zigzag. ``unshard`` puts the shards back in natural order.
"""

import numpy as np


class Layout:
    """The positions of P shards of N tokens; subclasses define ``runs(rank)``."""

    name = None

    def __init__(self, N, P):
        if P < 1 or P > N:
            raise ValueError(f"cannot cut N={N} tokens into {P} shards: need 1 <= ranks <= N")
        self.N, self.P = N, P

    def runs(self, rank):
        """[(start, stop, step), ...]: the ranges whose concatenation is ``positions(rank)``."""
        raise NotImplementedError

    def length(self, rank):
        return sum(len(range(*run)) for run in self.runs(rank))

    def positions(self, rank):
        """int64 array of the global token positions held by ``rank``, in shard (increasing) order."""
        pieces = [np.arange(*run, dtype=np.int64) for run in self.runs(rank)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def shard(self, x, rank, axis=1):
        """The rows of ``x`` (sequence on ``axis``) held by ``rank``, in shard order."""
        pieces = [x[(slice(None),) * axis + (slice(*run),)] for run in self.runs(rank)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=axis)

    def unshard(self, shards, axis=1):
        """Inverse of ``shard``: the per-rank arrays (rank order), back in natural token order."""
        joined = np.concatenate(shards, axis=axis)
        order = np.concatenate([self.positions(r) for r in range(self.P)])     # the position of each joined row
        return np.take(joined, np.argsort(order), axis=axis)


def _cut(N, pieces):
    """Starts of ``pieces`` consecutive runs of N tokens, the first N % pieces one token longer: (pieces + 1,)."""
    base, extra = divmod(N, pieces)
    return np.concatenate([[0], np.cumsum([base + (i < extra) for i in range(pieces)])]).astype(np.int64)


class Contiguous(Layout):
    """Rank r holds positions starts[r] .. starts[r+1]-1."""

    name = "contiguous"

    def __init__(self, N, P):
        super().__init__(N, P)
        self.starts = _cut(N, P)
        self.lengths = [int(b - a) for a, b in zip(self.starts[:-1], self.starts[1:])]

    def runs(self, rank):
        return [(int(self.starts[rank]), int(self.starts[rank + 1]), 1)]

    def length(self, rank):
        return self.lengths[rank]

    def unshard(self, shards, axis=1):
        """The shards in rank order are already in natural order."""
        return np.concatenate(shards, axis=axis)


class Zigzag(Layout):
    """Rank r holds chunks r and 2P-1-r of the 2P contiguous chunks (Megatron's context parallelism)."""

    name = "zigzag"

    def __init__(self, N, P):
        super().__init__(N, P)
        self.chunks = _cut(N, 2 * P)

    def runs(self, rank):
        chunks = (rank, 2 * self.P - 1 - rank)
        return [(int(self.chunks[c]), int(self.chunks[c + 1]), 1) for c in chunks
                if self.chunks[c + 1] > self.chunks[c]]


class Striped(Layout):
    """Rank r holds the tokens t = r mod P (striped attention, Brandon et al. 2023)."""

    name = "striped"

    def runs(self, rank):
        return [(rank, self.N, self.P)]


LAYOUTS = {cls.name: cls for cls in (Contiguous, Zigzag, Striped)}


def check_name(layout):
    """The layout's name, or a ValueError naming the three there are."""
    if not isinstance(layout, str) or layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")
    return layout


def layout_for(layout, N, P):
    """The layout called ``layout`` ("contiguous", "zigzag" or "striped") of N tokens over P ranks."""
    return LAYOUTS[check_name(layout)](N, P)
