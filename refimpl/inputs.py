"""Deterministic inputs that any rank can build for its own positions alone.

The values at global token position t depend only on (seed, tensor name, t // CHUNK) and the shape
(B, H, D), never on N or on the number of ranks. So a rank can generate exactly its shard, and the
global tensors are identical whether the run uses 1 rank, 4 simulated ranks or 64 MPI processes.
"""

import numpy as np

CHUNK = 128
_TENSORS = {"q": 0, "k": 1, "v": 2, "dout": 3}


def generate(name, B, H, D, start, stop, seed, dtype):
    """Standard-normal values of tensor ``name`` at positions start..stop-1: (B, stop - start, H, D)."""
    if name not in _TENSORS:
        raise ValueError(f"name must be one of {sorted(_TENSORS)}, got {name!r}")
    out = np.empty((B, stop - start, H, D), dtype)
    for chunk in range(start // CHUNK, (stop - 1) // CHUNK + 1 if stop > start else start // CHUNK):
        values = np.random.default_rng([seed, _TENSORS[name], chunk]).standard_normal((B, CHUNK, H, D))
        lo, hi = max(start, chunk * CHUNK), min(stop, (chunk + 1) * CHUNK)
        out[:, lo - start:hi - start] = values[:, lo - chunk * CHUNK:hi - chunk * CHUNK]
    return out
