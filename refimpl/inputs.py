"""Deterministic inputs that any rank can build for its own positions alone.

The values at global token position t depend only on (seed, tensor name, t // CHUNK) and the shape
(B, H, D), never on N, on the number of ranks or on the layout. So a rank can generate exactly its shard,
and the global tensors are identical whether the run uses 1 rank, 4 simulated ranks or 64 MPI processes,
cut contiguously, zigzag or striped. A rank draws every chunk its positions touch: a contiguous or zigzag
shard touches about n / CHUNK chunks, a striped one nearly all N / CHUNK (more drawing, the same memory:
one chunk at a time).
"""

import numpy as np

CHUNK = 128
_TENSORS = {"q": 0, "k": 1, "v": 2, "dout": 3}


def generate(name, B, H, D, start, stop, seed, dtype):
    """Standard-normal values of tensor ``name`` at positions start..stop-1: (B, stop - start, H, D)."""
    return generate_at(name, B, H, D, np.arange(start, stop), seed, dtype)


def generate_at(name, B, H, D, positions, seed, dtype):
    """Standard-normal values of tensor ``name`` at the global ``positions`` (int array), in that order:
    (B, len(positions), H, D)."""
    if name not in _TENSORS:
        raise ValueError(f"name must be one of {sorted(_TENSORS)}, got {name!r}")
    positions = np.asarray(positions, np.int64)
    out = np.empty((B, len(positions), H, D), dtype)
    chunks = positions // CHUNK
    order = np.argsort(chunks, kind="stable")
    touched, first = np.unique(chunks[order], return_index=True)
    for chunk, rows in zip(touched, np.split(order, first[1:])):       # rows: the output rows in this chunk
        values = np.random.default_rng([seed, _TENSORS[name], int(chunk)]).standard_normal((B, CHUNK, H, D))
        out[:, rows] = values[:, positions[rows] - chunk * CHUNK]
    return out
