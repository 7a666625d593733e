"""Argument checks shared by every entry point.

Every public function validates its inputs here, so that bad input fails the same way everywhere: a
``ValueError`` or ``TypeError`` whose message names the argument and says what was expected. Nothing is
silently broadcast, truncated or cast.

Shapes (see ``specs/conventions.md``)::

    q           (B, N, Hq,  D)
    k, v        (B, N, Hkv, D)      Hq % Hkv == 0
    out, dout   (B, N, Hq,  D)
    lse         (B, Hq, N)

Non-finite input (NaN or +-inf in q, k, v, out, dout or lse) is rejected with a ``ValueError`` that names
the argument and the first bad index: an oracle must never turn garbage in into plausible numbers out.
lse included: its -inf would mean a row that sees no key, which no mask of the blockwise and ring paths
(none, causal) produces. NumPy masked arrays are a ``TypeError``: their masked entries would escape the
checks.

The checks take an optional ``engine`` (``refimpl/engine.py``): the array type and dtypes it accepts, and
its ``first_nonfinite``. Without one they check host NumPy arrays, as every CPU entry point does.
"""

import math

import numpy as np

try:                                    # bfloat16 for NumPy comes from ml_dtypes (the `gpu` extra installs it)
    from ml_dtypes import bfloat16 as _bfloat16
    BFLOAT16 = np.dtype(_bfloat16)
except ImportError:
    BFLOAT16 = None

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
INPUT_DTYPES = FLOAT_DTYPES + ((BFLOAT16,) if BFLOAT16 is not None else ())


def accumulation_dtype(dtype):
    """float64 inputs accumulate in float64; float16 and float32 accumulate in float32."""
    return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _type_name(t):
    if isinstance(t, tuple):
        return " or ".join(_type_name(one) for one in t)
    return f"{t.__module__.split('.')[0]}.{t.__name__}"


def check_unmasked(name, x):
    """Reject NumPy masked arrays. Attention has no missing entries, and a masked array's reductions skip
    the masked ones (its ``sum`` would hide a NaN from ``first_nonfinite``), so the caller says what the
    masked entries are."""
    if isinstance(x, np.ma.MaskedArray):
        raise TypeError(f"{name} must not be a numpy masked array (its masked entries would be skipped by "
                        f"the checks and have no meaning in attention); pass {name}.filled(value) with the "
                        "value the masked entries should take")


def check_array(name, x, ndim, engine=None):
    check_unmasked(name, x)
    array_type = np.ndarray if engine is None else engine.array_type
    dtypes = FLOAT_DTYPES if engine is None else engine.dtypes
    if not isinstance(x, array_type):
        raise TypeError(f"{name} must be a {_type_name(array_type)}, got {type(x).__name__}")
    if x.dtype not in dtypes:
        names = [np.dtype(d).name for d in dtypes]
        raise TypeError(f"{name} must have a {', '.join(names[:-1])} or {names[-1]} dtype, got {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {x.shape}")


def first_nonfinite(x):
    """Index of the first NaN or +-inf in a host array, or None. One float64 reduction decides; the exact
    scan runs only if it trips. ``x`` is a plain array: ``check_array`` has rejected masked arrays, whose
    sum skips the masked entries."""
    with np.errstate(over="ignore", invalid="ignore"):
        total = np.sum(x, dtype=np.float64)
    if math.isfinite(total):
        return None
    bad = np.argwhere(~np.isfinite(x))
    return tuple(int(i) for i in bad[0]) if len(bad) else None


def check_finite(name, x, engine=None):
    """Reject NaN and +-inf, naming the argument and the first bad index."""
    bad = (first_nonfinite if engine is None else engine.first_nonfinite)(x)
    if bad is not None:
        raise ValueError(f"{name} contains non-finite values (first at index {bad}); "
                         "NaN and inf inputs are rejected, see specs/conventions.md")


def check_lse(name, lse, shape, dtype, engine=None):
    """lse as the blockwise and ring forward return it: in ``dtype``, and finite.

    Under every mask those take (none, causal) each query row sees at least one key (causal includes the
    diagonal), so its lse is finite. -inf, NaN and +inf are rejected: the backward would turn them into
    wrong gradients (it reads -inf as a row that sees no key).
    """
    check_like(name, lse, shape, dtype, engine)
    bad = (first_nonfinite if engine is None else engine.first_nonfinite)(lse)
    if bad is not None:
        raise ValueError(f"{name} contains non-finite values (first at index {bad}: {float(lse[bad])}); "
                         "with no mask or causal every query row sees at least one key, so the forward's "
                         "lse is finite: pass the lse the forward returned")


def check_qkv(q, k, v, engine=None):
    """Validate q (B, N, Hq, D), k and v (B, N, Hkv, D). Returns (B, N, Hq, Hkv, D)."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_array(name, x, 4, engine)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape (B, N, Hkv, D), got {k.shape} and {v.shape}")
    B, N, Hq, D = q.shape
    if k.shape[0] != B:
        raise ValueError(f"k has batch size {k.shape[0]} but q has {B}")
    if k.shape[1] != N:
        raise ValueError(f"k has sequence length {k.shape[1]} but q has {N}")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {D}")
    Hkv = k.shape[2]
    if min(B, N, Hq, Hkv, D) < 1:
        raise ValueError(f"q, k and v must have non-empty dimensions, got q {q.shape} and k {k.shape}")
    if Hq % Hkv:
        raise ValueError(f"q has {Hq} heads, which is not a multiple of the {Hkv} heads of k and v (Hq % Hkv must be 0)")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_finite(name, x, engine)
    return B, N, Hq, Hkv, D


def check_backward(out, dout, lse, q, Hq_shape, engine=None):
    """The extra inputs of a backward: out and dout like q (its dtype, finite), lse finite in the accumulation
    dtype."""
    B, n, Hq, D = Hq_shape
    for name, x in (("out", out), ("dout", dout)):
        check_like(name, x, (B, n, Hq, D), q.dtype, engine)
        check_finite(name, x, engine)
    check_lse("lse", lse, (B, Hq, n), accumulation_dtype(q.dtype), engine)


def check_like(name, x, shape, dtype=None, engine=None):
    """Validate an array that must match a known shape (out, dout, lse, or a received shard)."""
    check_array(name, x, len(shape), engine)
    if x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype)}, got {x.dtype}")


def check_scale(scale, D):
    """Default 1/sqrt(D); otherwise a finite real number."""
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_block(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of tokens, got {value}")
    return int(value)


def check_ranks(ranks, N):
    if isinstance(ranks, bool) or not isinstance(ranks, (int, np.integer)):
        raise TypeError(f"ranks must be an int, got {type(ranks).__name__}")
    if ranks < 1:
        raise ValueError(f"ranks must be at least 1, got {ranks}")
    if ranks > N:
        raise ValueError(f"ranks={ranks} exceeds the sequence length N={N}: every rank needs at least one token")
    return int(ranks)


def collective(comm, check):
    """Run ``check()`` on every rank and agree on the outcome.

    If any rank's check raises ValueError or TypeError, every rank raises the same exception type with
    the first failing rank's message, so no rank is left waiting for a peer that gave up. Otherwise
    returns the list of every rank's result, in rank order.
    """
    try:
        outcome = (check(), None)
    except (ValueError, TypeError) as exc:
        outcome = (None, (type(exc), str(exc)))
    everyone = comm.allgather(outcome)
    for rank, (_, error) in enumerate(everyone):
        if error is not None:
            kind, message = error
            raise kind(message if comm.size == 1 else f"rank {rank}: {message}")
    return [result for result, _ in everyone]
