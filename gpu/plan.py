"""A step's tile plan as the int arrays the fused kernels read: the plan is data.

``refimpl/schedule.py: plan_tiles`` decides which (row block, column block) tiles a step runs and whether
each is FULL or PARTIAL; both engines call it, so they run, skip and trace the same tiles. The kernels
cut each tile into sub-tiles of their own size, and a CTA owns ``rows_per_cta`` rows, so the plan is laid
out per CTA::

    by query rows (forward, dq):       cta  (n_cta, 4)  row0, row_end, first entry, end entry
                                       cols (n_tiles, 3) k_start, k_end, kind   (the row block's tiles)
    by key rows (dk/dv, transposed):   cta  (n_cta, 4)  key row0, row_end, first entry, end entry
                                       rows (n_tiles, 3) q_start, q_end, kind   (the key block's tiles,
                                                                                  ascending queries)

Positions are shard-local row indices; the kernels read global positions from ``q_pos``/``k_pos``. Kinds
are ``KIND`` below (the kernels' KIND_PARTIAL, KIND_FULL). Only NumPy is needed here, so CI tests it.
"""

from dataclasses import dataclass

import numpy as np

from refimpl.masks import FULL, PARTIAL

KIND = {PARTIAL: 1, FULL: 2}


@dataclass
class TileTable:
    cta: np.ndarray          # (n_cta, 4) int32
    tiles: np.ndarray        # (n_tiles, 3) int32

    @property
    def n_cta(self):
        return len(self.cta)


def _table(blocks, rows_per_cta):
    """blocks: [(start, stop, [(start, stop, kind), ...]), ...] -> a TileTable, rows_per_cta per CTA."""
    cta, tiles = [], []
    for start, stop, entries in blocks:
        first = len(tiles)
        tiles.extend(entries)
        cta.extend((r0, min(r0 + rows_per_cta, stop), first, len(tiles)) for r0 in range(start, stop, rows_per_cta))
    return TileTable(np.asarray(cta, np.int32).reshape(-1, 4), np.asarray(tiles, np.int32).reshape(-1, 3))


def by_query_rows(plan, rows_per_cta):
    """The forward's and dq's table: each row block's CTAs walk the row block's key tiles."""
    return _table([(qs.start, qs.stop, [(ks.start, ks.stop, KIND[kind]) for ks, kind in cols])
                   for qs, cols in plan.rows], rows_per_cta)


def by_key_rows(plan, rows_per_cta):
    """The dk/dv table: the same tiles grouped by key block, each key block's query tiles ascending."""
    columns = {}
    for qs, cols in plan.rows:
        for ks, kind in cols:
            columns.setdefault((ks.start, ks.stop), []).append((qs.start, qs.stop, KIND[kind]))
    return _table([(k0, k1, columns[(k0, k1)]) for k0, k1 in sorted(columns)], rows_per_cta)
