"""The schedule: which K/V shard each rank holds at each ring step, and which tiles it runs.

The ring. P ranks stand in a circle. Rank r sends to r + 1 and receives from r - 1 (mod P). At step
t = 0 .. P-1, rank r holds the K/V shard that started on rank ``kv_source(r, t) = (r - t) mod P``. After
P steps every q shard has met every kv shard exactly once, and only P - 1 K/V hops were needed.

A mask that lets a query see only nearby keys or its own document (``mask.local``) may make the last
steps useless to every rank: then the ring runs only ``ring_steps`` = T < P steps, T - 1 K/V hops, and
the backward returns each dK/dV accumulator from where it is after T steps straight to its owner
(``return_to``); with T = P that is the successor, as before.

The tiles. Within a step, the q shard is cut into row blocks of ``block_q`` tokens and the kv shard into
column blocks of ``block_k``. ``plan_tiles`` classifies each (row block, column block) pair with the mask
on its global positions; empty tiles are dropped here, so they are never computed.

Message tags. Every message carries a tag that encodes what it is and at which step it was sent, so a
stuck receive can say which step it was waiting for (``describe_tag``).

Accounting, without running anything: ``ring_bytes`` (what each rank sends), ``plan_ring`` (the trace a
run will record, which ``ringattn trace`` prints and ``plot.py`` draws), and ``work`` (each rank's visible
query-key pairs per step, whose balance across the ranks ``imbalance`` measures; ``specs/schedule.md``).
"""

from dataclasses import asdict, dataclass

import numpy as np

from .masks import EMPTY, PARTIAL

FORWARD_KV, BACKWARD_KV, BACKWARD_DKV = 0, 1, 2
_KINDS = {FORWARD_KV: "forward K/V", BACKWARD_KV: "backward K/V", BACKWARD_DKV: "backward dK/dV"}


def send_to(rank, P):
    return (rank + 1) % P


def recv_from(rank, P):
    return (rank - 1) % P


def kv_source(rank, step, P):
    """The rank whose K/V shard ``rank`` holds at ``step``."""
    return (rank - step) % P


def steps_needed(layout, mask, rank):
    """1 + the last step at which ``rank``'s queries see a key of the K/V shard it holds (at least 1: a
    query sees itself, in the rank's own shard at step 0)."""
    q_pos = layout.positions(rank)
    for step in reversed(range(1, layout.P)):
        if mask.classify(q_pos, layout.positions(kv_source(rank, step, layout.P))) != EMPTY:
            return step + 1
    return 1


def ring_steps(layout, mask):
    """The steps the ring runs: the most any rank needs. P unless ``mask.local``: without a bound on both
    sides (no mask, causal) the query at N-1 or at 0 sees every key, so some rank needs every step."""
    if not mask.local:
        return layout.P
    return max(steps_needed(layout, mask, r) for r in range(layout.P))


def return_to(rank, steps, P):
    """Where ``rank`` sends the dK/dV accumulator it holds after the last of ``steps`` steps: its owner,
    ``kv_source(rank, steps - 1)`` (the successor when steps = P)."""
    return kv_source(rank, steps - 1, P)


def return_from(rank, steps, P):
    """The rank that returns ``rank``'s own dK/dV accumulator after ``steps`` steps (the predecessor when
    steps = P)."""
    return (rank + steps - 1) % P


def ring_bytes(layout, steps, B, Hkv, D, itemsize, acc_itemsize=None):
    """(P,) bytes each rank sends in one call of a ring of ``steps`` steps: the forward's ``steps`` - 1 K/V
    messages of ``itemsize`` bytes per element; given ``acc_itemsize``, the backward's, which sends the
    same K/V messages and one dK/dV message per step (``specs/protocol.md`` section 2)."""
    P = layout.P
    per_token = 2 * B * Hkv * D
    held = np.array([[layout.length(kv_source(r, t, P)) for t in range(steps)] for r in range(P)], np.int64)
    kv = held[:, :-1].sum(axis=1) * per_token * itemsize
    return kv if acc_itemsize is None else kv + held.sum(axis=1) * per_token * acc_itemsize


def tag(kind, step):
    return 3 * step + kind


def describe_tag(t):
    step, kind = divmod(t, 3)
    return f"{_KINDS[kind]} of step {step}"


