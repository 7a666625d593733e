"""ringattn: ring attention over simulated or MPI ranks against a float64 oracle; vectors, a model, traces.

``ringattn run`` is the main job. Every rank runs ``run_rank``: it builds (or memory-maps) only its own shard, runs ``ring_attention`` (and
``ring_attention_backward``), and joins the collective check and statistics. Simulated ranks are threads
over the in-process communicator; under ``mpiexec``/``srun`` each process is one rank over mpi4py. It is the
same function either way, so what the simulation shows is what the cluster runs.

``ringattn vectors`` (write golden vectors, ``vectors.py``) and ``ringattn check`` (judge a backend against
them, ``conformance.py``) are parsed and dispatched here too.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from . import (cases, check, conformance, inputs, model, plot, schedule, shardfiles, threads, tolerance, validate,
               vectors)
from .blockwise import BLOCK_K, BLOCK_Q
from .engine import NumpyEngine
from .layouts import LAYOUTS, layout_for
from .masks import check_window, mask_for
from .progress import Progress
from .ring import ring_attention, ring_attention_backward
from .schedule import kv_source, plan_ring, plan_tiles, ring_bytes

DTYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}
if validate.BFLOAT16 is not None:
    DTYPES["bf16"] = validate.BFLOAT16          # --device gpu only
FLAG_OF_DTYPE = {np.dtype(v).name if k != "bf16" else "bfloat16": k for k, v in DTYPES.items()}
PROBLEM = {"seq": 16384, "batch": 1, "heads": 8, "kv_heads": None, "dim": 64, "dtype": "fp32"}
# Options that do not shape the job, so ranks may differ in them: --ranks is ignored under MPI, and only
# rank 0 draws the progress bar.
RANK_LOCAL = ("ranks", "progress")
# Causal work is balanced by zigzag and striped shards (specs/schedule.md section 3). The demo's forward
# (N=16384, H=8, D=64, fp32, causal) under mpiexec -n 2, one rank per core: 1.42x faster with zigzag than
# contiguous in each of two runs of bench/balance.py (3.87 s against 5.48 s, 4.87 s against 6.91 s). Four
# simulated ranks sharing 2 cores do the same total work on the same cores, so there the layouts tie.
DEFAULT_LAYOUT = "zigzag"


class UsageError(Exception):
    """A bad command line. Exits with status 2 and the message; under MPI every rank exits (``main``)."""

    def __init__(self, message, usage=""):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse that raises ``UsageError`` instead of exiting, so an MPI rank can tell its peers first."""

    def error(self, message):
        raise UsageError(f"{self.prog}: error: {message}", self.format_usage())


def _positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _dtype_flag(text):
    """fp16/bf16/fp32/fp64, or NumPy's name for one of them."""
    return FLAG_OF_DTYPE.get(text, text)


def _seed(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text}")
    return value


def _seconds(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive, finite number of seconds, got {text}")
    return value


def _two_or_more(text):
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a number of ranks of at least 2 (the case files themselves "
                                         f"are the single-rank set), got {text}")
    return value


def add_problem_options(p, *, seq, causal, causal_help="causal mask", from_files=False):
    """The options that shape one attention problem, shared by ``ringattn run`` and the benchmarks.

    With ``from_files`` the shape options default to None, so ``ringattn run`` can tell a flag the user
    gave (which must agree with --input files) from a default (which the files replace)."""
    defaults = dict(PROBLEM, seq=seq)
    suffix = " (default: %s; with --input, the files')" if from_files else ""

    def default(name):
        return None if from_files else defaults[name]

    def helped(text, name):
        return text + (suffix % defaults[name] if from_files else "")

    p.add_argument("--seq", type=_positive, default=default("seq"), help=helped("sequence length N", "seq"))
    p.add_argument("--batch", type=_positive, default=default("batch"), help=helped("batch size B", "batch"))
    p.add_argument("--heads", type=_positive, default=default("heads"), help=helped("query heads Hq", "heads"))
    p.add_argument("--kv-heads", type=_positive, default=None,
                   help="key/value heads Hkv (GQA); default: --heads" + (", or the files'" if from_files else ""))
    p.add_argument("--dim", type=_positive, default=default("dim"), help=helped("head dimension D", "dim"))
    p.add_argument("--dtype", type=_dtype_flag, choices=sorted(DTYPES), default=default("dtype"),
                   help=helped("input dtype (NumPy's names float16, bfloat16, float32, float64 also work)", "dtype"))
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=causal, help=causal_help)
    p.add_argument("--block-q", type=_positive, default=BLOCK_Q, help="query rows per tile")
    p.add_argument("--block-k", type=_positive, default=BLOCK_K, help="key columns per tile")


def _cu_seqlens(text):
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints 0,A,B,...,N, got {text}") from None


def add_layout_options(p):
    """How the sequence is cut over the ranks (``layouts.py``) and the mask beyond --causal (``masks.py``),
    shared by ``ringattn run`` and ``trace``."""
    p.add_argument("--layout", choices=list(LAYOUTS), default=None,
                   help="which positions each rank holds: contiguous runs; zigzag (rank r holds chunks r and 2P-1-r "
                        f"of 2P); striped (rank r holds the tokens t = r mod P). Default: {DEFAULT_LAYOUT}, which "
                        "balances causal work; with --input, the files' layout, contiguous unless named")
    p.add_argument("--window", nargs=2, type=int, metavar=("LEFT", "RIGHT"), default=None,
                   help="sliding window (flash-attn's window_size): query i sees keys i-LEFT .. i+RIGHT, -1 = "
                        "unbounded on that side; with --causal, RIGHT is 0")
    p.add_argument("--cu-seqlens", type=_cu_seqlens, default=None, metavar="0,A,...,N",
                   help="packed documents: document d holds positions cu[d] .. cu[d+1]-1, and a token attends only "
                        "within its own document (increasing, from 0 to --seq)")


