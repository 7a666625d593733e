"""Forward speed at one BLAS thread: blockwise, simulated ring (P=1, P=4) and naive, against the GEMM floor.

For each N (default 2048 and 8192), B=1, H=8, D=64, fp32, non-causal, it times (median of --repeats):

blockwise     ``blockwise_attention``
ring P=1      ``simulate_ring(ranks=1)``: the same tile loop behind the ring machinery
ring P=4      ``simulate_ring(ranks=4)``: 4 rank threads. On a 2-core machine they share 2 cores, so the
              wall time is not comparable with the others; its CPU time (``time.process_time``, all
              threads) is printed too, and CPU time / floor is the fair ratio.
naive         ``naive_attention`` (the float64 oracle: it computes in float64, whatever the input). Its
              peak is about 4 float64 score matrices, 4 * 8 * B * H * N^2 bytes (17 GiB at N=8192, H=8).
              When that exceeds ``--naive-mem-limit`` (default 8 GiB, the machine is shared) or the
              memory available, it is timed one head at a time (H calls with the same N, summed) and
              labelled "per head"; the work is identical, only the peak memory differs.

GEMM floor. In the same run, the sgemm rate is measured on the products the tile loop issues, one
head at a time with ``np.matmul(..., out=...)`` at the block sizes of ``refimpl.blockwise`` (BLOCK_Q x
BLOCK_K; ``common.tile_gemm_seconds``)::

    s = q (bq, D) @ k^T (D, bk)     k a view of the (bk, H, D) rows of the shard
    o = p (bq, bk) @ v (bk, D)

    rate  = flops(both) / (median time(q k^T) + median time(p v))
    floor = 4 * N^2 * D * H / rate

SDPA. When torch is installed, torch's CPU ``scaled_dot_product_attention`` (one intra-op thread, under
``no_grad``) is timed in every repeat too, and blockwise / SDPA is printed; without torch a note says the
column is skipped. ``backward.py`` holds the kernel targets against SDPA, causal and not.

The machine is shared and its load drifts, so the rate is measured again just before every repeat, each
timed run is divided by the floor measured next to it, and the ratios reported are the medians of
those per-repeat ratios (the times shown are plain medians). Times are CPU seconds of the process
(``time.process_time``; the floor's too), which waiting for a busy core does not inflate as it does
wall time; ring P=4 is shown both ways.

Targets (``--check`` exits with status 1 if one is missed):
    blockwise <= 1.35 x GEMM floor, at every N
    blockwise and ring P=1 never slower than naive, for N >= 4096

``--profile`` adds, at the largest N, where the time of ``blockwise_attention`` goes: a cProfile listing,
then a line timing of the real functions (``common.LineTimer`` on ``attend_shard``, ``attend_tile``,
``_scores`` and ``merge``: NumPy's calls are timed in the line that makes them), and a sweep of block
sizes. ``--quick`` is a smoke run (< 30 s).

BLAS is pinned to one thread (OMP_NUM_THREADS / OPENBLAS_NUM_THREADS = 1 before numpy is imported, and
threadpoolctl around the timed code).
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.pin_blas_env(1)

import numpy as np  # noqa: E402

import refimpl  # noqa: E402
from refimpl import blockwise, blockwise_attention, naive_attention, simulate_ring, tile  # noqa: E402
from refimpl.blockwise import BLOCK_K, BLOCK_Q  # noqa: E402
from refimpl.model import mem_available  # noqa: E402

GiB = 1 << 30
TARGET_FLOOR = 1.35
NAIVE_FROM_N = 4096


def attn_flops(N, H, D, causal=False):
    f = 4.0 * N * N * D * H
    return f / 2 if causal else f


def make_qkv(B, N, H, D, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, N, H, D), dtype=np.float32) for _ in range(3))


# ---------------------------------------------------------------------------------------------------------
# GEMM floor


def gemm_rate(D=64, block_q=BLOCK_Q, block_k=BLOCK_K, calls=40):
    """sgemm rate (flop/s) on the tile loop's two products, one head's tile. Returns (rate, {product: rate})."""
    seconds = common.tile_gemm_seconds(block_q, block_k, D, calls=calls)
    flops_each = 2.0 * block_q * block_k * D
    return flops_each * len(seconds) / sum(seconds.values()), {p: flops_each / t for p, t in seconds.items()}


# ---------------------------------------------------------------------------------------------------------
# naive


def naive_peak_bytes(B, H, N):
    """Peak of naive_attention: about four float64 (B, H, N, N) arrays alive at once in _probabilities."""
    return 4 * 8 * B * H * N * N


def run_naive(q, k, v, per_head):
    if not per_head:
        return naive_attention(q, k, v)
    outs = [naive_attention(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1])[0] for h in range(q.shape[2])]
    return np.concatenate(outs, axis=2), None


# ---------------------------------------------------------------------------------------------------------
# profile


def profile(N, H, D, repeats):
    B = 1
    q, k, v = make_qkv(B, N, H, D)
    flops = attn_flops(N, H, D)
    print(f"== profile of blockwise_attention at N={N}, H={H}, D={D}, fp32, non-causal, 1 BLAS thread ==")

    pr = cProfile.Profile()
    pr.enable()
    ref, _ = blockwise_attention(q, k, v)
    pr.disable()
    buf = io.StringIO()
    pstats.Stats(pr, stream=buf).sort_stats("tottime").print_stats(12)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if "ncalls" in ln), 0)
    print("cProfile, top 12 by tottime (ufunc calls such as np.matmul, np.exp, np.subtract are not profiled "
          "as separate entries: their time is the tottime of the Python function that calls them):")
    print("\n".join(lines[start - 1:start + 14] if start else lines[:16]))
    print()

    plain = common.time_it(lambda: blockwise_attention(q, k, v), repeats)
    with common.LineTimer(blockwise.attend_shard, tile.attend_tile, tile._scores, tile.merge) as lt:
        traced = common.time_it(lambda: blockwise_attention(q, k, v), 1)
    print(f"line timing of the real functions (CPU seconds of one run: untraced median "
          f"{common.fmt_s(plain.cpu_median)}, traced {common.fmt_s(traced.cpu[0])}; a line that calls a timed "
          "function includes its time):")
    print(lt.report(traced.cpu[0]))
    rate, _ = gemm_rate(D)
    print(f"at the isolated sgemm rate ({rate / 1e9:.1f} GFLOP/s) the two products would take "
          f"{common.fmt_s(flops / rate)} in all")
    print()

    print("block size sweep (blockwise_attention's block_q/block_k keywords; refimpl default "
          f"{BLOCK_Q}x{BLOCK_K}), and one head per call:")
    rows = []
    base = None
    variants = [(BLOCK_Q, BLOCK_K), (128, 1024), (512, 512), (256, 512), (256, 2048), (128, 512), (64, 1024)]
    for bq, bk in variants:
        if bq > N or bk > N:
            continue
        t = common.time_it(lambda: blockwise_attention(q, k, v, block_q=bq, block_k=bk), repeats).cpu_median
        base = base or t
        rows.append([f"{bq}x{bk}, all {H} heads", common.fmt_s(t), f"{flops / t / 1e9:.1f}",
                     f"{t / base:.3f}", f"{t * rate / flops:.3f}"])
    for bq, bk in [(BLOCK_Q, BLOCK_K), (512, 2048)]:
        def per_head():
            for h in range(H):
                blockwise_attention(q[:, :, h:h + 1], k[:, :, h:h + 1], v[:, :, h:h + 1], block_q=bq, block_k=bk)
        t = common.time_it(per_head, repeats).cpu_median
        rows.append([f"{bq}x{bk}, one head per call", common.fmt_s(t), f"{flops / t / 1e9:.1f}",
                     f"{t / base:.3f}", f"{t * rate / flops:.3f}"])
    print(common.table(["tiles", "median CPU", "GFLOP/s", "vs default", "x floor"], rows))
    print()


# ---------------------------------------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (python -m pydoc bench/forward.py) for details.")
    ap.add_argument("--sizes", default=None, help="comma-separated N (default 2048,8192)")
    ap.add_argument("--heads", type=int, default=None, help="heads H (default 8; --quick: 4)")
    ap.add_argument("--dim", type=int, default=64, help="head dimension D (default 64)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case, median reported "
                                                               "(default 3, at least 3 recommended)")
    ap.add_argument("--no-naive", action="store_true", help="skip naive_attention")
    ap.add_argument("--naive-mem-limit", type=float, default=8.0,
                    help="GiB; above this estimated peak naive is timed one head at a time (default 8)")
    ap.add_argument("--profile", action="store_true",
                    help="also profile blockwise at the largest N: cProfile, line timing, block size sweep")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=2048,4096, H=4, 3 repeats (< 30 s)")
    ap.add_argument("--check", action="store_true", help="exit with status 1 if a target is missed")
    args = ap.parse_args(argv)

    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else ([2048, 4096] if args.quick else [2048, 8192])
    H = args.heads or (4 if args.quick else 8)
    D, B = args.dim, 1
    repeats = args.repeats or 3
    t_start = time.perf_counter()

    print(f"ringattn forward speed: B={B}, H={H}, D={D}, fp32, non-causal, block_q={BLOCK_Q}, block_k={BLOCK_K}, "
          f"median of {repeats}")
    torch = common.Sdpa.load()
    with common.blas_one_thread():
        print(f"BLAS: {common.blas_info()}; numpy {np.__version__}" + (f"; torch {torch.__version__}" if torch else "")
              + f"; refimpl from {Path(refimpl.__file__).parent}")
        note = common.blas_kernel_note()
        if note:
            print(note)
        print(f"machine: {common.load_line()} at start")
        results = []
        for N in sizes:
            q, k, v = make_qkv(B, N, H, D)
            fl = attn_flops(N, H, D)
            cases = {"blockwise": lambda: blockwise_attention(q, k, v),
                     "ring1": lambda: simulate_ring(q, k, v, ranks=1),
                     "ring4": lambda: simulate_ring(q, k, v, ranks=4)}
            if torch:
                cases["sdpa"] = common.Sdpa(torch, q, k, v).forward
            r = dict(N=N, rates=[], qk=[], pv=[], vs_sdpa=[], vs_sdpa_wall=[],
                     **{name: common.Timing() for name in cases})
            r["ratio"] = {name: [] for name in (*cases, "ring4_cpu")}
            cases["blockwise"]()                                  # warm-up
            for _ in range(repeats):                              # each repeat: fresh floor, then every case
                rate, detail = gemm_rate(D, calls=12)
                r["rates"].append(rate)
                r["qk"].append(detail["q k^T"])
                r["pv"].append(detail["p v"])
                for name, fn in cases.items():
                    t = common.time_it(fn, 1)
                    r[name].wall += t.wall
                    r[name].cpu += t.cpu
                    r["ratio"][name].append((t.wall if name == "ring4" else t.cpu)[0] * rate / fl)
                    if name == "ring4":
                        r["ratio"]["ring4_cpu"].append(t.cpu[0] * rate / fl)
                if torch:                                         # blockwise / SDPA within this repeat
                    r["vs_sdpa"].append(r["blockwise"].cpu[-1] / r["sdpa"].cpu[-1])
                    r["vs_sdpa_wall"].append(r["blockwise"].wall[-1] / r["sdpa"].wall[-1])
            r["rate"] = statistics.median(r["rates"])
            r["floor"] = fl / r["rate"]
            out_b, _ = blockwise_attention(q, k, v)
            out_r = simulate_ring(q, k, v, ranks=4).out
            r["ring_err"] = float(np.max(np.abs(out_b - out_r)))
            r["naive"] = None
            if not args.no_naive:
                est = naive_peak_bytes(B, H, N)
                avail = mem_available()
                per_head = est > args.naive_mem_limit * GiB or (avail is not None and est > 0.8 * avail)
                if per_head and naive_peak_bytes(B, 1, N) > min(args.naive_mem_limit * GiB, 0.8 * (avail or 1e30)):
                    r["naive_note"] = f"skipped: even one head needs ~{common.fmt_bytes(naive_peak_bytes(B, 1, N))}"
                else:
                    r["naive_note"] = (f"one head per call (full-H peak ~{common.fmt_bytes(est)} > limit)"
                                       if per_head else f"all heads in one call (peak ~{common.fmt_bytes(est)})")
                    holder = {}

                    def go():
                        holder["out"] = None          # drop the previous output before the next run
                        holder["out"] = run_naive(q, k, v, per_head)[0]

                    r["naive"] = common.time_it(go, repeats)
                    r["naive_err"] = float(np.max(np.abs(out_b.astype(np.float64) - holder["out"])))
                    del holder
            results.append(r)
            msg = ", ".join(f"{name} {common.fmt_s(r[key].cpu_median)}" for key, name in
                            [("blockwise", "blockwise"), ("ring1", "ring P=1"), ("ring4", "ring P=4")])
            if r["naive"] is not None:
                msg += f", naive {common.fmt_s(r['naive'].cpu_median)}"
            if torch:
                msg += f", SDPA {common.fmt_s(r['sdpa'].cpu_median)}"
            print(f"  N={N}: {msg}; sgemm {r['rate'] / 1e9:.1f} GFLOP/s (QK^T "
                  f"{statistics.median(r['qk']) / 1e9:.1f}, PV {statistics.median(r['pv']) / 1e9:.1f}; per repeat "
                  f"{', '.join(f'{x / 1e9:.1f}' for x in r['rates'])})", flush=True)
            del q, k, v, out_b, out_r
        print(f"machine: {common.load_line()} at end (the load includes this run; above 1 means other work shared "
              "the cores)")
        print()

        rows = []
        for r in results:
            N = r["N"]
            fl = attn_flops(N, H, D)

            def cell(t):
                return f"{common.fmt_s(t)} ({fl / t / 1e9:.1f})"

            rows.append([N, f"{common.fmt_s(r['floor'])} ({r['rate'] / 1e9:.1f})", cell(r["blockwise"].cpu_median),
                         cell(r["ring1"].cpu_median), cell(r["ring4"].median), common.fmt_s(r["ring4"].cpu_median),
                         cell(r["naive"].cpu_median) if r["naive"] else "-",
                         cell(r["sdpa"].cpu_median) if torch else "-"])
        print("median CPU time (achieved GFLOP/s), ring P=4 also wall; GFLOP counts 4*N^2*D*H, the non-causal "
              "forward's matmuls")
        print(common.table(["N", "GEMM floor", "blockwise", "ring P=1", "ring P=4 (wall)", "ring P=4 (cpu)",
                            "naive fp64", "torch SDPA"], rows))
        print()
        rows = []
        for r in results:
            med = {name: statistics.median(x) for name, x in r["ratio"].items()}
            r["blockwise_ratio"] = med["blockwise"]
            nb = r["naive"].cpu_median / r["blockwise"].cpu_median if r["naive"] else None
            rows.append([r["N"], f"{med['blockwise']:.3f}", f"{med['ring1']:.3f}", f"{med['ring4']:.3f}",
                         f"{med['ring4_cpu']:.3f}", "-" if nb is None else f"{nb:.2f}",
                         f"{r['ring4'].cpu_median / r['ring4'].median:.2f}",
                         f"{statistics.median(r['vs_sdpa']):.3f} ({statistics.median(r['vs_sdpa_wall']):.3f})"
                         if torch else "-"])
        print("ratios to the GEMM floor: each timed run is divided by the floor measured just before it, and the "
              "median of those ratios is shown (robust to load that drifts during the run).")
        print(f"P=4 runs 4 rank threads on {os.cpu_count()} cores: use its cpu/floor; 'cores used' = its cpu/wall, "
              "below the core count when other work shares the machine.")
        print("blockwise/SDPA: CPU time (wall time), the median of the per-repeat ratios (backward.py has the "
              "kernel targets, causal and not)")
        print(common.table(["N", "blockwise/floor", "ring P=1/floor", "ring P=4 wall/floor", "ring P=4 cpu/floor",
                            "naive/blockwise", "P=4 cores used", "blockwise/SDPA"], rows))
        print()
        for r in results:
            lo, hi = r["blockwise"].spread
            line = (f"  N={r['N']}: blockwise wall spread {common.fmt_s(lo)}..{common.fmt_s(hi)}; "
                    f"max |blockwise - ring P=4| {r['ring_err']:.1e}")
            if "naive_note" in r:
                line += f"; naive: {r['naive_note']}"
            if r.get("naive_err") is not None:
                line += f", max |blockwise - naive| {r['naive_err']:.1e}"
            print(line)
        print()

        verdicts = common.Verdicts()
        for r in results:
            ratio = r["blockwise_ratio"]
            verdicts.add(ratio <= TARGET_FLOOR, f"N={r['N']}: blockwise {ratio:.3f} x GEMM floor "
                                                f"(target <= {TARGET_FLOOR})")
        for r in results:
            if r["N"] < NAIVE_FROM_N:
                continue
            if r["naive"] is None:
                print(f"n/a: N={r['N']}: naive not run ({r.get('naive_note', '--no-naive')})")
                continue
            nb = r["naive"].cpu_median
            verdicts.add(r["blockwise"].cpu_median <= nb and r["ring1"].cpu_median <= nb,
                         f"N={r['N']}: blockwise ({common.fmt_s(r['blockwise'].cpu_median)}) and ring P=1 "
                         f"({common.fmt_s(r['ring1'].cpu_median)}) not slower than naive ({common.fmt_s(nb)}), "
                         "CPU time")
        if not any(r["N"] >= NAIVE_FROM_N for r in results):
            print(f"n/a: no N >= {NAIVE_FROM_N} in this run, the naive target is not checked")
        print(f"total {common.fmt_s(time.perf_counter() - t_start)}")
        print()
        if args.profile:
            profile(max(sizes), H, D, repeats)
            print(f"total with profile {common.fmt_s(time.perf_counter() - t_start)}")
    return verdicts.exit_code(args.check)


if __name__ == "__main__":
    sys.exit(main())
