"""Run under mpiexec: the ring over MPI with device buffers staged through host mirrors (HostDevice).

usage: mpi_staged.py DIR    reads DIR/inputs.npz; writes DIR/rank<R>.npz (out, lse, dq, dk, dv) and, on
rank 0, DIR/decision.json (the collective CUDA-aware decision of gpu/transport.py).
"""

import json
import sys
from pathlib import Path

import numpy as np

from gpu.transport import HostDevice, device_comm
from refimpl import ring_attention, ring_attention_backward
from refimpl.comm.mpi import MPIComm
from refimpl.layouts import Contiguous

directory = Path(sys.argv[1])
comm = device_comm(MPIComm(), HostDevice())
if comm.rank == 0:
    (directory / "decision.json").write_text(json.dumps({"path": comm.path, "reason": comm.decision.reason}))
data = np.load(directory / "inputs.npz")
layout = Contiguous(data["q"].shape[1], comm.size)
q, k, v, dout = (np.ascontiguousarray(layout.shard(data[x], comm.rank)) for x in ("q", "k", "v", "dout"))
options = dict(causal=True, block_q=16, block_k=8)
fwd = ring_attention(q, k, v, comm, **options)
bwd = ring_attention_backward(q, k, v, fwd.out, fwd.lse, dout, comm, **options)
np.savez(directory / f"rank{comm.rank}.npz", out=fwd.out, lse=fwd.lse, dq=bwd.dq, dk=bwd.dk, dv=bwd.dv)
