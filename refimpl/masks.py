"""Masks on global token positions, and the classification of a tile as empty, partial or full.

A mask answers one question: may the query at global position i see the key at global position j?
Because it is phrased on *global positions*, the same mask serves every layout and every ring step: a
rank never needs to know how the sequence was cut, only which positions its q rows and the current k
rows hold.

``classify`` lets the tile loop skip work. It looks only at the position ranges of a tile:

    EMPTY    no (i, j) pair in the tile is visible: skip it, compute nothing
    FULL     every pair is visible: compute it without building a mask
    PARTIAL  some pairs are visible: compute it and hide the others with -inf
"""

import numpy as np

EMPTY, PARTIAL, FULL = "empty", "partial", "full"


class NoMask:
    """Every query sees every key (bidirectional attention)."""

    name = "none"

    def classify(self, q_pos, k_pos):
        return FULL

    def visible(self, q_pos, k_pos):
        return np.ones((len(q_pos), len(k_pos)), dtype=bool)


class CausalMask:
    """Query i sees key j iff j <= i, in global positions."""

    name = "causal"

    def classify(self, q_pos, k_pos):
        if k_pos.min() > q_pos.max():
            return EMPTY
        if k_pos.max() <= q_pos.min():
            return FULL
        return PARTIAL

    def visible(self, q_pos, k_pos):
        """(len(q_pos), len(k_pos)) bool, True where the key is visible."""
        return k_pos[None, :] <= q_pos[:, None]


def mask_for(causal):
    return CausalMask() if causal else NoMask()
