"""Run under mpiexec: ring_attention and ring_attention_backward over MPIComm.

usage: ring_check.py DIR

DIR/cases.json lists the cases ({"name", "causal", "block_q", "block_k", "scale"}); DIR/<name>.npz holds
the full q, k, v, dout. Each rank loads the full arrays, takes its contiguous shard, runs forward and
backward, and writes DIR/<name>.rank<R>.npz with out, lse, dq, dk, dv and its per-step trace numbers.
"""

import json
import sys
from pathlib import Path

import numpy as np

from refimpl import ring_attention, ring_attention_backward
from refimpl.comm.mpi import MPIComm
from refimpl.layouts import Contiguous

directory = Path(sys.argv[1])
comm = MPIComm()
for case in json.loads((directory / "cases.json").read_text()):
    data = np.load(directory / f"{case['name']}.npz")
    layout = Contiguous(data["q"].shape[1], comm.size)
    q, k, v, dout = (np.ascontiguousarray(layout.shard(data[x], comm.rank)) for x in ("q", "k", "v", "dout"))
    options = dict(causal=case["causal"], scale=case["scale"], block_q=case["block_q"], block_k=case["block_k"])
    before = comm.bytes_sent
    fwd = ring_attention(q, k, v, comm, **options)
    bwd = ring_attention_backward(q, k, v, fwd.out, fwd.lse, dout, comm, **options)
    trace = fwd.trace + bwd.trace
    np.savez(directory / f"{case['name']}.rank{comm.rank}.npz", out=fwd.out, lse=fwd.lse, dq=bwd.dq, dk=bwd.dk,
             dv=bwd.dv, trace_bytes=np.array([t.bytes_sent for t in trace], np.int64),
             trace_wait=np.array([t.wait_s for t in trace]), bytes_sent=np.int64(comm.bytes_sent - before))
print(f"ring ok rank {comm.rank} of {comm.size}", flush=True)