def parser():
    p = _Parser(prog="ringattn", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser(
        "run", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        help="run ring attention and check it against the float64 oracle",
        description="Run ring attention on deterministic random inputs (or --input files) and compare it with "
                    "the float64 oracle (fully when small, on sampled rows otherwise). Without MPI it simulates "
                    "--ranks ranks as threads; under `mpiexec -n P ringattn run` each process is one rank, and "
                    "every option except --ranks and --progress must be the same on every rank.")
    run.add_argument("--ranks", type=_positive, default=4,
                     help="simulated ranks (ignored under an MPI launch with more than one process)")
    run.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                     help="where every rank computes: NumPy on the CPU, or CuPy on a GPU (simulated ranks share "
                          "one GPU; MPI ranks take a GPU by node-local rank). bf16 needs gpu")
    run.add_argument("--kernels", choices=("fused", "matmul"), default="fused",
                     help="with --device gpu: the fused flash-attention kernels, or cuBLAS tiles (the baseline; "
                          "fp64 and head dims over 128 always use it)")
    add_problem_options(run, seq=16384, causal=True, from_files=True)
    add_layout_options(run)
    run.add_argument("--seed", type=_seed, default=0,
                     help="seed of the inputs (values depend on seed and position only)")
    run.add_argument("--backward", action="store_true", help="also run the backward ring and check dq, dk, dv")
    run.add_argument("--samples", type=_positive, default=64,
                     help="query rows to check when N is too large for the full oracle (plus the first and last "
                          "row of every shard and zigzag chunk)")
    run.add_argument("--check", action="store_true",
                     help="exit with status 1 if an output fails the tolerance rule of specs/tolerances.md "
                          "(float64: 1e-12 relative; lower precisions: at most 2x the error of a plain "
                          "same-precision computation, plus a floor)")
    run.add_argument("--json", action="store_true",
                     help="print a machine-readable summary instead of tables (strict JSON: an infinite or NaN "
                          'number is written as the string "inf", "-inf" or "nan")')
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar on stderr once a run has lasted 2 s, counting every rank's tiles (default: "
                          "when stderr is a terminal; under mpiexec stderr is the launcher's pipe, so pass --progress)")
    run.add_argument("--input", metavar="DIR", default=None,
                     help="memory-map inputs from DIR/{q,k,v[,dout]}.RANK.npy instead of generating them; B, N, "
                          "Hq, Hkv, D and the dtype come from the files, and a flag that contradicts them is an error")
    run.add_argument("--output", metavar="DIR", default=None,
                     help="write each rank's DIR/{out,lse[,dq,dk,dv]}.RANK.npy, then DIR/manifest.json once every "
                          "rank has finished (a set without a manifest is incomplete)")
    run.add_argument("--overwrite", action="store_true",
                     help="let --output replace the files of a previous run in DIR")
    run.add_argument("--threads", type=_positive, default=None,
                     help=f"BLAS threads per rank (default: ${threads.ENV}, else this node's cores divided among "
                          "its ranks, never more than the BLAS pool the process started with)")
    run.add_argument("--timeout", type=_seconds, default=600.0,
                     help="simulated ranks: longest wait for one message before it is reported as a deadlock")
    _add_vectors(sub)
    _add_check(sub)
    _add_model(sub)
    _add_trace(sub)
    return p


def _add_vectors(sub):
    p = sub.add_parser(
        "vectors",
        help="write golden vectors: the conformance cases with their float64 answers and bounds",
        description="Write one .npz per case and dtype (inputs q, k, v, dout[, mask]; the float64 oracle's out, "
                    "lse, dq, dk, dv; the bound of each output), per-rank shards for each --ranks P, and "
                    "manifest.json (shapes, dtypes and sha256 of every array). The same bytes come out every "
                    "time on one NumPy and BLAS. Format: specs/vectors.md.")
    p.add_argument("--out", metavar="DIR", required=True,
                   help="directory to write: empty, absent, or holding vectors written before (replaced)")
    p.add_argument("--suite", choices=sorted(cases.SUITES), default="smoke",
                   help="the cases (refimpl/cases.py; default: smoke)")
    p.add_argument("--dtype", dest="dtypes", nargs="+", choices=sorted(cases.DTYPES),
                   default=list(vectors.DEFAULT_DTYPES),
                   help=f"input dtypes (default: {' '.join(vectors.DEFAULT_DTYPES)}; bf16 is stored as float32)")
    p.add_argument("--ranks", metavar="P", nargs="+", type=_two_or_more, default=[],
                   help="also write the shards of every rank for each of these rank counts (default: none)")
    p.add_argument("--layout", choices=sorted(vectors.LAYOUTS), default="contiguous",
                   help="how the shards cut the sequence (default: contiguous)")


