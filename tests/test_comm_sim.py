"""The in-process communicator: P ranks as P threads, with MPI's point-to-point semantics.

Ring attention is written against a small MPI subset (isend/irecv/wait, the blocking forms, three
collectives). ``SimWorld`` provides it in one process and turns every way a distributed program can go
wrong into a prompt exception rather than a hang: a deadlock, a mismatched message, a rank that crashed,
a rank that left early.

Every world here runs on a daemon thread joined with a timeout, so a regression that makes the
simulator hang fails the test instead of hanging the suite.

It must also stay cheap with thousands of ranks: the tests with hundreds of ranks check the cost
structure (one wakeup per wait, at most ``running`` ranks at once, the right bits at P=256) rather than
time it; ``bench/sim_ranks.py`` measures the seconds.
"""

import math
import os
import re
import threading
import time

import numpy as np
import pytest

from conftest import assert_fp64_close, make_qkv
from refimpl import naive_attention, simulate_ring, validate
from refimpl.comm import CommError, DeadlockError, RankAborted, SimWorld
from refimpl.engine import NumpyEngine
from refimpl.layouts import Contiguous
from refimpl.masks import mask_for
from refimpl.schedule import BACKWARD_KV, kv_source, tag

JOIN_TIMEOUT = 10.0


def run_world(P, fn, timeout=30.0):
    """Run ``SimWorld(P, timeout).run(fn)`` without risking a hang. Returns (results, exception, seconds)."""
    return run_in(SimWorld(P, timeout), fn)


def run_in(world, fn):
    """Run ``world.run(fn)`` on a daemon thread joined with a timeout. Returns (results, exception, seconds)."""
    box = {}

    def target():
        try:
            box["results"] = world.run(fn)
        except BaseException as exc:        # noqa: BLE001 - handed to the test
            box["error"] = exc

    t0 = time.monotonic()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(JOIN_TIMEOUT)
    assert not thread.is_alive(), f"SimWorld({world.size}).run did not return within {JOIN_TIMEOUT} s"
    return box.get("results"), box.get("error"), time.monotonic() - t0


def run_ok(P, fn):
    results, error, _ = run_world(P, fn)
    if error is not None:
        raise error
    return results


# -- point to point -----------------------------------------------------------------------------------

def test_isend_irecv_wait():
    def main(comm):
        if comm.rank == 0:
            data = np.arange(6, dtype=np.float64).reshape(2, 3)
            req = comm.isend(data, 1, tag=5)
            comm.wait(req)
            return None
        buf = np.zeros((2, 3))
        req = comm.irecv(buf, 0, tag=5)
        comm.wait(req)
        return buf

    results = run_ok(2, main)
    np.testing.assert_array_equal(results[1], np.arange(6.0).reshape(2, 3))


def test_receive_posted_before_send_and_waitall():
    def main(comm):
        peer = 1 - comm.rank
        buf = np.empty(4, np.float32)
        mine = np.full(4, comm.rank + 10, np.float32)
        comm.waitall([comm.irecv(buf, peer, 0), comm.isend(mine, peer, 0)])
        return buf

    results = run_ok(2, main)
    np.testing.assert_array_equal(results[0], np.full(4, 11, np.float32))
    np.testing.assert_array_equal(results[1], np.full(4, 10, np.float32))


def test_blocking_send_recv():
    def main(comm):
        if comm.rank == 0:
            comm.send(np.array([3, 1, 4], dtype=np.int64), 2, tag=1)
        elif comm.rank == 2:
            buf = np.zeros(3, np.int64)
            comm.recv(buf, 0, tag=1)
            return buf.tolist()

    assert run_ok(3, main)[2] == [3, 1, 4]


@pytest.mark.parametrize("P", [2, 3, 4, 5])
def test_sendrecv_ring_shift(P):
    """One step of the ring: every rank sends to r + 1 and receives from r - 1 at once."""
    def main(comm):
        r = comm.rank
        mine = np.full((2, 3), float(r))
        got = np.empty_like(mine)
        comm.sendrecv(mine, (r + 1) % P, got, (r - 1) % P, tag=0)
        return got

    results = run_ok(P, main)
    for r, got in enumerate(results):
        np.testing.assert_array_equal(got, np.full((2, 3), float((r - 1) % P)))


