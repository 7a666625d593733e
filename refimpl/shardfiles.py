"""Shard files: how ``ringattn run`` reads a problem from ``--input`` and writes its results to ``--output``.

A directory of shards holds one ``.npy`` file per array and rank, ``NAME.RANK.npy``, where rank r's file
holds the tokens of shard r of the run's layout (``--layout``, ``layouts.py``: contiguous, zigzag or
striped), in shard order: row i is the token at global position ``layout.positions(r)[i]``::

    input     q.R.npy (B, n_r, Hq, D)   k.R.npy, v.R.npy (B, n_r, Hkv, D)   [dout.R.npy (B, n_r, Hq, D)]
    output    out.R.npy (B, n_r, Hq, D)   lse.R.npy (B, Hq, n_r)   [dq.R.npy, dk.R.npy, dv.R.npy]
              manifest.json             written last: the set is complete only when it exists

Everything about the problem (B, N, Hq, Hkv, D, dtype) comes from the input files' headers, never from
flags. Which positions the input shards hold comes from the layout's definition: the files carry no
positions, ``--layout`` names the layout (default contiguous), and ``problem`` checks that the shards
agree with each other and that their lengths are the layout's.

Writing is all-or-nothing. Every rank first writes ``.NAME.RANK.npy.partial``; when every rank has
finished (a collective), each renames its own files, and rank 0 then writes ``manifest.json``, which
names every file with its shape and dtype, the layout, and the positions each rank holds::

    "layout": "zigzag"
    "ranges": [[[0, 3, 1], [9, 12, 1]], ...]      per rank, Python ranges [start, stop, step] whose
                                                  concatenation is the rank's positions, in shard order
    "positions": [[0, 30], [30, 60], ...]         contiguous sets only: [start, stop) per rank

To stitch a set back together, place the rows of ``NAME.r.npy`` at rank r's positions along the sequence
axis (axis 1, or 2 for lse): ``full[:, positions_r] = shard_r``, or ``layout.unshard``. For a contiguous
set that is concatenating ``NAME.0.npy .. NAME.{P-1}.npy``; the ``positions`` field is written only for
contiguous sets, so a reader that knows only that field fails on another layout instead of stitching it
in the wrong order. A directory that already holds a run's files is refused unless ``overwrite``; then
the old manifest goes first, then the old arrays, so a reader never sees a manifest next to files of
another run.
"""

import json
import os

import numpy as np

from .layouts import layout_for

INPUTS = ("q", "k", "v", "dout")
OUTPUTS = ("out", "lse", "dq", "dk", "dv")
MANIFEST = "manifest.json"
FORMAT = "ringattn-shards/1"


def path(directory, name, rank):
    return os.path.join(directory, f"{name}.{rank}.npy")


def _header(file):
    """(shape, dtype) of an .npy file, read from its header only."""
    x = np.load(file, mmap_mode="r")
    return tuple(x.shape), x.dtype


def headers(directory, ranks, backward):
    """{rank: {name: (shape, dtype)}} of the input files of ``ranks``; a ValueError names a missing file."""
    names = INPUTS if backward else INPUTS[:3]
    found = {}
    for r in ranks:
        found[r] = {}
        for name in names:
            file = path(directory, name, r)
            if not os.path.exists(file):
                raise ValueError(f"--input: {file} does not exist (expected {{q,k,v{',dout' if backward else ''}}}"
                                 f".RANK.npy for every rank 0..{max(ranks)})")
            found[r][name] = _header(file)
    return found


def extra_ranks(directory, P):
    """Ranks >= P that have a q file in ``directory`` (a set written for more ranks than this run has)."""
    r, extra = P, []
    while os.path.exists(path(directory, "q", r)):
        extra.append(r)
        r += 1
    return extra


def problem(found, P, layout="contiguous"):
    """(B, N, Hq, Hkv, D, dtype) from every rank's headers, or a ValueError naming the file that disagrees.

    Each rank's q, k, v (and dout) must be 4-d with one B, D, dtype; k and v (B, n_r, Hkv, D); q and dout
    (B, n_r, Hq, D); and the lengths n_r must be those of ``layout`` for N = sum n_r over P ranks.
    """
    first = found[0]["q"]
    if len(first[0]) != 4:
        raise ValueError(f"--input: q.0.npy must have 4 dimensions (B, n, Hq, D), got shape {first[0]}")
    B, _, Hq, D = first[0]
    Hkv = found[0]["k"][0][2] if len(found[0]["k"][0]) == 4 else None
    dtype = first[1]
    lengths = []
    for r in range(P):
        n = found[r]["q"][0][1] if len(found[r]["q"][0]) == 4 else None
        for name, (shape, dt) in found[r].items():
            heads = Hq if name in ("q", "dout") else Hkv
            want = (B, n, heads, D)
            if shape != want:
                raise ValueError(f"--input: {name}.{r}.npy has shape {shape}, expected {want} "
                                 f"(B, n_{r}, {'Hq' if heads == Hq else 'Hkv'}, D) from q.0.npy and q.{r}.npy")
            if dt != dtype:
                raise ValueError(f"--input: {name}.{r}.npy has dtype {dt}, but q.0.npy has {dtype}")
        lengths.append(n)
    N = sum(lengths)
    expected = [layout_for(layout, N, P).length(r) for r in range(P)]
    if lengths != expected:
        raise ValueError(f"--input: the shards hold {lengths} tokens, but the {layout} layout of N={N} over "
                         f"{P} ranks gives {expected} (layouts.py; set --layout to the files' layout)")
    return B, N, Hq, Hkv, D, dtype


def existing(directory):
    """The files of a previous run in ``directory``: its manifest and any NAME.RANK.npy output."""
    if not os.path.isdir(directory):
        return []
    return sorted(f for f in os.listdir(directory)
                  if f == MANIFEST or (f.endswith(".npy") and f.split(".")[0] in OUTPUTS))


def clear(directory):
    """Remove a previous run's set, manifest first (rank 0, before any rank writes)."""
    for f in sorted(existing(directory), key=lambda f: f != MANIFEST):
        os.remove(os.path.join(directory, f))


def write_partial(directory, rank, results):
    """This rank's arrays to ``.NAME.RANK.npy.partial``."""
    os.makedirs(directory, exist_ok=True)
    for name, x in results.items():
        with open(_partial(directory, name, rank), "wb") as f:
            np.save(f, x)


def publish(directory, rank, names):
    """Rename this rank's partial files to their final names (after every rank wrote its own)."""
    for name in names:
        os.replace(_partial(directory, name, rank), path(directory, name, rank))


def write_manifest(directory, params, layout, arrays):
    """manifest.json, last: params of the run, the layout and each rank's positions, and {file: {shape,
    dtype}}."""
    ranges = [[list(run) for run in layout.runs(r)] for r in range(layout.P)]
    manifest = dict(format=FORMAT, params=params, ranks=layout.P, layout=layout.name, ranges=ranges,
                    **({"positions": [run[0][:2] for run in ranges]} if layout.name == "contiguous" else {}),
                    files={f"{name}.{r}.npy": {"shape": list(shape), "dtype": str(dtype)}
                           for r, per_rank in enumerate(arrays) for name, (shape, dtype) in per_rank.items()})
    tmp = os.path.join(directory, f".{MANIFEST}.partial")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, allow_nan=False)
    os.replace(tmp, os.path.join(directory, MANIFEST))


def _partial(directory, name, rank):
    return os.path.join(directory, f".{name}.{rank}.npy.partial")
