"""Ring attention small enough to read every number: N = 8 tokens, P = 2 ranks, D = 2, one head, causal,
tiles of 2 x 2. ``specs/walkthrough.md`` explains what it prints; ``tests/test_walkthrough.py`` checks that
the walkthrough shows exactly these numbers.

Every number comes from the library: ``simulate_ring`` runs the real ring (``ring.py``, the NumPy engine,
the in-process communicator). It is handed an engine that records each step's input and output (running
(o, lse) before and after, and the partial of the step's K/V shard alone, from ``blockwise.attend_shard``),
and a communicator that records each dK/dV message as it is sent. The oracle is ``refimpl.naive_attention``.

    python examples/tiny_ring.py
"""

import numpy as np

import refimpl
from refimpl import tile
from refimpl.blockwise import attend_shard
from refimpl.engine import NumpyEngine
from refimpl.masks import EMPTY, CausalMask
from refimpl.schedule import BACKWARD_DKV

N, P, D, BLOCK = 8, 2, 2, 2
SCALE = 1 / np.sqrt(D)


def inputs():
    """q, k, v, dout: (B, N, H, D) = (1, 8, 1, 2) float64, four draws of ``default_rng(0)``."""
    rng = np.random.default_rng(0)
    return tuple(rng.standard_normal((1, N, 1, D)) for _ in range(4))


class RecordingComm:
    """The rank's communicator, unchanged, except that it notes every dK/dV message it sends."""

    def __init__(self, comm, sent):
        self.comm, self.sent = comm, sent

    def __getattr__(self, name):
        return getattr(self.comm, name)

    def isend(self, buf, dest, tag):
        if tag % 3 == BACKWARD_DKV:                    # schedule.tag(kind, step) = 3 * step + kind
            self.sent.append(dict(rank=self.comm.rank, dest=dest, step=tag // 3, dk=buf[0, 0, :, 0].copy(),
                                  dv=buf[1, 0, :, 0].copy()))
        return self.comm.isend(buf, dest, tag)


def recording_engine(steps, sent):
    """An engine class for ``simulate_ring``: the NumPy engine, plus a note of each step in ``steps``."""

    class Recording(NumpyEngine):
        def wrap(self, comm):
            self.rank, self.step = comm.rank, {"forward": 0, "backward": 0}
            return RecordingComm(comm, sent)

        def note(self, phase, k_pos, plan, **arrays):
            steps.append(dict(phase=phase, rank=self.rank, step=self.step[phase], kv=int(k_pos[0]) * P // N,
                              plan=plan, **{name: a[0, :, 0].copy() if a.ndim == 4 else a[0, 0].copy()
                                            for name, a in arrays.items()}))
            self.step[phase] += 1

        def attend(self, o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile=None):
            o_before, lse_before = o.copy(), lse.copy()
            plan = super().attend(o, lse, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, on_tile)
            o_part, lse_part = np.zeros_like(o), np.full_like(lse, -np.inf)     # this K/V shard alone
            attend_shard(o_part, lse_part, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k,
                         tile.Workspace(o.dtype))
            self.note("forward", k_pos, plan, o_before=o_before, lse_before=lse_before, o_part=o_part,
                      lse_part=lse_part, o=o, lse=lse)
            return plan

        def attend_backward(self, dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale, block_q,
                            block_k, on_tile=None):
            plan = super().attend_backward(dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale,
                                           block_q, block_k, on_tile)
            self.note("backward", k_pos, plan, dk=dk, dv=dv)          # dk, dv started at 0: this step's part
            return plan

    return Recording


def num(x):
    return f"{round(float(x), 3) + 0.0:6.3f}"          # + 0.0: no "-0.000"


def vec(x):
    return "[" + " ".join(num(a) for a in x) + "]"


def span(lo, hi):
    return f"{lo}-{hi}" if hi > lo else f"{lo}"


