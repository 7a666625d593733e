"""Does the double-buffered ring hide its K/V transfers behind the tiles? Measured under MPI, in one run.

Run it as ``python bench/overlap.py`` (it relaunches itself as ``mpiexec -n RANKS python -m mpi4py
bench/overlap.py ...`` with the mpiexec next to this Python), or launch it yourself::

    mpiexec -n 4 python -m mpi4py bench/overlap.py [--quick]

Three schedules of the same forward pass run interleaved, on the same inputs, ``--repeats`` times each:

double-buffered
    ``refimpl.ring.ring_attention`` with ``comm.progress`` turned into a no-op: at step t the receive of
    step t+1's K/V and the send of the current K/V are posted *before* the tiles of step t run, then
    waited on, and MPI is not entered in between.
double-buffered + progress
    ``ring_attention`` as it ships: it calls ``comm.progress()`` (one ``MPI_Iprobe``) after every tile.
    MPI libraries without a progress thread (MPICH and Open MPI by default) move a large,
    rendezvous-protocol message only while a rank is inside an MPI call, so without it a "non-blocking"
    transfer may not start until the wait. The difference between the two shows how much that exposes.
blocking
    the same tiles (``refimpl.blockwise.attend_shard``, in the same order) but the K/V exchange is a
    blocking ``comm.sendrecv`` *after* the step's tiles: nothing overlaps. Its results are checked to be
    bitwise identical to the double-buffered ones.

Reported per rank (medians over the repeats; each run starts after a barrier)::

    wall        seconds from the barrier to the rank's result
    wait        seconds the rank spent blocked in MPI waits (MPIComm.wait_seconds) during the run
    comm        for the blocking schedule: seconds in sendrecv, i.e. its whole, exposed, communication
    hidden      1 - wait(double-buffered) / comm(blocking)
                the fraction of the blocking schedule's communication time that the double-buffered
                schedule no longer waits for (1: all hidden; 0: nothing gained; negative: it waited longer)
    speedup     wall(blocking) / wall(double-buffered)

On a machine with fewer cores than ranks (``mpiexec`` oversubscribes), waits also include the time a
rank's neighbour was descheduled, and load imbalance (a causal mask) shows up as wait in both schedules:
compare the two schedules with each other, not with a dedicated cluster. The defaults (P=4, N=4096, 8
heads, D=64, fp32, no mask) run in well under a minute on 2 cores; ``--quick`` in a few seconds.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.pin_blas_env(1)

import numpy as np  # noqa: E402

from refimpl import tile, validate  # noqa: E402
from refimpl.blockwise import attend_shard  # noqa: E402
from refimpl.cli import DTYPES, add_problem_options  # noqa: E402
from refimpl.layouts import Contiguous  # noqa: E402
from refimpl.masks import mask_for  # noqa: E402
from refimpl.ring import ring_attention  # noqa: E402
from refimpl.schedule import FORWARD_KV, kv_source, recv_from, send_to, tag  # noqa: E402

VARIANTS = ("double-buffered", "double-buffered + progress", "blocking")


class _WithoutProgress:
    """The same communicator with ``progress()`` as a no-op: the ring as it would run without polling MPI."""

    def __init__(self, comm):
        self._comm = comm

    def progress(self):
        pass

    def __getattr__(self, name):
        return getattr(self._comm, name)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ranks", type=int, default=4,
                   help="ranks to launch with mpiexec (ignored when already started by an MPI launcher)")
    add_problem_options(p, seq=4096, causal=False,
                        causal_help="causal mask (off by default: with contiguous shards it adds load imbalance, "
                                    "which shows up as wait in both schedules)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each schedule")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each schedule first")
    p.add_argument("--quick", action="store_true", help="N=1024, 3 repeats: a smoke test of a few seconds")
    p.add_argument("--json", action="store_true", help="print the per-rank numbers as JSON instead of a table")
    return p


# -- the blocking schedule ------------------------------------------------------------------------------

def blocking_ring(q, k, v, comm, *, causal, block_q, block_k):
    """Forward ring attention with nothing in flight: each step computes its tiles, then ``sendrecv``.

    The same ``attend_shard`` calls in the same order, on the same accumulators, as ``ring_attention``, so
    the same bits come out (``run_rank`` checks it).
    """
    P, r = comm.size, comm.rank
    B, n, Hq, D = q.shape
    Hkv = k.shape[2]
    layout = Contiguous(comm.allreduce(n), P)
    acc = validate.accumulation_dtype(q.dtype)
    mask, scale, ws = mask_for(causal), validate.check_scale(None, D), tile.Workspace(acc)
    o, lse = np.zeros(q.shape, acc), np.full((B, Hq, n), -np.inf, np.float64)   # running lse: float64 (tile.merge)
    flat = [np.empty(2 * B * max(layout.lengths) * Hkv * D, k.dtype) for _ in range(2)]

    def shard_view(buf, owner):          # the front of a flat buffer as owner's (2, B, n, Hkv, D) K/V
        m = layout.length(owner)
        return buf[: 2 * B * m * Hkv * D].reshape(2, B, m, Hkv, D)

    current = shard_view(flat[0], r)
    current[0], current[1] = k, v
    for step in range(P):
        attend_shard(o, lse, q, current[0], current[1], layout.positions(r),
                     layout.positions(kv_source(r, step, P)), mask, scale, block_q, block_k, ws)
        if step + 1 < P:
            following = shard_view(flat[(step + 1) % 2], kv_source(r, step + 1, P))
            comm.sendrecv(current, send_to(r, P), following, recv_from(r, P), tag(FORWARD_KV, step))
            current = following
    return o.astype(q.dtype, copy=False), lse.astype(acc, copy=False)


# -- one rank -------------------------------------------------------------------------------------------

def run_rank(args):
    from refimpl.comm.mpi import MPIComm, install_abort_hook

    comm = MPIComm()
    install_abort_hook(comm)
    P, r = comm.size, comm.rank
    if P > args.seq:
        raise ValueError(f"{P} ranks exceed --seq {args.seq}")
    layout = Contiguous(args.seq, P)
    n, Hkv, dtype = layout.length(r), args.kv_heads, DTYPES[args.dtype]
    rng = np.random.default_rng([args.seq, r])
    q = rng.standard_normal((args.batch, n, args.heads, args.dim)).astype(dtype)
    k, v = (rng.standard_normal((args.batch, n, Hkv, args.dim)).astype(dtype) for _ in range(2))
    options = dict(causal=args.causal, block_q=args.block_q, block_k=args.block_k)

    quiet = _WithoutProgress(comm)
    runs = {
        "double-buffered": lambda: ring_attention(q, k, v, quiet, **options),
        "double-buffered + progress": lambda: ring_attention(q, k, v, comm, **options),
        "blocking": lambda: blocking_ring(q, k, v, comm, **options),
    }
    outputs = {}
    samples = {name: {"wall": [], "wait": []} for name in VARIANTS}
    for i in range(args.warmup + args.repeats):
        for name in VARIANTS:
            comm.barrier()
            wait0, t0 = comm.wait_seconds, time.perf_counter()
            result = runs[name]()
            wall = time.perf_counter() - t0
            if i < args.warmup:
                outputs[name] = (result.out, result.lse) if hasattr(result, "out") else result
            else:
                samples[name]["wall"].append(wall)
                samples[name]["wait"].append(comm.wait_seconds - wait0)
    reference = outputs[VARIANTS[0]]
    identical = all(np.array_equal(a, b) for name in VARIANTS[1:] for a, b in zip(reference, outputs[name]))
    mine = {name: {key: statistics.median(values) for key, values in s.items()} for name, s in samples.items()}
    mine["identical"] = identical
    mine["message_bytes"] = 2 * args.batch * n * Hkv * args.dim * np.dtype(dtype).itemsize
    everyone = comm.allgather(mine)
    if r == 0:
        report(args, comm, everyone)
    return 0 if all(e["identical"] for e in everyone) else 1


def _hidden(wait, comm_blocking):
    return 1.0 - wait / comm_blocking if comm_blocking > 0 else float("nan")


def report(args, comm, everyone):
    P = len(everyone)
    rows, per_rank = [], []
    for r, e in enumerate(everyone):
        db, dbp, bl = (e[name] for name in VARIANTS)
        numbers = dict(rank=r, wall_double_buffered=db["wall"], wall_progress=dbp["wall"], wall_blocking=bl["wall"],
                       wait_double_buffered=db["wait"], wait_progress=dbp["wait"], comm_blocking=bl["wait"],
                       hidden=_hidden(db["wait"], bl["wait"]), hidden_progress=_hidden(dbp["wait"], bl["wait"]),
                       speedup=bl["wall"] / db["wall"], speedup_progress=bl["wall"] / dbp["wall"],
                       identical=e["identical"])
        per_rank.append(numbers)
    # The job's time is its slowest rank's.
    slowest = {key: max(x[key] for x in per_rank) for key in ("wall_double_buffered", "wall_progress",
                                                              "wall_blocking")}
    total = dict(wait_double_buffered=sum(x["wait_double_buffered"] for x in per_rank),
                 wait_progress=sum(x["wait_progress"] for x in per_rank),
                 comm_blocking=sum(x["comm_blocking"] for x in per_rank))
    summary = dict(
        ranks=P, mpi=" ".join(comm.MPI.Get_library_version().split()[:3]), seq=args.seq, batch=args.batch,
        heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, dtype=args.dtype, causal=args.causal,
        block_q=args.block_q, block_k=args.block_k, repeats=args.repeats, cores=os.cpu_count(),
        message_bytes=[e["message_bytes"] for e in everyone], per_rank=per_rank,
        job=dict(**slowest, speedup=slowest["wall_blocking"] / slowest["wall_double_buffered"],
                 speedup_progress=slowest["wall_blocking"] / slowest["wall_progress"],
                 hidden=_hidden(total["wait_double_buffered"], total["comm_blocking"]),
                 hidden_progress=_hidden(total["wait_progress"], total["comm_blocking"]), **total),
        identical=all(x["identical"] for x in per_rank))
    if args.json:
        print(json.dumps(summary))
        return
    fs, pct = common.fmt_s, (lambda x: f"{100 * x:.0f}%")
    print(f"overlap: P={P} ranks on {os.cpu_count()} cores ({summary['mpi']}), N={args.seq}, B={args.batch}, "
          f"Hq={args.heads}, Hkv={args.kv_heads}, D={args.dim}, {args.dtype}, "
          f"{'causal' if args.causal else 'no mask'}, tiles {args.block_q}x{args.block_k}, "
          f"median of {args.repeats}")
    print(f"K/V message per hop: {common.fmt_bytes(max(summary['message_bytes']))}, {P - 1} hops per run\n")
    headers = ["rank", "wall db", "wall db+p", "wall blocking", "wait db", "wait db+p", "comm blocking",
               "hidden db", "hidden db+p", "speedup db", "speedup db+p"]
    rows = [[x["rank"], fs(x["wall_double_buffered"]), fs(x["wall_progress"]), fs(x["wall_blocking"]),
             fs(x["wait_double_buffered"]), fs(x["wait_progress"]), fs(x["comm_blocking"]),
             pct(x["hidden"]), pct(x["hidden_progress"]), f"{x['speedup']:.2f}x", f"{x['speedup_progress']:.2f}x"]
            for x in per_rank]
    j = summary["job"]
    rows.append(["job", fs(j["wall_double_buffered"]), fs(j["wall_progress"]), fs(j["wall_blocking"]),
                 fs(j["wait_double_buffered"]), fs(j["wait_progress"]), fs(j["comm_blocking"]),
                 pct(j["hidden"]), pct(j["hidden_progress"]), f"{j['speedup']:.2f}x",
                 f"{j['speedup_progress']:.2f}x"])
    print(common.table(headers, rows))
    print("\ndb = double-buffered ring (refimpl.ring.ring_attention) with comm.progress() disabled; db+p = the "
          "ring as shipped, MPI progress polled after every tile;\nblocking = same tiles, blocking sendrecv after each step's compute. wall: median "
          "seconds from a barrier to the\nrank's result; wait: seconds blocked in MPI waits; comm blocking: "
          "seconds in sendrecv (all of the blocking\nschedule's communication, exposed). hidden = 1 - wait / "
          "comm blocking; speedup = wall blocking / wall.\nRow 'job': walls of the slowest rank, waits summed "
          "over ranks.")
    print(f"results of the three schedules bitwise identical on every rank: {'yes' if summary['identical'] else 'NO'}")


# -- launching ------------------------------------------------------------------------------------------

def relaunch(args, argv):
    """Not started by an MPI launcher: run this script under ``mpiexec -n --ranks`` and return its status."""
    here = Path(sys.executable).parent / "mpiexec"
    mpiexec = str(here) if here.exists() else shutil.which("mpiexec")
    if mpiexec is None:
        sys.exit("bench/overlap.py needs mpiexec (pip install 'ringattn[mpi]'), or run it as "
                 "`mpiexec -n 4 python -m mpi4py bench/overlap.py`")
    cmd = [mpiexec, "-n", str(args.ranks), sys.executable, "-m", "mpi4py", str(Path(__file__).resolve())] + argv
    print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.call(cmd, env=dict(os.environ))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.quick:
        args.seq, args.repeats = min(args.seq, 1024), min(args.repeats, 3)
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        parser().error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.repeats < 1 or args.warmup < 1:
        parser().error("--repeats and --warmup must be at least 1 (the warmup run is the bitwise check)")
    try:
        from refimpl.comm.mpi import detect_launch
    except ImportError as exc:
        sys.exit(str(exc))
    if detect_launch()[0] is None:
        return relaunch(args, argv)
    return run_rank(args)


if __name__ == "__main__":
    sys.exit(main())
