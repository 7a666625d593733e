"""``ringattn run``: the main job. Ring attention over simulated or MPI ranks, checked against the oracle.

Every rank runs ``run_rank``: it builds (or memory-maps) only its own shard, runs ``ring_attention`` (and
``ring_attention_backward``), and joins the collective check and statistics. Simulated ranks are threads
over the in-process communicator; under ``mpiexec``/``srun`` each process is one rank over mpi4py. It is the
same function either way, so what the simulation shows is what the cluster runs.
"""

import argparse
import json
import os
import sys
import threading
import time

import numpy as np

from . import check, inputs, validate
from .blockwise import BLOCK_K, BLOCK_Q
from .engine import NumpyEngine
from .layouts import Contiguous
from .masks import mask_for
from .naive import naive_attention, naive_attention_backward
from .ring import ring_attention, ring_attention_backward
from .schedule import kv_source, plan_tiles

DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}
if validate.BFLOAT16 is not None:
    DTYPES["bf16"] = validate.BFLOAT16          # --device gpu only
FULL_CHECK_SCORES = 1 << 22          # the full oracle runs when B * Hq * N^2 is at most this


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_problem_options(p, *, seq, causal, causal_help="causal mask"):
    """The options that shape one attention problem, shared by ``ringattn run`` and the benchmarks."""
    p.add_argument("--seq", type=_positive, default=seq, help="sequence length N")
    p.add_argument("--batch", type=_positive, default=1, help="batch size B")
    p.add_argument("--heads", type=_positive, default=8, help="query heads Hq")
    p.add_argument("--kv-heads", type=_positive, default=None, help="key/value heads Hkv (GQA); default: --heads")
    p.add_argument("--dim", type=_positive, default=64, help="head dimension D")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="input dtype")
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=causal, help=causal_help)
    p.add_argument("--block-q", type=_positive, default=BLOCK_Q, help="query rows per tile")
    p.add_argument("--block-k", type=_positive, default=BLOCK_K, help="key columns per tile")


def parser():
    p = argparse.ArgumentParser(prog="ringattn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run ring attention and check it against the float64 oracle",
        description="Run ring attention on deterministic random inputs and compare it with the float64 "
                    "oracle (fully when small, on sampled rows otherwise). Without MPI it simulates --ranks "
                    "ranks as threads; under `mpiexec -n P ringattn run` each process is one rank.")
    run.add_argument("--ranks", type=_positive, default=4,
                     help="simulated ranks (ignored under an MPI launch with more than one process)")
    run.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                     help="where every rank computes: NumPy on the CPU, or CuPy on a GPU (simulated ranks share "
                          "one GPU; MPI ranks take a GPU by node-local rank). bf16 needs gpu")
    run.add_argument("--kernels", choices=("fused", "matmul"), default="fused",
                     help="with --device gpu: the fused flash-attention kernels, or cuBLAS tiles (the baseline; "
                          "fp64 and head dims over 128 always use it)")
    add_problem_options(run, seq=16384, causal=True)
    run.add_argument("--seed", type=int, default=0, help="seed of the inputs (values depend on seed and position only)")
    run.add_argument("--backward", action="store_true", help="also run the backward ring and check dq, dk, dv")
    run.add_argument("--samples", type=_positive, default=64,
                     help="query rows to check when N is too large for the full oracle (plus every shard's first and last row)")
    run.add_argument("--check", action="store_true",
                     help="exit with status 1 if an error exceeds the tolerance of the dtype "
                          f"({', '.join(f'{k}: {v:g}' for k, v in check.TOLERANCE.items())})")
    run.add_argument("--json", action="store_true", help="print a machine-readable summary instead of tables")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr for runs longer than 2 s (default: when stderr is a terminal)")
    run.add_argument("--input", metavar="DIR", default=None,
                     help="memory-map inputs from DIR/{q,k,v[,dout]}.RANK.npy instead of generating them")
    run.add_argument("--output", metavar="DIR", default=None,
                     help="write each rank's DIR/{out,lse[,dq,dk,dv]}.RANK.npy")
    run.add_argument("--timeout", type=float, default=600.0,
                     help="simulated ranks: longest wait for one message before it is reported as a deadlock")
    return p


