"""Run under mpiexec on GPUs: ring attention with the GPU engine over MPIComm.

usage: mpi_gpu_ring.py DIR    reads DIR/inputs.npz (q, k, v, dout as uint16 bfloat16 bits, and options);
writes DIR/rank<R>.npz (out, lse, dq, dk, dv; bfloat16 as uint16 bits) and, on rank 0, DIR/decision.json.

With RINGATTN_TEST_MANAGED=1 every CuPy allocation is CUDA managed memory: an MPI that cannot read device
memory can still read those buffers from the host, which is how the tests exercise the CUDA-aware path
(``RINGATTN_CUDA_AWARE=1``) with the PyPI MPICH. Keep such runs small.
"""

import json
import os
import sys
from pathlib import Path

import cupy as cp
import numpy as np

from gpu.device import select_device
from gpu.engine import CupyEngine
from refimpl import ring_attention, ring_attention_backward, validate
from refimpl.comm.mpi import MPIComm
from refimpl.layouts import Contiguous

if os.environ.get("RINGATTN_TEST_MANAGED") == "1":
    cp.cuda.set_allocator(cp.cuda.MemoryPool(cp.cuda.malloc_managed).malloc)

directory = Path(sys.argv[1])
mpi = MPIComm()
device, local_rank, local_size = select_device(mpi)
engine = CupyEngine()
comm = engine.wrap(mpi)
if comm.rank == 0:
    (directory / "decision.json").write_text(json.dumps({"path": comm.path, "reason": comm.decision.reason,
                                                         "local_size": local_size, "device": device}))
data = np.load(directory / "inputs.npz")
layout = Contiguous(data["q"].shape[1], comm.size)
shards = [engine.asarray(np.ascontiguousarray(layout.shard(data[x], comm.rank)).view(validate.BFLOAT16))
          for x in ("q", "k", "v", "dout")]
options = dict(causal=bool(data["causal"]), block_q=int(data["block_q"]), block_k=int(data["block_k"]), engine=engine)
q, k, v, dout = shards
fwd = ring_attention(q, k, v, comm, **options)
bwd = ring_attention_backward(q, k, v, fwd.out, fwd.lse, dout, comm, **options)
host = {name: engine.to_host(x) for name, x in
        dict(out=fwd.out, lse=fwd.lse, dq=bwd.dq, dk=bwd.dk, dv=bwd.dv).items()}
np.savez(directory / f"rank{comm.rank}.npz",
         **{n: (x.view(np.uint16) if x.dtype == validate.BFLOAT16 else x) for n, x in host.items()})
