"""Shared helpers for the benchmarks in ``bench/``: BLAS thread pinning, timing, sizes, tables, verdicts.

Import this module *before* numpy when a benchmark needs one BLAS thread: ``pin_blas_env()`` only works
if it runs before OpenBLAS is loaded. ``blas_one_thread()`` additionally pins an already loaded library
through threadpoolctl (used as a context manager around the timed code).

The machine these run on is small, shared and noisy: everything here reports medians, and the verdicts
compare ratios rather than absolute times.

Also here, for the kernel benches (``forward.py``, ``backward.py``): the GEMM floor of a pass at the tile
shapes (``tile_gemm_seconds``), torch's CPU ``scaled_dot_product_attention`` as the yardstick (``Sdpa``;
torch is optional) and a line timer of the real refimpl functions (``LineTimer``).
"""

import collections
import contextlib
import linecache
import os
import statistics
import sys
import time
from pathlib import Path

_BLAS_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")

# Make ``import refimpl`` work when a script is run as ``python bench/forward.py`` from anywhere.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def pin_blas_env(threads=1):
    """Set the BLAS/OpenMP thread-count variables. Must run before numpy is first imported."""
    if "numpy" in sys.modules:
        print("warning: numpy was imported before the BLAS thread variables were set; relying on "
              "threadpoolctl alone", file=sys.stderr)
    for name in _BLAS_ENV:
        os.environ[name] = str(threads)


@contextlib.contextmanager
def blas_one_thread():
    """Limit BLAS to one thread with threadpoolctl (if installed) for the duration of the block."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in the test extras
        print("warning: threadpoolctl is not installed; relying on the environment variables",
              file=sys.stderr)
        yield
        return
    with threadpool_limits(limits=1):
        yield


def blas_info():
    """A one-line description of the BLAS libraries numpy loaded and their thread counts."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:  # pragma: no cover
        return "threadpoolctl not installed"
    parts = [f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')}), "
             f"{i.get('num_threads')} thread(s)" for i in threadpool_info()]
    return "; ".join(parts) or "no BLAS found by threadpoolctl"