class Progress:
    """A tile counter drawn as a bar on stderr once a run has lasted two seconds."""

    def __init__(self, total, enabled):
        self.total, self.enabled, self.done = max(total, 1), enabled, 0
        self.start = self.drawn = time.monotonic()
        self.lock = threading.Lock()

    def __call__(self):
        with self.lock:
            self.done += 1
            now = time.monotonic()
            if self.enabled and now - self.start > 2.0 and (now - self.drawn > 0.1 or self.done == self.total):
                self.drawn = now
                frac = self.done / self.total
                sys.stderr.write(f"\r[{'#' * int(30 * frac):<30}] {100 * frac:5.1f}%  {now - self.start:6.1f} s")
                sys.stderr.flush()

    def close(self):
        if self.enabled and self.drawn > self.start:
            sys.stderr.write("\n")


def count_tiles(layout, mask, block_q, block_k, ranks):
    """Tiles the given ranks will compute over all ring steps (one pass: forward, or backward)."""
    return sum(plan_tiles(layout.positions(r), layout.positions(kv_source(r, t, layout.P)), mask,
                          block_q, block_k).computed for r in ranks for t in range(layout.P))


def _oracle_input(x):
    """Inputs as the float64 oracle takes them: bfloat16 widened to float32 (exactly)."""
    return x.astype(np.float32) if x is not None and x.dtype == validate.BFLOAT16 else x


def _load_shard(args, name, rank, shape, dtype):
    if args.input is None:
        B, Hq, Hkv, D = shape
        start, stop = int(args.layout.starts[rank]), int(args.layout.starts[rank + 1])
        return inputs.generate(name, B, Hq if name in ("q", "dout") else Hkv, D, start, stop, args.seed, dtype)
    path = os.path.join(args.input, f"{name}.{rank}.npy")
    if not os.path.exists(path):
        raise ValueError(f"--input: {path} does not exist (expected {{q,k,v[,dout]}}.RANK.npy for every rank)")
    return np.load(path, mmap_mode="r")


def run_rank(comm, args, engine, on_tile=None):
    """One rank of the main job on ``engine`` (``comm`` already wrapped by it). Returns the summary dict
    (complete on rank 0)."""
    r, P = comm.rank, comm.size
    dtype = DTYPES[args.dtype]
    shape = (args.batch, args.heads, args.kv_heads or args.heads, args.dim)
    q, k, v = (_load_shard(args, name, r, shape, dtype) for name in ("q", "k", "v"))
    dout = _load_shard(args, "dout", r, shape, dtype) if args.backward else None
    on_engine = [engine.asarray(x) for x in (q, k, v)]
    opts = dict(causal=args.causal, block_q=args.block_q, block_k=args.block_k, on_tile=on_tile, engine=engine)
    comm.barrier()
    t0 = time.perf_counter()
    fwd = ring_attention(*on_engine, comm, **opts)
    t1 = time.perf_counter()
    bwd = None
    if args.backward:
        bwd = ring_attention_backward(*on_engine, fwd.out, fwd.lse, engine.asarray(dout), comm, **opts)
    t2 = time.perf_counter()
    results = dict(out=fwd.out, lse=fwd.lse, **({"dq": bwd.dq, "dk": bwd.dk, "dv": bwd.dv} if bwd else {}))
    results = {name: engine.to_host(x) for name, x in results.items()}
    if args.output is not None:
        os.makedirs(args.output, exist_ok=True)
        for name, x in results.items():
            np.save(os.path.join(args.output, f"{name}.{r}.npy"), x)
    q, k, v, dout = (_oracle_input(x) for x in (q, k, v, dout))

    layout, scale = args.layout, 1.0 / np.sqrt(args.dim)
    B, Hq, Hkv, _ = shape
    full = B * Hq * layout.N ** 2 <= FULL_CHECK_SCORES
    if full:
        everything = comm.allgather((q, k, v, dout) + tuple(results.values()))
        errors = _full_errors(everything, layout, args.causal, scale) if r == 0 else {}
        rows = layout.N
    else:
        sampled = check.sample_rows(layout, args.samples, args.seed)
        errors = check.sampled_errors(comm, sampled, layout.positions(r), q, k, v, results["out"], results["lse"],
                                      causal=args.causal, scale=scale, dout=dout, dq=results.get("dq"))
        rows = len(sampled)
    stats = comm.allgather(dict(trace=fwd.trace + (bwd.trace if bwd else []),
                                peak=max(fwd.peak_bytes, bwd.peak_bytes if bwd else 0),
                                sent=comm.bytes_sent, forward_s=t1 - t0, backward_s=t2 - t1,
                                rss=_peak_rss() if args.transport == "mpi" else None))
    if r != 0:
        return None
    tolerance = check.TOLERANCE[np.dtype(dtype).name]
    return dict(
        transport=args.transport, ranks=P, **engine.describe(), seq=layout.N, batch=B, heads=Hq, kv_heads=Hkv,
        dim=args.dim,
        dtype=args.dtype, causal=args.causal, block_q=args.block_q, block_k=args.block_k, seed=args.seed,
        backward=args.backward,
        time_s=dict(forward=max(s["forward_s"] for s in stats),
                    **({"backward": max(s["backward_s"] for s in stats)} if bwd else {})),
        check=dict(mode="full" if full else "sampled", rows=rows, tolerance=tolerance, errors=errors,
                   passed=all(e <= tolerance for e in errors.values())),
        peak_bytes=[s["peak"] for s in stats],
        naive_score_bytes=B * Hq * layout.N ** 2 * np.dtype(dtype).itemsize,
        bytes_sent=[s["sent"] for s in stats],
        **({"peak_rss_bytes": [s["rss"] for s in stats]} if args.transport == "mpi" else {}),
        overlap=_overlap([rec for s in stats for rec in s["trace"]]),
        trace=[rec.summary() for s in stats for rec in s["trace"]])