def tile_kinds(plan):
    """{(q block, k block): "full", "partial" or "empty"} for one step, from the engine's ``StepPlan``."""
    kinds = {(qs.start // BLOCK, ks.start // BLOCK): kind for qs, cols in plan.rows for ks, kind in cols}
    kinds.update({tuple(t): EMPTY for t in plan.skipped})
    return kinds


def tiles(plan, q0, k0):
    """The step's tiles in order, as 'q rows x k cols kind'."""
    kinds = tile_kinds(plan)
    return ", ".join(f"{span(q0 + i * BLOCK, q0 + i * BLOCK + BLOCK - 1)} x "
                     f"{span(k0 + j * BLOCK, k0 + j * BLOCK + BLOCK - 1)} {kinds[i, j]}" for i, j in sorted(kinds))


def show_inputs(q, k, v, dout):
    print(f"N={N}, P={P}, D={D}, one head, causal, tiles of {BLOCK} x {BLOCK}, scale = 1/sqrt(D) = {SCALE:.4f}")
    print("rng = np.random.default_rng(0); q, k, v, dout = (rng.standard_normal((1, 8, 1, 2)) for _ in range(4))")
    print("pos  q                k                v                dout")
    for i in range(N):
        print(f"{i:3d}  " + "  ".join(vec(x[0, i, 0]) for x in (q, k, v, dout)))


def show_grid(steps, n):
    """The whole 8 x 8 score matrix in tiles: which rank computes each tile, at which step, of what kind."""
    print("\nthe score matrix in tiles: the rank and step that meet each tile; F full, P partial, E empty")
    cell = {}
    for s in (s for s in steps if s["phase"] == "forward"):
        for (i, j), kind in tile_kinds(s["plan"]).items():
            cell[s["rank"] * n // BLOCK + i, s["kv"] * n // BLOCK + j] = f"r{s['rank']} t{s['step']} {kind[0].upper()}"
    blocks = N // BLOCK
    print(" " * 13 + "".join(f"keys {span(j * BLOCK, j * BLOCK + BLOCK - 1):<7}" for j in range(blocks)).rstrip())
    for i in range(blocks):
        print((f"queries {span(i * BLOCK, i * BLOCK + BLOCK - 1)}  "
               + "".join(f"{cell[i, j]:<12}" for j in range(blocks))).rstrip())


def show_forward(steps, n):
    for r in range(P):
        print(f"\nforward, rank {r} (queries {r * n}..{r * n + n - 1})")
        for s in sorted((s for s in steps if s["phase"] == "forward" and s["rank"] == r), key=lambda s: s["step"]):
            held = "its own" if s["kv"] == r else f"received from rank {(r - 1) % P}"
            print(f"step {s['step']}: holds kv{s['kv']} (keys {s['kv'] * n}..{s['kv'] * n + n - 1}), {held}")
            print(f"  tiles (q rows x k cols; empty ones are skipped): {tiles(s['plan'], r * n, s['kv'] * n)}")
            print("  pos  partial lse  partial o          merged lse  w_run  w_new  merged o")
            w_run = np.exp(s["lse_before"] - s["lse"])
            w_new = np.exp(s["lse_part"] - s["lse"])
            for i in range(n):
                print(f"  {r * n + i:3d}       {num(s['lse_part'][i])}  {vec(s['o_part'][i])}      {num(s['lse'][i])}"
                      f" {num(w_run[i])} {num(w_new[i])}  {vec(s['o'][i])}")
            o, lse = s["o_before"].copy(), s["lse_before"].copy()
            tile.merge(o, lse, s["o_part"], s["lse_part"])
            same = np.allclose(o, s["o"], rtol=0, atol=1e-12) and np.allclose(lse, s["lse"], rtol=0, atol=1e-12)
            print(f"  tile.merge(running before, partial) == the ring's running (o, lse) after the step: {same}")


def show_one_step(q, k, v):
    """Rank 1, step 0, query rows 6-7: its two tiles with ``tile.attend_tile``, folded by ``tile.merge``."""
    print("\ninside rank 1's step 0, query rows 6-7: tile by tile")
    mask, ws, q_pos = CausalMask(), tile.Workspace(np.float64), np.arange(6, 8)
    qt = tile.q_tile(q[:, 6:8], 1, np.float64)                           # working form (B, Hkv, G, bq, D)
    o_run, lse_run = np.zeros(qt.shape), np.full(qt.shape[:4], -np.inf)
    for k_pos in (np.arange(4, 6), np.arange(6, 8)):
        kind = mask.classify(q_pos, k_pos)
        o, lse = tile.attend_tile(qt, tile.kv_tile(k[:, k_pos], np.float64), tile.kv_tile(v[:, k_pos], np.float64),
                                  q_pos, k_pos, mask, kind, SCALE, ws)
        tile.merge(o_run, lse_run, o, lse)
        print(f"tile 6-7 x {span(k_pos[0], k_pos[-1])} ({kind}):  lse {vec(lse[0, 0, 0])}  o {vec(o[0, 0, 0, 0])} "
              f"{vec(o[0, 0, 0, 1])}")
        print(f"  running after tile.merge:  lse {vec(lse_run[0, 0, 0])}  o {vec(o_run[0, 0, 0, 0])} "
              f"{vec(o_run[0, 0, 0, 1])}")


def show_result(names, ring, oracle):
    print(("pos  " + "  ".join(f"ring {n:<11} oracle {n:<9}" for n in names)).rstrip())
    for i in range(N):
        print((f"{i:3d}  " + "  ".join(f"{vec(a[i]) if a.ndim > 1 else num(a[i]):<16} "
                                       f"{vec(b[i]) if b.ndim > 1 else num(b[i]):<16}"
                                       for a, b in zip(ring, oracle))).rstrip())


def show_backward(steps, sent, n):
    for s in range(P):
        print(f"\nthe dK/dV accumulator of kv{s} (keys {s * n}..{s * n + n - 1}), hop by hop")
        hops = sorted((m for m in sent if (m["rank"] - m["step"]) % P == s), key=lambda m: m["step"])
        for m in hops:
            mine = next(c for c in steps if c["phase"] == "backward" and c["rank"] == m["rank"]
                        and c["step"] == m["step"])
            how = ("computes its part into it" if m["step"] == 0
                   else f"receives it from rank {(m['rank'] - 1) % P}, adds its part")
            home = " (home)" if m["dest"] == s else ""
            print(f"step {m['step']}, rank {m['rank']}: {how}; tiles {mine['plan'].computed} computed, "
                  f"{len(mine['plan'].skipped)} skipped; sends the sum to rank {m['dest']}{home}")
            print("  key  part dk          part dv          sent dk          sent dv")
            for i in range(n):
                print(f"  {s * n + i:3d}  " + "  ".join(vec(x[i]) for x in (mine["dk"], mine["dv"], m["dk"], m["dv"])))


def main():
    """Print the walkthrough's numbers; returns {name: (ring's array, oracle's array)}."""
    q, k, v, dout = inputs()
    steps, sent = [], []
    res = refimpl.simulate_ring(q, k, v, ranks=P, causal=True, dout=dout, block_q=BLOCK, block_k=BLOCK,
                                engine=recording_engine(steps, sent))
    out, lse = refimpl.naive_attention(q, k, v, causal=True)
    dq, dk, dv = refimpl.naive_attention_backward(q, k, v, dout, causal=True)
    n = N // P
    show_inputs(q, k, v, dout)
    show_grid(steps, n)
    show_forward(steps, n)
    show_one_step(q, k, v)
    print("\nforward result, natural order, next to the float64 oracle (refimpl.naive_attention)")
    show_result(("lse", "out"), (res.lse[0, 0], res.out[0, :, 0]), (lse[0, 0], out[0, :, 0]))
    show_backward(steps, sent, n)
    print("\nbackward result next to the oracle (refimpl.naive_attention_backward)")
    show_result(("dq", "dk", "dv"), (res.dq[0, :, 0], res.dk[0, :, 0], res.dv[0, :, 0]),
                (dq[0, :, 0], dk[0, :, 0], dv[0, :, 0]))
    results = dict(zip(("out", "lse", "dq", "dk", "dv"), zip((res.out, res.lse, res.dq, res.dk, res.dv),
                                                             (out, lse, dq, dk, dv))))
    worst = max(np.max(np.abs(a - b)) / np.max(np.abs(b)) for a, b in results.values())
    print(f"every output within 1e-12 of the oracle, relative to its largest value (the float64 rule): "
          f"{worst <= 1e-12}")
    return results

if __name__ == "__main__":
    main()