@pytest.mark.parametrize("P", [2, 3, 5])
def test_full_rotation_returns_every_shard_home(P):
    """P - 1 shifts visit every shard; P shifts bring each back to its owner."""
    def main(comm):
        r = comm.rank
        current, seen = np.array([r]), [r]
        for step in range(P):
            nxt = np.empty_like(current)
            comm.sendrecv(current, (r + 1) % P, nxt, (r - 1) % P, tag=step)
            current = nxt
            seen.append(int(current[0]))
        return seen

    for r, seen in enumerate(run_ok(P, main)):
        assert seen == [(r - t) % P for t in range(P + 1)]


def test_messages_between_a_pair_with_one_tag_arrive_in_order():
    def main(comm):
        if comm.rank == 0:
            reqs = [comm.isend(np.array([float(i)]), 1, tag=7) for i in range(5)]
            comm.waitall(reqs)
            return None
        bufs = [np.empty(1) for _ in range(5)]
        comm.waitall([comm.irecv(b, 0, tag=7) for b in bufs])
        return [float(b[0]) for b in bufs]

    assert run_ok(2, main)[1] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_tags_keep_messages_apart():
    """A receive matches the send with its tag, not the one posted first."""
    def main(comm):
        if comm.rank == 0:
            comm.waitall([comm.isend(np.array([1.0]), 1, tag=1), comm.isend(np.array([2.0]), 1, tag=2)])
            return None
        a, b = np.empty(1), np.empty(1)
        comm.waitall([comm.irecv(b, 0, tag=2), comm.irecv(a, 0, tag=1)])
        return a[0], b[0]

    assert run_ok(2, main)[1] == (1.0, 2.0)


def test_send_to_self():
    def main(comm):
        out = np.empty(3)
        comm.waitall([comm.isend(np.array([1.0, 2.0, 3.0]), 0, 4), comm.irecv(out, 0, 4)])
        return out

    np.testing.assert_array_equal(run_ok(1, main)[0], [1.0, 2.0, 3.0])


def test_byte_and_message_counting():
    def main(comm):
        r = comm.rank
        if r == 0:
            comm.send(np.zeros(10, np.float64), 1, 0)          # 80 bytes
            comm.send(np.zeros((3, 2), np.float32), 1, 1)      # 24 bytes
            comm.send(np.zeros(7, np.float16), 2, 0)           # 14 bytes
        elif r == 1:
            comm.recv(np.empty(10), 0, 0)
            comm.recv(np.empty((3, 2), np.float32), 0, 1)
        else:
            comm.recv(np.empty(7, np.float16), 0, 0)
        comm.barrier()                                         # collectives are not counted
        return comm.bytes_sent, comm.messages_sent

    assert run_ok(3, main) == [(118, 3), (0, 0), (0, 0)]


def test_rejects_non_contiguous_buffers_and_bad_peers():
    def main(comm):
        with pytest.raises(CommError, match=r"rank 0: send buffer must be a C-contiguous numpy array"):
            comm.isend(np.zeros((4, 4))[:, 1], 0, 0)
        with pytest.raises(CommError, match=r"rank 0: peer rank 3 is outside 0..0"):
            comm.irecv(np.zeros(2), 3, 0)
        return "checked"

    assert run_ok(1, main) == ["checked"]


# -- collectives --------------------------------------------------------------------------------------

@pytest.mark.parametrize("P", [1, 2, 4])
def test_allreduce_and_allgather_scalars(P):
    def main(comm):
        r = comm.rank
        return (comm.allreduce(r + 1), comm.allreduce(r + 1, "sum"), comm.allreduce(10 - r, "max"),
                comm.allreduce(10 - r, "min"), comm.allgather(("rank", r)))

    for res in run_ok(P, main):
        total, total2, mx, mn, gathered = res
        assert total == total2 == P * (P + 1) // 2
        assert mx == 10 and mn == 10 - (P - 1)
        assert gathered == [("rank", r) for r in range(P)]


