"""The picture of a ring schedule: the N x N attention matrix, and which rank computes which tile at which step.

``ringattn trace --png FILE`` (or ``--svg``) draws it; ``specs/schedule_pictures.py`` makes the pictures in
``specs/``. Rows are query positions i, columns key positions j, both in natural order (0 at the top left).
Cell (i, j) belongs to the rank r that holds query i, at the step t at which r holds the K/V shard of key
j (t = (r - s) mod P, s the rank holding j), and to one tile of that step's plan (``schedule.plan_tiles``)::

    coloured by r, numbered t     a tile the rank computes; pale where the mask hides the pair (computed
                                  anyway: the tile is PARTIAL)
    hatched ///                   a tile that is skipped: every pair fully masked
    grey, dotted                  a step the ring does not run (it stopped early: ``schedule.ring_steps``)
    black line                    the mask's boundary (batch 0 when documents differ by batch)

Large N is drawn on a grid of at most ``CELLS`` x ``CELLS`` sampled positions. matplotlib is an optional
extra: ``pip install 'ringattn[plot]'``.
"""

import numpy as np

from .schedule import kv_source, plan_tiles, ring_steps

CELLS = 512
NOT_RUN, SKIPPED, COMPUTED = 0, 1, 2


def _matplotlib():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("drawing the schedule needs matplotlib: pip install 'ringattn[plot]' "
                          "(or pip install matplotlib)") from None
    return plt


