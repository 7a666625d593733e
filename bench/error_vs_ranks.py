"""Error of ring attention against the float64 oracle as the number of ranks P grows (zhuzilin/ring-flash-attention#42).

#42 reports that the backward error of ring-flash-attention grows with the world size, and names the
suspect: flash-attn returns each step's result in 16 bits, which the ring then accumulates in float32.
This measures, on one problem (default B=1, N=1024, Hq=Hkv=4, D=64, causal or ``--no-causal``, scores of
standard deviation ``--logits`` 1, three seeds), every output's
error for P in 1, 2, 4, 8, 16, 32 (``simulate_ring``, default tiles, so each rank computes one tile per
step), under four schemes:

fp32            float32 inputs; ringattn's ring: each step's partials stay float32, the running lse float64
bf16            inputs rounded to bfloat16 (ml_dtypes), then computed as float32 by the same ring
bf16 per-step   the same inputs, but each step's partial out and its dq, dk, dv contributions are rounded to
                bfloat16 before they are folded into the float32 accumulators (lse to float32): a ring built
                from a kernel that returns 16-bit results per step, as #42 describes (``PerStepRounding``)
bf16 running    the same inputs, with the running out and dq themselves rounded to bfloat16 after every
                step: accumulators held in 16 bits (``RoundedAccumulators``; dk, dv stay float32)

Two numbers per output and P (median over the seeds):

rel     max |x - ref| / max |ref|: the normwise error of the ring's float32 result
ratio   error / bound of the tolerance rule (``tolerance.judge``) for the input dtype, with x as the
        backend returns it: float32 for fp32, rounded to bfloat16 for the bf16 schemes (lse stays float32)

The table is printed, and written as CSV with ``--csv``; with matplotlib installed, ``--plot FILE.png`` draws
rel against P. BLAS is pinned to one thread. About 15 s at the defaults on a 2-core machine; ``--quick``
(N=256, one seed) about 3 s.
"""

import argparse
import csv
import statistics
import sys

from common import pin_blas_env

pin_blas_env(1)

import numpy as np  # noqa: E402  (after pin_blas_env, so OpenBLAS starts with one thread)

from refimpl import naive_attention, naive_attention_backward, simulate_ring, tile, tolerance  # noqa: E402
from refimpl.engine import NumpyEngine  # noqa: E402
from refimpl.plain import plain_outputs  # noqa: E402
from refimpl.validate import BFLOAT16  # noqa: E402

OUTPUTS = tolerance.OUTPUTS
RANKS = (1, 2, 4, 8, 16, 32)


def to_bf16(x):
    """x rounded to bfloat16 (nearest even), returned in x's dtype."""
    return x.astype(BFLOAT16).astype(x.dtype)


class PerStepRounding(NumpyEngine):
    """A ring whose per-step kernel returns bfloat16: each step's partial out (and float32 lse), and each
    step's dq, dk, dv contributions, are rounded before the ring folds them into its accumulators."""

    def attend(self, o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile=None):
        o_step, lse_step = np.zeros_like(o), np.full_like(lse, -np.inf)
        plan = super().attend(o_step, lse_step, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile)
        heads_first = (0, 2, 1, 3)                          # merge takes (..., n, D) and (..., n)
        tile.merge(o.transpose(heads_first), lse, to_bf16(o_step).transpose(heads_first),
                   lse_step.astype(np.float32).astype(lse.dtype))
        return plan

    def attend_backward(self, dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                        block_k, on_tile=None):
        steps = [np.zeros_like(a) for a in (dq, dk, dv)]
        plan = super().attend_backward(*steps, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                                       block_k, on_tile)
        for acc, step in zip((dq, dk, dv), steps):
            acc += to_bf16(step)
        return plan


class RoundedAccumulators(NumpyEngine):
    """A ring that keeps its running out and dq in bfloat16 between steps (rounded after every step). dk and
    dv still travel in float32: the ring adds each step's contribution to them outside the engine."""

    def attend(self, o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile=None):
        plan = super().attend(o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile)
        o[...] = to_bf16(o)
        return plan

    def attend_backward(self, dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                        block_k, on_tile=None):
        plan = super().attend_backward(dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                                       block_k, on_tile)
        dq[...] = to_bf16(dq)
        return plan


SCHEMES = {"fp32": (np.float32, NumpyEngine), "bf16": (BFLOAT16, NumpyEngine),
           "bf16 per-step": (BFLOAT16, PerStepRounding), "bf16 running": (BFLOAT16, RoundedAccumulators)}


def problem(args, seed):
    """q, k, v, dout as float32 arrays: standard normal, q and k times sqrt(logits) (as ``cases.py``)."""
    rng = np.random.default_rng(seed)
    shape = (args.batch, args.seq, args.heads, args.dim)
    size = [np.sqrt(args.logits)] * 2 + [1.0] * 2              # q, k scaled so the scores' std is ``logits``
    return [(rng.standard_normal(shape) * m).astype(np.float32) for m in size]