def test_allreduce_on_numpy_arrays_is_elementwise():
    """MPI semantics: reducing arrays reduces each element."""
    def main(comm):
        x = np.array([comm.rank, 5 - comm.rank, 2.0])
        return comm.allreduce(x, "sum"), comm.allreduce(x, "max"), comm.allreduce(x, "min")

    for s, mx, mn in run_ok(3, main):
        np.testing.assert_array_equal(s, [3.0, 12.0, 6.0])
        np.testing.assert_array_equal(mx, [2.0, 5.0, 2.0])
        np.testing.assert_array_equal(mn, [0.0, 3.0, 2.0])


def test_allreduce_rejects_unknown_op():
    def main(comm):
        with pytest.raises(ValueError, match=r"op must be one of \['max', 'min', 'sum'\], got 'prod'"):
            comm.allreduce(1, "prod")
        return comm.allreduce(1)

    assert run_ok(2, main) == [2, 2]


def test_barrier_orders_phases():
    """Nothing written after the barrier is seen by a rank before it; everything before it is."""
    board = []
    lock = threading.Lock()

    def main(comm):
        with lock:
            board.append(("before", comm.rank))
        comm.barrier()
        with lock:
            snapshot = list(board)
            board.append(("after", comm.rank))
        return sum(1 for phase, _ in snapshot if phase == "before")

    assert run_ok(4, main) == [4, 4, 4, 4]


def test_repeated_collectives_do_not_mix_generations():
    def main(comm):
        return [comm.allgather(comm.rank * 100 + i) for i in range(20)]

    for res in run_ok(3, main):
        assert res == [[i, 100 + i, 200 + i] for i in range(20)]


# -- failures: errors, never hangs --------------------------------------------------------------------

@pytest.mark.parametrize("recv_buf,detail", [
    (np.empty(5, np.float64), "is 32 bytes of float64, but the receive buffer is 40 bytes of float64"),
    (np.empty(8, np.float32), "is 32 bytes of float64, but the receive buffer is 32 bytes of float32"),
])
def test_size_or_dtype_mismatch_is_a_comm_error(recv_buf, detail):
    def main(comm):
        if comm.rank == 0:
            comm.send(np.zeros(4, np.float64), 1, tag(BACKWARD_KV, 1))
        else:
            comm.recv(recv_buf.copy(), 0, tag(BACKWARD_KV, 1))

    _, error, _ = run_world(2, main)
    assert type(error) is CommError
    assert str(error) == f"message from rank 0 to rank 1 with tag 4 (backward K/V of step 1) {detail}"


def test_mismatch_is_reported_even_when_another_rank_is_left_waiting():
    """Ranks 1 and 2 exchange a mismatched message; rank 0 waits for rank 1, which then fails.

    ``run`` promises to re-raise the exception of the first rank that failed: the mismatch, not the
    deadlock it left behind on rank 0.
    """
    def main(comm):
        if comm.rank == 0:
            comm.recv(np.empty(1), 1, 99)
        elif comm.rank == 1:
            comm.send(np.zeros(4), 2, 0)
            comm.send(np.zeros(1), 0, 99)
        else:
            comm.recv(np.zeros(3), 1, 0)

    _, error, seconds = run_world(3, main)
    assert seconds < 5
    assert isinstance(error, CommError)
    assert "message from rank 1 to rank 2 with tag 0" in str(error), f"got {type(error).__name__}: {error}"


def test_deadlock_is_detected_at_once_and_names_everyone():
    """Every rank does a blocking receive first: no one will ever send."""
    P = 3
    t = tag(BACKWARD_KV, 2)                         # 7: "backward K/V of step 2"

    def main(comm):
        r = comm.rank
        buf = np.empty(2)
        comm.recv(buf, (r - 1) % P, t)
        comm.send(buf, (r + 1) % P, t)

    _, error, seconds = run_world(P, main, timeout=30.0)
    assert seconds < 5
    assert type(error) is DeadlockError
    message = str(error)
    assert message.startswith("deadlock: ")
    for r in range(P):
        assert f"rank {r} waits to receive from rank {(r - 1) % P}: tag 7 (backward K/V of step 2)" in message


