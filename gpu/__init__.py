"""ringattn on GPUs: refimpl's ring, schedule and tile plan, computed with CuPy.

Only the engine is new (``refimpl/engine.py`` defines the seam): ``CupyEngine`` keeps a rank's arrays on
its GPU, on its own stream, and runs a step's tile plan with the fused kernels of ``flash_forward.cu`` and
``flash_backward.cu`` (or cuBLAS tiles, ``matmul.py``). ``transport.py`` moves device buffers between
ranks, straight from device memory or staged through pinned host buffers.

    import gpu, refimpl
    res = refimpl.simulate_ring(q, k, v, ranks=4, causal=True, dout=dout, engine=gpu.CupyEngine)

Modules: ``engine`` (the engine), ``kernels`` (building and launching the .cu sources), ``plan`` (a step's
plan as int arrays), ``matmul`` (the cuBLAS tile engine), ``transport`` (direct or staged messages, the
CUDA-aware decision), ``device`` (streams, pinned memory, device choice). ``plan`` and ``transport`` need
no CuPy; the others import it, so ``import gpu`` works without a GPU and the names below load on use.
"""

_LAZY = {"CupyEngine": "engine", "sim_world": "device", "select_device": "device"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'gpu' has no attribute {name!r}")