def _add_check(sub):
    p = sub.add_parser(
        "check",
        help="judge a backend, or the result files of one, against golden vectors",
        description="Run a backend on every vector file (or read the arrays it wrote) and judge each output "
                    "against the file's float64 reference and stored bound: error / bound must be at most 1. "
                    "Shapes and dtypes come from the files. Prints one line per case and the diagnosis of each "
                    "failure; exits with status 1 if a case fails, 2 if the files or options cannot be used. "
                    "Under `mpiexec -n P ringattn check` each process is one rank and checks its shard of "
                    "every case. Format and conventions: specs/vectors.md.")
    p.add_argument("--vectors", metavar="DIR", required=True, help="the vectors (ringattn vectors --out DIR)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--impl", metavar="MODULE:FUNCTION",
                        help="the backend: fn(q, k, v, *, causal, scale, dout=None[, mask]) returning {out, lse, "
                             "dq, dk, dv}; under mpiexec, one rank's fn(..., comm, positions, layout) on its shard. "
                             "MODULE is imported with the current directory on sys.path. 'refimpl': ringattn's "
                             "own ring")
    source.add_argument("--results", metavar="DIR",
                        help="read the outputs from DIR/STEM.NAME.npy, STEM the vector file's name without .npz, "
                             "NAME out, lse, dq, dk or dv")
    p.add_argument("--ranks", metavar="P", type=_positive, default=None,
                   help="check the shards of P ranks (default: 1, the whole case files; under mpiexec: the "
                        "job's size). Without mpiexec, only with --results")
    p.add_argument("--layout", choices=sorted(vectors.LAYOUTS), default="contiguous",
                   help="the shards' layout (default: contiguous)")
    p.add_argument("--features", nargs="*", choices=conformance.FEATURES, default=None,
                   help="what the backend supports; cases that need more are skipped and listed (default: "
                        f"all; refimpl: {' '.join(conformance.REFIMPL_FEATURES)})")
    p.add_argument("--outputs", nargs="+", choices=tolerance.OUTPUTS, default=list(tolerance.OUTPUTS),
                   help="the outputs the backend returns (default: all five; out is required; without dq, dk, "
                        "dv no dout is passed)")
    p.add_argument("--dtype", dest="dtypes", nargs="+", choices=sorted(set(cases.DTYPES) | {"bf16"}), default=None,
                   help="check only the cases of these dtypes (default: every dtype in the vectors)")
    p.add_argument("--case", dest="names", metavar="NAME", nargs="+", default=None,
                   help="check only these cases (default: all)")
    p.add_argument("--json", action="store_true",
                   help="print the report as strict JSON instead of lines (non-finite numbers as strings)")


def _vectors_command(comm, args):
    """``ringattn vectors``: write the set, print what was written."""
    if comm is not None:
        raise UsageError("ringattn vectors: error: writes files from one process; run it without mpiexec")
    try:
        manifest = vectors.generate(args.out, suite=args.suite, dtypes=args.dtypes, ranks=args.ranks,
                                    layout=args.layout)
    except ValueError as exc:
        raise UsageError(f"ringattn vectors: error: {exc}") from None
    files = [vectors.MANIFEST] + [e["file"] for e in manifest["cases"]] + [
        s["file"] for e in manifest["cases"] for s in e["shards"]]
    size = sum(os.path.getsize(os.path.join(args.out, f)) for f in files)
    print(f"wrote {len(files)} files ({_bytes(size)}) to {args.out}: {len(manifest['cases'])} case files "
          f"({args.suite} suite in {', '.join(args.dtypes)})"
          + (f", shards for {', '.join(map(str, args.ranks))} ranks ({args.layout})" if args.ranks else ""))
    return 0


def _check_command(comm, args):
    """``ringattn check``: the report on rank 0; status 1 on every rank when a case fails."""
    try:
        report = conformance.check(args.vectors, impl=args.impl, results=args.results, comm=comm, ranks=args.ranks,
                                   layout=args.layout, features=args.features, outputs=args.outputs,
                                   dtypes=args.dtypes, names=args.names)
    except (vectors.VectorsError, conformance.CheckError) as exc:
        raise UsageError(f"ringattn check: error: {exc}") from None
    passed = report.passed if report is not None else None
    if comm is not None:
        passed = comm.allgather(passed)[0]
    if report is not None:
        print(json.dumps(_strict(report.to_dict()), allow_nan=False) if args.json else report.text())
    return 0 if passed else 1


def _add_model(sub):
    p = sub.add_parser(
        "model", conflict_handler="resolve",
        help="predict a run's time, efficiency and memory per rank on given hardware (a performance model)",
        description="Predict ring attention's step and total time, efficiency and memory per rank from the tile "
                    "FLOPs, the device's FLOP/s, the K/V message bytes and the link's bandwidth and latency, with "
                    "the transfer overlapping the compute. Presets: nominal A100/H100 over NVLink or InfiniBand "
                    "NDR, or this CPU measured; --flops/--bandwidth/--latency for others. Equations and sources: "
                    "specs/model.md.")
    add_problem_options(p, seq=PROBLEM["seq"], causal=True)
    model.add_arguments(p)


def _model_command(comm, args):
    """``ringattn model``: print the prediction; no ranks run."""
    if comm is not None:
        raise UsageError("ringattn model: error: predicts from one process; run it without mpiexec")
    try:
        result = model.command(args)
    except ValueError as exc:
        raise UsageError(f"ringattn model: error: {exc}") from None
    print(json.dumps(_strict(result), allow_nan=False) if isinstance(result, dict) else result)
    return 0


