"""Blockwise attention: the tile loop over one q shard and one kv shard, written once.

``attend_shard`` and ``attend_shard_backward`` visit the tiles that ``schedule.plan_tiles`` keeps and fold
them into running accumulators. The ring calls them once per step, with the K/V shard it holds at that
step; ``blockwise_attention`` is the same loop called once, with the whole sequence as a single shard.
Memory beyond the inputs and accumulators is one head's tile of scores (two in the backward) and
working-form copies of one row block (q and o; q, dout and dq in the backward).

Accumulators, in the accumulation dtype (float32 for float16/float32 inputs, float64 for float64)::

    forward:   o (B, nq, Hq, D), lse (B, Hq, nq)          start at o = 0, lse = -inf
    backward:  dq (B, nq, Hq, D), dk, dv (B, nk, Hkv, D)  start at 0

except the running lse, which is always float64 (see ``tile.merge``): the merge weights are
exp(lse_a - lse), and a float32 lse of magnitude |lse| would make each weight wrong by |lse| ulps. It is
rounded to the accumulation dtype once, when returned.
"""

import numpy as np

from . import tile, validate
from .masks import mask_for
from .schedule import plan_tiles

BLOCK_Q = 512
BLOCK_K = 1024


def attend_shard(o_acc, lse_acc, q, k, v, q_pos, k_pos, mask, scale, block_q, block_k, ws, on_tile=None):
    """Fold attention of q (B, nq, Hq, D) over k, v (B, nk, Hkv, D) into (o_acc, lse_acc).

    q_pos (nq,) and k_pos (nk,) are the rows' global positions. Returns the ``StepPlan`` it ran.
    A row block's running (o, lse) is folded in a contiguous working-form copy, written back once the
    block's tiles are done (each merge then streams through contiguous memory).
    """
    Hkv, acc = k.shape[2], o_acc.dtype
    plan = plan_tiles(q_pos, k_pos, mask, block_q, block_k)
    for qs, cols in plan.rows:
        qt = tile.q_tile(q[:, qs], Hkv, acc)
        o_run, lse_run = tile.q_tile(o_acc[:, qs], Hkv, acc), tile.grouped_rows(lse_acc[:, :, qs], Hkv).copy()
        for ks, kind in cols:
            o, lse = tile.attend_tile(qt, tile.kv_tile(k[:, ks], acc), tile.kv_tile(v[:, ks], acc),
                                      q_pos[qs], k_pos[ks], mask, kind, scale, ws)
            tile.merge(o_run, lse_run, o, lse)
            if on_tile is not None:
                on_tile()
        tile.grouped(o_acc[:, qs], Hkv)[...] = o_run
        tile.grouped_rows(lse_acc[:, :, qs], Hkv)[...] = lse_run
    return plan


def row_terms(out, dout, lse, block_q):
    """The per-row constants of the backward: delta = rowsum(dout * out), and lse with -inf -> 0.

    out, dout (B, n, Hq, D); lse (B, Hq, n). Returns delta, lse_safe (B, Hq, n) in lse's dtype.
    Computed block by block so no (B, n, Hq, D) temporary is made.
    """
    acc = lse.dtype
    delta = np.empty(lse.shape, acc)
    for i0 in range(0, out.shape[1], block_q):
        rows = slice(i0, i0 + block_q)
        delta[:, :, rows] = np.einsum("bnhd,bnhd->bhn", out[:, rows].astype(acc), dout[:, rows].astype(acc))
    return delta, np.where(np.isneginf(lse), 0.0, lse).astype(acc)


