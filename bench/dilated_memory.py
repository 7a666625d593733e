"""The seed's scenario with dilated attention on tiles: time and peak working memory.

The class of ``specs/background.md`` ran LongNet's dilated attention at B=1, N=16384, H=16, D=64, float32
and built a (segment x segment) score matrix per segment and head: 8 GiB of scores at 8K segments (the
report: about 8.2 GB in all, out of memory on an 8 GB GPU). This runs the same problem with
``refimpl.dilated_attention`` (``specs/dilated.md``), one BLAS thread, in two configurations:

    segments (2048, 4096, 8192), rates (1, 2, 4)       LongNet's mix of branches
    segments (8192,), rate (1,)                        the seed report's 8K segments

and prints per configuration:

seconds
    wall time of one forward (and of one backward with ``--backward``).
working memory
    tracemalloc peak during the call, minus the arrays that must exist anyway::

        forward   peak - bytes(q, k, v) - bytes(out)
        backward  peak - bytes(q, k, v, out, lse, dout) - bytes(dq, dk, dv)

    tracemalloc sees NumPy's data allocations; not seen: OpenBLAS's internal packing buffers (its own
    allocator, a few MB per thread, independent of N).
seed scores
    ``(N / w) * H * w^2 * 4`` bytes, w = min(N, the largest segment): the seed class's score matrices, one
    (w x w) per segment and head (``bench/memory.py: seed_score_bytes``).
sampled-rows error
    max |out - oracle| on 4 rows (every head) against ``naive_dilated_rows`` (float64), outside the
    measurement.

Target (``--check`` exits with status 1 if missed): forward working memory <= 150 MB (150e6 bytes) in
both configurations, and the sampled rows within 1e-5 of the oracle. ``--quick``: N=4096, H=4 (seconds).
"""

import argparse
import gc
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.pin_blas_env(1)

import numpy as np  # noqa: E402

from refimpl import dilated_attention, dilated_attention_backward, naive_dilated_rows  # noqa: E402

CONFIGS = [((2048, 4096, 8192), (1, 2, 4)), ((8192,), (1,))]
TARGET_BYTES = 150e6
TARGET_ERROR = 1e-5


def seed_score_bytes(N, H, segment):
    w = min(N, segment)
    return (N // w) * H * w * w * 4


def measure(fn, resident):
    """Run ``fn()`` under tracemalloc (started before the ``resident`` arrays were created, so they are in
    the baseline); returns (result, seconds, peak - baseline)."""
    gc.collect()
    tracemalloc.reset_peak()
    baseline = tracemalloc.get_traced_memory()[0]
    assert baseline >= sum(x.nbytes for x in resident), "start tracemalloc before creating the inputs"
    t0 = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - t0
    return result, seconds, tracemalloc.get_traced_memory()[1] - baseline


def run(N, H, D, segments, rates, causal, backward, seed=0):
    rng = np.random.default_rng(seed)
    options = dict(segment_lengths=segments, dilation_rates=rates, causal=causal)
    tracemalloc.start()
    try:
        q, k, v = (rng.standard_normal((1, N, H, D), dtype=np.float32) for _ in range(3))
        (out, lse), fwd_s, peak = measure(lambda: dilated_attention(q, k, v, **options), (q, k, v))
        row = dict(segments=segments, rates=rates, fwd_s=fwd_s, fwd_bytes=peak - out.nbytes)
        if backward:
            dout = rng.standard_normal(q.shape, dtype=np.float32)
            grads, row["bwd_s"], peak = measure(
                lambda: dilated_attention_backward(q, k, v, out, lse, dout, **options), (q, k, v, out, lse, dout))
            row["bwd_bytes"] = peak - sum(g.nbytes for g in grads)
    finally:
        tracemalloc.stop()
    rows = np.array([0, N // 3, N // 2 + 1, N - 1])
    ref, _ = naive_dilated_rows(q, k, v, rows, **options)
    row["error"] = float(np.max(np.abs(out[:, rows].astype(np.float64) - ref)))
    row["seed"] = seed_score_bytes(N, H, max(segments))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="The module docstring (python -m pydoc bench/dilated_memory.py) defines "
                                        "every column.")
    ap.add_argument("--causal", action="store_true", help="causal dilated attention (the seed's default is not)")
    ap.add_argument("--backward", action="store_true", help="also time and measure the backward")
    ap.add_argument("--quick", action="store_true", help="N=4096, H=4 instead of N=16384, H=16")
    ap.add_argument("--check", action="store_true", help="exit with status 1 if a target is missed")
    args = ap.parse_args(argv)
    N, H, D = (4096, 4, 64) if args.quick else (16384, 16, 64)

    print(f"dilated_attention, the seed's scenario: B=1, N={common.fmt_n(N)}, H={H}, D={D}, float32, "
          f"{'causal' if args.causal else 'not causal'}, one BLAS thread")
    print(f"BLAS: {common.blas_info()}; machine: {common.load_line()}")
    print()
    results = []
    with common.blas_one_thread():
        for segments, rates in CONFIGS:
            results.append(run(N, H, D, segments, rates, args.causal, args.backward))
    headers = ["segments", "rates", "forward", "fwd working", "seed scores", "seed / ours"]
    if args.backward:
        headers += ["backward", "bwd working"]
    rows = []
    for r in results:
        row = [",".join(map(str, r["segments"])), ",".join(map(str, r["rates"])), common.fmt_s(r["fwd_s"]),
               common.fmt_bytes(r["fwd_bytes"]), common.fmt_bytes(r["seed"]), f"{r['seed'] / r['fwd_bytes']:.0f}x"]
        if args.backward:
            row += [common.fmt_s(r["bwd_s"]), common.fmt_bytes(r["bwd_bytes"])]
        rows.append(row)
    print(common.table(headers, rows))
    print()
    verdicts = common.Verdicts()
    worst = max(r["fwd_bytes"] for r in results)
    verdicts.add(worst <= TARGET_BYTES, f"forward working memory <= {TARGET_BYTES / 1e6:.0f} MB in every "
                                        f"configuration (worst {worst / 1e6:.1f} MB)")
    error = max(r["error"] for r in results)
    verdicts.add(error <= TARGET_ERROR, f"4 sampled rows within {TARGET_ERROR:g} of the float64 oracle "
                                        f"(worst {error:.1e})")
    return verdicts.exit_code(args.check)


if __name__ == "__main__":
    sys.exit(main())