def _peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _overlap(trace):
    """Seconds in tiles and seconds blocked on messages after the tiles, summed over ranks and steps."""
    compute = sum(rec.compute_s for rec in trace)
    wait = sum(rec.wait_s for rec in trace)
    return dict(compute_s=compute, wait_s=wait, wait_fraction=wait / (compute + wait) if compute + wait else 0.0)


def _full_errors(everything, layout, causal, scale):
    """Every output against the full float64 oracle (small N only): shards concatenated on rank 0."""
    cat = [None if parts[0] is None else layout.unshard(list(parts), axis=2 if i == 5 else 1)
           for i, parts in enumerate(zip(*everything))]
    q, k, v, dout, out, lse = cat[:6]
    out_ref, lse_ref = naive_attention(q, k, v, causal=causal, scale=scale)
    errors = {"out": check.relative_error(out, out_ref), "lse": check.relative_error(lse, lse_ref)}
    if dout is not None:
        refs = naive_attention_backward(q, k, v, dout, causal=causal, scale=scale)
        errors.update({g: check.relative_error(x, ref) for g, x, ref in zip(("dq", "dk", "dv"), cat[6:], refs)})
    return errors


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def report(summary, out=None):
    """The human-readable report of a run (rank 0), on ``out`` (default: standard output)."""
    s, c = summary, summary["check"]
    w = (out or sys.stdout).write
    w(f"ring attention: {s['transport']} ranks={s['ranks']}  N={s['seq']} B={s['batch']} Hq={s['heads']} "
      f"Hkv={s['kv_heads']} D={s['dim']} {s['dtype']} {'causal' if s['causal'] else 'full'}  "
      f"tiles {s['block_q']}x{s['block_k']}\n")
    if s["engine"] != "numpy":
        w(f"engine: {s['engine']} on {s['device']}, kernels {s['kernels']}\n")
    if s.get("messages"):
        w(f"messages: {s['messages']['path']} ({s['messages']['reason']})\n")
    w("\n")
    for phase in ("forward", "backward"):
        recs = [x for x in s["trace"] if x["phase"] == phase]
        if not recs:
            continue
        w(f"{phase} schedule: kv shard held / tiles computed / tiles skipped, per step (rows) and rank (columns)\n")
        w("step " + "".join(f"{'rank ' + str(r):>14}" for r in range(s["ranks"])) + "\n")
        for step in range(s["ranks"]):
            row = sorted((x for x in recs if x["step"] == step), key=lambda x: x["rank"])
            w(f"{step:>4} " + "".join(f"{'kv%d %d/%d' % (x['kv_shard'], x['tiles'], x['skipped']):>14}" for x in row) + "\n")
        w("\n")
    times = ", ".join(f"{k} {v:.3f} s" for k, v in s["time_s"].items())
    w(f"time: {times} (slowest rank)\n")
    o = s["overlap"]
    w(f"message waits after compute: {o['wait_s']:.3f} s of {o['compute_s'] + o['wait_s']:.3f} s summed over ranks "
      f"({100 * o['wait_fraction']:.1f}%)\n")
    w(f"peak memory per rank: {', '.join(_bytes(b) for b in s['peak_bytes'])}"
      f"   naive attention's score matrix alone: {_bytes(s['naive_score_bytes'])} "
      f"({s['naive_score_bytes'] / max(s['peak_bytes']):.0f}x a rank's peak)\n")
    if "peak_rss_bytes" in s:
        w(f"peak RSS per rank: {', '.join(_bytes(b) for b in s['peak_rss_bytes'])}\n")
    w(f"bytes sent per rank: {', '.join(_bytes(b) for b in s['bytes_sent'])}\n\n")
    what = "all rows" if c["mode"] == "full" else f"{c['rows']} sampled rows"
    w(f"check against the float64 oracle ({what}), relative error max|x - ref| / max|ref|:\n")
    for name, err in c["errors"].items():
        w(f"  {name:<4} {err:.3e}  {'ok' if err <= c['tolerance'] else 'EXCEEDS'} (tolerance {c['tolerance']:g})\n")
    if c["mode"] == "sampled" and s["backward"]:
        w("  dk, dv are checked against the full oracle only when B*Hq*N^2 <= "
          f"{FULL_CHECK_SCORES}; the test suite covers them at every rank count\n")
    w(f"{'PASS' if c['passed'] else 'FAIL'}\n")