def _add_trace(sub):
    p = sub.add_parser(
        "trace", help="print (and draw) the ring's schedule for a problem: no tensors, nothing computed",
        description="The plan the ring runs, from the layout and the mask alone: per step and rank the K/V shard "
                    "held, the tiles computed and skipped and the bytes sent; each rank's work (visible query-key "
                    "pairs) and its balance; where the ring stops early. --png/--svg draw the N x N attention "
                    "matrix, every tile coloured by the rank that computes it and numbered by its step.")
    add_problem_options(p, seq=PROBLEM["seq"], causal=True)
    add_layout_options(p)
    p.add_argument("--ranks", type=_positive, default=4, help="ranks P (default: 4)")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="draw the schedule to FILE as PNG (needs matplotlib: pip install 'ringattn[plot]')")
    p.add_argument("--svg", metavar="FILE", default=None, help="draw the schedule to FILE as SVG (as --png)")
    p.add_argument("--json", action="store_true", help="print the plan as strict JSON instead of tables")


def _trace_command(comm, args):
    """``ringattn trace``: the schedule of one problem, planned (``schedule.plan_ring``), printed or drawn."""
    def usage(message):
        return UsageError(f"ringattn trace: error: {message}")
    if comm is not None:
        raise usage("plans from one process; run it without mpiexec")
    args.kv_heads = args.kv_heads or args.heads
    if args.heads % args.kv_heads:
        raise usage(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if args.ranks > args.seq:
        raise usage(f"{args.ranks} ranks exceed --seq {args.seq}: every rank needs at least one token")
    layout = layout_for(args.layout or DEFAULT_LAYOUT, args.seq, args.ranks)
    try:
        mask = _mask_of(args)
    except UsageError as exc:
        raise usage(str(exc)) from None
    kv, acc = np.dtype(DTYPES[args.dtype]).itemsize, validate.accumulation_dtype(DTYPES[args.dtype]).itemsize
    shape = (args.batch, args.kv_heads, args.dim)
    records = plan_ring(layout, mask, args.block_q, args.block_k, 2 * int(np.prod(shape)) * kv)
    steps = records[-1].step + 1
    load = schedule.work(layout, mask)
    sent = dict(forward=ring_bytes(layout, steps, *shape, kv), backward=ring_bytes(layout, steps, *shape, kv, acc),
                forward_full_ring=ring_bytes(layout, layout.P, *shape, kv),
                backward_full_ring=ring_bytes(layout, layout.P, *shape, kv, acc))
    for path in (args.png, args.svg):
        if path is not None:
            try:
                plot.draw(layout, mask, args.block_q, args.block_k, path)
            except ImportError as exc:
                raise usage(str(exc)) from None
    summary = dict(ranks=layout.P, layout=layout.name, seq=args.seq, batch=args.batch, heads=args.heads,
                   kv_heads=args.kv_heads, dim=args.dim, dtype=args.dtype, causal=args.causal, window=args.window,
                   cu_seqlens=args.cu_seqlens, mask=mask.name, block_q=args.block_q, block_k=args.block_k,
                   steps=steps, trace=[rec.summary() for rec in records], work=load.tolist(),
                   imbalance=schedule.imbalance(load),
                   bytes_sent={phase: [int(b) for b in per_rank] for phase, per_rank in sent.items()})
    if args.json:
        print(json.dumps(_strict(summary), allow_nan=False))
    else:
        trace_report(summary)
    return 0


def trace_report(s, out=None):
    """The tables of ``ringattn trace`` on ``out`` (default: standard output)."""
    w = (out or sys.stdout).write
    w(f"ring schedule, planned (no tensors, nothing computed): ranks={s['ranks']} {s['layout']}  N={s['seq']} "
      f"B={s['batch']} Hq={s['heads']} Hkv={s['kv_heads']} D={s['dim']} {s['dtype']} {_mask_text(s)}  "
      f"tiles {s['block_q']}x{s['block_k']}\n\n")
    w("forward, per step (rows) and rank (columns): 'kvS T/K B' = the rank holds the K/V shard of rank S, "
      "computes T tiles, skips K fully masked ones and sends B to the next rank\n")
    w("step " + "".join(f"{'rank ' + str(r):>22}" for r in range(s["ranks"])) + "\n")
    for step in range(s["steps"]):
        row = [x for x in s["trace"] if x["step"] == step]
        cells = ("kv%d %d/%d %s" % (x["kv_shard"], x["tiles"], x["skipped"], _bytes(x["bytes_sent"])) for x in row)
        w(f"{step:>4} " + "".join(f"{cell:>22}" for cell in cells) + "\n")
    if s["steps"] < s["ranks"]:
        w(f"{s['steps']:>4}.. not run: the mask leaves no rank anything to see in the K/V shards of steps "
          f"{s['steps']} to {s['ranks'] - 1}\n")
    totals = [sum(row) for row in s["work"]]
    w(f"\nwork per rank, visible query-key pairs over all steps (per batch entry and head): "
      f"{', '.join(f'{t:,}' for t in totals)}; the busiest rank has {s['imbalance']:.2f}x the mean\n")
    b = s["bytes_sent"]
    w(f"bytes sent per rank: forward {', '.join(_bytes(x) for x in b['forward'])}; backward (the same K/V "
      f"messages and one dK/dV message per step) {', '.join(_bytes(x) for x in b['backward'])}\n")
    if s["steps"] < s["ranks"]:
        sent, full = sum(b["forward"]) + sum(b["backward"]), sum(b["forward_full_ring"]) + sum(b["backward_full_ring"])
        w(f"the ring stops after {s['steps']} of {s['ranks']} steps: forward and backward send {_bytes(sent)} instead "
          f"of {_bytes(full)}, {_bytes(full - sent)} saved ({100 * (full - sent) / full:.0f}%)\n")


COMMANDS = {"vectors": _vectors_command, "check": _check_command, "model": _model_command, "trace": _trace_command}


def count_tiles(layout, mask, block_q, block_k, ranks):
    """Tiles the given ranks will compute over all ring steps (one pass: forward, or backward)."""
    return sum(plan_tiles(layout.positions(r), layout.positions(kv_source(r, t, layout.P)), mask,
                          block_q, block_k).computed for r in ranks for t in range(layout.P))


def _oracle_input(x):
    """Inputs as the float64 oracle takes them: bfloat16 widened to float32 (exactly)."""
    return x.astype(np.float32) if x is not None and x.dtype == validate.BFLOAT16 else x


def _load_shard(args, name, rank, dtype):
    if args.input is None:
        heads = args.heads if name in ("q", "dout") else args.kv_heads
        return inputs.generate_at(name, args.batch, heads, args.dim, args.layout.positions(rank), args.seed, dtype)
    return np.load(shardfiles.path(args.input, name, rank), mmap_mode="r")


def run_rank(comm, args, engine, on_tile=None):
    """One rank of the main job on ``engine`` (``comm`` already wrapped by it). Returns the summary dict
    (complete on rank 0)."""
    r, P = comm.rank, comm.size
    dtype = DTYPES[args.dtype]
    q, k, v = (_load_shard(args, name, r, dtype) for name in ("q", "k", "v"))
    dout = _load_shard(args, "dout", r, dtype) if args.backward else None
    on_engine = [engine.asarray(x) for x in (q, k, v)]
    masking = dict(causal=args.causal, window=args.window, cu_seqlens=args.cu_seqlens)
    opts = dict(block_q=args.block_q, block_k=args.block_k, on_tile=on_tile, engine=engine, layout=args.layout.name,
                **masking)
    if args.output is not None and args.overwrite and r == 0:
        shardfiles.clear(args.output)
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
        _write_outputs(comm, args, results)
    q, k, v, dout = (_oracle_input(x) for x in (q, k, v, dout))

    layout, scale = args.layout, 1.0 / math.sqrt(args.dim)
    full = args.batch * args.heads * layout.N ** 2 <= check.FULL_CHECK_SCORES
    if full:
        everything = comm.allgather((q, k, v, dout, results))
        verdicts = _full_verdicts(everything, layout, masking, scale, dtype) if r == 0 else {}
        rows = layout.N
    else:
        sampled = check.sample_rows(layout, args.samples, args.seed)
        verdicts = check.sampled_verdicts(comm, sampled, layout.positions(r), q, k, v, results, scale=scale,
                                          dout=dout, input_dtype=dtype, **masking)
        rows = len(sampled)
    stats = comm.allgather(dict(trace=fwd.trace + (bwd.trace if bwd else []),
                                peak=max(fwd.peak_bytes, bwd.peak_bytes if bwd else 0),
                                sent=comm.bytes_sent, forward_s=t1 - t0, backward_s=t2 - t1,
                                rss=_peak_rss()))
    if r != 0:
        return None
    B, Hq, Hkv = args.batch, args.heads, args.kv_heads
    sizes = np.dtype(dtype).itemsize, validate.accumulation_dtype(dtype).itemsize
    full_ring = ring_bytes(layout, P, B, Hkv, args.dim, sizes[0])            # what a ring of all P steps sends
    if bwd:
        full_ring = full_ring + ring_bytes(layout, P, B, Hkv, args.dim, *sizes)
    return dict(
        transport=args.transport, ranks=P, layout=layout.name, **engine.describe(), seq=layout.N, batch=B, heads=Hq,
        kv_heads=Hkv, dim=args.dim, dtype=args.dtype, causal=args.causal, window=args.window,
        cu_seqlens=args.cu_seqlens, mask=args.mask.name, block_q=args.block_q, block_k=args.block_k,
        seed=None if args.input else args.seed, input=args.input, backward=args.backward,
        threads=dict(per_rank=args.blas.per_rank, reason=args.blas.reason),
        time_s=dict(forward=max(s["forward_s"] for s in stats),
                    **({"backward": max(s["backward_s"] for s in stats)} if bwd else {})),
        check=dict(mode="full" if full else "sampled", rows=rows,
                   rule=f"{tolerance.rule_for('out', dtype).why}; plus {check.ALLOWANCE.why}",
                   outputs={name: v.to_dict() for name, v in verdicts.items()},
                   passed=all(v.passed for v in verdicts.values())),
        peak_bytes=[s["peak"] for s in stats],
        naive_score_bytes=B * Hq * layout.N ** 2 * np.dtype(dtype).itemsize,
        bytes_sent=[s["sent"] for s in stats],
        steps=fwd.trace[-1].step + 1, full_ring_bytes=[int(b) for b in full_ring],
        peak_rss_bytes=[s["rss"] for s in (stats if args.transport == "mpi" else stats[:1])],
        overlap=_overlap([rec for s in stats for rec in s["trace"]]),
        per_rank=_per_rank(stats, B * Hq * args.dim),
        trace=[rec.summary() for s in stats for rec in s["trace"]])


def _write_outputs(comm, args, results):
    """Every rank writes its partial files; once all have (the allgather), each publishes its own, and
    rank 0 writes the manifest after a barrier (``shardfiles``)."""
    shardfiles.write_partial(args.output, comm.rank, results)
    arrays = comm.allgather({name: (x.shape, x.dtype) for name, x in results.items()})
    shardfiles.publish(args.output, comm.rank, results)
    comm.barrier()
    if comm.rank == 0:
        params = dict(seq=args.layout.N, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, dim=args.dim,
                      dtype=args.dtype, causal=args.causal, scale=1.0 / math.sqrt(args.dim), backward=args.backward,
                      block_q=args.block_q, block_k=args.block_k, layout=args.layout.name, window=args.window,
                      cu_seqlens=args.cu_seqlens,
                      **({"input": os.path.abspath(args.input)} if args.input else {"seed": args.seed}))
        shardfiles.write_manifest(args.output, params, args.layout, arrays)


def _peak_rss():
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


FLOPS_PER_SCORE = {"forward": 4, "backward": 10}   # per score element and head dim: 2 and 5 matrix products


def _per_rank(stats, bhd):
    """One dict per rank: tiles (full, partial, skipped), compute, wait and idle seconds, GFLOP/s.

    ``bhd`` = B * Hq * D. idle is the time a rank spent neither in tiles nor waiting for a message while
    the slowest rank was still busy: the cost of an uneven schedule."""
    slowest = max(s["forward_s"] + s["backward_s"] for s in stats)
    rows = []
    for r, s in enumerate(stats):
        trace = s["trace"]
        compute, wait = sum(x.compute_s for x in trace), sum(x.wait_s for x in trace)
        flops = sum(FLOPS_PER_SCORE[x.phase] * bhd * x.scores for x in trace)
        rows.append(dict(rank=r, full=sum(x.tiles - x.partial_tiles for x in trace),
                         partial=sum(x.partial_tiles for x in trace), skipped=sum(x.skipped for x in trace),
                         compute_s=compute, wait_s=wait, idle_s=max(0.0, slowest - compute - wait),
                         gflops=flops / compute / 1e9 if compute > 0 else 0.0))
    return rows


def _overlap(trace):
    """Seconds in tiles and seconds blocked on messages after the tiles, summed over ranks and steps."""
    compute = sum(rec.compute_s for rec in trace)
    wait = sum(rec.wait_s for rec in trace)
    return dict(compute_s=compute, wait_s=wait, wait_fraction=wait / (compute + wait) if compute + wait else 0.0)


def _full_verdicts(everything, layout, masking, scale, dtype):
    """Every output against the full float64 oracle (small N only): shards put back in natural order on
    rank 0. ``masking``: causal, window, cu_seqlens."""
    q, k, v, dout = (None if parts[0] is None else layout.unshard(list(parts))
                     for parts in list(zip(*everything))[:4])
    results = {name: layout.unshard([e[4][name] for e in everything], axis=2 if name == "lse" else 1)
               for name in everything[0][4]}
    return check.full_verdicts(q, k, v, results, scale=scale, dout=dout, input_dtype=dtype, **masking)


def _mask_text(s):
    """'causal', 'full', plus the window and the documents, as the report's header names the mask."""
    parts = ["causal" if s["causal"] else "full"]
    if s["window"] is not None:
        parts.append(f"window ({s['window'][0]}, {s['window'][1]})")
    if s["cu_seqlens"] is not None:
        parts.append(f"{len(s['cu_seqlens']) - 1} documents")
    return ", ".join(parts)


def _bytes(n):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024


def report(summary, out=None):
    """The human-readable report of a run (rank 0), on ``out`` (default: standard output)."""
    s, c = summary, summary["check"]
    w = (out or sys.stdout).write
    w(f"ring attention: {s['transport']} ranks={s['ranks']} {s['layout']}  N={s['seq']} B={s['batch']} Hq={s['heads']} "
      f"Hkv={s['kv_heads']} D={s['dim']} {s['dtype']} {_mask_text(s)}  tiles {s['block_q']}x{s['block_k']}\n")
    if s["engine"] != "numpy":
        w(f"engine: {s['engine']} on {s['device']}, kernels {s['kernels']}\n")
    if s.get("messages"):
        w(f"messages: {s['messages']['path']} ({s['messages']['reason']})\n")
    w("\n")
    for phase in ("forward", "backward"):
        recs = [x for x in s["trace"] if x["phase"] == phase]
        if not recs:
            continue
        w(f"{phase} schedule, per step (rows) and rank (columns): 'kvS T/K' = the rank held the K/V shard of "
          f"rank S, computed T tiles and skipped K fully masked ones\n")
        w("step " + "".join(f"{'rank ' + str(r):>14}" for r in range(s["ranks"])) + "\n")
        for step in range(s["steps"]):
            row = sorted((x for x in recs if x["step"] == step), key=lambda x: x["rank"])
            w(f"{step:>4} " + "".join(f"{'kv%d %d/%d' % (x['kv_shard'], x['tiles'], x['skipped']):>14}" for x in row) + "\n")
        if s["steps"] < s["ranks"]:
            w(f"{s['steps']:>4}.. not run: the mask leaves no rank anything to see in the K/V shards of steps "
              f"{s['steps']} to {s['ranks'] - 1}\n")
        w("\n")
    times = ", ".join(f"{k} {v:.3f} s" for k, v in s["time_s"].items())
    w(f"time: {times} (slowest rank), {s['threads']['per_rank']} BLAS thread(s) per rank "
      f"({s['threads']['reason']})\n")
    w("per rank (all phases): tiles full/partial/skipped, seconds in tiles, waiting for messages after them, "
      "and idle while the slowest rank was busy\n")
    w(f"{'rank':>4} {'full':>6} {'partial':>7} {'skipped':>7} {'compute s':>10} {'wait s':>8} {'idle s':>8} "
      f"{'GFLOP/s':>8}\n")
    for x in s["per_rank"]:
        w(f"{x['rank']:>4} {x['full']:>6} {x['partial']:>7} {x['skipped']:>7} {x['compute_s']:>10.3f} "
          f"{x['wait_s']:>8.3f} {x['idle_s']:>8.3f} {x['gflops']:>8.1f}\n")
    computes = [x["compute_s"] for x in s["per_rank"]]
    mean = sum(computes) / len(computes)
    o = s["overlap"]
    w(f"imbalance: the busiest rank computed {max(computes) / mean if mean else 1.0:.2f}x the mean; "
      f"message waits after compute: {o['wait_s']:.3f} s of {o['compute_s'] + o['wait_s']:.3f} s summed over "
      f"ranks ({100 * o['wait_fraction']:.1f}%), the rest of the transfers hid behind the tiles\n")
    w(f"memory per rank, accounted (the arrays a rank holds at once, specs/memory.md 4): "
      f"{', '.join(_bytes(b) for b in s['peak_bytes'])}; naive attention's score matrix alone: "
      f"{_bytes(s['naive_score_bytes'])} ({s['naive_score_bytes'] / max(s['peak_bytes']):.0f}x)\n")
    where = "per rank" if s["transport"] == "mpi" else "of the process (all simulated ranks)"
    w(f"memory measured, peak RSS {where}: {', '.join(_bytes(b) for b in s['peak_rss_bytes'])}\n")
    w(f"bytes sent per rank: {', '.join(_bytes(b) for b in s['bytes_sent'])}\n")
    if s["steps"] < s["ranks"]:
        sent, full = sum(s["bytes_sent"]), sum(s["full_ring_bytes"])
        w(f"the ring stopped after {s['steps']} of {s['ranks']} steps: {_bytes(sent)} sent instead of {_bytes(full)}, "
          f"{_bytes(full - sent)} saved ({100 * (full - sent) / full:.0f}%)\n")
    w("\n")
    what = "all rows" if c["mode"] == "full" else f"{c['rows']} sampled rows"
    w(f"check against the float64 oracle ({what}); rule: {c['rule']}\n")
    for name, v in c["outputs"].items():
        plain = "" if v["plain_error"] is None else f", plain {s['dtype']} {v['plain_error']:.2e}"
        verdict = (("ok" if v["strict"] else "ok (within the score-rounding allowance, not the 2x rule alone)")
                   if v["passed"] else f"EXCEEDS, worst at {tuple(v['worst'] or ())}")
        w(f"  {name:<4} error {v['error']:.2e} (relative {v['relative']:.2e}){plain}, bound {v['bound']:.2e}  "
          f"{verdict}\n")
    if c["mode"] == "sampled" and s["backward"]:
        w("  dk, dv are checked against the full oracle only when B*Hq*N^2 <= "
          f"{check.FULL_CHECK_SCORES}; the test suite covers them at every rank count\n")
    w(f"{'PASS' if c['passed'] else 'FAIL'}\n")


def _launched_size():
    try:
        from .comm.mpi import launched_world_size
    except ImportError:
        return 1
    return launched_world_size()


def _engine(args):
    """The engine class of ``--device`` (and ``--kernels``), or a ``UsageError`` saying what is missing."""
    if args.device == "cpu":
        if args.dtype == "bf16":
            raise UsageError("--dtype bf16 needs --device gpu (the CPU reference takes fp16, fp32 and fp64)")
        return NumpyEngine
    try:
        from gpu.engine import CupyEngine
        import cupy
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy sees no CUDA device")
    except Exception as exc:             # noqa: BLE001 - no CuPy, no driver, no device: one usage error
        raise UsageError(f"--device gpu needs CuPy and a CUDA GPU ({type(exc).__name__}: {exc}); "
                         "install CuPy with: pip install 'ringattn[gpu]'") from None
    return CupyEngine.configured(kernels=args.kernels)


def _collective(comm, step):
    """Run ``step()`` on every rank (or once, with no ``comm``). If it raises ``UsageError`` on any rank,
    every rank raises that rank's message, so all of them exit together. Returns every rank's result."""
    if comm is None:
        return [step()]
    try:
        outcome = (step(), None)
    except UsageError as exc:
        outcome = (None, (str(exc), exc.usage))
    everyone = comm.allgather(outcome)
    for rank, (_, error) in enumerate(everyone):
        if error is not None:
            raise UsageError(f"rank {rank}: {error[0]}", error[1])
    return [result for result, _ in everyone]


def _agree(comm, args):
    """Every option that shapes the job must be the same on every rank; a disagreement names the option
    and each rank's value."""
    mine = {key: value for key, value in vars(args).items() if key not in RANK_LOCAL}
    everyone = comm.allgather(mine)
    for key in mine:
        values = [theirs.get(key) for theirs in everyone]
        if any(value != values[0] for value in values):
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"ranks disagree on {flag}: "
                             + ", ".join(f"rank {r}: {value}" for r, value in enumerate(values)))


