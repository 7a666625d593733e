"""Building and launching the CUDA sources of ``gpu/`` with ``cupy.RawModule``.

Each ``.cu`` is compiled by NVRTC for the current device, once per (source, element type, padded head
dimension, tile sizes), and cached (in memory, and on disk by CuPy under ``CUPY_CACHE_DIR``). ``build_options`` is the single place where the compile-time constants
are chosen, and ``smem_bytes`` the single place where the shared memory they imply is computed; the
compile test (``tests/gpu/test_compile.py``) builds every source with ``nvcc`` with the same options.
"""

import functools
import os
import time

import numpy as np

from refimpl.masks import FULL

SOURCE_DIR = os.path.dirname(os.path.abspath(__file__))
SOURCES = ("flash_forward.cu", "flash_backward.cu", "convert.cu")
ELEM = {"float16": 0, "bfloat16": 1, "float32": 2}      # -DELEM of each input dtype of the fused kernels
MAX_HEAD_DIM = 128
NWARPS = 4                                               # 16 rows per warp: 64 query (or key) rows per CTA


# The forward kernel's versions, side by side as in llm.c's dev/cuda: 16-row tiles per warp and keys per
# sub-tile. Every version is checked against the oracle by the tests and timed by bench/gpu.py.
FORWARD = {"m16n64": (1, 64), "m16n32": (1, 32), "m32n32": (2, 32)}
FORWARD_MASKED, FORWARD_UNMASKED = "m16n32", "m32n32"       # forward_version's picks; masked: the default


def forward_version(elem, plan):
    """The version a step runs unless the engine names one. On an H100 (bench/README.md, bf16, D=128):
    with only FULL tiles (no mask), m32n32 was the fastest, 11-18% over m16n32; with PARTIAL tiles
    m16n32 was, by 7-18% over m32n32, and 3-13% over m16n64 but for one case within noise. float32 was
    not timed and keeps m16n32."""
    if ELEM[elem] != 2 and all(kind == FULL for _, cols in plan.rows for _, kind in cols):
        return FORWARD_UNMASKED
    return FORWARD_MASKED


def tiles(elem):
    """(block_n, block_q): keys per dq sub-tile, queries per dk/dv sub-tile, for an element type."""
    return (64, 32) if ELEM[elem] != 2 else (32, 32)


def rows_per_cta(forward=None):
    """Rows one CTA owns: 16 per warp in the backward kernels, 16 x row tiles in forward version ``forward``."""
    return 16 * NWARPS * (FORWARD[forward][0] if forward else 1)