def measure(args, seed, schemes):
    """{(scheme, P, output): (rel, ratio)} for one seed."""
    found = {}
    base = problem(args, seed)
    scale = 1.0 / np.sqrt(args.dim)
    for dtype in dict.fromkeys(SCHEMES[s][0] for s in schemes):
        q, k, v, dout = (to_bf16(x) for x in base) if dtype is BFLOAT16 else base
        refs = dict(zip(("out", "lse"), naive_attention(q, k, v, causal=args.causal, scale=scale)))
        refs.update(zip(("dq", "dk", "dv"), naive_attention_backward(q, k, v, dout, causal=args.causal, scale=scale)))
        plain = plain_outputs(q, k, v, dout, causal=args.causal, scale=scale, round_to=dtype)
        scales = tolerance.Scales.of(q, k, v, dout, scale=scale)
        for name in (s for s in schemes if SCHEMES[s][0] is dtype):
            for P in args.ranks:
                ring = simulate_ring(q, k, v, ranks=P, causal=args.causal, scale=scale, dout=dout,
                                     engine=SCHEMES[name][1])
                for output in OUTPUTS:
                    x = getattr(ring, output)
                    rel = tolerance.abs_error(x, refs[output])[0] / tolerance.output_scale(output, refs[output])
                    returned = x if output == "lse" or dtype is np.float32 else to_bf16(x)
                    verdict = tolerance.judge(output, returned, refs[output], input_dtype=dtype, plain=plain[output],
                                              scales=scales)
                    found[name, P, output] = (rel, verdict.ratio)
                print(f"  seed {seed} {name:<14} P={P:<3} done", file=sys.stderr)
    return found


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seq", type=int, default=1024, help="N (every P must divide into at least one token per rank)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--logits", type=float, default=1.0,
                   help="standard deviation of the scores: q and k are standard normal times sqrt(logits)")
    p.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    p.add_argument("--seeds", type=int, default=3, help="problems measured; the table shows medians")
    p.add_argument("--csv", metavar="FILE", default=None, help="also write every median to FILE")
    p.add_argument("--plot", metavar="FILE", default=None, help="draw rel against P to FILE (needs matplotlib)")
    p.add_argument("--quick", action="store_true", help="N=256, one seed")
    args = p.parse_args()
    if args.quick:
        args.seq, args.seeds = 256, 1
    schemes = [s for s in SCHEMES if BFLOAT16 is not None or SCHEMES[s][0] is np.float32]
    if len(schemes) < len(SCHEMES):
        print("ml_dtypes is not installed: measuring fp32 only", file=sys.stderr)
    runs = [measure(args, seed, schemes) for seed in range(args.seeds)]
    median = {key: tuple(statistics.median(run[key][i] for run in runs) for i in (0, 1)) for key in runs[0]}

    print(f"ring attention error against float64: B={args.batch} N={args.seq} Hq=Hkv={args.heads} D={args.dim} "
          f"{'causal' if args.causal else 'full'}, scores of std {args.logits:g}, median of {args.seeds} seed(s)")
    print("rel = max|x - ref| / max|ref| of the float32 result; ratio = error / bound of the rule "
          "(bf16 schemes: outputs rounded to bfloat16, as returned)")
    for name in schemes:
        print(f"\n{name}")
        print(f"{'P':>4}  " + "  ".join(f"{o + ' rel':>11} {'ratio':>5}" for o in OUTPUTS))
        for P in args.ranks:
            print(f"{P:>4}  " + "  ".join(f"{median[name, P, o][0]:>11.3e} {median[name, P, o][1]:>5.2f}"
                                          for o in OUTPUTS))
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["scheme", "ranks", "output", "rel", "ratio"])
            for (name, P, o), (rel, ratio) in median.items():
                w.writerow([name, P, o, f"{rel:.6e}", f"{ratio:.4f}"])
    if args.plot:
        plot(args, schemes, median)


def plot(args, schemes, median):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (the table and --csv have the numbers)", file=sys.stderr)
        return
    fig, axes = plt.subplots(1, len(OUTPUTS), figsize=(4 * len(OUTPUTS), 3.5), sharex=True)
    for ax, o in zip(axes, OUTPUTS):
        for name in schemes:
            ax.plot(args.ranks, [median[name, P, o][0] for P in args.ranks], marker="o", label=name)
        ax.set(xscale="log", yscale="log", title=o, xlabel="ranks P")
        ax.set_xticks(args.ranks, [str(P) for P in args.ranks])
    axes[0].set_ylabel("max |x - ref| / max |ref|")
    axes[-1].legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
