"""GPU benchmark: the fused kernels against torch SDPA and cuBLAS tiles, the ring on one GPU, 2^20 tokens.

Every kernel is checked before it is timed (llm.c's rule): at each size, the fused forward and backward
are compared with SDPA run in float32 on the same bfloat16 inputs, next to SDPA's own bfloat16 error; a
ratio over 2 is flagged. Then, measured side by side in one run (CUDA events, median of --repeats after a
warm-up; each step's device time is what the engine's ``finish`` reports):

1. kernels   fused vs ``torch.nn.functional.scaled_dot_product_attention`` vs the cuBLAS tile engine,
             bf16, B=1, H=16, D=128, N in --seqs, causal and not, forward and forward+backward.
             TFLOP/s count 4 N^2 H D per forward (half when causal) and 2.5x that for the backward.
             Target: fused forward >= 0.5x SDPA's throughput.
2. ring      P simulated ranks on one GPU against P = 1 (``simulate_ring``, device inputs, wall time).
             Target: <= 10% overhead.
3. million   N = 2^20, causal, 8 simulated ranks, bf16 forward: time and memory.
4. oracle    the float64 cuBLAS-tile engine at N = 2^20 (causal, H=1, D=64, one rank): TFLOP/s, and
             the time that implies at H=16, D=128.

usage: python bench/gpu.py [--quick] [--seqs 4096 16384 65536] [--repeats 5] [--json FILE]
"""

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import cupy as cp                      # noqa: E402
import numpy as np                     # noqa: E402

import refimpl                         # noqa: E402
from gpu import kernels                # noqa: E402
from gpu.engine import CupyEngine      # noqa: E402
from gpu.kernels import FORWARD        # noqa: E402
from refimpl import validate           # noqa: E402
from refimpl.masks import mask_for     # noqa: E402

BF16 = validate.BFLOAT16


def device_info():
    props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return {"gpu": name, "sms": props["multiProcessorCount"], "memory_gib": props["totalGlobalMem"] / 2**30,
            "cuda_runtime": cp.cuda.runtime.runtimeGetVersion(), "driver": cp.cuda.runtime.driverGetVersion(),
            "cupy": cp.__version__}


def bf16(x32):
    """float32 device array -> bfloat16 (round to nearest even) with the engine's own kernel."""
    y = cp.empty(x32.shape, BF16)
    kernels.launch_1d(kernels.function("convert.cu", "narrow", "bfloat16", 0), x32.size, (x32, y, kernels.i64(x32.size)))
    return y


def random_bf16(shape, seed):
    x = bf16(cp.random.default_rng(seed).standard_normal(shape, dtype=cp.float32))
    cp.cuda.Device().synchronize()          # torch and other engines' streams read it next
    return x


def median_ms(fn, repeats, stream, warmup=1):
    """Median milliseconds of ``fn()`` between CUDA events on ``stream``, where its work runs."""
    start, end = cp.cuda.Event(), cp.cuda.Event()
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start.record(stream)
        fn()
        end.record(stream)
        end.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, end))
    return statistics.median(times)


def median_ms_torch(torch, fn, repeats, warmup=1):
    """The same with torch's events on torch's current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def flops(N, H, D, causal, backward=False):
    f = 4.0 * N * N * H * D * (0.5 if causal else 1.0)
    return f * 3.5 if backward else f


class Kernels:
    """One rank's fused (or cuBLAS-tile) forward and backward over the whole sequence, plans cached."""

    def __init__(self, q, k, v, dout, causal, kernels_name, block, forward=None):
        self.engine = CupyEngine(kernels=kernels_name, forward=forward)
        self.q, self.k, self.v, self.dout = q, k, v, dout
        B, N, H, D = q.shape
        self.pos = np.arange(N, dtype=np.int64)
        self.mask, self.scale, self.block = mask_for(causal), 1.0 / math.sqrt(D), block
        self.o = cp.zeros(q.shape, np.float32)
        self.lse = cp.full((B, H, N), -np.inf, np.float64)

    def forward(self):
        self.o.fill(0)
        self.lse.fill(-np.inf)
        self.engine.attend(self.o, self.lse, self.q, self.k, self.v, self.pos, self.pos, self.mask, self.scale,
                           self.block, self.block)
        return self.engine.finish()

    def outputs(self):
        self.forward()
        out = self.engine.cast(self.o, self.q.dtype)
        return out, self.engine.cast(self.lse, np.float32)

    def backward(self):
        """Forward, row terms and backward: one unit, as SDPA's forward + backward is timed."""
        out, lse = self.outputs()
        delta, lse_safe = self.engine.row_terms(out, self.dout, lse, self.block)
        dq = cp.zeros(self.q.shape, np.float32)
        dk, dv = cp.zeros(self.k.shape, np.float32), cp.zeros(self.v.shape, np.float32)
        self.engine.attend_backward(dq, dk, dv, self.q, self.k, self.v, self.dout, lse_safe, delta, self.pos,
                                    self.pos, self.mask, self.scale, self.block, self.block)
        self.engine.finish()
        return dq, dk, dv