def _problem(comm, args, P):
    """Settle B, N, Hq, Hkv, D and the dtype: from the --input files' headers (flags must agree with
    them), or from the flags and their defaults. Then the layout."""
    flags = {name: getattr(args, name) for name in PROBLEM}
    if args.input is not None:
        try:
            if comm is None:
                found = shardfiles.headers(args.input, range(P), args.backward)
            else:
                found = dict(enumerate(_collective(comm, lambda: _headers(args, comm.rank))))
            extra = shardfiles.extra_ranks(args.input, P)
            if extra:
                raise ValueError(f"--input: {args.input} holds shards for ranks 0..{extra[-1]}, but this run has "
                                 f"{P} ranks")
            B, N, Hq, Hkv, D, dtype = shardfiles.problem(found, P, args.layout or "contiguous")
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        name = FLAG_OF_DTYPE.get(validate.BFLOAT16.name if validate.BFLOAT16 == dtype else dtype.name)
        if name is None:
            raise UsageError(f"--input: the files hold {dtype}, expected one of "
                             + ", ".join(np.dtype(d).name for d in DTYPES.values()))
        files = dict(seq=N, batch=B, heads=Hq, kv_heads=Hkv, dim=D, dtype=name)
        for key, value in flags.items():
            if value is not None and value != files[key]:
                raise UsageError(f"--{key.replace('_', '-')} {value} contradicts the --input files, which hold "
                                 f"{key.replace('_', ' ')} {files[key]}; leave the flag out to take the files'")
        vars(args).update(files)
    else:
        vars(args).update({key: PROBLEM[key] if value is None else value for key, value in flags.items()})
        args.kv_heads = args.kv_heads or args.heads
        if args.heads % args.kv_heads:
            raise UsageError(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if P > args.seq:
        raise UsageError(f"{P} ranks exceed --seq {args.seq}: every rank needs at least one token")
    # the name, agreed on every rank, becomes the layout; files keep the order they were written in
    args.layout = layout_for(args.layout or ("contiguous" if args.input else DEFAULT_LAYOUT), args.seq, P)
    args.mask = _mask_of(args)


def _mask_of(args):
    """The mask of --causal, --window and --cu-seqlens (N = --seq), or a ``UsageError`` naming the flag."""
    try:
        check_window(args.window)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--window: {exc}") from None
    try:
        return mask_for(args.causal, args.window, None, args.cu_seqlens, B=args.batch, N=args.seq)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"--cu-seqlens: {exc}") from None