def test_deadlock_between_two_synchronous_sends():
    """Two ranks both send first: with MPI's rendezvous semantics this deadlocks, so it must here."""
    def main(comm):
        peer = 1 - comm.rank
        comm.send(np.zeros(3), peer, 0)
        comm.recv(np.zeros(3), peer, 0)

    _, error, seconds = run_world(2, main)
    assert seconds < 5
    assert type(error) is DeadlockError
    assert "rank 0 waits to send to rank 1: tag 0 (forward K/V of step 0)" in str(error)
    assert "rank 1 waits to send to rank 0: tag 0 (forward K/V of step 0)" in str(error)


def test_exception_on_one_rank_is_reraised_and_others_abort():
    seen = {}

    class Boom(RuntimeError):
        pass

    def main(comm):
        if comm.rank == 2:
            raise Boom("rank 2 exploded")
        try:
            comm.recv(np.empty(1), 2, 0)                 # waits for the rank that will never send
        except CommError as exc:
            seen[comm.rank] = exc
            raise

    _, error, seconds = run_world(4, main)
    assert seconds < 5
    assert type(error) is Boom and str(error) == "rank 2 exploded"
    assert sorted(seen) == [0, 1, 3]
    for r, exc in seen.items():
        assert type(exc) is RankAborted
        assert str(exc) == f"rank {r} stopped because rank 2 failed: Boom: rank 2 exploded"


def test_exception_aborts_a_rank_waiting_in_a_collective():
    def main(comm):
        if comm.rank == 0:
            raise ValueError("bad shard on rank 0")
        comm.barrier()

    _, error, seconds = run_world(3, main)
    assert seconds < 5
    assert type(error) is ValueError and str(error) == "bad shard on rank 0"


def test_rank_returning_early_while_a_peer_waits_is_a_deadlock():
    def main(comm):
        if comm.rank == 1:
            return "left early"
        comm.recv(np.empty(1), 1, 3)

    _, error, seconds = run_world(2, main)
    assert seconds < 5
    assert type(error) is DeadlockError
    assert str(error) == "deadlock: rank 0 waits to receive from rank 1: tag 3 (forward K/V of step 1)"


def test_rank_returning_early_from_a_collective_is_a_deadlock():
    def main(comm):
        if comm.rank != 2:
            comm.barrier()

    _, error, seconds = run_world(3, main)
    assert seconds < 5
    assert type(error) is DeadlockError
    assert "rank 0 waits in a collective" in str(error) and "rank 1 waits in a collective" in str(error)


def test_timeout_bounds_a_wait_on_a_busy_peer():
    """Not a deadlock (rank 1 is computing), but longer than the world's timeout."""
    def main(comm):
        if comm.rank == 1:
            time.sleep(1.0)
            return None
        comm.recv(np.empty(1), 1, 0)

    _, error, seconds = run_world(2, main, timeout=0.2)
    assert seconds < 5
    assert isinstance(error, DeadlockError)
    assert str(error).startswith("timeout after 0.2 s: rank 0 waits to receive from rank 1: tag 0")


# -- the timeout ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("timeout", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf])
def test_timeout_must_be_positive_and_finite(timeout):
    """0 or less would fail every wait at once, as a false deadlock; NaN or inf would switch it off."""
    message = f"timeout must be a positive, finite number of seconds, got {timeout}"
    with pytest.raises(ValueError, match=re.escape(message)):
        SimWorld(2, timeout)
    q = k = v = np.zeros((1, 4, 1, 2))
    with pytest.raises(ValueError, match=re.escape(message)):
        simulate_ring(q, k, v, ranks=2, timeout=timeout)


@pytest.mark.parametrize("timeout,name", [("10", "str"), (None, "NoneType"), (True, "bool")])
def test_timeout_must_be_a_number(timeout, name):
    with pytest.raises(TypeError, match=f"timeout must be a number of seconds, got {name}"):
        SimWorld(2, timeout)


def test_a_timeout_longer_than_a_lock_can_wait_is_accepted():
    """1e300 s is finite: a wait longer than threading.TIMEOUT_MAX waits in pieces, not OverflowError."""
    def main(comm):
        if comm.rank == 0:
            time.sleep(0.05)                          # rank 1 is parked in its receive by then
            comm.send(np.array([7.0]), 1, 0)
            return None
        buf = np.empty(1)
        comm.recv(buf, 0, 0)
        return buf[0]

    results, error, _ = run_world(2, main, timeout=1e300)
    assert error is None and results == [None, 7.0]