def sdpa(torch, q, k, v, dout, causal, backward):
    F = torch.nn.functional
    if not backward:
        with torch.no_grad():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for x in (q, k, v):
        x.grad = None
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    out.backward(dout)
    return out


def to_torch(torch, x):
    """A (B, N, H, D) CuPy array -> a contiguous (B, H, N, D) torch tensor (SDPA's own layout), same dtype."""
    t = torch.from_dlpack(x.view(cp.uint16) if x.dtype == BF16 else x)
    if x.dtype == BF16:
        t = t.view(torch.bfloat16)
    return t.transpose(1, 2).contiguous()


def rel(x, ref):
    x, ref = x.float(), ref.float()
    return float((x - ref).abs().max() / ref.abs().max())


def check_then_time(torch, N, H, D, causal, repeats, matmul_max_n):
    """Section 1 at one size: correctness first, then the timings. Returns a dict of results."""
    q, k, v, dout = (random_bf16((1, N, H, D), seed) for seed in range(4))
    fused = Kernels(q, k, v, dout, causal, "fused", 512)
    tq, tk, tv, tdo = (to_torch(torch, x) for x in (q, k, v, dout))
    row = {"N": N, "causal": causal}
    # correctness: fused vs SDPA in float32 on the same bf16 inputs, next to SDPA's own bf16 error
    if N <= 16384:
        ref32 = [x.float().requires_grad_() for x in (tq, tk, tv)]
        out32 = sdpa(torch, *ref32, tdo.float(), causal, True)
        lowp = [x.clone().requires_grad_() for x in (tq, tk, tv)]
        out16 = sdpa(torch, *lowp, tdo, causal, True)
        out, _ = fused.outputs()
        dq, dk, dv = fused.backward()
        mine = [to_torch(torch, out)] + [to_torch(torch, g) for g in (dq, dk, dv)]
        refs = [out32] + [x.grad for x in ref32]
        theirs = [out16] + [x.grad for x in lowp]
        row["check"] = {name: {"fused": rel(m, r), "sdpa_bf16": rel(t, r)}
                        for name, m, r, t in zip(("out", "dq", "dk", "dv"), mine, refs, theirs)}
        row["check_ok"] = all(c["fused"] <= 2 * c["sdpa_bf16"] + 1e-3 for c in row["check"].values())
        del ref32, out32, lowp, out16, mine, refs, theirs
    # timings
    tq.requires_grad_()
    tk.requires_grad_()
    tv.requires_grad_()
    row["fused_fwd_ms"] = median_ms(fused.forward, repeats, fused.engine.stream)
    row["fused_fwdbwd_ms"] = median_ms(fused.backward, repeats, fused.engine.stream)
    row["sdpa_fwd_ms"] = median_ms_torch(torch, lambda: sdpa(torch, tq, tk, tv, tdo, causal, False), repeats)
    row["sdpa_fwdbwd_ms"] = median_ms_torch(torch, lambda: sdpa(torch, tq, tk, tv, tdo, causal, True), repeats)
    for version in FORWARD:                      # the forward kernel's versions, each checked by the tests
        other = Kernels(q, k, v, dout, causal, "fused", 512, forward=version)
        row[f"fused_{version}_fwd_ms"] = median_ms(other.forward, repeats, other.engine.stream)
    with_backend = getattr(torch.nn, "attention", None)
    if with_backend is not None:                 # SDPA's backends one by one: which one is the baseline
        for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
            try:
                with with_backend.sdpa_kernel(getattr(with_backend.SDPBackend, backend)):
                    row[f"sdpa_{backend.lower()}_fwd_ms"] = median_ms_torch(
                        torch, lambda: sdpa(torch, tq, tk, tv, tdo, causal, False), repeats)
            except Exception as exc:             # noqa: BLE001 - a backend that cannot run this case
                row[f"sdpa_{backend.lower()}_fwd"] = f"unavailable: {type(exc).__name__}"
    if N <= matmul_max_n:
        plain = Kernels(q, k, v, dout, causal, "matmul", 2048)
        row["matmul_fwd_ms"] = median_ms(plain.forward, max(2, repeats // 2), plain.engine.stream)
        row["matmul_fwdbwd_ms"] = median_ms(plain.backward, max(2, repeats // 2), plain.engine.stream)
    for what in ("fwd", "fwdbwd"):
        work = flops(N, H, D, causal, what == "fwdbwd")
        for key in [k[:-len(f"_{what}_ms")] for k in list(row) if k.endswith(f"_{what}_ms")]:
            row[f"{key}_{what}_tflops"] = work / (row[f"{key}_{what}_ms"] * 1e-3) / 1e12
        row[f"fused_over_sdpa_{what}"] = row[f"fused_{what}_tflops"] / row[f"sdpa_{what}_tflops"]
    return row


def ring_overhead(N, H, D, causal, ranks, repeats):
    """Section 2: wall time of simulate_ring with P ranks on one GPU, against P = 1."""
    q, k, v = (random_bf16((1, N, H, D), seed) for seed in range(3))
    times, steps = {}, {}
    for P in ranks:
        def run():
            return refimpl.simulate_ring(q, k, v, ranks=P, causal=causal, block_q=1024, block_k=1024,
                                         engine=CupyEngine)
        run()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            res = run()
            samples.append(time.perf_counter() - t0)
        times[P] = statistics.median(samples)
        per_rank = [[rec for rec in res.trace if rec.rank == r] for r in range(P)]
        steps[P] = {"device_compute_s_per_rank": [round(sum(x.compute_s for x in recs), 4) for recs in per_rank],
                    "wait_s_per_rank": [round(sum(x.wait_s for x in recs), 4) for recs in per_rank]}
    return {"N": N, "causal": causal, "seconds": times, "overhead": {P: times[P] / times[1] - 1 for P in ranks},
            "trace": steps}


def million(H, D, ranks):
    """Section 3: N = 2^20, causal, bf16, forward, on ``ranks`` simulated ranks."""
    N = 1 << 20
    q, k, v = (random_bf16((1, N, H, D), seed) for seed in range(3))
    pool = cp.get_default_memory_pool()
    cp.cuda.Device().synchronize()
    before = pool.total_bytes()
    t0 = time.perf_counter()
    res = refimpl.simulate_ring(q, k, v, ranks=ranks, causal=True, block_q=4096, block_k=4096, engine=CupyEngine)
    cp.cuda.Device().synchronize()
    seconds = time.perf_counter() - t0
    finite = bool(cp.isfinite(res.lse).all())
    return {"N": N, "H": H, "D": D, "ranks": ranks, "seconds": seconds,
            "tflops": flops(N, H, D, True) / seconds / 1e12, "lse_finite": finite,
            "peak_bytes_per_rank": max(res.peak_bytes), "inputs_bytes": 3 * q.nbytes,
            "pool_bytes_during_run": pool.total_bytes() - before + 3 * q.nbytes,
            "naive_score_bytes": N * N * H * 2}


def oracle(N, H, D, block):
    """Section 4: the float64 cuBLAS-tile engine at N tokens, causal, one rank."""
    rng = cp.random.default_rng(7)
    q, k, v = (rng.standard_normal((1, N, H, D), dtype=cp.float64) for _ in range(3))
    engine = CupyEngine(kernels="matmul")
    pos = np.arange(N, dtype=np.int64)
    o, lse = cp.zeros(q.shape, np.float64), cp.full((1, H, N), -np.inf, np.float64)
    t0 = time.perf_counter()
    engine.attend(o, lse, q, k, v, pos, pos, mask_for(True), 1 / math.sqrt(D), block, block)
    device_s = engine.finish()
    seconds = time.perf_counter() - t0
    tflops = flops(N, H, D, True) / seconds / 1e12
    return {"N": N, "H": H, "D": D, "block": block, "seconds": seconds, "device_seconds": device_s,
            "tflops": tflops, "minutes_at_H16_D128": flops(N, 16, 128, True) / (tflops * 1e12) / 60}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[4096, 16384, 65536])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--matmul-max-n", type=int, default=16384, help="largest N for the cuBLAS-tile baseline")
    p.add_argument("--ring-seqs", type=int, nargs="+", default=[16384, 65536])
    p.add_argument("--ring-ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--million-heads", type=int, default=8)
    p.add_argument("--skip", nargs="*", default=[], choices=["kernels", "ring", "million", "oracle"])
    p.add_argument("--quick", action="store_true", help="N 4096 and 16384, 3 repeats, no million/oracle")
    p.add_argument("--json", default=None, help="also write every number to this file")
    args = p.parse_args()
    if args.quick:
        args.seqs, args.repeats, args.ring_seqs = [4096, 16384], 3, [16384]
        args.skip = args.skip + ["million", "oracle"]
    results = {"device": device_info(), "args": vars(args)}
    print(json.dumps(results["device"]))
    try:
        import torch
        results["torch"] = torch.__version__
    except ImportError:
        torch = None
    sections = {
        "kernels": lambda: [check_then_time(torch, N, args.heads, args.dim, causal, args.repeats, args.matmul_max_n)
                            for N in args.seqs for causal in (False, True)],
        "ring": lambda: [ring_overhead(N, args.heads, args.dim, causal, args.ring_ranks, max(2, args.repeats // 2))
                         for N in args.ring_seqs for causal in (False, True)],
        "million": lambda: million(args.million_heads, args.dim, 8),
        "oracle": lambda: oracle(1 << 20, 1, 64, 8192),
    }
    if torch is None:
        args.skip.append("kernels")
        results["kernels_skipped"] = "torch is not installed"
    failed = []
    for name, run in sections.items():
        if name in args.skip:
            continue
        try:
            results[name] = run()
            print(json.dumps({name: results[name]}), flush=True)
        except Exception:                      # noqa: BLE001 - report, and go on with the other sections
            import traceback
            traceback.print_exc()
            failed.append(name)
        cp.get_default_memory_pool().free_all_blocks()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    summary(results)
    if failed:
        print(f"failed sections: {', '.join(failed)}")
        sys.exit(1)


def summary(results):
    d = results["device"]
    print(f"\n{d['gpu']}, {d['sms']} SMs, CUDA runtime {d['cuda_runtime']}, CuPy {d['cupy']}, "
          f"torch {results.get('torch', 'missing')}")
    if results.get("kernels"):
        print("\n| N | causal | check (fused err / SDPA bf16 err, max over out dq dk dv) | fused fwd | SDPA fwd | "
              "fwd ratio | cuBLAS fwd | fused fwd+bwd | SDPA fwd+bwd | fwd+bwd ratio | cuBLAS fwd+bwd |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in results["kernels"]:
            check = "-" if "check" not in r else f"{max(c['fused'] / c['sdpa_bf16'] for c in r['check'].values()):.2f}" \
                    + ("" if r["check_ok"] else " FLAG")

            def t(key):
                return f"{r[key + '_ms']:.2f} ms {r[key + '_tflops']:.0f} TF/s" if key + "_ms" in r else "-"
            print(f"| {r['N']} | {r['causal']} | {check} | {t('fused_fwd')} | {t('sdpa_fwd')} | "
                  f"{r['fused_over_sdpa_fwd']:.2f} | {t('matmul_fwd')} | {t('fused_fwdbwd')} | {t('sdpa_fwdbwd')} | "
                  f"{r['fused_over_sdpa_fwdbwd']:.2f} | {t('matmul_fwdbwd')} |")
        keys = [k[:-7] for k in results["kernels"][0] if k.endswith("_fwd_ms") and k not in
                ("fused_fwd_ms", "sdpa_fwd_ms", "matmul_fwd_ms")]
        print("\nforward versions and SDPA backends, TF/s:\n| N | causal | " + " | ".join(keys) + " |")
        print("|---|---|" + "---|" * len(keys))
        for r in results["kernels"]:
            print(f"| {r['N']} | {r['causal']} | " + " | ".join(
                f"{r[k + '_fwd_tflops']:.0f}" if k + "_fwd_tflops" in r else "-" for k in keys) + " |")
    for r in results.get("ring", []):
        print(f"\nring on one GPU, N={r['N']} causal={r['causal']}: " + ", ".join(
            f"P={P} {s:.3f} s ({100 * r['overhead'][P]:+.1f}%)" for P, s in r["seconds"].items()))
    if "million" in results:
        m = results["million"]
        print(f"\nN=2^20 causal, {m['ranks']} simulated ranks, H={m['H']} D={m['D']} bf16 forward: {m['seconds']:.1f} s "
              f"({m['tflops']:.0f} TF/s), peak per rank {m['peak_bytes_per_rank'] / 2**30:.2f} GiB, device pool "
              f"{m['pool_bytes_during_run'] / 2**30:.1f} GiB; a score matrix would be {m['naive_score_bytes'] / 2**40:.1f} TiB")
    if "oracle" in results:
        o = results["oracle"]
        print(f"\nfloat64 oracle (cuBLAS tiles), N=2^20 causal H={o['H']} D={o['D']}: {o['seconds']:.1f} s, "
              f"{o['tflops']:.1f} TF/s; at H=16, D=128: {o['minutes_at_H16_D128']:.1f} min")


if __name__ == "__main__":
    main()
