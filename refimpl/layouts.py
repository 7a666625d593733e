"""How a sequence of N tokens is cut into P shards, one per rank.

A layout is nothing but the global positions each rank holds. The ring and the tiles only ever see
positions, so a new layout (zigzag, striped) is a new ``positions`` method, not a new loop.

``Contiguous`` gives rank r one run of consecutive tokens. When P does not divide N, the first N % P
ranks get one extra token, so shard lengths differ by at most one.
"""

import numpy as np


class Contiguous:
    name = "contiguous"

    def __init__(self, N, P):
        if P < 1 or P > N:
            raise ValueError(f"cannot cut N={N} tokens into {P} shards: need 1 <= ranks <= N")
        self.N, self.P = N, P
        base, extra = divmod(N, P)
        self.lengths = [base + (r < extra) for r in range(P)]
        self.starts = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)

    def length(self, rank):
        return self.lengths[rank]

    def positions(self, rank):
        """int64 array of the global token positions held by ``rank``, in shard order."""
        return np.arange(self.starts[rank], self.starts[rank + 1], dtype=np.int64)

    def shard(self, x, rank, axis=1):
        """The rows of ``x`` (sequence on ``axis``) held by ``rank``: a view, no copy."""
        index = [slice(None)] * x.ndim
        index[axis] = slice(int(self.starts[rank]), int(self.starts[rank + 1]))
        return x[tuple(index)]

    def unshard(self, shards, axis=1):
        """Inverse of ``shard``: the per-rank arrays, back in natural token order."""
        return np.concatenate(shards, axis=axis)
