"""Shared helpers for the benchmarks in ``bench/``: BLAS thread pinning, timing, sizes, tables, verdicts.

Import this module *before* numpy when a benchmark needs one BLAS thread: ``pin_blas_env()`` only works
if it runs before OpenBLAS is loaded. ``blas_one_thread()`` additionally pins an already loaded library
through threadpoolctl (used as a context manager around the timed code).

The machine these run on is small, shared and noisy: everything here reports medians, and the verdicts
compare ratios rather than absolute times.
"""

import contextlib
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


def mem_available():
    """Bytes of memory the kernel says are available now (Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


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
