"""Shared helpers for the ringattn test suite.

Every numerical test compares against the float64 oracle ``refimpl.naive_attention`` /
``naive_attention_backward``. Two kinds of tolerance are used:

* float64 implementations must agree with the oracle to a *relative* error (max abs error divided by
  max abs reference) of at most ``FP64_RTOL`` = 1e-12;
* lower-precision implementations are held to the "2x rule": their error against the oracle must be
  at most twice the error of a plain textbook computation in that precision (``plain_attention`` and
  ``plain_attention_backward`` below), plus a tiny absolute floor in case the plain computation happens
  to be exact.

The plain computations are deliberately written the obvious way, independent of refimpl: materialise
the score matrix, subtract the row max, exponentiate, normalise.
"""

import math
import os

import numpy as np
import pytest
from hypothesis import settings

# Property tests draw the same examples on every run, so CI is reproducible; HYPOTHESIS_PROFILE=explore
# (make explore) draws fresh ones on every run and keeps failures in .hypothesis/ to replay them.
settings.register_profile("reproducible", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "reproducible"))

FP64_RTOL = 1e-12


# -- inputs -------------------------------------------------------------------------------------------

def make_qkv(rng, B=1, N=8, Hq=2, Hkv=None, D=4, dtype=np.float64, magnitude=1.0):
    """Random q (B, N, Hq, D), k and v (B, N, Hkv, D), standard normal times ``magnitude``, in ``dtype``."""
    Hkv = Hq if Hkv is None else Hkv
    q = (rng.standard_normal((B, N, Hq, D)) * magnitude).astype(dtype)
    k = (rng.standard_normal((B, N, Hkv, D)) * magnitude).astype(dtype)
    v = rng.standard_normal((B, N, Hkv, D)).astype(dtype)
    return q, k, v


def make_dout(rng, q, dtype=None):
    return rng.standard_normal(q.shape).astype(q.dtype if dtype is None else dtype)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's name, so every test is reproducible on its own."""
    seed = sum(map(ord, request.node.name)) % (2 ** 31)
    return np.random.default_rng(seed)


# -- error measures -----------------------------------------------------------------------------------

def abs_err(x, ref):
    """Max abs error, treating matching -inf entries (rows that see no key) as exact.

    A -inf in one array where the other is finite is an infinite error.
    """
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    assert x.shape == ref.shape, (x.shape, ref.shape)
    assert not np.isnan(x).any(), "result contains NaN"
    both_neginf = np.isneginf(x) & np.isneginf(ref)
    if (np.isinf(x) != np.isinf(ref)).any() or (np.isinf(x) & ~both_neginf).any():
        return math.inf
    with np.errstate(invalid="ignore"):
        d = np.abs(np.where(both_neginf, 0.0, x - ref))
    return float(d.max()) if d.size else 0.0


def ref_scale(ref):
    """max |ref| over the finite entries (1.0 if there are none or all are zero)."""
    ref = np.asarray(ref, np.float64)
    finite = ref[np.isfinite(ref)]
    m = float(np.abs(finite).max()) if finite.size else 0.0
    return m if m > 0 else 1.0


def rel_err(x, ref):
    """max |x - ref| / max |ref|, the relative error used throughout the suite."""
    return abs_err(x, ref) / ref_scale(ref)


def assert_fp64_close(x, ref, name="", rtol=FP64_RTOL):
    err = rel_err(x, ref)
    assert err <= rtol, f"{name}: relative error {err:.3e} > {rtol:.0e}"


def assert_2x_rule(ours, plain, ref, name="", floor=1e-7):
    """err(ours) <= 2 err(plain) + floor * max|ref|, all errors measured against the float64 oracle."""
    e_ours, e_plain = abs_err(ours, ref), abs_err(plain, ref)
    bound = 2 * e_plain + floor * ref_scale(ref)
    assert e_ours <= bound, (f"{name}: error {e_ours:.3e} exceeds 2 x plain error {e_plain:.3e} "
                             f"+ floor (bound {bound:.3e})")


# -- plain textbook attention in a low precision ------------------------------------------------------

def _expand_heads(x, Hq):
    """(B, N, Hkv, D) -> (B, Hq, N, D); query head h reads kv head h // (Hq / Hkv)."""
    return np.repeat(x.transpose(0, 2, 1, 3), Hq // x.shape[2], axis=1)


def _fold(g, Hkv):
    """(B, Hq, N, D) -> (B, N, Hkv, D), summing the query heads of each kv head."""
    B, Hq, N, D = g.shape
    return g.reshape(B, Hkv, Hq // Hkv, N, D).sum(axis=2).transpose(0, 2, 1, 3)


def _plain_probs(q, k, causal, scale, dt):
    Hq = q.shape[2]
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh = _expand_heads(k.astype(dt), Hq)
    s = (qh @ kh.transpose(0, 1, 3, 2)) * dt.type(scale)
    N = q.shape[1]
    if causal:
        s = np.where(np.tril(np.ones((N, N), bool)), s, dt.type(-np.inf))
    m = s.max(axis=-1, keepdims=True)
    e = np.exp(s - m)
    l = e.sum(axis=-1, keepdims=True)
    return e / l, (m + np.log(l))[..., 0]


def plain_attention(q, k, v, causal=False, scale=None, dtype=np.float32):
    """Textbook attention computed entirely in ``dtype`` (inputs are cast to it first).

    Returns out (B, N, Hq, D) and lse (B, Hq, N) in ``dtype``. Every row must see at least one key.
    """
    dt = np.dtype(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    p, lse = _plain_probs(q, k, causal, scale, dt)
    out = p @ _expand_heads(v.astype(dt), q.shape[2])
    return out.transpose(0, 2, 1, 3), lse


def plain_attention_backward(q, k, v, dout, causal=False, scale=None, dtype=np.float32):
    """Textbook attention gradients computed entirely in ``dtype``. Returns dq, dk, dv in ``dtype``."""
    dt = np.dtype(dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    Hq, Hkv = q.shape[2], k.shape[2]
    p, _ = _plain_probs(q, k, causal, scale, dt)
    qh = q.astype(dt).transpose(0, 2, 1, 3)
    kh, vh = _expand_heads(k.astype(dt), Hq), _expand_heads(v.astype(dt), Hq)
    do = dout.astype(dt).transpose(0, 2, 1, 3)
    out = p @ vh
    dv = p.transpose(0, 1, 3, 2) @ do
    dp = do @ vh.transpose(0, 1, 3, 2)
    ds = p * (dp - (do * out).sum(axis=-1, keepdims=True))
    dq = dt.type(scale) * (ds @ kh)
    dk = dt.type(scale) * (ds.transpose(0, 1, 3, 2) @ qh)
    return dq.transpose(0, 2, 1, 3), _fold(dk, Hkv), _fold(dv, Hkv)


def plain_naive_fp32(q, k, v, causal=False, scale=None):
    """The brief's name for the plain float32 forward."""
    return plain_attention(q, k, v, causal, scale, np.float32)


def half_ulp(dtype, magnitude):
    """Half the spacing of ``dtype`` numbers at ``magnitude``: the rounding error of storing a value."""
    return float(np.spacing(np.asarray(magnitude, dtype=dtype))) / 2
