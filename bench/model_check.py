"""Does ``ringattn model`` predict this machine? Predicted against measured wall time, simulated and MPI ranks.

For every run, in turn (each repeat runs every P of ``--ranks``, as simulated ranks and under mpiexec):

1. calibrate this CPU just before it (``refimpl.model.calibrate``): the sgemm and attention tile rates per
   CPU second of one thread, the cores one process gets now (fewer while other work runs), and the
   in-process message speed;
2. run ``ringattn run --json --threads 1``, as simulated ranks (``--ranks P``) or under ``mpiexec -n P``
   (with ``--ranks P`` too, so that ``-n 1`` runs one rank), and read its ``time_s`` (forward, backward:
   the slowest rank, from a barrier to its result) and its per-step trace;
3. predict it with ``refimpl.model.predict`` from that calibration (``model.Hardware.share``: how simulated
   and MPI ranks share the cores).

It prints, per (transport, P, pass), the medians over the repeats of the predicted and the measured seconds
and the median of the per-run ratios predicted / measured. Target: every ratio in [0.75, 1.25] (within 25%);
``--check`` exits with status 1 if one is outside. ``--steps`` adds each step's compute on the slowest rank,
predicted against the largest ``compute_s`` in the trace.

The defaults (N=8192, H=8, D=64, fp32, causal, contiguous (``--layout``), forward and backward, P = 1, 2,
4, 3 repeats)
take a few minutes on 2 cores. On a machine shared with other work the runs' times drift with its load:
the model is given the cores available just before each run, and the medians absorb some of the rest, not
all of it.
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.pin_blas_env(1)

from refimpl import model  # noqa: E402
from refimpl.cli import add_problem_options  # noqa: E402

PASSES = ("forward", "backward")
TARGET = (0.75, 1.25)


def parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_problem_options(p, seq=8192, causal=True)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="rank counts P")
    p.add_argument("--layout", choices=model.LAYOUTS, default="contiguous", help="how the sequence is cut")
    p.add_argument("--transports", nargs="+", choices=("simulated", "mpi"), default=["simulated", "mpi"],
                   help="simulated ranks, and/or mpiexec -n P")
    p.add_argument("--no-backward", dest="backward", action="store_false", help="time the forward only")
    p.add_argument("--repeats", type=int, default=3, help="calibrations, and runs of each configuration")
    p.add_argument("--steps", action="store_true", help="also print each step's predicted and measured compute")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--check", action="store_true", help="exit with status 1 if a ratio is outside [0.75, 1.25]")
    return p


def mpiexec():
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def run(args, P, transport):
    """One ``ringattn run --json``; returns its summary."""
    cmd = [sys.executable, "-m", "refimpl", "run", "--json", "--threads", "1", "--ranks", str(P),
           "--seq", str(args.seq), "--batch", str(args.batch), "--heads", str(args.heads),
           "--kv-heads", str(args.kv_heads), "--dim", str(args.dim), "--dtype", args.dtype,
           "--block-q", str(args.block_q), "--block-k", str(args.block_k), "--samples", "8",
           "--causal" if args.causal else "--no-causal"] + (["--backward"] if args.backward else []) + (
               ["--layout", args.layout] if args.layout != "contiguous" else [])
    if transport == "mpi":
        cmd = [mpiexec(), "-n", str(P)] + cmd
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=common.ROOT)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def slowest_compute(trace, phase, P):
    """Per step of one pass, the largest compute_s over the ranks."""
    return [max(x["compute_s"] for x in trace if x["phase"] == phase and x["step"] == t) for t in range(P)]


def measure(args):
    """Every calibration's description, and per (transport, P, pass) the list of runs: dicts of the cores
    the calibration found available, the predicted and measured seconds, and per-step compute (predicted,
    measured)."""
    passes = PASSES if args.backward else PASSES[:1]
    base = model.Problem(args.seq, 1, args.batch, args.heads, args.kv_heads, args.dim, args.dtype, args.causal,
                         args.layout, args.block_q, args.block_k)
    calibrations, runs = [], {}
    for _ in range(args.repeats):
        for transport in args.transports:
            for P in args.ranks:
                cpu = model.calibrate(base, transport)
                calibrations.append(cpu.source)
                measured = run(args, P, transport)
                predicted = model.predict(replace(base, ranks=P), cpu, backward=args.backward)
                for phase in passes:
                    pass_ = getattr(predicted, phase)
                    runs.setdefault((transport, P, phase), []).append(dict(
                        available=cpu.available, predicted_s=pass_.time_s,
                        measured_s=measured["time_s"][phase],
                        steps=list(zip([x.compute_s for x in pass_.steps],
                                       slowest_compute(measured["trace"], phase, P)))))
    return calibrations, runs


def main(argv=None):
    args = parser().parse_args(argv)
    args.kv_heads = args.kv_heads or args.heads
    if "mpi" in args.transports and mpiexec() is None:
        sys.exit("bench/model_check.py needs mpiexec for --transports mpi (pip install 'ringattn[mpi]')")
    started = time.strftime("%Y-%m-%d %H:%M")
    calibrations, runs = measure(args)
    rows = []
    for (transport, P, phase), samples in runs.items():
        median = lambda key: statistics.median(x[key] for x in samples)   # noqa: E731
        ratio = statistics.median(x["predicted_s"] / x["measured_s"] for x in samples)
        rows.append(dict(transport=transport, ranks=P, phase=phase, available=median("available"),
                         predicted_s=median("predicted_s"), measured_s=median("measured_s"), ratio=ratio,
                         within=TARGET[0] <= ratio <= TARGET[1], runs=samples,
                         steps=[tuple(statistics.median(x["steps"][t][i] for x in samples) for i in (0, 1))
                                for t in range(P)]))
    missed = [r for r in rows if not r["within"]]
    if args.json:
        print(json.dumps(dict(
            date=started, machine=common.load_line(), blas=common.blas_info(), seq=args.seq, batch=args.batch,
            heads=args.heads, kv_heads=args.kv_heads, dim=args.dim, dtype=args.dtype, causal=args.causal,
            layout=args.layout, block_q=args.block_q, block_k=args.block_k, repeats=args.repeats,
            calibrations=calibrations, rows=rows)))
        return 1 if args.check and missed else 0
    print(f"model check: N={args.seq} B={args.batch} Hq={args.heads} Hkv={args.kv_heads} D={args.dim} {args.dtype} "
          f"{'causal' if args.causal else 'no mask'}, {args.layout}, tiles {args.block_q}x{args.block_k}, one BLAS "
          f"thread per rank; {started}; {common.load_line()}; medians of {args.repeats} repeats")
    print(f"  first calibration: {calibrations[0]}")
    print()
    print(common.table(
        ["transport", "P", "pass", "cores available", "predicted", "measured", "predicted / measured",
         "within 25%", "measured runs"],
        [[r["transport"], r["ranks"], r["phase"], f"{r['available']:.2f}", common.fmt_s(r["predicted_s"]),
          common.fmt_s(r["measured_s"]), f"{r['ratio']:.2f}", "yes" if r["within"] else "NO",
          " ".join(common.fmt_s(x["measured_s"]) for x in r["runs"])] for r in rows]))
    print("\ncores available: what the calibration just before each run got of the machine's cores (median), "
          "which its prediction uses;\npredicted / measured: the median of the per-run ratios")
    if args.steps:
        print("\ncompute per step on the slowest rank, predicted / measured (medians):")
        for r in rows:
            print(f"  {r['transport']:<9} P={r['ranks']} {r['phase']:<8} "
                  + "  ".join(f"{common.fmt_s(p)}/{common.fmt_s(m)}" for p, m in r["steps"]))
    print()
    common.Verdicts().add(not missed, "every predicted time within 25% of the measured one (median ratio)"
                          + "".join(f"; missed {r['transport']} P={r['ranks']} {r['phase']} ({r['ratio']:.2f})"
                                    for r in missed))
    return 1 if args.check and missed else 0


if __name__ == "__main__":
    sys.exit(main())
