"""Causal work per rank in each layout: the balance table, and the demo measured in each layout.

Part 1, counted (no tensors), for P = 2, 4, 8, 16 at the demo's N and tile sizes, causal::

    visible    max / mean over the ranks of their visible (query, key) pairs (``schedule.work``): the work
               the mask leaves; 1.00 is a perfect balance. ``analytic`` is specs/schedule.md section 3's
               value for P | N (contiguous (n(2P-1)+1)/(nP+1), zigzag 1, striped 1 + (P-1)/(Pn+1), n = N/P)
    tiles      max / mean of the score elements the ranks' tiles compute (``StepPlan.scores``: a partial
               tile counts whole), which is what the CPU spends its time on

Part 2, measured: ``ringattn run`` with the demo's options (N=16384, H=8, D=64, fp32, causal, 512 x 1024
tiles) and ``--layout`` each layout, simulated with ``--ranks 4`` and under ``mpiexec -n 2``. Reported: the
ring's forward seconds (``time_s.forward``, the slowest rank; medians of ``--repeats``), the busiest rank's
compute over the mean (``imbalance``) and the process's wall seconds (start-up and the sampled check
included). Runs alternate between the layouts, so the machine's load falls on all of them alike.

    python bench/balance.py                  the table and the runs (a few minutes on 2 cores)
    python bench/balance.py --no-runs        the table only
"""

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repository on sys.path)

import numpy as np  # noqa: E402

from refimpl.blockwise import BLOCK_K, BLOCK_Q  # noqa: E402
from refimpl.layouts import LAYOUTS, layout_for  # noqa: E402
from refimpl.masks import mask_for  # noqa: E402
from refimpl.schedule import imbalance, kv_source, plan_tiles, work  # noqa: E402

BIN = Path(sys.executable).parent


def analytic(layout, N, P):
    """The causal max / mean of visible pairs for P | N (2P | N for zigzag): specs/schedule.md section 3."""
    n = N / P
    return {"contiguous": (n * (2 * P - 1) + 1) / (n * P + 1), "zigzag": 1.0,
            "striped": 1 + (P - 1) / (P * n + 1)}[layout]


def tile_imbalance(cut, mask, block_q, block_k):
    """max / mean of the score elements each rank's tiles compute over all steps."""
    P = cut.P
    totals = [sum(plan_tiles(cut.positions(r), cut.positions(kv_source(r, t, P)), mask, block_q, block_k).scores
                  for t in range(P)) for r in range(P)]
    return max(totals) / np.mean(totals)


def table(N, ranks, block_q, block_k):
    mask = mask_for(True)
    print(f"causal work per rank, N={N}, tiles {block_q}x{block_k}: max / mean over the ranks (1.00 = balanced)")
    print(f"{'P':>3} {'layout':<11} {'visible':>8} {'analytic':>9} {'tiles':>7}")
    for P in ranks:
        for name in LAYOUTS:
            cut = layout_for(name, N, P)
            print(f"{P:>3} {name:<11} {imbalance(work(cut, mask)):>8.3f} {analytic(name, N, P):>9.3f} "
                  f"{tile_imbalance(cut, mask, block_q, block_k):>7.3f}")
    print()


def run_once(command):
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=900)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"$ {' '.join(command)}\nexit {done.returncode}\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    computes = [x["compute_s"] for x in summary["per_rank"]]
    return summary["time_s"]["forward"], max(computes) / np.mean(computes), wall


def runs(repeats):
    ringattn = BIN / "ringattn"
    modes = {"simulated P=4": [str(ringattn), "run", "--ranks", "4"]}
    if (BIN / "mpiexec").exists():
        modes["mpiexec -n 2"] = [str(BIN / "mpiexec"), "-n", "2", str(ringattn), "run"]
    else:
        print("no mpiexec next to this python: the MPI runs are left out (pip install 'ringattn[mpi]')")
    print(f"`ringattn run` at the demo's size (N=16384, H=8, D=64, fp32, causal), medians of {repeats}")
    print(f"{'mode':<15} {'layout':<11} {'forward s':>10} {'imbalance':>10} {'wall s':>8}")
    for mode, command in modes.items():
        seen = {name: [] for name in LAYOUTS}
        for _ in range(repeats):
            for name in LAYOUTS:
                seen[name].append(run_once(command + ["--layout", name, "--json", "--no-progress"]))
        base = statistics.median(f for f, _, _ in seen["contiguous"])
        for name in LAYOUTS:
            forward, imbalance_, wall = (statistics.median(x) for x in zip(*seen[name]))
            print(f"{mode:<15} {name:<11} {forward:>10.3f} {imbalance_:>10.2f} {wall:>8.2f}"
                  + ("" if name == "contiguous" else f"   {base / forward:.2f}x contiguous's speed"))
    print()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=16384, help="N for the table (default: the demo's)")
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3, help="runs per layout and mode")
    p.add_argument("--no-runs", action="store_true", help="print the table only")
    args = p.parse_args()
    table(args.seq, args.ranks, BLOCK_Q, BLOCK_K)
    if not args.no_runs:
        if shutil.which(str(BIN / "ringattn")) is None:
            raise SystemExit(f"no ringattn next to {sys.executable}: pip install -e .")
        runs(args.repeats)


if __name__ == "__main__":
    main()
