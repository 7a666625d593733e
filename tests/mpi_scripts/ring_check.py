"""Run under mpiexec: ring_attention and ring_attention_backward over MPIComm.

usage: ring_check.py DIR

DIR/cases.json lists the cases ({"name", "causal", "block_q", "block_k", "scale"}, and optionally "layout",
"window", "cu_seqlens"); DIR/<name>.npz holds the full q, k, v, dout (and optionally segment_ids, (B, N)).
Each rank loads the full arrays, takes its shard of the case's layout (default contiguous), runs forward
and backward, and writes DIR/<name>.rank<R>.npz with out, lse, dq, dk, dv (in shard order) and its per-step
trace numbers.
"""

import json
import sys
from pathlib import Path

import numpy as np

from refimpl import ring_attention, ring_attention_backward
from refimpl.comm.mpi import MPIComm
from refimpl.layouts import layout_for

directory = Path(sys.argv[1])
comm = MPIComm()
for case in json.loads((directory / "cases.json").read_text()):
    data = np.load(directory / f"{case['name']}.npz")
    layout = layout_for(case.get("layout", "contiguous"), data["q"].shape[1], comm.size)
    q, k, v, dout = (np.ascontiguousarray(layout.shard(data[x], comm.rank)) for x in ("q", "k", "v", "dout"))
    options = dict(causal=case["causal"], scale=case["scale"], block_q=case["block_q"], block_k=case["block_k"],
                   layout=layout.name, window=case.get("window"), cu_seqlens=case.get("cu_seqlens"),
                   segment_ids=data["segment_ids"] if "segment_ids" in data else None)
    before = comm.bytes_sent
    fwd = ring_attention(q, k, v, comm, **options)
    bwd = ring_attention_backward(q, k, v, fwd.out, fwd.lse, dout, comm, **options)
    trace = fwd.trace + bwd.trace
    np.savez(directory / f"{case['name']}.rank{comm.rank}.npz", out=fwd.out, lse=fwd.lse, dq=bwd.dq, dk=bwd.dk,
             dv=bwd.dv, trace_bytes=np.array([t.bytes_sent for t in trace], np.int64),
             trace_wait=np.array([t.wait_s for t in trace]), bytes_sent=np.int64(comm.bytes_sent - before))
print(f"ring ok rank {comm.rank} of {comm.size}", flush=True)
