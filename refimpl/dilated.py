"""Dilated attention (LongNet): which keys each position sees, the float64 oracle, and the tiles.

The definition (``specs/dilated.md``; Ding et al. 2023, arXiv:2307.02486, Eq. 3-15). Branch i has a segment
length w_i and a dilation rate r_i. For query head j it cuts the sequence into segments of w_i tokens (the
last one shorter when w_i does not divide N) and, in the segment that starts at a, selects the positions

    a + o, a + o + r_i, a + o + 2 r_i, ...  < min(a + w_i, N)          o = o_i(j), the head's offset

A selected position p attends to the selected keys of its own segment (t <= p when causal): K_i(p). The
branches combine by their softmax denominators (Eq. 10), which is one softmax over the multiset union of
(branch, key) pairs; a key that two branches give p counts twice::

    lse_p = log sum_i sum_{t in K_i(p)} exp(s_pt)          s_pt = scale * q_p . k_t
    out_p = sum_i sum_{t in K_i(p)} exp(s_pt - lse_p) v_t

K_i(p) is empty when branch i does not select p; a position no branch selects gets out = 0, lse = -inf.

Offsets: ``"paper"`` o_i(j) = j mod r_i; ``"torchscale"`` o_i(j) = j // ceil(Hq / r_i). Modes: ``"longnet"``,
every head uses every branch; ``"head_groups"``, the heads form k contiguous groups (sizes differing by at
most one, the first ones larger) and group i uses branch i alone, with offset i mod r_i.

Three pieces, in reading order:

``branches``, ``gathers``      the definition as data: per branch, each query head's offset; and the work
                               items (rows, query heads, kv heads) of one branch, one segment and one head
                               group, all basic slices, so every gather is a strided view
``naive_dilated_attention``    the oracle: dense per-branch masks on global positions, summed into a
                               multiplicity (Hq, N, N), and a softmax weighted by it, in float64
``dilated_attention``          the same on tiles: ``blockwise.attend_shard`` on each work item, with the
                               rows' global positions, folding into one (out, lse) accumulator; ``merge``
                               of the branches' partials IS the multiset softmax. The backward recomputes
                               p = exp(s - lse) from the final lse, and the dK/dV of a key that several
                               branches select sum.

Shapes as everywhere (``specs/conventions.md``): q (B, N, Hq, D), k and v (B, N, Hkv, D), lse (B, Hq, N);
query head h reads kv head h // (Hq / Hkv).
"""

from dataclasses import dataclass

import numpy as np

from . import tile, validate
from .blockwise import BLOCK_K, BLOCK_Q, attend_shard, attend_shard_backward, row_terms
from .masks import mask_for
from .naive import _check_rows, _fold_heads, _heads

OFFSETS = ("paper", "torchscale")
MODES = ("longnet", "head_groups")


# -- the definition as data ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Branch:
    """One (segment length, dilation rate) pair and the offset of each query head (None: head not in it)."""
    segment: int
    rate: int
    offsets: tuple