def blas_kernel_note():
    """A note when OpenBLAS runs its AVX2 kernels on a CPU that has AVX-512, else None.

    OpenBLAS picks its kernels from the CPU model when it loads; a model it does not recognise (AMD family
    0x1A, Zen 5, before OpenBLAS pull request #6033) gets the Haswell (AVX2) kernels.
    ``OPENBLAS_CORETYPE=SkylakeX`` in the environment selects the AVX-512 ones (on the 2-core machine of
    ``bench/README.md``: sgemm 120 -> 210 GFLOP/s).
    """
    try:
        from threadpoolctl import threadpool_info
        with open("/proc/cpuinfo") as f:
            flags = next((line.split() for line in f if line.startswith("flags")), [])
    except (ImportError, OSError):  # pragma: no cover - not Linux, or no threadpoolctl
        return None
    arch = {i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"}
    if "avx512f" in flags and arch & {"Haswell", "Zen", "Sandybridge"}:
        return (f"note: OpenBLAS runs its {'/'.join(sorted(arch))} (AVX2) kernels on a CPU with AVX-512; "
                "OPENBLAS_CORETYPE=SkylakeX selects its AVX-512 kernels (bench/README.md)")
    return None


class Timing:
    """Wall and CPU (process) seconds of repeated runs; ``median`` / ``cpu_median`` for reporting."""

    def __init__(self):
        self.wall, self.cpu = [], []

    @property
    def median(self):
        return statistics.median(self.wall)

    @property
    def cpu_median(self):
        return statistics.median(self.cpu)

    @property
    def spread(self):
        """(min, max) of the wall times, to show the noise next to the median."""
        return min(self.wall), max(self.wall)


def time_it(fn, repeats, warmup=0):
    """Run ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed. Returns a ``Timing``."""
    for _ in range(warmup):
        fn()
    t = Timing()
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        fn()
        t.cpu.append(time.process_time() - c0)
        t.wall.append(time.perf_counter() - w0)
    return t


def load_line():
    """CPU count and 1-minute load average, to flag a busy machine next to the timings."""
    try:
        load = f"{os.getloadavg()[0]:.2f}"
    except OSError:  # pragma: no cover
        load = "?"
    return f"{os.cpu_count()} CPUs, load average (1 min) {load}"


def fmt_bytes(n):
    """Human-readable bytes in binary units: 1.00 GiB, 41.6 MiB, 512 KiB."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            if unit == "B":
                return f"{int(n)} B"
            return f"{n:.3g} {unit}" if abs(n) < 100 else f"{n:.0f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def fmt_n(n):
    """Sequence length as 8K, 128K (binary K) when it divides evenly, else the plain number."""
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt_s(s):
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.1f} ms"


def table(headers, rows, align=None):
    """Render a plain-text table. ``align`` is a string of 'l'/'r' per column (default: first left)."""
    rows = [[str(c) for c in r] for r in rows]
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align))

    out = [line([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


class Verdicts:
    """Collects PASS/FAIL lines; ``exit_code(check)`` is 1 when ``check`` and anything failed."""

    def __init__(self):
        self.results = []

    def add(self, ok, what):
        self.results.append((bool(ok), what))
        print(f"{'PASS' if ok else 'FAIL'}: {what}")
        return ok

    @property
    def failed(self):
        return [w for ok, w in self.results if not ok]

    def exit_code(self, check):
        if check and self.failed:
            print(f"--check: {len(self.failed)} target(s) missed", file=sys.stderr)
            return 1
        return 0


# -- the GEMM floor of a pass ---------------------------------------------------------------------------

def tile_gemm_seconds(block_q, block_k, D, backward=False, calls=20, H=8, seed=1):
    """{product: median CPU seconds} of one head's matrix products on one tile, as refimpl/tile.py issues them.

    Shapes: q, dout (block_q, D) contiguous; k, v (block_k, D) views of a (block_k, H, D) array (as the
    tiles read the (B, N, Hkv, D) shards); p, ds (block_q, block_k) contiguous. The forward's products are
    q k^T and p v (4 * block_q * block_k * D flops); the backward's q k^T, dout v^T, p^T dout, ds k and
    ds^T q (10 * block_q * block_k * D).
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    kv = rng.standard_normal((block_k, H, 2, D), dtype=np.float32)
    k, v = kv[:, 0, 0], kv[:, 0, 1]
    q, dout = (rng.standard_normal((block_q, D), dtype=np.float32) for _ in range(2))
    p, ds = (rng.random((block_q, block_k), dtype=np.float32) for _ in range(2))
    s, dq, dk, dv = np.empty_like(p), np.empty_like(q), np.empty_like(k), np.empty_like(v)
    products = {"q k^T": lambda: np.matmul(q, k.T, out=s), "p v": lambda: np.matmul(p, v, out=dq)}
    if backward:
        products = {"q k^T": lambda: np.matmul(q, k.T, out=s), "dout v^T": lambda: np.matmul(dout, v.T, out=ds),
                    "p^T dout": lambda: np.matmul(p.T, dout, out=dv), "ds k": lambda: np.matmul(ds, k, out=dq),
                    "ds^T q": lambda: np.matmul(ds.T, q, out=dk)}
    return {name: time_it(f, calls, warmup=2).cpu_median for name, f in products.items()}


def computed_pairs(N, causal, block_q, block_k):
    """(pairs in the tiles the tile loop computes, pairs the mask shows) for one head of length N."""
    import numpy as np

    from refimpl.masks import mask_for
    from refimpl.schedule import plan_tiles

    pos = np.arange(N)
    plan = plan_tiles(pos, pos, mask_for(causal), block_q, block_k)
    area = sum((qs.stop - qs.start) * (ks.stop - ks.start) for qs, cols in plan.rows for ks, _ in cols)
    return area, (N * (N + 1) // 2 if causal else N * N)


# -- torch's scaled_dot_product_attention -----------------------------------------------------------------

class Sdpa:
    """torch's CPU ``scaled_dot_product_attention`` on (B, N, H, D) NumPy inputs, one intra-op thread.

    ``Sdpa.load()`` returns None, after printing a note, when torch is not installed (an optional bench
    extra): the benches then leave the torch columns out. The inputs are converted to torch's (B, H, N, D)
    layout once, outside the timed calls. ``forward`` runs under ``no_grad``; ``timed_backward`` times only
    ``out.backward(dout)`` of a forward run just before it, untimed; ``forward_backward`` runs both (the
    last two need ``dout``).
    """

    def __init__(self, torch, q, k, v, dout=None, causal=False):
        self.torch, self.causal = torch, causal
        self.q, self.k, self.v = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        self.dout = None if dout is None else torch.from_numpy(dout).transpose(1, 2).contiguous()

    @staticmethod
    def load():
        try:
            import torch
        except ImportError:
            print("note: torch is not installed (pip install torch, CPU build): the SDPA columns are skipped")
            return None
        torch.set_num_threads(1)
        return torch

    def _run(self, grad):
        q, k, v = (t.detach().requires_grad_(grad) for t in (self.q, self.k, self.v))
        return self.torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    def forward(self):
        with self.torch.no_grad():
            self._run(False)

    def forward_backward(self):
        self._run(True).backward(self.dout)

    def timed_backward(self):
        """Run a forward untimed, then its backward; returns the backward's (wall, cpu) seconds."""
        out = self._run(True)
        w0, c0 = time.perf_counter(), time.process_time()
        out.backward(self.dout)
        return time.perf_counter() - w0, time.process_time() - c0


# -- line timing of the real functions -------------------------------------------------------------------

class LineTimer:
    """Seconds spent on each source line of the given functions, measured on their real code.

    Installed with ``sys.settrace`` for the duration of a ``with`` block. A line's time runs from its
    line event to the next event of the same frame, so a line that calls another timed function includes
    that function's time; NumPy's C functions have no events of their own and count in the line that calls
    them. The cost is one trace call per line executed in the timed functions and per Python call
    anywhere, a few percent here: ``report`` prints the untraced and traced totals side by side.
    """

    def __init__(self, *functions, clock=time.thread_time):
        self._codes = {f.__code__ for f in functions}
        self.clock = clock
        self.seconds = collections.Counter()            # (code, line number) -> seconds
        self.hits = collections.Counter()

    def _on_call(self, frame, event, arg):
        if frame.f_code not in self._codes:
            return None
        current = [None, 0.0]                            # the line running in this frame, since when

        def on_event(frame, event, arg):
            now = self.clock()
            if current[0] is not None:
                self.seconds[current[0]] += now - current[1]
                self.hits[current[0]] += 1
            current[0] = (frame.f_code, frame.f_lineno) if event == "line" else None
            current[1] = self.clock()
            return on_event

        return on_event

    def __enter__(self):
        self._previous = sys.gettrace()
        sys.settrace(self._on_call)
        return self

    def __exit__(self, *exc):
        sys.settrace(self._previous)

    def report(self, total, top=25):
        """The ``top`` lines by time as a table: share of ``total`` seconds, seconds, hits, function:line, source."""
        rows = []
        for (code, line), sec in self.seconds.most_common(top):
            source = linecache.getline(code.co_filename, line).strip()
            rows.append([f"{100 * sec / total:.1f}%", fmt_s(sec), self.hits[(code, line)],
                         f"{code.co_name}:{line}", source[:88]])
        return table(["share", "time", "hits", "function:line", "source"], rows, align="rrrll")
