"""What the GPU tests share: finding a GPU (or the reason there is none), and the rules of
specs/tolerances.md section 3.5 applied to the GPU engine's outputs.

The plain same-precision computation a tensor-core kernel is compared with (flash-attention's test rule)
rounds where a tensor-core implementation must: the inputs are float16/bfloat16, scores and softmax are
float32, the probabilities p and the score gradients ds are rounded to the input dtype before the products
that use them (p v, p^T dout, ds k, ds^T q), and the outputs are rounded to the input dtype.
"""

import math

import numpy as np
import pytest

from conftest import _expand_heads, _fold, _plain_probs, abs_err, half_ulp, plain_attention, \
    plain_attention_backward, ref_scale

from refimpl import naive_attention, naive_attention_backward, validate


def gpu_missing():
    """Why the GPU tests cannot run here, or None."""
    try:
        import cupy
    except ImportError as exc:
        return f"no GPU: CuPy is not installed ({exc}); pip install 'ringattn[gpu]' on a machine with a GPU"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:                              # noqa: BLE001 - any CUDA error means no device
        return f"no GPU: CuPy found no CUDA device ({type(exc).__name__}: {exc})"
    return None if count > 0 else "no GPU: CuPy found no CUDA device"


needs_gpu = pytest.mark.skipif(gpu_missing() is not None, reason=str(gpu_missing()))

BF16 = validate.BFLOAT16
DTYPES = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}
if BF16 is not None:
    DTYPES["bfloat16"] = BF16


def inputs(rng, dtype, B=2, N=301, Hq=4, Hkv=2, D=64, magnitude=1.0):
    """q, k, v, dout in ``dtype`` (host arrays), drawn in float64 and rounded once."""
    dt = DTYPES[dtype]
    q = (rng.standard_normal((B, N, Hq, D)) * magnitude).astype(dt)
    k = (rng.standard_normal((B, N, Hkv, D)) * magnitude).astype(dt)
    v = rng.standard_normal((B, N, Hkv, D)).astype(dt)
    dout = rng.standard_normal((B, N, Hq, D)).astype(dt)
    return q, k, v, dout


def to_host(x):
    import cupy
    if x.dtype == BF16:
        return cupy.asnumpy(x.view(cupy.uint16)).view(BF16)
    return cupy.asnumpy(x)


def f64(x):
    return np.asarray(x).astype(np.float64)


def oracle(q, k, v, dout, causal):
    """The float64 oracle on the same (rounded) inputs: out, lse, dq, dk, dv."""
    q, k, v, dout = (x.astype(np.float64) for x in (q, k, v, dout))
    out, lse = naive_attention(q, k, v, causal=causal)
    return (out, lse) + naive_attention_backward(q, k, v, dout, causal=causal)


def _round(x, dtype):
    return x.astype(dtype).astype(np.float32)


def plain_tensor_core(q, k, v, dout, causal, dtype):
    """Plain same-precision attention as tensor cores compute it (module docstring): out, lse, dq, dk, dv."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    f32 = np.dtype(np.float32)
    q, k, v, dout = (x.astype(np.float32) for x in (q, k, v, dout))
    Hq, Hkv = q.shape[2], k.shape[2]
    p, lse = _plain_probs(q, k, causal, scale, f32)
    qh, kh, vh = q.transpose(0, 2, 1, 3), _expand_heads(k, Hq), _expand_heads(v, Hq)
    do = dout.transpose(0, 2, 1, 3)
    pr = _round(p, dtype)
    out = _round(pr @ vh, dtype)
    dv = pr.transpose(0, 1, 3, 2) @ do
    ds = p * (do @ vh.transpose(0, 1, 3, 2) - (do * out).sum(axis=-1, keepdims=True))
    dsr = _round(ds, dtype)
    dq = f32.type(scale) * (dsr @ kh)
    dk = f32.type(scale) * (dsr.transpose(0, 1, 3, 2) @ qh)
    return (out.transpose(0, 2, 1, 3), lse, _round(dq.transpose(0, 2, 1, 3), dtype), _round(_fold(dk, Hkv), dtype),
            _round(_fold(dv, Hkv), dtype))


def plain_float32(q, k, v, dout, causal, round_to=None):
    """Textbook float32 attention (tests/conftest.py), outputs rounded to ``round_to`` if given."""
    q32, k32, v32, d32 = (x.astype(np.float32) for x in (q, k, v, dout))
    out, lse = plain_attention(q32, k32, v32, causal)
    grads = plain_attention_backward(q32, k32, v32, d32, causal)
    outs = (out,) + tuple(grads)
    if round_to is not None:
        outs = tuple(_round(x, round_to) for x in outs)
    return (outs[0], lse) + outs[1:]


NAMES = ("out", "lse", "dq", "dk", "dv")


def rule(dtype, kernels):
    """Which plain computation and floor apply (specs/tolerances.md sections 3.1-3.3 and 3.5)."""
    if dtype == "float64":
        return "fp64"
    if dtype == "float32":
        return "2x plain float32"
    return "2x plain tensor-core" if kernels == "fused" else "2x plain float32, rounded"


def check(dtype, kernels, got, q, k, v, dout, causal):
    """Every output against the oracle under its rule. Returns rows (name, err, bound, ok) and the rule."""
    ref = oracle(q, k, v, dout, causal)
    which = rule(dtype, kernels)
    rows = []
    if which == "fp64":
        for name, x, r in zip(NAMES, got, ref):
            err = abs_err(f64(x), r) / ref_scale(r)
            rows.append((name, err, 1e-12, err <= 1e-12))
        return rows, which
    dt = DTYPES[dtype]
    if which == "2x plain tensor-core":
        plain = plain_tensor_core(q, k, v, dout, causal, dt)
    else:
        plain = plain_float32(q, k, v, dout, causal, None if dtype == "float32" else dt)
    lse_plain = plain_float32(q, k, v, dout, causal)[1]
    for name, x, r, p in zip(NAMES, got, ref, plain):
        if name == "lse":
            p = lse_plain
        floor = 1e-7 * ref_scale(r) if dtype == "float32" or name == "lse" else half_ulp(dt, ref_scale(r))
        err, e_plain = abs_err(f64(x), r), abs_err(f64(p), r)
        bound = 2 * e_plain + floor
        rows.append((name, err, bound, err <= bound))
    return rows, which


def table(rows, which):
    return f"rule: {which}\n" + "\n".join(f"  {n:<4} err {e:.3e}  bound {b:.3e}  ratio {e / b if b else 0:.2f}  "
                                          f"{'ok' if ok else 'FAIL'}" for n, e, b, ok in rows)