# -- many ranks: the cost structure ---------------------------------------------------------------------

def shift_ring(steps):
    """``steps`` ring shifts; every rank returns the rank whose value it holds at the end."""
    def main(comm):
        P, r = comm.size, comm.rank
        current = np.array([r])
        for step in range(steps):
            following = np.empty_like(current)
            comm.sendrecv(current, (r + 1) % P, following, (r - 1) % P, tag=step)
            current = following
        return int(current[0])
    return main


def test_a_world_runs_again_on_new_threads():
    world = SimWorld(3, 30)
    for _ in range(2):
        results, error, _ = run_in(world, shift_ring(2))
        assert error is None and results == [1, 2, 0]


def test_every_wait_wakes_its_rank_at_most_once():
    """512 ranks, 3 ring shifts: 2 waits per rank and shift. Each wait parks at most once and is woken
    once, by what it waited for; no one else is woken (a wakeup per message for every rank would be
    512 times as many). The other P wakeups are the ranks' first turns."""
    P, steps = 512, 3
    world = SimWorld(P, 30)
    results, error, _ = run_in(world, shift_ring(steps))
    assert error is None
    assert results == [(r - steps) % P for r in range(P)]
    assert P <= world.wakeups <= 2 * P * steps + P


def test_at_most_running_ranks_run_at_once():
    P = 64
    world = SimWorld(P, 30)
    lock = threading.Lock()
    active, peak = [0], [0]

    def main(comm):
        for step in range(4):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.0005)                        # computing, holding the turn
            with lock:
                active[0] -= 1
            comm.sendrecv(np.array([step]), (comm.rank + 1) % P, np.empty(1, int), (comm.rank - 1) % P, step)

    _, error, _ = run_in(world, main)
    assert error is None
    assert world.running == min(P, os.cpu_count())
    assert 1 <= peak[0] <= world.running


def test_deadlock_among_many_ranks_is_detected_and_names_every_rank():
    P = 1024
    t = tag(BACKWARD_KV, 0)

    def main(comm):
        comm.recv(np.empty(1), (comm.rank - 1) % P, t)

    _, error, _ = run_world(P, main)
    assert type(error) is DeadlockError
    waits = str(error).removeprefix("deadlock: ").split("; ")
    assert waits == [f"rank {r} waits to receive from rank {(r - 1) % P}: tag {t} (backward K/V of step 0)"
                     for r in range(P)]


def test_ring_of_256_ranks_is_bitwise_each_rank_folding_its_shards():
    """simulate_ring at P=256 (shards of 1 and 2 tokens) against the same fold with no transport: each
    rank's engine attends to the K/V shards in ring order, read straight from k and v. Equal bits mean
    every message arrived intact, in order, at the right rank."""
    P, N, block = 256, 300, 4
    q, k, v = make_qkv(np.random.default_rng(8), 1, N, 2, 1, 4)
    ours = simulate_ring(q, k, v, ranks=P, causal=True, block_q=block, block_k=block, timeout=60)

    layout, mask, scale = Contiguous(N, P), mask_for(True), validate.check_scale(None, q.shape[-1])
    outs, lses = [], []
    for r in range(P):
        engine, q_r = NumpyEngine(), layout.shard(q, r)
        o = np.zeros(q_r.shape)
        lse = np.full((1, q.shape[2], layout.length(r)), -np.inf)
        for step in range(P):
            src = kv_source(r, step, P)
            engine.attend(o, lse, q_r, layout.shard(k, src), layout.shard(v, src), layout.positions(r),
                          layout.positions(src), mask, scale, block, block)
        outs.append(o)
        lses.append(lse)
    np.testing.assert_array_equal(ours.out, np.concatenate(outs, axis=1))
    np.testing.assert_array_equal(ours.lse, np.concatenate(lses, axis=2))
    want_out, want_lse = naive_attention(q, k, v, causal=True)
    assert_fp64_close(ours.out, want_out, "out")
    assert_fp64_close(ours.lse, want_lse, "lse")