def attend_shard_backward(dq_acc, dk_acc, dv_acc, q, k, v, dout, lse, delta, q_pos, k_pos, mask, scale,
                          block_q, block_k, ws, on_tile=None):
    """Add the gradient contributions of q (B, nq, Hq, D) against k, v (B, nk, Hkv, D).

    dout (B, nq, Hq, D); lse and delta (B, Hq, nq) from ``row_terms``. dq_acc is (B, nq, Hq, D);
    dk_acc, dv_acc are (B, nk, Hkv, D). Returns the ``StepPlan`` it ran.
    """
    Hkv, acc = k.shape[2], dq_acc.dtype
    plan = plan_tiles(q_pos, k_pos, mask, block_q, block_k)
    for qs, cols in plan.rows:
        qt = tile.q_tile(q[:, qs], Hkv, acc)
        dot = tile.q_tile(dout[:, qs], Hkv, acc)
        lse_t, delta_t = tile.grouped_rows(lse[:, :, qs], Hkv), tile.grouped_rows(delta[:, :, qs], Hkv)
        dq_rows = np.zeros(qt.shape, acc)
        for ks, kind in cols:
            dq, dk, dv = tile.attend_tile_backward(qt, tile.kv_tile(k[:, ks], acc), tile.kv_tile(v[:, ks], acc),
                                                   dot, lse_t, delta_t, q_pos[qs], k_pos[ks], mask, kind, scale,
                                                   ws)
            dq_rows += dq
            dk_acc[:, ks] += dk.transpose(0, 2, 1, 3)
            dv_acc[:, ks] += dv.transpose(0, 2, 1, 3)
            if on_tile is not None:
                on_tile()
        dq_rows *= scale
        tile.grouped(dq_acc[:, qs], Hkv)[...] += dq_rows
    return plan


def blockwise_attention(q, k, v, *, causal=False, scale=None, block_q=BLOCK_Q, block_k=BLOCK_K):
    """Attention by online softmax over tiles; never more than one tile of scores in memory.

    q (B, N, Hq, D), k and v (B, N, Hkv, D) -> out (B, N, Hq, D) in q's dtype, lse (B, Hq, N) in the
    accumulation dtype (float32, or float64 for float64 inputs).
    """
    B, N, Hq, _, D = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, D)
    block_q, block_k = validate.check_block("block_q", block_q), validate.check_block("block_k", block_k)
    acc = validate.accumulation_dtype(q.dtype)
    o, lse = np.zeros((B, N, Hq, D), acc), np.full((B, Hq, N), -np.inf, np.float64)
    pos = np.arange(N)
    attend_shard(o, lse, q, k, v, pos, pos, mask_for(causal), scale, block_q, block_k, tile.Workspace(acc))
    return o.astype(q.dtype, copy=False), lse.astype(acc, copy=False)


def blockwise_attention_backward(q, k, v, out, lse, dout, *, causal=False, scale=None,
                                 block_q=BLOCK_Q, block_k=BLOCK_K):
    """Gradients by the flash-attention-2 recomputation, tile by tile.

    out and lse are what ``blockwise_attention`` returned (out in q's dtype, lse in the accumulation
    dtype); dout is (B, N, Hq, D) in q's dtype. Returns dq, dk, dv in the input dtype, shaped like q, k, v.
    """
    B, N, Hq, Hkv, D = validate.check_qkv(q, k, v)
    scale = validate.check_scale(scale, D)
    block_q, block_k = validate.check_block("block_q", block_q), validate.check_block("block_k", block_k)
    acc = validate.accumulation_dtype(q.dtype)
    validate.check_backward(out, dout, lse, q, (B, N, Hq, D))
    delta, lse_safe = row_terms(out, dout, lse, block_q)
    dq, dk, dv = np.zeros((B, N, Hq, D), acc), np.zeros((B, N, Hkv, D), acc), np.zeros((B, N, Hkv, D), acc)
    pos = np.arange(N)
    attend_shard_backward(dq, dk, dv, q, k, v, dout, lse_safe, delta, pos, pos, mask_for(causal), scale,
                          block_q, block_k, tile.Workspace(acc))
    return tuple(g.astype(q.dtype, copy=False) for g in (dq, dk, dv))
