"""The schedule: which K/V shard each rank holds at each ring step, and which tiles it runs.

The ring. P ranks stand in a circle. Rank r sends to r + 1 and receives from r - 1 (mod P). At step
t = 0 .. P-1, rank r holds the K/V shard that started on rank ``kv_source(r, t) = (r - t) mod P``. After
P steps every q shard has met every kv shard exactly once, and only P - 1 K/V hops were needed.

The tiles. Within a step, the q shard is cut into row blocks of ``block_q`` tokens and the kv shard into
column blocks of ``block_k``. ``plan_tiles`` classifies each (row block, column block) pair with the mask
on its global positions; empty tiles are dropped here, so they are never computed.

Message tags. Every message carries a tag that encodes what it is and at which step it was sent, so a
stuck receive can say which step it was waiting for (``describe_tag``).
"""

from dataclasses import asdict, dataclass

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
