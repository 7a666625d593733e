"""Run under mpiexec: MPIComm's point-to-point and collectives, checked on every rank.

Prints "comm ok rank R of P" on success; any failed assertion aborts the job (python -m mpi4py).
"""

import numpy as np

from refimpl.comm import CommError
from refimpl.comm.mpi import MPIComm, launched_world_size

comm = MPIComm()
r, P = comm.rank, comm.size
assert launched_world_size() == P, (launched_world_size(), P)
right, left = (r + 1) % P, (r - 1) % P

# Ring shift, double-buffered like the ring: every dtype travels bit for bit.
for dtype in (np.float16, np.float32, np.float64, np.int64):
    cur = np.full((2, 3, 5), r, dtype)
    bufs = [cur, np.empty_like(cur)]
    for step in range(P):
        assert (bufs[step % 2] == (r - step) % P).all(), (dtype, step, bufs[step % 2])
        nxt = bufs[(step + 1) % 2]
        reqs = [comm.irecv(nxt, left, step), comm.isend(bufs[step % 2], right, step)]
        comm.waitall(reqs)
    assert (bufs[P % 2] == r).all()

# A non-trivial payload: exact bits, NaN payloads and signed zeros included.
payload = np.random.default_rng(r).standard_normal(1001)
payload[:3] = [np.nan, -0.0, np.inf]
got = np.empty_like(payload)
comm.sendrecv(payload, right, got, left, 7)
expect = np.random.default_rng(left).standard_normal(1001)
expect[:3] = [np.nan, -0.0, np.inf]
assert got.view(np.uint64).tolist() == expect.view(np.uint64).tolist()

# Byte and message counting: 4 dtypes x P steps, plus one sendrecv.
sizes = sum(2 * 3 * 5 * np.dtype(d).itemsize for d in (np.float16, np.float32, np.float64, np.int64))
assert comm.bytes_sent == P * sizes + payload.nbytes, comm.bytes_sent
assert comm.messages_sent == 4 * P + 1, comm.messages_sent
assert comm.wait_seconds >= 0.0

# Collectives.
assert comm.allgather(r) == list(range(P))
assert comm.allgather({"rank": r}) == [{"rank": i} for i in range(P)]
assert comm.allreduce(r) == P * (P - 1) // 2
assert comm.allreduce(r, "sum") == P * (P - 1) // 2
assert comm.allreduce(r + 0.5, "max") == P - 0.5
assert comm.allreduce(r, "min") == 0
assert np.array_equal(comm.allreduce(np.arange(3) * r), np.arange(3) * (P * (P - 1) // 2))
try:
    comm.allreduce(1, "prod")
except ValueError as exc:
    assert "op must be one of" in str(exc)
else:
    raise AssertionError("allreduce accepted an unknown op")
comm.barrier()

# Bad buffers and peers are refused before anything is posted.
for bad in (np.zeros((4, 4))[:, ::2], [1.0, 2.0]):
    try:
        comm.isend(bad, right, 0)
    except CommError as exc:
        assert "C-contiguous" in str(exc)
    else:
        raise AssertionError("isend accepted a non-contiguous buffer")
try:
    comm.irecv(np.zeros(3), P, 0)
except CommError as exc:
    assert "outside" in str(exc)
else:
    raise AssertionError("irecv accepted a peer outside the communicator")

# A message whose size differs from the receive buffer is an error naming ranks and message, both ways.
for extra in (-8, 8):
    send = np.zeros(16 + extra // 8)
    recv = np.zeros(16)
    rreq = comm.irecv(recv, left, 3 * 5 + 1)
    sreq = comm.isend(send, right, 3 * 5 + 1)
    try:
        comm.wait(rreq)
    except CommError as exc:
        text = str(exc)
        assert f"from rank {left} to rank {r}" in text and "backward K/V of step 5" in text, text
        assert "128" in text, text
    else:
        raise AssertionError(f"a {send.nbytes}-byte message into a 128-byte buffer passed")
    comm.wait(sreq)
    comm.barrier()

print(f"comm ok rank {r} of {P}", flush=True)