def head_dim_pad(D):
    return -(-D // 16) * 16


def supports(dtype_name, D):
    """Why the fused kernels cannot run this problem, or None if they can."""
    if dtype_name not in ELEM:
        return f"the fused kernels take {', '.join(ELEM)} inputs, not {dtype_name}"
    if D > MAX_HEAD_DIM:
        return f"the fused kernels take head dims up to {MAX_HEAD_DIM}, not {D}"
    if D % (8 if ELEM[dtype_name] != 2 else 4):
        return f"the fused kernels need 16-byte rows: D a multiple of {8 if ELEM[dtype_name] != 2 else 4}, not {D}"
    return None


def source_text(source):
    """The text of ``source`` with its local ``#include "..."`` headers inlined, each once.

    This is what NVRTC compiles. Inlining makes CuPy's kernel cache, which is keyed on the source text
    and the options, see a change to a header too (with ``-I`` it would load a stale binary)."""
    seen = set()

    def expand(name):
        if name in seen:
            return ""
        seen.add(name)
        with open(os.path.join(SOURCE_DIR, name)) as f:
            lines = f.read().splitlines()
        out = []
        for line in lines:
            words = line.split()
            if len(words) == 2 and words[0] == "#include" and words[1].startswith('"'):
                out.append(expand(words[1].strip('"')))
            elif line.strip() != "#pragma once":
                out.append(line)
        return "\n".join(out)
    return expand(source) + "\n"


def build_options(source, elem, D, forward=None):
    """The nvcc/NVRTC options for ``source`` with element type ``elem`` (a dtype name), head dim D and,
    for the forward, version ``forward`` (default ``FORWARD_MASKED``)."""
    options = [f"-DELEM={ELEM[elem]}"]
    if source != "convert.cu":
        block_n, block_q = tiles(elem)
        if source == "flash_forward.cu":
            row_tiles, block_n = FORWARD[forward or FORWARD_MASKED]
            options.append(f"-DROW_TILES={row_tiles}")
        options += [f"-DHEAD_DIM_PAD={head_dim_pad(D)}", f"-DNWARPS={NWARPS}", f"-DBLOCK_N={block_n}",
                    f"-DBLOCK_Q={block_q}"]
    return tuple(options)


def smem_bytes(kernel, elem, D, forward=None):
    """Dynamic shared memory of one CTA of ``kernel`` (the layouts at the top of each kernel)."""
    block_n, block_q = tiles(elem)
    size = 4 if ELEM[elem] == 2 else 2
    row = (head_dim_pad(D) + 16 // size) * size               # LDS elements per shared row
    bm = rows_per_cta()
    if kernel == "flash_forward":
        forward = forward or FORWARD_MASKED
        return (rows_per_cta(forward) + 4 * FORWARD[forward][1]) * row
    if kernel == "flash_backward_dq":
        return (2 * bm + 4 * block_n) * row
    if kernel == "flash_backward_dkdv":
        return (2 * bm + 4 * block_q) * row + 4 * block_q * 4
    raise ValueError(f"unknown kernel {kernel!r}")


@functools.lru_cache(maxsize=None)
def _module(source, options, device):
    import cupy
    return cupy.RawModule(code=source_text(source), options=options)


def function(source, name, elem, D, smem=0, forward=None):
    """The compiled kernel ``name`` of ``source``, with its dynamic shared memory limit raised to ``smem``."""
    import cupy
    kernel = _module(source, build_options(source, elem, D, forward), cupy.cuda.Device().id).get_function(name)
    if smem > 48 * 1024 and kernel.max_dynamic_shared_size_bytes < smem:
        kernel.max_dynamic_shared_size_bytes = smem
    return kernel


def launch_1d(kernel, n, args, block=256):
    """Launch an elementwise (grid-stride) kernel over n items on the current stream."""
    grid = max(1, min(-(-n // block), 16384))
    kernel((grid,), (block,), args)


def i64(n):
    return np.int64(n)


KERNELS = {"flash_forward.cu": ("flash_forward",), "flash_backward.cu": ("flash_backward_dq", "flash_backward_dkdv"),
           "convert.cu": ("widen", "narrow", "row_delta")}


def _build(variant):
    source, elem, D, forward = variant
    t0 = time.perf_counter()
    for name in KERNELS[source]:
        function(source, name, elem, D, forward=forward)
    return variant, time.perf_counter() - t0


def warm(elems=tuple(ELEM), dims=(64, 128), processes=8):
    """Compile the kernels (every forward version) for these dtypes and head dims in parallel processes,
    into CuPy's kernel cache (``CUPY_CACHE_DIR``), so that later processes load them instead of compiling."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing
    variants = sorted({(s, e, 0 if s == "convert.cu" else D, f if s == "flash_forward.cu" else "")
                       for s in SOURCES for e in elems for D in dims for f in FORWARD
                       if s == "convert.cu" or supports(e, D) is None})
    variants = [(s, e, D, f or None) for s, e, D, f in variants]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_build, variants))


if __name__ == "__main__":
    import argparse
    p = argparse.ArgumentParser(description="compile gpu/ kernels into CuPy's cache ahead of use")
    p.add_argument("--dtypes", nargs="+", default=list(ELEM), choices=list(ELEM))
    p.add_argument("--dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--processes", type=int, default=8)
    a = p.parse_args()
    for (source, elem, D, forward), seconds in warm(a.dtypes, a.dims, a.processes):
        print(f"{source} {elem} D={D}{' ' + forward if forward else ''}: {seconds:.1f} s")