def cells(layout, mask, block_q, block_k, positions):
    """For the sampled ``positions`` (M,) as rows and as columns: (rank, step, state, tile id, visible),
    each (M, M); state is NOT_RUN, SKIPPED or COMPUTED, and the tile id is unique per (rank, step, tile)."""
    P, N = layout.P, layout.N
    owner, index = np.empty(N, np.int64), np.empty(N, np.int64)
    for r in range(P):
        pos = layout.positions(r)
        owner[pos], index[pos] = r, np.arange(len(pos))
    steps = ring_steps(layout, mask)
    M = len(positions)
    rank = np.broadcast_to(owner[positions][:, None], (M, M))
    step = (owner[positions][:, None] - owner[positions][None, :]) % P
    state = np.full((M, M), NOT_RUN)
    tile = np.full((M, M), -1, np.int64)
    blocks_q, blocks_k = index[positions] // block_q, index[positions] // block_k
    for r in range(P):
        rows = np.flatnonzero(owner[positions] == r)
        for t in range(steps):
            s = kv_source(r, t, P)
            cols = np.flatnonzero(owner[positions] == s)
            plan = plan_tiles(layout.positions(r), layout.positions(s), mask, block_q, block_k)
            kinds = np.full((-(-layout.length(r) // block_q), -(-layout.length(s) // block_k)), SKIPPED)
            for qs, computed in plan.rows:
                for ks, _ in computed:
                    kinds[qs.start // block_q, ks.start // block_k] = COMPUTED
            where = np.ix_(rows, cols)
            state[where] = kinds[blocks_q[rows][:, None], blocks_k[cols][None, :]]
            tile[where] = ((r * P + t) * kinds.shape[0] + blocks_q[rows][:, None]) * kinds.shape[1] \
                + blocks_k[cols][None, :]
    seen = mask.visible(positions, positions)
    return rank, step, state, tile, (seen if seen.ndim == 2 else seen[0])


def _labels(ax, state, tile, step, extent):
    """The step number at the centre of every rectangle of equal tile id (a tile of a zigzag or striped
    shard is several rectangles), when the cells are big enough to read."""
    from matplotlib.patheffects import withStroke
    M = len(state)
    if M > 96:
        return
    cell = extent / M
    for a in range(M):
        for b in range(M):
            if state[a, b] != COMPUTED or (b and tile[a, b - 1] == tile[a, b]) or (a and tile[a - 1, b] == tile[a, b]):
                continue                                   # not the top left corner of a rectangle
            w = 1
            while b + w < M and tile[a, b + w] == tile[a, b]:
                w += 1
            h = 1
            while a + h < M and tile[a + h, b] == tile[a, b]:
                h += 1
            ax.text((b + w / 2) * cell, (a + h / 2) * cell, str(step[a, b]), ha="center", va="center",
                    fontsize=7 if min(w, h) < 2 else 9, color="black",
                    path_effects=[withStroke(linewidth=2, foreground="white")])


def _rectangles(where, extent):
    """The True cells of ``where`` (M, M) as rectangles, one per run of consecutive cells in a row."""
    from matplotlib.patches import Rectangle
    cell = extent / len(where)
    padded = np.pad(where.astype(np.int8), ((0, 0), (1, 1)))
    rows, cols = np.nonzero(np.diff(padded, axis=1))                    # starts and stops of runs, in turn
    return [Rectangle((a * cell, row * cell), (b - a) * cell, cell)
            for row, a, b in zip(rows[::2], cols[::2], cols[1::2])]


def _boundary(label, extent):
    """Segments along the cell edges between cells of different ``label`` (M, M): the mask's boundary
    (label = visible), or the tiles' edges (label = tile id), as staircases."""
    M = len(label)
    cell = extent / M
    a, b = np.nonzero(label[1:] != label[:-1])                            # between rows a and a + 1
    across = [((j * cell, (i + 1) * cell), ((j + 1) * cell, (i + 1) * cell)) for i, j in zip(a, b)]
    a, b = np.nonzero(label[:, 1:] != label[:, :-1])                      # between columns b and b + 1
    down = [(((j + 1) * cell, i * cell), ((j + 1) * cell, (i + 1) * cell)) for i, j in zip(a, b)]
    return across + down


def draw(layout, mask, block_q, block_k, path, title=None):
    """Write the picture of ``layout``'s ring under ``mask`` with these tiles to ``path`` (.png or .svg)."""
    plt = _matplotlib()
    from matplotlib.collections import LineCollection, PatchCollection
    from matplotlib.patches import Patch
    N, P = layout.N, layout.P
    positions = np.arange(N) if N <= CELLS else np.linspace(0, N - 1, CELLS).round().astype(np.int64)
    rank, step, state, tile, seen = cells(layout, mask, block_q, block_k, positions)
    colours = plt.get_cmap("tab10" if P <= 10 else "tab20")(np.arange(P) % (10 if P <= 10 else 20))
    image = np.ones(state.shape + (4,))
    computed = state == COMPUTED
    image[computed] = colours[rank[computed]]
    image[computed & ~seen, 3] = 0.3                                       # computed, but hidden by the mask
    image[state == NOT_RUN] = (0.85, 0.85, 0.85, 1.0)
    fig, ax = plt.subplots(figsize=(7.2, 6.4))
    ax.imshow(image, extent=(0, N, N, 0), interpolation="nearest")
    for where, hatch in ((state == SKIPPED, "///"), (state == NOT_RUN, "..")):
        ax.add_collection(PatchCollection(_rectangles(where, N), facecolor="none", edgecolor="black", linewidth=0,
                                          hatch=hatch))
    if len(positions) <= 96:                                               # the tiles' edges, when they show
        ax.add_collection(LineCollection(_boundary(tile, N), colors="white", linewidths=0.8))
    ax.add_collection(LineCollection(_boundary(seen, N), colors="black", linewidths=1.4))
    ax.set_xlim(0, N)
    ax.set_ylim(N, 0)
    _labels(ax, state, tile, step, N)
    ax.set_xlabel("key position j")
    ax.set_ylabel("query position i")
    ax.set_title(title or f"{layout.name}, P={P}, {mask.name} mask, tiles {block_q}x{block_k}", fontsize=10)
    handles = [Patch(color=colours[r], label=f"rank {r}") for r in range(P)]
    handles += [Patch(facecolor=(0.5, 0.5, 0.5, 0.3), label="computed, masked"),
                Patch(facecolor="white", edgecolor="black", hatch="///", label="skipped tile"),
                Patch(facecolor=(0.85, 0.85, 0.85), edgecolor="black", hatch="..", label="step not run")]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title="number = ring step", title_fontsize=8)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
