"""How the simulated ranks scale: seconds of ``simulate_ring`` for P = 64 .. 1024 ranks (4096 on request).

Every run is ``simulate_ring(q, k, v, ranks=P, causal=True)`` on N = 16 P tokens, B = 1, H = 1, D = 16,
float32, one BLAS thread: 16 tokens per rank whatever P, so a rank-step (one tile, one K/V message)
costs the same at every P, there are P^2 of them, and the time should grow as P^2 and no faster.
Reported per P (medians of ``--repeats``)::

    seconds        wall time of the run
    cpu            CPU seconds of the process (all threads)
    running        ranks that may run at once (``SimWorld.running``: one per core)
    us/step        wall and CPU microseconds per rank-step: flat in P when each message costs O(1)
    wakeups/step   threads woken (``SimWorld.wakeups``) per rank-step; each rank-step waits twice, so
                   at most 2 (plus 1/P for each rank's first turn) when only the waiting rank is woken

Targets (``--check`` exits with status 1 if one is missed):
    P=1024 (N=16384) in at most 60 s
    at most 2 + 1/P wakeups per rank-step, at every P
Add 4096 to ``--ranks`` for the other target, P=4096 at N=65536: it completes. That is 17 million
rank-steps: 21 minutes on 2 shared cores, and 8 GiB, most of it the ring's trace (a record per step).

``--quick`` runs P = 64, 128, 256 (seconds). The machine is shared: compare the CPU column between runs,
and the wall column with the load average printed above the table.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.pin_blas_env(1)

import numpy as np  # noqa: E402

from refimpl import simulate_ring  # noqa: E402
from refimpl.comm import SimWorld  # noqa: E402
from refimpl.engine import NumpyEngine  # noqa: E402

TARGET_P, TARGET_SECONDS = 1024, 60.0


class _Watched(NumpyEngine):
    """The NumPy engine, keeping the world of ranks it makes so the run's wakeups can be read."""

    worlds = []

    @staticmethod
    def sim_world(size, timeout):
        world = SimWorld(size, timeout)
        _Watched.worlds.append(world)
        return world


def run_one(P, args):
    """Time ``simulate_ring`` at P ranks; returns a dict of medians."""
    N = P * args.tokens_per_rank
    rng = np.random.default_rng(P)
    q, k, v = (rng.standard_normal((1, N, 1, args.dim)).astype(np.dtype(args.dtype)) for _ in range(3))
    wall, cpu, wakeups = [], [], []
    for _ in range(args.repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        simulate_ring(q, k, v, ranks=P, causal=True, engine=_Watched)
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
        world = _Watched.worlds.pop()
        wakeups.append(world.wakeups)
    steps = P * P
    return dict(P=P, N=N, seconds=statistics.median(wall), cpu=statistics.median(cpu),
                wall_us_per_step=1e6 * statistics.median(wall) / steps,
                cpu_us_per_step=1e6 * statistics.median(cpu) / steps,
                wakeups_per_step=max(wakeups) / steps, running=world.running)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (python -m pydoc bench/sim_ranks.py) for details.")
    ap.add_argument("--ranks", default=None, help="comma-separated P (default 64,128,256,512,1024)")
    ap.add_argument("--tokens-per-rank", type=int, default=16, help="N / P (default 16)")
    ap.add_argument("--dim", type=int, default=16, help="head dimension D (default 16)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="input dtype (default float32)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per P, median reported (default 1)")
    ap.add_argument("--quick", action="store_true", help="P = 64, 128, 256 only")
    ap.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    ap.add_argument("--check", action="store_true", help="exit with status 1 if a target is missed")
    args = ap.parse_args(argv)
    ranks = [int(x) for x in args.ranks.split(",")] if args.ranks else (
        [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024])
    if args.repeats < 1 or args.tokens_per_rank < 1 or args.dim < 1 or min(ranks) < 1:
        ap.error("--repeats, --tokens-per-rank, --dim and every P must be at least 1")

    if not args.json:
        print(f"sim_ranks: simulate_ring, causal, B=1, H=1, D={args.dim}, {args.dtype}, N = {args.tokens_per_rank} P; "
              f"{common.load_line()}; {common.blas_info()}", flush=True)
    results = []
    with common.blas_one_thread():
        for P in ranks:
            results.append(run_one(P, args))
            if not args.json:
                r = results[-1]
                print(f"  P={P}: {common.fmt_s(r['seconds'])} (cpu {common.fmt_s(r['cpu'])})", flush=True)
    if args.json:
        print(json.dumps(results))
    else:
        print()
        print(common.table(
            ["P", "N", "running", "seconds", "cpu", "wall us/step", "cpu us/step", "wakeups/step"],
            [[r["P"], r["N"], r["running"], common.fmt_s(r["seconds"]), common.fmt_s(r["cpu"]),
              f"{r['wall_us_per_step']:.0f}", f"{r['cpu_us_per_step']:.0f}", f"{r['wakeups_per_step']:.3f}"]
             for r in results]))
        print("\nrunning: ranks that may run at once (SimWorld.running, one per core); a rank-step is one tile "
              "and one K/V message.\n")

    verdicts = common.Verdicts()
    for r in results:
        verdicts.add(r["wakeups_per_step"] <= 2 + 1 / r["P"],
                     f"P={r['P']}: {r['wakeups_per_step']:.3f} wakeups per rank-step (target <= 2 + 1/P)")
        if (r["P"], r["N"], args.dim) == (TARGET_P, 16 * TARGET_P, 16):
            verdicts.add(r["seconds"] <= TARGET_SECONDS,
                         f"P={TARGET_P}, N={r['N']}: {common.fmt_s(r['seconds'])} (target <= {TARGET_SECONDS:g} s)")
        if (r["P"], r["N"]) == (4096, 65536):
            verdicts.add(True, f"P=4096, N=65536 completed in {common.fmt_s(r['seconds'])}")
    return verdicts.exit_code(args.check)


if __name__ == "__main__":
    sys.exit(main())
