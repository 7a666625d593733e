"""Run under mpiexec: failure cases that must end the whole job quickly with a non-zero exit.

usage: fail_check.py MODE [hook] [errors=DIR]

MODE:
  raise     rank 1 raises RuntimeError at its first tile of ring step 1 (the message gives the moment on the
            time.monotonic() clock); the other ranks end up waiting for a message from it
  nan       rank 1's q shard contains a NaN: ring_attention rejects it collectively on every rank
  length    rank 1 holds two tokens too many (a mismatched shard file): rejected collectively
  dtype     rank 1's shard is float32, the others float64: rejected collectively
  empty     more ranks than tokens (P > N): the last rank's shard is empty, rejected collectively
  size      a receive buffer smaller than the message: CommError on the receiving rank

With "hook", ``install_abort_hook`` is installed, for runs under plain python (not python -m mpi4py).
With "errors=DIR", each rank that fails ring_attention also writes "ExceptionType: message" to
DIR/rank<R>.txt (the ranks' stderr streams interleave, so the test reads these instead).
"""

import itertools
import sys
import time

import numpy as np

from refimpl import ring_attention
from refimpl.comm.mpi import MPIComm, install_abort_hook

mode = sys.argv[1]
comm = MPIComm()
if "hook" in sys.argv[2:]:
    install_abort_hook(comm)
r, P = comm.rank, comm.size

if mode == "raise":
    tiles = itertools.count(1)              # shards of 8 tokens in tiles of 2 x 3: 4 x 3 tiles per ring step

    def fail_in_step_1():
        if next(tiles) == 4 * 3 + 1 and r == 1:
            raise RuntimeError(f"deliberate failure on rank 1 in ring step 1 (monotonic clock {time.monotonic():.6f})")

    rng = np.random.default_rng(r)
    q, k, v = (rng.standard_normal((1, 8, 2, 4)) for _ in range(3))
    ring_attention(q, k, v, comm, block_q=2, block_k=3, on_tile=fail_in_step_1)
    comm.recv(np.empty(4), 1, 99)          # never sent: only an abort ends this wait
    raise AssertionError("unreachable")

if mode == "size":
    if r == 0:
        comm.send(np.zeros(16), 1, 4)
    elif r == 1:
        comm.recv(np.zeros(8), 0, 4)
    comm.barrier()
    raise AssertionError("unreachable")

N = P - 1 if mode == "empty" else 4 * P + 1
rng = np.random.default_rng(0)
q, k, v = (rng.standard_normal((1, N, 2, 4)) for _ in range(3))
shards = [np.array_split(x, P, axis=1)[r] for x in (q, k, v)]
if r == 1 and mode == "nan":
    shards[0][0, 0, 0, 0] = np.nan
if r == 1 and mode == "length":
    shards = [np.concatenate([s, s[:, :2]], axis=1) for s in shards]
if r == 1 and mode == "dtype":
    shards = [s.astype(np.float32) for s in shards]
errors = [a.split("=", 1)[1] for a in sys.argv[2:] if a.startswith("errors=")]
try:
    ring_attention(*[np.ascontiguousarray(s) for s in shards], comm, block_q=2, block_k=3)
except Exception as exc:
    if errors:
        with open(f"{errors[0]}/rank{r}.txt", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
    raise
raise AssertionError(f"rank {r}: mode {mode} was not rejected")