@dataclass
class StepPlan:
    """The tiles one rank runs in one step: for each q row block, its non-empty kv column blocks."""
    rows: list                      # [(q slice, [(k slice, kind), ...]), ...]
    computed: int                   # tiles computed (full and partial)
    skipped: list                   # [(q block index, k block index), ...] of the tiles left out
    partial: int = 0                # of the computed tiles, how many the mask cuts (the rest are full)
    scores: int = 0                 # score elements computed: the sum of rows x columns over computed tiles


def plan_tiles(q_pos, k_pos, mask, block_q, block_k):
    """Cut q_pos (nq,) x k_pos (nk,) into tiles and classify each; empty tiles are skipped, not run."""
    rows, skipped, partial, scores = [], [], 0, 0
    for i0 in range(0, len(q_pos), block_q):
        qs = slice(i0, min(i0 + block_q, len(q_pos)))
        cols = []
        for j0 in range(0, len(k_pos), block_k):
            ks = slice(j0, min(j0 + block_k, len(k_pos)))
            kind = mask.classify(q_pos[qs], k_pos[ks])
            if kind == EMPTY:
                skipped.append((i0 // block_q, j0 // block_k))
            else:
                cols.append((ks, kind))
                partial += kind == PARTIAL
                scores += (qs.stop - qs.start) * (ks.stop - ks.start)
        if cols:
            rows.append((qs, cols))
    return StepPlan(rows, sum(len(cols) for _, cols in rows), skipped, partial, scores)


@dataclass
class StepRecord:
    """What one rank did in one step: the trace entry of ``simulate_ring`` and the MPI run."""
    phase: str                      # "forward" or "backward"
    step: int
    rank: int
    q_shard: int                    # whose q rows (always the rank itself)
    kv_shard: int                   # whose K/V shard was attended to
    tiles: int                      # tiles computed (full and partial)
    skipped_tiles: list             # tiles skipped as fully masked: (q block index, k block index)
    bytes_sent: int                 # bytes this rank posted to its successor during the step
    compute_s: float = 0.0          # seconds spent in tiles
    wait_s: float = 0.0             # seconds spent waiting for messages after the tiles were done
    partial_tiles: int = 0          # of the computed tiles, those the mask cuts
    scores: int = 0                 # score elements computed (per batch and query head)

    @property
    def skipped(self):
        """How many tiles were skipped."""
        return len(self.skipped_tiles)

    def summary(self):
        """The record as a JSON-ready dict, with the skipped tiles counted rather than listed."""
        fields = asdict(self)
        fields["skipped"] = len(fields.pop("skipped_tiles"))
        return fields


# -- the whole ring at once, without running it: the trace it will record, the work per rank --------------

def plan_ring(layout, mask, block_q, block_k, kv_bytes_per_token):
    """The forward trace the ring will record, without running it: a ``StepRecord`` (no times) for every
    step the ring runs (``ring_steps``) and every rank. ``kv_bytes_per_token`` = 2 B Hkv D itemsize, so a
    K/V message of shard s is that times its length."""
    P, steps = layout.P, ring_steps(layout, mask)
    records = []
    for step in range(steps):
        for r in range(P):
            src = kv_source(r, step, P)
            plan = plan_tiles(layout.positions(r), layout.positions(src), mask, block_q, block_k)
            sent = layout.length(src) * kv_bytes_per_token if step + 1 < steps else 0
            records.append(StepRecord("forward", step, r, r, src, plan.computed, plan.skipped, sent,
                                      partial_tiles=plan.partial, scores=plan.scores))
    return records


def work(layout, mask):
    """(P, P) int64: work[r, t] = the score elements rank r computes at step t that the mask leaves
    visible, i.e. its visible (query, key) pairs with the K/V shard it holds, per head (summed over the
    batch entries when the documents differ by batch). Independent of the tile sizes: a partial tile
    computes more elements than this, and that overhead is the tile plan's (``StepPlan.scores``)."""
    P = layout.P
    return np.array([[int(np.sum(mask.counts(layout.positions(r), layout.positions(kv_source(r, t, P)))))
                      for t in range(P)] for r in range(P)], dtype=np.int64)


def imbalance(work):
    """max / mean of the ranks' total work: 1.0 is a perfect balance; the busiest rank sets the pace."""
    totals = np.asarray(work).sum(axis=1)
    return float(totals.max() / totals.mean())