def head_offsets(Hq, rate, offsets="paper"):
    """The offset of each of ``Hq`` query heads in a branch of dilation ``rate``: paper j mod r, torchscale
    j // ceil(Hq / r) (contiguous blocks; Hq=6, r=4 gives [0, 0, 1, 1, 2, 2])."""
    if offsets == "paper":
        return [j % rate for j in range(Hq)]
    block = -(-Hq // rate)
    return [j // block for j in range(Hq)]


def head_group_bounds(Hq, k):
    """head_groups mode: the [start, stop) query heads of each of ``k`` contiguous groups, sizes differing by
    at most one, the first ones larger (Hq=5, k=3: [(0, 2), (2, 4), (4, 5)])."""
    sizes = [Hq // k + (i < Hq % k) for i in range(k)]
    stops = np.cumsum(sizes).tolist()
    return [(stop - size, stop) for size, stop in zip(sizes, stops)]


def _check_lengths(name, values):
    if isinstance(values, (str, bytes)) or not isinstance(values, (list, tuple, np.ndarray)):
        raise TypeError(f"{name} must be a list or tuple of positive ints, got {type(values).__name__}")
    if len(values) == 0:
        raise ValueError(f"{name} must hold at least one value (one per branch), got an empty sequence")
    for i, value in enumerate(values):
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}[{i}] must be an int, got {type(value).__name__} {value!r}")
        if value < 1:
            raise ValueError(f"{name}[{i}] must be a positive int, got {value}")
    return [int(value) for value in values]


def _check_name(name, value, allowed):
    if not isinstance(value, str):
        raise TypeError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {type(value).__name__}")
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def branches(Hq, segment_lengths, dilation_rates, offsets="paper", mode="longnet"):
    """Validate the options and return the branches (a tuple of ``Branch``), each with per-head offsets."""
    segments = _check_lengths("segment_lengths", segment_lengths)
    rates = _check_lengths("dilation_rates", dilation_rates)
    if len(segments) != len(rates):
        raise ValueError(f"segment_lengths has {len(segments)} values but dilation_rates has {len(rates)}: "
                         "each branch needs one of each")
    _check_name("offsets", offsets, OFFSETS)
    _check_name("mode", mode, MODES)
    if mode == "longnet":
        return tuple(Branch(w, r, tuple(head_offsets(Hq, r, offsets))) for w, r in zip(segments, rates))
    if offsets != "paper":
        raise ValueError(f"offsets={offsets!r} applies to mode='longnet' only: in mode='head_groups' group i "
                         "uses offset i mod r_i (pass offsets='paper')")
    if Hq < len(segments):
        raise ValueError(f"mode='head_groups' gives each of the {len(segments)} branches its own group of query "
                         f"heads, but q has only Hq={Hq} heads")
    groups = head_group_bounds(Hq, len(segments))
    return tuple(Branch(w, r, tuple(i % r if start <= j < stop else None for j in range(Hq)))
                 for i, (w, r, (start, stop)) in enumerate(zip(segments, rates, groups)))


def _as_slice(indices):
    """Sorted indices in arithmetic progression -> the equivalent slice (the offsets guarantee it)."""
    step = indices[1] - indices[0] if len(indices) > 1 else 1
    assert list(indices) == list(range(indices[0], indices[-1] + 1, step)), indices
    return slice(indices[0], indices[-1] + 1, step)


def gathers(plan, N, Hkv):
    """The work items of the branches ``plan`` over N tokens: (rows, heads, kv_heads), three slices.

    One item per branch, head group and segment. A head group is the query heads of one kv head that share
    the branch's offset o; ``rows`` are the positions that offset selects in the segment [a, min(a + w, N)),
    ``slice(a + o, min(a + w, N), r)``; ``heads`` the group's query heads and ``kv_heads`` its kv head, so
    ``q[:, rows, heads]`` is a (B, ~w/r, G', D) view reading ``k[:, rows, kv_heads]`` (B, ~w/r, 1, D).
    Segments in which the offset selects nothing (a short last one) give no item.
    """
    G = len(plan[0].offsets) // Hkv
    for branch in plan:
        for c in range(Hkv):
            group_offsets = branch.offsets[c * G:(c + 1) * G]
            for o in sorted({o for o in group_offsets if o is not None}):
                heads = _as_slice([c * G + g for g, og in enumerate(group_offsets) if og == o])
                for a in range(0, N, branch.segment):
                    if a + o < min(a + branch.segment, N):
                        yield slice(a + o, min(a + branch.segment, N), branch.rate), heads, slice(c, c + 1)


def selected(plan, N, Hkv):
    """(Hq, N) bool: True where some branch selects the position for the head (where lse is finite)."""
    mask = np.zeros((len(plan[0].offsets), N), bool)
    for rows, heads, _ in gathers(plan, N, Hkv):
        mask[heads, rows] = True
    return mask


# -- the oracle -----------------------------------------------------------------------------------------

def multiplicity(q_pos, k_pos, plan, causal):
    """(Hq, nq, nk) int64: how many branches give query q_pos[a] the key k_pos[b], per query head.

    Built from one dense (nq, nk) mask per branch and head, on global positions, straight from the
    definition (same segment, both selected, t <= p when causal).
    """
    counts = np.zeros((len(plan[0].offsets), len(q_pos), len(k_pos)), np.int64)
    for branch in plan:
        w, r = branch.segment, branch.rate
        same_segment = (q_pos[:, None] // w) == (k_pos[None, :] // w)
        if causal:
            same_segment &= k_pos[None, :] <= q_pos[:, None]
        for h, o in enumerate(branch.offsets):
            if o is not None:
                counts[h] += same_segment & ((q_pos % w) % r == o)[:, None] & ((k_pos % w) % r == o)[None, :]
    return counts


def _multiset_softmax(q, k, counts, scale):
    """q (B, Hq, nq, D), k (B, Hq, nk, D) float64, counts (Hq, nq, nk) -> p (B, Hq, nq, nk), lse (B, Hq, nq).

    p_pt = c_pt exp(s_pt - lse_p), lse_p = log sum_t c_pt exp(s_pt): the softmax over the multiset in which
    key t appears c_pt times. A visible score beyond the float64 range is an OverflowError.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        s = scale * (q @ k.transpose(0, 1, 3, 2))
    visible = np.broadcast_to(counts > 0, s.shape)
    bad = np.argwhere(visible & ~np.isfinite(s))
    if len(bad):
        raise OverflowError(f"scale * q k^T overflows float64 at visible score (b, h, row, key) = "
                            f"{tuple(int(i) for i in bad[0])}: reduce scale or the size of q and k")
    s = np.where(visible, s, -np.inf)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)          # rows that see no key: exp(-inf - 0) = 0, no NaN
    e = counts * np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(l > 0, e / l, 0.0), (m + np.log(l))[..., 0]


def _oracle_forward(q, k, v, q_pos, plan, causal, scale):
    Hq = q.shape[2]
    counts = multiplicity(q_pos, np.arange(k.shape[1]), plan, causal)
    p, lse = _multiset_softmax(q.astype(np.float64).transpose(0, 2, 1, 3), _heads(k, Hq), counts, scale)
    return (p @ _heads(v, Hq)).transpose(0, 2, 1, 3), lse


def naive_dilated_attention(q, k, v, *, segment_lengths, dilation_rates, causal=False, offsets="paper",
                            mode="longnet", scale=None):
    """Exact dilated attention in float64 (module docstring). Memory O(B * Hq * N^2): small N only.

    q (B, N, Hq, D), k and v (B, N, Hkv, D) -> out (B, N, Hq, D) float64, lse (B, Hq, N) float64, with
    out = 0 and lse = -inf where no branch selects the position.
    """
    _, N, Hq, _, D = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, D)
    plan = branches(Hq, segment_lengths, dilation_rates, offsets, mode)
    return _oracle_forward(q, k, v, np.arange(N), plan, causal, scale)


def naive_dilated_rows(q, k, v, rows, *, segment_lengths, dilation_rates, causal=False, offsets="paper",
                       mode="longnet", scale=None):
    """``naive_dilated_attention`` for the query rows ``rows`` (global positions) only: out (B, len(rows),
    Hq, D) and lse (B, Hq, len(rows)) in float64; memory O(B * Hq * len(rows) * N), for checks at large N."""
    _, N, Hq, _, D = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, D)
    plan = branches(Hq, segment_lengths, dilation_rates, offsets, mode)
    rows = _check_rows(rows, N)
    return _oracle_forward(q[:, rows], k, v, rows, plan, causal, scale)


def naive_dilated_attention_backward(q, k, v, dout, *, segment_lengths, dilation_rates, causal=False,
                                     offsets="paper", mode="longnet", scale=None):
    """Exact gradients of ``naive_dilated_attention`` in float64: dq (B, N, Hq, D), dk and dv (B, N, Hkv, D).

    The formulas of ``naive_attention_backward`` with p the multiset probabilities: a key that two branches
    give a row contributes to dk and dv twice (once per (branch, key) pair).
    """
    B, N, Hq, Hkv, D = validate.check_qkv(q, k, v)
    validate.check_like("dout", dout, (B, N, Hq, D))
    validate.check_finite("dout", dout)
    scale = validate.check_scale(scale, D)
    plan = branches(Hq, segment_lengths, dilation_rates, offsets, mode)
    pos = np.arange(N)
    qh, kh, vh = q.astype(np.float64).transpose(0, 2, 1, 3), _heads(k, Hq), _heads(v, Hq)
    do = dout.astype(np.float64).transpose(0, 2, 1, 3)
    p, _ = _multiset_softmax(qh, kh, multiplicity(pos, pos, plan, causal), scale)
    out = p @ vh
    dv = p.transpose(0, 1, 3, 2) @ do
    ds = p * (do @ vh.transpose(0, 1, 3, 2) - np.sum(do * out, axis=-1, keepdims=True))
    dq = scale * (ds @ kh)
    dk = scale * (ds.transpose(0, 1, 3, 2) @ qh)
    return dq.transpose(0, 2, 1, 3), _fold_heads(dk, Hkv), _fold_heads(dv, Hkv)


# -- on tiles -------------------------------------------------------------------------------------------

def _setup(q, k, v, segment_lengths, dilation_rates, offsets, mode, scale, block_q, block_k):
    """Validate the arguments of the tiled entry points; returns the shapes, scale, blocks and branches."""
    shape = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, shape[4])
    block_q, block_k = validate.check_block("block_q", block_q), validate.check_block("block_k", block_k)
    return shape, scale, block_q, block_k, branches(shape[2], segment_lengths, dilation_rates, offsets, mode)


def dilated_attention(q, k, v, *, segment_lengths, dilation_rates, causal=False, offsets="paper",
                      mode="longnet", scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Dilated attention on tiles; never more than one tile of scores in memory.

    q (B, N, Hq, D), k and v (B, N, Hkv, D) -> out (B, N, Hq, D) in q's dtype, lse (B, Hq, N) in the
    accumulation dtype, -inf where no branch selects the position. Each work item of ``gathers`` runs
    ``attend_shard`` on strided views of its selected rows, with their global positions, folding into the
    views of one accumulator: a branch costs about N * w / r^2 scores per head, not N * w.
    """
    (B, N, Hq, Hkv, D), scale, block_q, block_k, plan = _setup(q, k, v, segment_lengths, dilation_rates,
                                                              offsets, mode, scale, block_q, block_k)
    acc = validate.accumulation_dtype(q.dtype)
    o, lse = np.zeros((B, N, Hq, D), acc), np.full((B, Hq, N), -np.inf, np.float64)
    pos, mask, ws = np.arange(N), mask_for(causal), tile.Workspace(acc)
    for rows, heads, kv in gathers(plan, N, Hkv):
        attend_shard(o[:, rows, heads], lse[:, heads, rows], q[:, rows, heads], k[:, rows, kv], v[:, rows, kv],
                     pos[rows], pos[rows], mask, scale, block_q, block_k, ws)
    return o.astype(q.dtype, copy=False), lse.astype(acc, copy=False)


def _check_lse(lse, chosen, shape, dtype):
    """lse as ``dilated_attention`` returns it: finite where some branch selects the row, -inf elsewhere."""
    validate.check_like("lse", lse, shape, dtype)
    bad = np.argwhere(np.where(chosen, ~np.isfinite(lse), ~np.isneginf(lse)))
    if len(bad):
        index = tuple(int(i) for i in bad[0])
        raise ValueError(f"lse must be finite where a branch selects the row and -inf where none does, as "
                         f"dilated_attention returns it; at index {index} (b, h, position) it is {lse[index]} "
                         f"and the position is {'selected' if chosen[index[1:]] else 'not selected'} for the head")


def dilated_attention_backward(q, k, v, out, lse, dout, *, segment_lengths, dilation_rates, causal=False,
                               offsets="paper", mode="longnet", scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Gradients of ``dilated_attention`` by the flash-attention-2 recomputation, tile by tile.

    out and lse as the forward returned them; dout (B, N, Hq, D) in q's dtype. p = exp(s - lse) with the
    final lse, over every branch at once, so each (branch, key) pair gets its share of the multiset softmax;
    dk, dv of a key that several branches select sum over them. Returns dq, dk, dv in the input dtype.
    """
    (B, N, Hq, Hkv, D), scale, block_q, block_k, plan = _setup(q, k, v, segment_lengths, dilation_rates,
                                                              offsets, mode, scale, block_q, block_k)
    acc = validate.accumulation_dtype(q.dtype)
    for name, x in (("out", out), ("dout", dout)):
        validate.check_like(name, x, (B, N, Hq, D), q.dtype)
        validate.check_finite(name, x)
    _check_lse(lse, selected(plan, N, Hkv), (B, Hq, N), acc)
    delta, lse_safe = row_terms(out, dout, lse, block_q)
    dq, dk, dv = np.zeros((B, N, Hq, D), acc), np.zeros((B, N, Hkv, D), acc), np.zeros((B, N, Hkv, D), acc)
    pos, mask, ws = np.arange(N), mask_for(causal), tile.Workspace(acc)
    for rows, heads, kv in gathers(plan, N, Hkv):
        attend_shard_backward(dq[:, rows, heads], dk[:, rows, kv], dv[:, rows, kv], q[:, rows, heads],
                              k[:, rows, kv], v[:, rows, kv], dout[:, rows, heads], lse_safe[:, heads, rows],
                              delta[:, heads, rows], pos[rows], pos[rows], mask, scale, block_q, block_k, ws)
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
