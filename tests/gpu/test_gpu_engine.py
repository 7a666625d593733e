"""The GPU engine against the float64 oracle: fused kernels and cuBLAS tiles, every dtype, the ring on one GPU.

Skipped with the reason when there is no GPU (``gpu_helpers.gpu_missing``). Rules (specs/tolerances.md):
float64 within 1e-12; float32 within 2x plain float32; float16/bfloat16 within 2x the plain computation
that rounds like tensor cores (fused) or 2x plain float32 rounded to the dtype (cuBLAS tiles, which keep p
in float32). Shapes: GQA (Hq = 4, Hkv = 2), N = 301 (divisible by no block, no CTA, no rank count), row
blocks of 96 and key blocks of 80 (neither a multiple of the kernels' 64-row CTAs or sub-tiles).
"""

import numpy as np
import pytest

from gpu_helpers import DTYPES, check, gpu_missing, inputs, needs_gpu, table, to_host

import refimpl
from gpu.kernels import FORWARD
from refimpl.comm.sim import SimWorld

pytestmark = needs_gpu

if gpu_missing() is None:
    import cupy as cp

    from gpu.engine import CupyEngine


def ring(q, k, v, dout, *, P, causal, kernels="fused", block_q=96, block_k=80):
    res = refimpl.simulate_ring(q, k, v, ranks=P, causal=causal, dout=dout, block_q=block_q, block_k=block_k,
                                engine=CupyEngine.configured(kernels=kernels), timeout=120.0)
    return res, tuple(to_host(getattr(res, n)) for n in ("out", "lse", "dq", "dk", "dv"))


def assert_rule(dtype, kernels, got, q, k, v, dout, causal):
    rows, which = check(dtype, kernels, got, q, k, v, dout, causal)
    assert all(ok for *_, ok in rows), table(rows, which)


CASES = [(d, kern) for d in DTYPES for kern in ("fused", "matmul")]


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype, kernels", CASES)
def test_ring_on_one_gpu_meets_the_rule(rng, dtype, kernels, causal, P):
    q, k, v, dout = inputs(rng, dtype)
    res, got = ring(q, k, v, dout, P=P, causal=causal, kernels=kernels)
    assert got[0].dtype == q.dtype and got[1].dtype == (np.float64 if dtype == "float64" else np.float32)
    assert_rule(dtype, kernels, got, q, k, v, dout, causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("version", sorted(FORWARD))
@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "float64"])
def test_every_forward_version_meets_the_rule(rng, dtype, version, causal):
    """The forward kernel's versions (gpu/kernels.py: FORWARD), each checked before bench/gpu.py times it."""
    q, k, v, dout = inputs(rng, dtype, D=72)
    res = refimpl.simulate_ring(q, k, v, ranks=3, causal=causal, dout=dout, block_q=96, block_k=80, timeout=120.0,
                                engine=CupyEngine.configured(forward=version))
    got = tuple(to_host(getattr(res, n)) for n in ("out", "lse", "dq", "dk", "dv"))
    assert_rule(dtype, "fused", got, q, k, v, dout, causal)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "float64"])
def test_padded_head_dim(rng, dtype):
    q, k, v, dout = inputs(rng, dtype, D=40)
    _, got = ring(q, k, v, dout, P=2, causal=True)
    assert_rule(dtype, "fused", got, q, k, v, dout, True)


def test_many_ctas_and_sub_tiles(rng):
    q, k, v, dout = inputs(rng, "bfloat16", B=1, N=1000, Hq=8, Hkv=2, D=128)
    _, got = ring(q, k, v, dout, P=2, causal=True, block_q=256, block_k=192)
    assert_rule("bfloat16", "fused", got, q, k, v, dout, True)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_large_logits(rng, dtype):
    """Scores of several hundred: the max subtraction and the float64 merge must keep every output exact."""
    q, k, v, dout = inputs(rng, dtype, N=200, magnitude=6.0 if dtype == "float16" else 12.0)
    _, got = ring(q, k, v, dout, P=2, causal=True)
    assert all(np.isfinite(np.asarray(x, np.float64)).all() for x in got)
    assert_rule(dtype, "fused", got, q, k, v, dout, True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_same_schedule_and_trace_as_the_cpu_engine(rng, dtype):
    q, k, v, dout = inputs(rng, dtype, N=203)
    options = dict(ranks=3, causal=True, dout=dout, block_q=48, block_k=64)
    cpu = refimpl.simulate_ring(q, k, v, **options)
    gpu, got = ring(q, k, v, dout, P=3, causal=True, block_q=48, block_k=64)
    fields = ("phase", "step", "rank", "kv_shard", "tiles", "skipped_tiles", "bytes_sent")
    assert [[getattr(r, f) for f in fields] for r in gpu.trace] == [[getattr(r, f) for f in fields] for r in cpu.trace]
    assert gpu.bytes_sent == cpu.bytes_sent
    assert_rule(dtype, "fused", got, q, k, v, dout, True)
    assert_rule(dtype, "matmul", [getattr(cpu, n) for n in ("out", "lse", "dq", "dk", "dv")], q, k, v, dout, True)


def test_fused_backward_is_deterministic(rng):
    q, k, v, dout = inputs(rng, "bfloat16", N=257)
    _, first = ring(q, k, v, dout, P=2, causal=True)
    _, second = ring(q, k, v, dout, P=2, causal=True)
    for a, b in zip(first, second):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_device_inputs_are_taken_as_they_are(rng):
    q, k, v, dout = inputs(rng, "float16", N=100)
    host, _ = ring(q, k, v, dout, P=2, causal=False)
    device = refimpl.simulate_ring(*(cp.asarray(x) for x in (q, k, v)), ranks=2, dout=cp.asarray(dout),
                                   block_q=96, block_k=80, engine=CupyEngine)
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert isinstance(getattr(device, name), cp.ndarray)
        assert cp.array_equal(getattr(device, name), getattr(host, name)), name


def test_head_dim_over_128_falls_back_to_cublas_tiles(rng):
    q, k, v, dout = inputs(rng, "bfloat16", N=130, Hq=2, Hkv=1, D=160)
    engines = []

    class Recording(CupyEngine):
        def __init__(self):
            super().__init__()
            engines.append(self)

    _, got = ring(q, k, v, dout, P=2, causal=True)
    res = refimpl.simulate_ring(q, k, v, ranks=2, causal=True, dout=dout, block_q=96, block_k=80, engine=Recording)
    assert all("head dims up to 128" in e.describe()["kernels"] for e in engines)
    assert_rule("bfloat16", "matmul", got, q, k, v, dout, True)
    assert np.array_equal(to_host(res.out).view(np.uint16), got[0].view(np.uint16))


def test_bad_device_input_is_named(rng):
    q, k, v, dout = inputs(rng, "bfloat16", N=64)
    bad = cp.asarray(k.view(np.uint16))
    bad[0, 5, 1, 3] = 0x7FC0                                       # a bfloat16 NaN
    with pytest.raises(ValueError, match=r"k contains non-finite values \(first at index \(0, 5, 1, 3\)\)"):
        refimpl.simulate_ring(q, bad.view(q.dtype), v, ranks=2, engine=CupyEngine)
    with pytest.raises(TypeError, match="q must be a cupy.ndarray"):
        SimWorld(1).run(lambda comm: refimpl.ring_attention(q, k, v, comm, engine=CupyEngine()))
