"""Kernel speed at one BLAS thread: forward, backward and forward+backward against torch SDPA and the GEMM floor.

For one N (default 8192), B=1, H=8, D=64, fp32, without a mask and causal, each repeat runs in turn:

floor       the sgemm time of each pass at the tile shapes (``common.tile_gemm_seconds``: one head's
            products on one block_q x block_k tile, as refimpl/tile.py issues them), times the number of
            head-tiles the tile loop computes (with the causal mask, the tiles it keeps, in full):
            forward 2 products (q k^T, p v), backward 5 (q k^T, dout v^T, p^T dout, ds k, ds^T q), so the
            backward's floor is 2.5x the forward's.
blockwise   fwd: ``blockwise_attention``; bwd: ``blockwise_attention_backward`` on its out and lse;
            fwd+bwd: the two, back to back.
SDPA        torch's CPU ``scaled_dot_product_attention`` with ``torch.set_num_threads(1)``: fwd under
            ``no_grad``; bwd: ``out.backward(dout)`` alone; fwd+bwd: a forward with autograd, then its
            backward. torch is optional: without it a note is printed and the SDPA columns are left out.

Times are CPU seconds of the process (``time.process_time``: every thread of it, so a second thread of
torch or BLAS would count) and wall seconds. On a shared machine the wall time includes waiting for a
core and the CPU time does not, so the ratios are taken on CPU time; both medians are printed. Each
ratio is computed within a repeat (the two sides ran seconds apart), and the median over repeats is shown.

Targets (``--check`` exits with status 1 if one is missed), with the mask and without:
    blockwise fwd      <= 1.15 x SDPA fwd
    blockwise fwd+bwd  <= 1.15 x SDPA fwd+bwd

``--profile`` adds line timings of the real forward and backward functions (``common.LineTimer``), per mask.
``OPENBLAS_CORETYPE`` selects OpenBLAS's kernels (the bench prints a note when it runs its AVX2 kernels
on an AVX-512 CPU). ``--quick`` is a smoke run (N=2048, H=4, 2 repeats).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.pin_blas_env(1)

import numpy as np  # noqa: E402

from refimpl import blockwise, tile  # noqa: E402
from refimpl.blockwise import BLOCK_K, BLOCK_Q, blockwise_attention, blockwise_attention_backward  # noqa: E402

TARGET_SDPA = 1.15
PASSES = ("fwd", "bwd", "fwd+bwd")


def make_inputs(B, N, H, D, seed=0):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((B, N, H, D), dtype=np.float32) for _ in range(4))


def timed(fn):
    """(result, wall seconds, cpu seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w0, time.process_time() - c0


def floors(N, H, D, causal, block_q, block_k):
    """Seconds of the forward's and the backward's products at the measured sgemm times of one tile."""
    area, _ = common.computed_pairs(N, causal, block_q, block_k)
    head_tiles = H * area / (block_q * block_k)
    return {name: head_tiles * sum(common.tile_gemm_seconds(block_q, block_k, D, backward, calls=8).values())
            for name, backward in (("fwd", False), ("bwd", True))}


def measure(q, k, v, dout, causal, block_q, block_k, sdpa, repeats):
    """Per pass: blockwise and SDPA (wall, cpu) lists and the floor list, over ``repeats`` interleaved repeats."""
    B, N, H, D = q.shape
    opts = dict(causal=causal, block_q=block_q, block_k=block_k)
    res = {who: {p: common.Timing() for p in PASSES} for who in ("blockwise", "sdpa")}
    res["floor"] = {p: [] for p in PASSES}
    out, lse = blockwise_attention(q, k, v, **opts)                      # warm-up
    blockwise_attention_backward(q, k, v, out, lse, dout, **opts)
    if sdpa:
        sdpa.forward_backward()
    for _ in range(repeats):
        fl = floors(N, H, D, causal, block_q, block_k)
        for p, sec in (("fwd", fl["fwd"]), ("bwd", fl["bwd"]), ("fwd+bwd", fl["fwd"] + fl["bwd"])):
            res["floor"][p].append(sec)
        (out, lse), w_f, c_f = timed(lambda: blockwise_attention(q, k, v, **opts))
        _, w_b, c_b = timed(lambda: blockwise_attention_backward(q, k, v, out, lse, dout, **opts))
        for p, w, c in (("fwd", w_f, c_f), ("bwd", w_b, c_b), ("fwd+bwd", w_f + w_b, c_f + c_b)):
            res["blockwise"][p].wall.append(w)
            res["blockwise"][p].cpu.append(c)
        if sdpa:
            for p, (w, c) in (("fwd", timed(sdpa.forward)[1:]), ("bwd", sdpa.timed_backward()),
                              ("fwd+bwd", timed(sdpa.forward_backward)[1:])):
                res["sdpa"][p].wall.append(w)
                res["sdpa"][p].cpu.append(c)
    return res


def ratio(a, b):
    """Median over repeats of a[i] / b[i]."""
    return statistics.median(x / y for x, y in zip(a, b))


def profile(q, k, v, dout, causal, block_q, block_k):
    """Line timings of one forward and one backward run: the real functions, CPU seconds."""
    opts = dict(causal=causal, block_q=block_q, block_k=block_k)
    out, lse = blockwise_attention(q, k, v, **opts)
    passes = (("blockwise_attention", lambda: blockwise_attention(q, k, v, **opts),
               (blockwise.attend_shard, tile.attend_tile, tile._scores, tile.merge)),
              ("blockwise_attention_backward", lambda: blockwise_attention_backward(q, k, v, out, lse, dout, **opts),
               (blockwise.attend_shard_backward, blockwise.row_terms, tile.attend_tile_backward, tile._scores)))
    for name, run, functions in passes:
        _, _, plain = timed(run)
        with common.LineTimer(*functions) as lt:
            _, _, traced = timed(run)
        print(f"line timing of {name}, {'causal' if causal else 'no mask'} (CPU seconds; untraced "
              f"{common.fmt_s(plain)}, traced {common.fmt_s(traced)}; a line that calls a timed function includes "
              "its time):")
        print(lt.report(traced))
        print()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="See the module docstring (python -m pydoc bench/backward.py) for details.")
    ap.add_argument("--seq", type=int, default=None, help="sequence length N (default 8192; --quick: 2048)")
    ap.add_argument("--heads", type=int, default=None, help="heads H (default 8; --quick: 4)")
    ap.add_argument("--dim", type=int, default=64, help="head dimension D (default 64)")
    ap.add_argument("--block-q", type=int, default=BLOCK_Q, help=f"query rows per tile (default {BLOCK_Q})")
    ap.add_argument("--block-k", type=int, default=BLOCK_K, help=f"key columns per tile (default {BLOCK_K})")
    ap.add_argument("--mask", choices=("both", "none", "causal"), default="both", help="default: both")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats, medians reported (default 3)")
    ap.add_argument("--profile", action="store_true",
                    help="also line timings of the forward and the backward, per mask")
    ap.add_argument("--quick", action="store_true", help="smoke run: N=2048, H=4, 2 repeats")
    ap.add_argument("--check", action="store_true", help="exit with status 1 if a target is missed")
    args = ap.parse_args(argv)

    N = args.seq or (2048 if args.quick else 8192)
    H = args.heads or (4 if args.quick else 8)
    D, B, bq, bk = args.dim, 1, args.block_q, args.block_k
    repeats = args.repeats or (2 if args.quick else 3)
    masks = {"both": (False, True), "none": (False,), "causal": (True,)}[args.mask]
    t_start = time.perf_counter()

    print(f"ringattn kernel speed: B={B}, N={N}, H={H}, D={D}, fp32, blocks {bq}x{bk}, {repeats} interleaved "
          "repeats")
    torch = common.Sdpa.load()
    with common.blas_one_thread():
        print(f"BLAS: {common.blas_info()}; numpy {np.__version__}" + (f"; torch {torch.__version__}" if torch else ""))
        note = common.blas_kernel_note()
        if note:
            print(note)
        print(f"machine: {common.load_line()} at start")
        q, k, v, dout = make_inputs(B, N, H, D)
        results = {}
        for causal in masks:
            sdpa = common.Sdpa(torch, q, k, v, dout, causal) if torch else None
            results[causal] = measure(q, k, v, dout, causal, bq, bk, sdpa, repeats)
            print(f"  {'causal' if causal else 'no mask'} done ({common.fmt_s(time.perf_counter() - t_start)})",
                  flush=True)
        print(f"machine: {common.load_line()} at end (above {os.cpu_count()}: other work shared the cores)")
        print()

        rows = []
        for causal, res in results.items():
            area, visible = common.computed_pairs(N, causal, bq, bk)
            for p in PASSES:
                ours, theirs, floor = res["blockwise"][p], res["sdpa"][p], res["floor"][p]
                have = bool(theirs.cpu)
                rows.append(["causal" if causal else "none", p, f"{common.fmt_s(ours.cpu_median)} "
                             f"({common.fmt_s(ours.median)})",
                             f"{common.fmt_s(theirs.cpu_median)} ({common.fmt_s(theirs.median)})" if have else "-",
                             f"{ratio(ours.cpu, theirs.cpu):.3f}" if have else "-",
                             f"{ratio(ours.wall, theirs.wall):.3f}" if have else "-",
                             common.fmt_s(statistics.median(floor)), f"{ratio(ours.cpu, floor):.3f}",
                             f"{ratio(theirs.cpu, floor):.3f}" if have else "-"])
            if causal:
                print(f"causal: the tile loop computes {area / visible:.3f} x the visible pairs (the tiles on the "
                      f"diagonal in full); the floor counts what it computes")
        print("CPU seconds (wall seconds), medians; ratios: median over repeats of the per-repeat ratio")
        print(common.table(["mask", "pass", "blockwise", "SDPA", "blockwise/SDPA", "(wall)", "GEMM floor",
                            "blockwise/floor", "SDPA/floor"], rows))
        print()

        verdicts = common.Verdicts()
        for causal, res in results.items():
            for p in ("fwd", "fwd+bwd"):
                what = f"{'causal' if causal else 'no mask'}: blockwise {p}"
                if not res["sdpa"][p].cpu:
                    print(f"n/a: {what} against SDPA (torch not installed)")
                    continue
                r = ratio(res["blockwise"][p].cpu, res["sdpa"][p].cpu)
                verdicts.add(r <= TARGET_SDPA, f"{what} {r:.3f} x SDPA's (target <= {TARGET_SDPA})")
        print(f"total {common.fmt_s(time.perf_counter() - t_start)}")
        print()
        if args.profile:
            for causal in masks:
                profile(q, k, v, dout, causal, bq, bk)
    return verdicts.exit_code(args.check)


if __name__ == "__main__":
    sys.exit(main())
