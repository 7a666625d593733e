"""ringattn reference implementation: a float64 oracle, blockwise attention, and ring attention.

Read it in this order: ``naive`` (the oracle), ``masks`` and ``layouts`` (positions), ``tile`` (one tile
and the merge), ``schedule`` (which tiles and which ring step), ``blockwise`` (the tile loop),
``engine`` (where a rank's arrays live and how a step runs: the seam ``gpu/`` plugs into), ``ring`` (the
loop over ranks), ``comm`` (the transport), ``simulate`` (P ranks in one process). Checking another
backend: ``tolerance`` and ``plain`` (the rule), ``cases`` (the problems), ``verify`` (runs a backend on
them), ``diagnose`` (where a failure is). LongNet's dilated attention: ``dilated`` (branches as strided
views of the selected rows, on the same tiles and merge).

Layout conventions (``specs/conventions.md``): q (B, N, Hq, D), k and v (B, N, Hkv, D), lse (B, Hq, N).
"""

from .blockwise import blockwise_attention, blockwise_attention_backward
from .dilated import (dilated_attention, dilated_attention_backward, naive_dilated_attention,
                      naive_dilated_attention_backward, naive_dilated_rows)
from .naive import naive_attention, naive_attention_backward, naive_rows
from .ring import ring_attention, ring_attention_backward
from .simulate import RingResult, simulate_ring
from .verify import verify

__all__ = [
    "naive_attention", "naive_attention_backward", "naive_rows",
    "blockwise_attention", "blockwise_attention_backward",
    "naive_dilated_attention", "naive_dilated_attention_backward", "naive_dilated_rows",
    "dilated_attention", "dilated_attention_backward",
    "ring_attention", "ring_attention_backward",
    "simulate_ring", "RingResult",
    "verify",
]