def _launched_size():
    try:
        from .comm.mpi import launched_world_size
    except ImportError:
        return 1
    return launched_world_size()


def _engine(args):
    """The engine class of ``--device`` (and ``--kernels``), or a usage error saying what is missing."""
    if args.device == "cpu":
        if args.dtype == "bf16":
            parser().error("--dtype bf16 needs --device gpu (the CPU reference takes fp16, fp32 and fp64)")
        return NumpyEngine
    try:
        from gpu.engine import CupyEngine
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy sees no CUDA device")
    except Exception as exc:             # noqa: BLE001 - no CuPy, no driver, no device: one usage error
        parser().error(f"--device gpu needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc}); "
                       "install CuPy with: pip install 'ringattn[gpu]'")
    return CupyEngine.configured(kernels=args.kernels)


def main(argv=None):
    args = parser().parse_args(argv)
    mpi_size = _launched_size()          # 1: not an MPI job of several ranks; 0: launched, size unknown
    args.transport = "simulated" if mpi_size == 1 else "mpi"
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        parser().error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    engine = _engine(args)
    comm = None
    if args.transport == "mpi":
        from .comm.mpi import MPIComm, install_abort_hook
        comm = MPIComm()
        install_abort_hook(comm)
        if args.device == "gpu":
            from gpu.device import select_device
            select_device(comm)
    P = comm.size if comm is not None else args.ranks
    if P > args.seq:
        parser().error(f"{P} ranks exceed --seq {args.seq}: every rank needs at least one token")
    args.layout = Contiguous(args.seq, P)
    mask = mask_for(args.causal)

    if comm is not None:
        show = comm.rank == 0 and (args.progress if args.progress is not None else sys.stderr.isatty())
        progress = Progress(count_tiles(args.layout, mask, args.block_q, args.block_k, [comm.rank])
                            * (2 if args.backward else 1), show)
        rank_engine = engine()
        summary = run_rank(rank_engine.wrap(comm), args, rank_engine, progress)
    else:
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = Progress(count_tiles(args.layout, mask, args.block_q, args.block_k, range(P))
                            * (2 if args.backward else 1), show)
        def rank_main(comm):
            rank_engine = engine()
            return run_rank(rank_engine.wrap(comm), args, rank_engine, progress)
        summary = engine.sim_world(P, args.timeout).run(rank_main)[0]
    progress.close()
    if summary is None:
        return 0
    if args.json:
        print(json.dumps(summary))
    else:
        report(summary)
    return 1 if args.check and not summary["check"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