def _headers(args, rank):
    try:
        return shardfiles.headers(args.input, [rank], args.backward)[rank]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _prepare(comm, args):
    """Every check of the command line, on every rank, before any work. Returns the engine class."""
    engine = _collective(comm, lambda: _engine(args))[0]
    if args.output is not None and not args.overwrite:
        def fresh():
            old = shardfiles.existing(args.output)
            if old:
                raise UsageError(f"--output {args.output} holds the files of another run ({', '.join(old[:4])}"
                                 f"{', ...' if len(old) > 4 else ''}); pass --overwrite to replace them")
        _collective(comm, fresh)
    if comm is not None:
        _agree(comm, args)
    _problem(comm, args, comm.size if comm is not None else args.ranks)
    try:
        sharing = args.layout.P if comm is None else (1 if threads.bound_by_launcher() else comm.node_size())
        args.blas = threads.choose(sharing, args.threads)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return engine


def _strict(value):
    """``value`` with every non-finite float written as the string "inf", "-inf" or "nan" (strict JSON)."""
    if isinstance(value, dict):
        return {key: _strict(v) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return value


def _usage_exit(error, rank=0):
    """Print a usage error (on rank 0 only: every rank has the same one) and exit with status 2."""
    if rank == 0:
        message = str(error)
        if "ringattn" not in message.split("error:")[0]:
            message = f"ringattn run: error: {message}"
        sys.stderr.write(error.usage + message + "\n")
    raise SystemExit(2)


def main(argv=None):
    mpi_size = _launched_size()          # 1: not an MPI job of several ranks; 0: launched, size unknown
    try:
        args, parse_error = parser().parse_args(argv), None
    except UsageError as exc:
        args, parse_error = None, exc
    comm = None
    if mpi_size != 1:
        from .comm.mpi import MPIComm, install_abort_hook
        comm = MPIComm()
        install_abort_hook(comm)
    try:
        _collective(comm, lambda: (_ for _ in ()).throw(parse_error) if parse_error else None)
        if args.command in COMMANDS:
            return COMMANDS[args.command](comm, args)
        args.transport = "simulated" if comm is None else "mpi"
        engine = _prepare(comm, args)
    except UsageError as exc:
        _usage_exit(exc, 0 if comm is None else comm.rank)
    if comm is not None and args.device == "gpu":
        from gpu.device import select_device
        select_device(comm)
    P = args.layout.P
    mask = args.mask

    passes = 2 if args.backward else 1
    totals = [passes * count_tiles(args.layout, mask, args.block_q, args.block_k, [r]) for r in range(P)]
    if comm is not None:
        show = comm.rank == 0 and (args.progress if args.progress is not None else sys.stderr.isatty())
        progress = Progress(totals, show, comm)
        rank_engine = engine()
        with threads.limited(args.blas):
            summary = run_rank(rank_engine.wrap(comm), args, rank_engine, progress)
    else:
        show = args.progress if args.progress is not None else sys.stderr.isatty()
        progress = Progress(totals, show)

        def rank_main(comm):
            rank_engine = engine()
            return run_rank(rank_engine.wrap(comm), args, rank_engine, progress)
        with threads.limited(args.blas):
            summary = engine.sim_world(P, args.timeout).run(rank_main)[0]
    progress.close()
    if summary is None:
        return 0
    if args.json:
        print(json.dumps(_strict(summary), allow_nan=False))
    else:
        report(summary)
    return 1 if args.check and not summary["check"]["passed"] else 0


if __name__ == "__main__":
    sys.exit(main())
