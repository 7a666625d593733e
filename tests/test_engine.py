"""The engine seam (refimpl/engine.py): what the ring asks of an engine, and that the NumPy engine is
the reference path unchanged.

A recording engine (the NumPy engine, logging its calls) shows that the ring hands every step exactly the
positions of the schedule, plans nothing itself, calls ``finish`` once per step after its messages, and
reports the engine's seconds as ``compute_s``; and that results do not depend on which engine object ran
them (a fresh one per call, or one per rank across calls).
"""

import numpy as np
import pytest

from conftest import make_dout, make_qkv

import refimpl
from refimpl.engine import NumpyEngine
from refimpl.layouts import Contiguous
from refimpl.schedule import kv_source


class Recording(NumpyEngine):
    """The NumPy engine, logging (phase, rank, q positions, k positions) of each step and each finish."""
    log = []

    def wrap(self, comm):
        self.rank = comm.rank
        return comm

    def attend(self, o, lse, q, k, v, q_pos, k_pos, *args, **kwargs):
        Recording.log.append(("forward", self.rank, q_pos.copy(), k_pos.copy()))
        return super().attend(o, lse, q, k, v, q_pos, k_pos, *args, **kwargs)

    def attend_backward(self, dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, *args, **kwargs):
        Recording.log.append(("backward", self.rank, q_pos.copy(), k_pos.copy()))
        return super().attend_backward(dq, dk, dv, q, k, v, dout, lse, delta, q_pos, k_pos, *args, **kwargs)

    def finish(self):
        seconds = super().finish()
        Recording.log.append(("finish", self.rank, seconds))
        return seconds


@pytest.mark.parametrize("P", [1, 2, 3, 5])
def test_the_ring_hands_each_step_the_schedules_positions(rng, P):
    q, k, v = make_qkv(rng, B=1, N=41, Hq=2, D=4)
    dout = make_dout(rng, q)
    Recording.log = []
    got = refimpl.simulate_ring(q, k, v, ranks=P, causal=True, dout=dout, block_q=8, block_k=8, engine=Recording)
    ref = refimpl.simulate_ring(q, k, v, ranks=P, causal=True, dout=dout, block_q=8, block_k=8)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert np.array_equal(getattr(got, name), getattr(ref, name)), name
    layout = Contiguous(41, P)
    for r in range(P):
        mine = [e for e in Recording.log if e[1] == r]
        steps = [e for e in mine if e[0] != "finish"]
        assert [e[0] for e in steps] == ["forward"] * P + ["backward"] * P
        for t, (_, _, q_pos, k_pos) in enumerate(steps):
            assert np.array_equal(q_pos, layout.positions(r))
            assert np.array_equal(k_pos, layout.positions(kv_source(r, t % P, P)))
        kinds = ["finish" if e[0] == "finish" else "step" for e in mine]
        assert kinds == ["step", "finish"] * (2 * P), "one finish() after every step"
        seconds = [e[2] for e in mine if e[0] == "finish"]
        trace = [rec.compute_s for rec in got.trace if rec.rank == r]
        assert trace == seconds, "compute_s is what the engine's finish() returned"


def test_one_engine_across_calls_gives_the_same_bits_as_fresh_ones(rng):
    q, k, v = make_qkv(rng, B=2, N=33, Hq=4, Hkv=2, D=8, dtype=np.float32)
    dout = make_dout(rng, q)
    comm_world = NumpyEngine.sim_world(1, 10.0)

    def run(shared):
        def main(comm):
            first = NumpyEngine()
            fwd = refimpl.ring_attention(q, k, v, comm, causal=True, block_q=8, block_k=16, engine=first)
            bwd = refimpl.ring_attention_backward(q, k, v, fwd.out, fwd.lse, dout, comm, causal=True, block_q=8,
                                                  block_k=16, engine=first if shared else NumpyEngine())
            return fwd, bwd
        return comm_world.run(main)[0]

    (f1, b1), (f2, b2) = run(True), run(False)
    for a, b in [(f1.out, f2.out), (f1.lse, f2.lse), (b1.dq, b2.dq), (b1.dk, b2.dk), (b1.dv, b2.dv)]:
        assert np.array_equal(a, b)
    assert f1.peak_bytes == f2.peak_bytes and b1.peak_bytes == b2.peak_bytes, "a rank never holds both phases' tiles"
