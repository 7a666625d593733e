"""``ringattn model``: how long ring attention takes on given hardware, and how much memory each rank needs.

The model walks the ring of ``ring.py`` step by step, without running it. At step t = 0 .. P-1 rank r folds
the K/V shard of rank s = (r - t) mod P into its output while the next shard travels: the exchange is posted
*before* the tiles are computed (``specs/protocol.md`` section 3), so a step lasts as long as the longer of
the two. Every rank waits for its neighbours' messages, so the ranks move in lockstep and a step lasts as
long as its slowest rank. Equations and sources: ``specs/model.md``.

Notation: N tokens over P ranks, batch B, Hq query heads and Hkv key/value heads of dimension D, input
element size s_in and accumulation element size s_acc (2/4 for bf16 and fp16, 4/4 fp32, 8/8 fp64); n_r
tokens on rank r; tiles of block_q x block_k.

**Work.** A (q row, k column) pair costs 4 D FLOPs per batch and query head (2 D for q k^T, 2 D for p v; the
exponentials are not counted); the backward's five products cost 2.5 times the forward's two. A tile the
mask hides entirely is skipped, a tile it hides in part is computed in full (``schedule.plan_tiles``). So
rank r at step t computes A[r, t] pairs (the area of its non-empty tiles), of which V[r, t] are visible::

    flops[r, t] = k * 4 B Hq D A[r, t]              k = 1 forward, 2.5 backward

**Step time.** F FLOP/s per device, of which the attention tiles reach a fraction e; link bandwidth W
bytes/s in each direction; latency L seconds per message::

    C[t] = max_r flops[r, t] / (F e share[t])       compute of the slowest rank
    M[t] = m[t] L + bytes[t] / W                     the messages on each link during step t
    T[t] = max(C[t], M[t])                           the transfer overlaps the compute

    forward:   bytes[t] = 2 B n_s Hkv D s_in for t < P-1 (the K/V shard; only KV heads travel), none at P-1
    backward:  the K/V of step t and the dK/dV accumulator sent at the end of step t-1 share the link:
               bytes[t] = 2 B n_s Hkv D s_in [t < P-1] + 2 B n_s' Hkv D s_acc [t > 0],  s' = (r - t + 1) mod P;
               the last accumulator returns to its owner after the loop, exposed: L + 2 B n Hkv D s_acc / W

``share[t]`` is 1 where every rank has a device of its own. On c shared CPU cores Linux (autogroups) gives
each session an equal slice, split among its threads; one process got g of them (c on an idle machine), so c/g - 1
sessions of other work compete. With busy[t] ranks that have tiles to compute:

    simulated ranks (threads of one session; at most c run, a waiting one sleeps):
        share = min(1, g / u) u / busy[t],  u = min(busy[t], c)
    MPI ranks (a session each; a waiting rank yields its core):
        share = min(1, c / (c/g - 1 + busy[t]))

**Total and efficiency.** T = sum_t T[t] (+ the backward's return message). With G devices (P, or
min(P, c) on shared cores) and the useful work U = k 4 B Hq D sum V::

    efficiency = U / (G F e T)

which is 1 only with no idle rank, no masked pair computed and every message hidden.

**Hiding condition.** In a step a rank with n tokens computes w k 4 B Hq D n^2 FLOPs (w = 1 without mask,
and for the busiest rank of contiguous causal shards; 1/2 for a causal mask balanced by zigzag or striped
shards) and sends a n bytes (a = 2 B Hkv D s_in forward, plus 2 B Hkv D s_acc backward). The transfer
hides when C >= M::

    w k 4 B Hq D n^2 / (F e) >= m L + a n / W  <=>  n >= n* = (beta + sqrt(beta^2 + 4 alpha m L)) / (2 alpha)
    alpha = w k 4 B Hq D / (F e),  beta = a / W,  m = 1 message forward, 2 backward

With L = 0, e = 1, no mask, bf16 (s_in = 2) and MHA (Hkv = Hq), n* = F / W: the Ring Attention paper's
condition c >= F/B (Liu et al. 2023), its block size c being the tokens per host whose K/V travel each step.

**Work per layout** (the mask is causal; without it every tile is computed: A = V = n_r n_s). Positions
increase along every shard, so a shard against itself is the causal pattern on indices, ``lower(n, n, 0)``:

    contiguous  rank r holds a run of consecutive tokens.  s < r: every tile (A = V = n_r n_s);
                s > r: none; s = r: lower(n_r, n_r, 0)
    striped     rank r holds the tokens t = r mod P.  Row i of r sees column j of s iff s + jP <= r + iP,
                i.e. j <= i (s <= r) or j <= i - 1 (s > r): lower(n_r, n_s, 0 or 1)
    zigzag      rank r holds chunks r and 2P-1-r of 2P chunks of (nearly) equal length (the second empty when
                N < 2P - r).  s < r: the k tiles that start in chunk s are computed against every row;
                s > r: the q tiles that end in chunk 2P-1-r against every column; s = r: lower(n_r, n_r, 0)

``lower(nq, nk, shift)``: row i sees column j iff j <= i - shift. Its visible pairs are a closed form and its
tiles a sum over row blocks (``_lower``). ``tests/test_model.py`` checks every (rank, step) against
``schedule.plan_tiles`` on the layouts' positions.

**Memory** per rank: ``specs/memory.md`` sections 2 and 3, for the rank with the most tokens
(``memory_bytes``).
"""

import argparse
import math
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache

import numpy as np

from .blockwise import BLOCK_K, BLOCK_Q

LAYOUTS = ("contiguous", "zigzag", "striped")
ITEMSIZE = {"bf16": (2, 4), "fp16": (2, 4), "fp32": (4, 4), "fp64": (8, 8)}   # (s_in, s_acc) bytes
BACKWARD_FACTOR = 2.5                       # five products per backward tile against the forward's two
GiB = 1 << 30


# -- the problem ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Problem:
    """One ring attention run: N tokens over P ranks, shapes, dtype, mask, layout and tile sizes."""
    seq: int
    ranks: int
    batch: int = 1
    heads: int = 8
    kv_heads: int = None            # default: heads (MHA)
    dim: int = 64
    dtype: str = "bf16"
    causal: bool = True
    layout: str = "contiguous"
    block_q: int = BLOCK_Q
    block_k: int = BLOCK_K

    def __post_init__(self):
        if self.kv_heads is None:
            object.__setattr__(self, "kv_heads", self.heads)
        for name in ("seq", "ranks", "batch", "heads", "kv_heads", "dim", "block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"dtype must be one of {', '.join(ITEMSIZE)}, got {self.dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.seq < self.ranks:
            raise ValueError(f"seq {self.seq} is too short for {self.ranks} ranks: every rank needs a token")

    @property
    def itemsizes(self):
        return ITEMSIZE[self.dtype]


def chunk_lengths(N, pieces):
    """Lengths of ``pieces`` consecutive chunks of N tokens, the first N % pieces one token longer. (pieces,)"""
    base, extra = divmod(N, pieces)
    return base + (np.arange(pieces) < extra).astype(np.int64)


def shard_lengths(layout, N, P):
    """Tokens held by each rank (P,), as ``layouts.py`` cuts them. Contiguous and striped shards differ by at
    most one token; a zigzag shard is chunks r and 2P-1-r of ``chunk_lengths(N, 2P)`` (the second one empty
    when N < 2P - r)."""
    if layout == "zigzag":
        m = chunk_lengths(N, 2 * P)
        return m[:P] + m[::-1][:P]
    return chunk_lengths(N, P)


# -- work per rank and step -------------------------------------------------------------------------

@dataclass
class Work:
    """Per rank (P,) int64: pairs in computed tiles, visible pairs, computed tiles."""
    area: np.ndarray
    visible: np.ndarray
    tiles: np.ndarray


def _triangle(x, nk):
    """sum_{y=1..x} min(y, nk), 0 for x <= 0 (exact integers)."""
    if x <= 0:
        return 0
    if x <= nk:
        return x * (x + 1) // 2
    return nk * (nk + 1) // 2 + (x - nk) * nk


@lru_cache(maxsize=None)
def _lower(nq, nk, block_q, block_k, shift):
    """(tiles, area, visible) of nq rows against nk columns where row i sees column j iff j <= i - shift.

    Row block i (rows i*bq .. last_i) computes the column blocks whose first column it can see:
    cols_i = clip(floor((last_i - shift) / bk) + 1, 0, J), J = ceil(nk / bk). Visible pairs:
    sum_i clip(i + 1 - shift, 0, nk). Summed over row blocks in slices, so memory stays bounded for any N.
    """
    J = -(-nk // block_k)
    blocks = -(-nq // block_q)
    tiles = area = 0
    for first in range(0, blocks, 1 << 20):
        i = np.arange(first, min(blocks, first + (1 << 20)), dtype=np.int64)
        last = np.minimum((i + 1) * block_q, nq) - 1
        cols = np.clip((last - shift) // block_k + 1, 0, J)
        tiles += int(cols.sum())
        area += int(((last - i * block_q + 1) * np.minimum(cols * block_k, nk)).sum())
    return tiles, area, _triangle(nq - shift, nk)


@lru_cache(maxsize=16)
def _shards(problem):
    """(n, index, lower): tokens per rank (P,); each rank's index among the L distinct lengths (a layout has
    two or three); for a causal mask, ``_lower`` of every pair of those lengths and shift 0 or 1, as a
    (2, L, L, 3) table of (tiles, area, visible)."""
    n = shard_lengths(problem.layout, problem.seq, problem.ranks)
    lengths = np.unique(n)
    table = np.array([[[_lower(int(a), int(b), problem.block_q, problem.block_k, shift) for b in lengths]
                       for a in lengths] for shift in (0, 1)], dtype=np.int64) if problem.causal else None
    return n, np.searchsorted(lengths, n), table


def step_work(problem, step):
    """What every rank computes at ``step``: a ``Work`` of (P,) arrays, from the layout's definition alone."""
    P, bq, bk = problem.ranks, problem.block_q, problem.block_k
    n, index, lower = _shards(problem)
    r = np.arange(P)
    s = (r - step) % P
    nq, nk = n[r], n[s]
    row_blocks, col_blocks = -(-nq // bq), -(-nk // bk)
    full = np.stack([row_blocks * col_blocks, nq * nk, nq * nk])       # (tiles, area, visible) of every pair
    if not problem.causal:
        return Work(full[1], full[2], full[0])
    out = np.zeros_like(full)
    if problem.layout == "contiguous":
        out[:, s < r] = full[:, s < r]
        out[:, s == r] = lower[0, index, index].T[:, s == r]
    elif problem.layout == "striped":
        shift = (s > r).astype(np.int64)
        out[...] = lower[shift, index[r], index[s]].T
    else:                                                   # zigzag
        m = chunk_lengths(problem.seq, 2 * P)
        first_k = m[s]                                      # tokens of s's first chunk (chunk s)
        cols = -(-first_k // bk)                            # k tiles that start in it
        earlier = s < r
        out[:, earlier] = np.stack([row_blocks * cols, nq * np.minimum(cols * bk, nk), nq * first_k])[:, earlier]
        second = m[2 * P - 1 - r]                           # tokens of r's second chunk (empty when N < 2P - r)
        skip = np.where(second > 0, m[r] // bq, row_blocks)  # q tiles that end in r's first chunk
        later = s > r
        out[:, later] = np.stack([(row_blocks - skip) * col_blocks, np.maximum(nq - skip * bq, 0) * nk,
                                  second * nk])[:, later]
        out[:, s == r] = lower[0, index, index].T[:, s == r]
    return Work(out[1], out[2], out[0])


# -- hardware ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Hardware:
    """One rank's device and its link to the next rank."""
    name: str
    flops: float                    # FLOP/s of one device at the run's dtype
    bandwidth: float                # bytes/s from a rank to the next, one direction
    latency: float                  # seconds per message
    efficiency: tuple = (1.0, 1.0)  # fraction of ``flops`` the attention tiles reach: (forward, backward)
    cores: int = None               # CPU cores the ranks share; None: every rank has a device of its own
    available: float = None         # of those, the cores one process gets now (fewer while other work runs)
    transport: str = None           # on shared cores: "simulated" (threads of one process) or "mpi" (processes)
    memory: float = None            # bytes of one device, if known
    link_spans: int = None          # ranks the link joins (NVLink: the 8 GPUs of a node); None: any number
    source: str = ""

    def __post_init__(self):
        for name in ("flops", "bandwidth"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive, finite number, got {value!r}")
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"latency must be a non-negative, finite number of seconds, got {self.latency!r}")
        if not all(0 < e <= 1 for e in self.efficiency):
            raise ValueError(f"efficiency must be a fraction in (0, 1], got {self.efficiency!r}")

    def share(self, busy, ranks):
        """The fraction of a device at which each of ``busy`` ranks (of ``ranks``) computes.

        1 where every rank has a device. On c shared CPU cores, Linux gives every session (autogroup) an
        equal slice and splits it among the session's threads; one process with c threads got g cores
        (``available``: c on an idle machine), so c / g - 1 sessions of other work compete.
        Simulated ranks are threads of one session: at most c of them run (``comm/sim.py`` turns), and
        they split g. MPI ranks are sessions of their own (the launcher starts each in a new session); a
        waiting one polls but yields its core (MPICH's busy-wait loop calls sched_yield), so the busy ones
        compete: each gets c / (c / g - 1 + busy) of a core.
        """
        if self.cores is None or busy == 0:
            return 1.0
        if self.transport == "mpi":
            return min(1.0, self.cores / (self.cores / self.available - 1 + busy))
        running = min(busy, self.cores)
        return min(1.0, self.available / running) * running / busy


A100_DATASHEET = "NVIDIA A100 Tensor Core GPU datasheet (SXM4 80GB)"
H100_DATASHEET = "NVIDIA H100 Tensor Core GPU datasheet (SXM5)"
LATENCY_NOTE = ("Nominal figures, not measured. The latency is assumed (the order of a point-to-point message's "
                "software latency), not a datasheet figure")
# Peak dense FLOP/s per dtype. bf16/fp16: tensor cores; fp32: the FP32 (FMA) rate, which the fused fp32
# kernels use; fp64: FP64 tensor cores (cuBLAS DGEMM).
A100_FLOPS = {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12, "fp64": 19.5e12}
H100_FLOPS = {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12, "fp64": 67e12}
PRESETS = {
    "a100": dict(flops=A100_FLOPS, bandwidth=300e9, latency=10e-6, memory=80 * GiB, link_spans=8,
                 about="NVIDIA A100 SXM4 80GB over NVLink 3 (600 GB/s total = 300 GB/s per direction)",
                 source=f"{A100_DATASHEET}: BF16/FP16 312 TFLOP/s dense (624 with sparsity), FP32 19.5, FP64 "
                        f"tensor core 19.5; NVLink 600 GB/s; 80 GB HBM2e. {LATENCY_NOTE}"),
    "h100": dict(flops=H100_FLOPS, bandwidth=450e9, latency=10e-6, memory=80 * GiB, link_spans=8,
                 about="NVIDIA H100 SXM5 80GB over NVLink 4 (900 GB/s total = 450 GB/s per direction)",
                 source=f"{H100_DATASHEET}: BF16/FP16 989 TFLOP/s dense (1,979 with sparsity), FP32 67, FP64 "
                        f"tensor core 67; NVLink 900 GB/s; 80 GB HBM3. {LATENCY_NOTE}"),
    "a100-ndr": dict(flops=A100_FLOPS, bandwidth=50e9, latency=10e-6, memory=80 * GiB,
                     about="NVIDIA A100 SXM4 80GB, one InfiniBand NDR port per GPU (400 Gb/s = 50 GB/s per direction)",
                     source=f"{A100_DATASHEET}; InfiniBand NDR 400 Gb/s per port (NVIDIA ConnectX-7). "
                            f"{LATENCY_NOTE}"),
    "h100-ndr": dict(flops=H100_FLOPS, bandwidth=50e9, latency=10e-6, memory=80 * GiB,
                     about="NVIDIA H100 SXM5 80GB, one InfiniBand NDR port per GPU (400 Gb/s = 50 GB/s per direction, "
                           "as in a DGX H100)",
                     source=f"{H100_DATASHEET}; InfiniBand NDR 400 Gb/s per port (NVIDIA ConnectX-7). "
                            f"{LATENCY_NOTE}"),
}
HARDWARE = tuple(PRESETS) + ("cpu",)


def preset(name, dtype):
    """The nominal ``Hardware`` of a GPU preset at ``dtype``: peak figures, tiles at 100% of peak."""
    if name not in PRESETS:
        raise ValueError(f"hardware must be one of {', '.join(HARDWARE)}, got {name!r}")
    p = PRESETS[name]
    return Hardware(f"{name}: {p['about']}", p["flops"][dtype], p["bandwidth"], p["latency"],
                    memory=p["memory"], link_spans=p.get("link_spans"), source=p["source"])


# -- this CPU, measured -----------------------------------------------------------------------------

def _cpu_seconds(fn, repeats):
    """Median CPU seconds of this thread per call of ``fn`` (after a warm-up call): what the work costs on a
    core of its own, however many other threads share the cores meanwhile."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def calibrate(problem, transport="simulated", repeats=3):
    """Measure this CPU as ranks of one BLAS thread each, sharing its cores: a ``Hardware`` named ``cpu``.

    - flops: an sgemm (dgemm for fp64) of one tile's shape, (block_q, D) x (D, block_k), on one thread;
    - efficiency: ``blockwise_attention`` and its backward over max(block_q, block_k) tokens, with the
      problem's B, Hq, Hkv, D and dtype, on one thread, as a fraction of that rate.
      Both are timed in CPU seconds of the thread (``time.thread_time``): a core's own rates, however
      many other threads share the cores meanwhile;
    - available: the forward run by c threads of this process at once (c the cores it may use): the CPU
      seconds they got per second of wall time, at most c; less while other work takes its share;
    - bandwidth and latency: the fastest of ``repeats`` messages of 16 MiB and of 8 bytes between two
      simulated ranks (in-process);
    - ``transport``: how the ranks share the cores (``Hardware.share``).
    Medians of ``repeats`` timings; a second or two at the default sizes. On a shared machine the load
    drifts: calibrate just before the run the prediction is for.
    """
    from threadpoolctl import threadpool_limits

    from .blockwise import blockwise_attention, blockwise_attention_backward
    from .comm.sim import SimWorld
    from .threads import available_cores

    if problem.dtype == "bf16":
        raise ValueError("the cpu hardware measures this CPU's NumPy kernels, which take fp16, fp32 and fp64, "
                         "not bf16")
    if transport not in ("simulated", "mpi"):
        raise ValueError(f"transport must be 'simulated' or 'mpi', got {transport!r}")
    dtype = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64}[problem.dtype]
    acc = np.float64 if dtype == np.float64 else np.float32
    B, Hq, Hkv, D, bq, bk = (problem.batch, problem.heads, problem.kv_heads, problem.dim, problem.block_q,
                             problem.block_k)
    rng = np.random.default_rng(0)
    N = max(bq, bk)
    q = rng.standard_normal((B, N, Hq, D)).astype(dtype)
    k, v = (rng.standard_normal((B, N, Hkv, D)).astype(dtype) for _ in range(2))
    dout = rng.standard_normal(q.shape).astype(dtype)
    a, b = rng.standard_normal((bq, D)).astype(acc), rng.standard_normal((D, bk)).astype(acc)
    opts = dict(block_q=bq, block_k=bk)
    pairs = 4 * B * Hq * D * N * N
    cores = available_cores()
    with threadpool_limits(limits=1, user_api="blas"):
        gemm = 2 * bq * D * bk / _cpu_seconds(lambda: a @ b, max(repeats, 20))
        out, lse = blockwise_attention(q, k, v, **opts)
        forward = pairs / _cpu_seconds(lambda: blockwise_attention(q, k, v, **opts), repeats)
        backward = BACKWARD_FACTOR * pairs / _cpu_seconds(
            lambda: blockwise_attention_backward(q, k, v, out, lse, dout, **opts), repeats)
        available = min(float(cores), _cores_got(lambda: blockwise_attention(q, k, v, **opts), cores, repeats))
    bandwidth, latency = _message_speed(SimWorld, repeats)
    return Hardware(
        f"cpu: this machine's {cores} cores ({available:.2g} of them for one process now), shared by {transport} "
        f"ranks of one BLAS thread", gemm, bandwidth, latency,
        efficiency=(min(1.0, forward / gemm), min(1.0, backward / gemm)), cores=cores, available=available,
        transport=transport, memory=mem_available(),
        source=f"measured: {'dgemm' if acc == np.float64 else 'sgemm'} ({bq}x{D})x({D}x{bk}) {gemm / 1e9:.1f} GFLOP/s, "
               f"blockwise forward {forward / 1e9:.1f} and backward {backward / 1e9:.1f} GFLOP/s per CPU second of "
               f"one thread; {cores} threads at once got {available:.2f} cores; in-process messages "
               f"{bandwidth / 1e9:.2f} GB/s, {latency * 1e6:.0f} us")


def _cores_got(fn, threads, repeats):
    """CPU seconds per wall second that ``threads`` threads got, each calling ``fn`` ``repeats`` times, all
    at once."""
    start, used = threading.Barrier(threads + 1), [0.0] * threads

    def work(i):
        start.wait()
        t0 = time.thread_time()
        for _ in range(repeats):
            fn()
        used[i] = time.thread_time() - t0
    pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    t0 = time.perf_counter()
    for thread in pool:
        thread.join()
    return sum(used) / (time.perf_counter() - t0)


def _message_speed(SimWorld, repeats):
    """(bytes/s, seconds): the fastest of ``repeats`` messages between two simulated ranks, of 16 MiB (its
    bandwidth) and of 8 bytes (the latency)."""
    def fastest(size):
        def rank(comm):
            buf = np.zeros(size // 8)
            times = []
            for i in range(repeats + 1):
                comm.barrier()
                t0 = time.perf_counter()
                if comm.rank == 0:
                    comm.send(buf, 1, i)
                else:
                    comm.recv(buf, 0, i)
                times.append(time.perf_counter() - t0)
            return min(times[1:])
        return max(SimWorld(2).run(rank))
    big = 16 << 20
    return big / fastest(big), fastest(8)


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


# -- the prediction ---------------------------------------------------------------------------------

@dataclass
class Step:
    step: int
    compute_s: float                # C[t]: the slowest rank's tiles
    comm_s: float                   # M[t]: the messages on a link during the step
    time_s: float                   # max(C[t], M[t])
    busy_ranks: int                 # ranks with tiles to compute


@dataclass
class Phase:
    phase: str
    time_s: float                   # sum of the steps (+ the backward's return message)
    compute_s: float                # sum of C[t]
    exposed_comm_s: float           # time_s - compute_s: communication nothing hid
    useful_flops: float             # k 4 B Hq D sum V
    efficiency: float               # useful_flops / (devices F e time_s)
    hide_tokens: float              # n*: tokens per rank from which a balanced step hides its messages
    steps: list = field(default_factory=list)


@dataclass
class Prediction:
    problem: Problem
    hardware: Hardware
    tokens_per_rank: tuple          # (fewest, most)
    forward: Phase
    backward: Phase                 # None unless asked for
    memory: dict                    # bytes per rank: forward, backward
    imbalance: float                # max over ranks of the computed pairs / their mean
    tile_use: float                 # visible pairs / computed pairs

    @property
    def time_s(self):
        return self.forward.time_s + (self.backward.time_s if self.backward else 0.0)

    def to_dict(self):
        return dict(asdict(self), time_s=self.time_s)


def _phase(problem, hw, phase):
    """Step times of one pass (``forward`` or ``backward``), and per-rank totals of computed pairs."""
    P, B, Hq, Hkv, D = problem.ranks, problem.batch, problem.heads, problem.kv_heads, problem.dim
    s_in, s_acc = problem.itemsizes
    backward = phase == "backward"
    k = BACKWARD_FACTOR if backward else 1.0
    rate = hw.flops * hw.efficiency[1 if backward else 0]
    per_pair = k * 4 * B * Hq * D
    n = shard_lengths(problem.layout, problem.seq, P)
    r = np.arange(P)
    kv_bytes = 2 * B * Hkv * D * s_in * n              # the K/V shard of each rank, as it travels
    dkv_bytes = 2 * B * Hkv * D * s_acc * n             # its dK/dV accumulator
    steps, area_per_rank, visible = [], np.zeros(P, dtype=np.int64), 0
    for t in range(P):
        work = step_work(problem, t)
        area_per_rank += work.area
        visible += int(work.visible.sum())
        busy = int(np.count_nonzero(work.area))
        compute = per_pair * float(work.area.max()) / (rate * hw.share(busy, P))
        sent = float(kv_bytes[(r - t) % P].max()) if t < P - 1 else 0.0
        messages = int(t < P - 1)
        if backward and t > 0:
            sent += float(dkv_bytes[(r - t + 1) % P].max())
            messages += 1
        comm = messages * hw.latency + sent / hw.bandwidth
        steps.append(Step(t, compute, comm, max(compute, comm), busy))
    total = sum(x.time_s for x in steps)
    if backward:
        total += hw.latency + float(dkv_bytes.max()) / hw.bandwidth
    compute = sum(x.compute_s for x in steps)
    devices = P if hw.cores is None else min(P, hw.cores)
    useful = per_pair * visible
    result = Phase(phase, total, compute, total - compute, useful, useful / (devices * rate * total),
                   hide_tokens(problem, hw, phase), steps)
    return result, area_per_rank, visible


def hide_tokens(problem, hw, phase="forward"):
    """n*: the tokens per rank from which a balanced step's compute covers its messages (module docstring)."""
    B, Hq, Hkv, D = problem.batch, problem.heads, problem.kv_heads, problem.dim
    s_in, s_acc = problem.itemsizes
    backward = phase == "backward"
    w = 0.5 if problem.causal and problem.layout != "contiguous" else 1.0
    rate = hw.flops * hw.efficiency[1 if backward else 0]
    alpha = w * (BACKWARD_FACTOR if backward else 1.0) * 4 * B * Hq * D / rate
    beta = 2 * B * Hkv * D * (s_in + (s_acc if backward else 0)) / hw.bandwidth
    latency = (2 if backward else 1) * hw.latency          # the backward's K/V and dK/dV messages
    return (beta + math.sqrt(beta * beta + 4 * alpha * latency)) / (2 * alpha)


def memory_bytes(problem):
    """Bytes one rank holds (``specs/memory.md`` sections 2 and 3), for the rank with the most tokens.

    The score buffers are one head's (bq, bk) tile, TILE_f = t_max s_acc: one in the forward ("s"), two in
    the backward ("p" and "ds"), which ``tile.attend_tile_backward`` now also fills one head at a time.
    """
    B, Hq, Hkv, D = problem.batch, problem.heads, problem.kv_heads, problem.dim
    s_in, s_acc = problem.itemsizes
    n = n_max = int(shard_lengths(problem.layout, problem.seq, problem.ranks).max())
    Q, KV, ROW, BUF = B * n * Hq * D, B * n * Hkv * D, B * Hq * n, 2 * B * n_max * Hkv * D
    tile_f = min(problem.block_q, n) * min(problem.block_k, n_max) * s_acc
    forward = ((Q + 2 * KV) * s_in + Q * s_acc + 8 * ROW + 2 * BUF * s_in + tile_f
               + (Q * s_in if s_in != s_acc else 0) + (4 * ROW if s_acc == 4 else 0))
    backward = ((3 * Q + 2 * KV) * s_in + (3 * ROW + Q) * s_acc + 2 * BUF * s_in + 3 * BUF * s_acc + 2 * tile_f
                + 2 * KV * s_in + (Q * s_in if s_in != s_acc else 0))
    return {"forward": forward, "backward": backward}


def predict(problem, hardware, backward=False):
    """The ``Prediction`` of ``problem`` on ``hardware``: the forward pass, and the backward if asked."""
    forward, area, visible = _phase(problem, hardware, "forward")
    bwd = _phase(problem, hardware, "backward")[0] if backward else None
    n = shard_lengths(problem.layout, problem.seq, problem.ranks)
    return Prediction(problem, hardware, (int(n.min()), int(n.max())), forward, bwd, memory_bytes(problem),
                      float(area.max() / area.mean()) if area.any() else 1.0,
                      visible / int(area.sum()) if area.any() else 1.0)


# -- the Ring Attention paper's condition and table -------------------------------------------------

# Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context" (arXiv
# 2310.01889, ICLR 2024), section 3, "Arithmetic Intensity Between Hosts", and its table "Minimal sequence
# length needed on each device": FLOPS (TF), interconnect bandwidth (GB/s, unidirectional), minimal block
# size and minimal sequence length (x1e3 tokens), with c = FLOPS / bandwidth and s = 6 c.
PAPER_TABLE = (
    ("A100 NVLink", 312, 300, 1.0, 6.2),
    ("A100 InfiniBand", 312, 12.5, 24.5, 149.5),
    ("TPU v3", 123, 112, 1.1, 6.6),
    ("TPU v4", 275, 268, 1.0, 6.2),
    ("TPU v5e", 196, 186, 1.1, 6.3),
)


def paper_block_size(flops, bandwidth):
    """The paper's minimal block size, as this model's n* of one host: no mask, bf16, MHA, no latency,
    tiles at peak. It equals flops / bandwidth (the paper's c >= F/B)."""
    problem = Problem(seq=1, ranks=1, heads=1, dim=1, dtype="bf16", causal=False)
    return hide_tokens(problem, Hardware("paper", flops, bandwidth, 0.0), "forward")


def paper_rows():
    """The paper's table next to this model's values: dicts with both, in tokens."""
    rows = []
    for name, tf, gbs, block, seq in PAPER_TABLE:
        c = paper_block_size(tf * 1e12, gbs * 1e9)
        rows.append(dict(spec=name, tflops=tf, bandwidth_gbs=gbs, block=c, seq=6 * c,
                         paper_block=block * 1e3, paper_seq=seq * 1e3))
    return rows


# -- the command ------------------------------------------------------------------------------------

def _number(lowest, inclusive):
    """An argparse type: a finite number above ``lowest`` (or equal to it, if ``inclusive``)."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not (math.isfinite(value) and (value >= lowest if inclusive else value > lowest)):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>=' if inclusive else '>'} {lowest}, "
                                             f"got {text}")
        return value
    return parse


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def add_arguments(p):
    """The options of ``ringattn model`` beyond the problem's shape (``cli.add_problem_options``). Its
    --dtype replaces the shape options' one (the parser resolves the conflict): the model needs only the
    element sizes, so bf16 is always offered, and the default follows the hardware."""
    p.add_argument("--ranks", type=_positive_int, default=4, help="ranks P (GPUs, or processes)")
    p.add_argument("--dtype", choices=sorted(ITEMSIZE), default=None,
                   help="input dtype (default: bf16, or fp32 with --hardware cpu)")
    p.add_argument("--layout", choices=LAYOUTS, default="contiguous",
                   help="how the sequence is cut (layouts.py): contiguous runs; zigzag (rank r holds chunks r and "
                        "2P-1-r of 2P); striped (rank r holds the tokens t = r mod P)")
    p.add_argument("--backward", action="store_true", help="also model the backward pass")
    p.add_argument("--hardware", choices=HARDWARE, default=None,
                   help="nominal GPU figures (a100, h100 over NVLink; a100-ndr, h100-ndr over InfiniBand NDR), or "
                        "cpu: this machine, measured by a calibration run of about a second")
    p.add_argument("--flops", type=_number(0, False), default=None,
                   help="FLOP/s of one device, e.g. 989e12 (replaces the preset's)")
    p.add_argument("--bandwidth", type=_number(0, False), default=None,
                   help="bytes/s from one rank to the next, one direction, e.g. 450e9 (replaces the preset's)")
    p.add_argument("--latency", type=_number(0, True), default=None,
                   help="seconds per message, e.g. 10e-6 (replaces the preset's; without --hardware: 0)")
    p.add_argument("--efficiency", type=_number(0, False), default=None,
                   help="fraction of the FLOP/s the attention tiles reach, forward and backward (default: 1 on the "
                        "nominal presets, measured on cpu)")
    p.add_argument("--transport", choices=("simulated", "mpi"), default=None,
                   help="with --hardware cpu: simulated ranks (threads of one process; the default) or MPI ranks "
                        "(a process each); it matters when the ranks outnumber the cores or other work runs")
    p.add_argument("--json", action="store_true", help="print the prediction as strict JSON")
    p.add_argument("--png", metavar="FILE", default=None,
                   help="also draw efficiency against tokens per rank and against P (needs matplotlib)")
    p.add_argument("--paper", action="store_true",
                   help="print the Ring Attention paper's minimal block size table next to the model's values, and "
                        "exit")


def hardware_of(args, problem):
    """The ``Hardware`` the options describe: a preset or the measured cpu, with --flops, --bandwidth,
    --latency and --efficiency replacing its figures; or those figures alone."""
    if args.hardware is None and (args.flops is None or args.bandwidth is None):
        raise ValueError("give --hardware (" + ", ".join(HARDWARE) + "), or both --flops and --bandwidth")
    if args.transport is not None and args.hardware != "cpu":
        raise ValueError("--transport describes the ranks sharing this CPU: it needs --hardware cpu")
    if args.efficiency is not None and not 0 < args.efficiency <= 1:
        raise ValueError(f"--efficiency must be a fraction in (0, 1], got {args.efficiency}")
    if args.hardware == "cpu":
        hw = calibrate(problem, args.transport or "simulated")
    elif args.hardware is not None:
        hw = preset(args.hardware, problem.dtype)
    else:
        hw = Hardware("custom", args.flops, args.bandwidth, 0.0, source="--flops, --bandwidth, --latency")
    given = {name: getattr(args, name) for name in ("flops", "bandwidth", "latency") if getattr(args, name) is not None}
    if args.efficiency is not None:
        given["efficiency"] = (args.efficiency, args.efficiency)
    if args.hardware is not None and given:
        given["name"] = f"{hw.name} (with {', '.join('--' + name for name in given)})"
    return replace(hw, **given)


def command(args):
    """``ringattn model``: the prediction as text, or as a dict with --json (or the paper's table with
    --paper). Raises ValueError on options that do not fit together."""
    if args.paper:
        return paper_text()
    dtype = args.dtype or ("fp32" if args.hardware == "cpu" else "bf16")
    problem = Problem(args.seq, args.ranks, args.batch, args.heads, args.kv_heads, args.dim, dtype,
                      args.causal, args.layout, args.block_q, args.block_k)
    hw = hardware_of(args, problem)
    if args.png is not None:
        plot(problem, hw, args.png, backward=args.backward)
    prediction = predict(problem, hw, backward=args.backward)
    return prediction.to_dict() if args.json else report(prediction)


# -- text -------------------------------------------------------------------------------------------

def _s(x):
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if x >= scale or unit == "us":
            return f"{x / scale:.3g} {unit}"


def _b(x):
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if x < 1024 or unit == "TiB":
            return f"{x:.3g} {unit}" if unit != "B" else f"{int(x)} B"
        x /= 1024


def report(p):
    """The human-readable prediction."""
    pr, hw = p.problem, p.hardware
    lo, hi = p.tokens_per_rank
    lines = [
        f"ring attention model: N={pr.seq:,} over P={pr.ranks} ranks ({pr.layout}, "
        f"{f'{hi:,}' if lo == hi else f'{lo:,}-{hi:,}'} tokens per rank), B={pr.batch} Hq={pr.heads} "
        f"Hkv={pr.kv_heads} D={pr.dim} {pr.dtype}, {'causal' if pr.causal else 'no mask'}, "
        f"tiles {pr.block_q}x{pr.block_k}",
        f"hardware: {hw.name}",
        f"  {hw.flops / 1e12:.4g} TFLOP/s per device, the tiles at {hw.efficiency[0]:.0%} of it forward and "
        f"{hw.efficiency[1]:.0%} backward; link {hw.bandwidth / 1e9:.4g} GB/s per direction, latency {_s(hw.latency)}",
        f"  source: {hw.source}",
    ]
    if hw.link_spans is not None and pr.ranks > hw.link_spans:
        lines.append(f"  note: this link joins {hw.link_spans} ranks (one node); a ring of {pr.ranks} also crosses "
                     "nodes, and since its steps run in lockstep they go at the slower link's pace: compare "
                     "the -ndr hardware")
    lines.append("")
    for phase in (p.forward, p.backward):
        if phase is None:
            continue
        compute = [x.compute_s for x in phase.steps]
        comm = [x.comm_s for x in phase.steps]
        hidden = sum(x.comm_s <= x.compute_s for x in phase.steps)
        balanced = " (a balanced causal step)" if pr.causal and pr.layout != "contiguous" else ""
        lines += [
            f"{phase.phase}: {_s(phase.time_s)}, {phase.efficiency:.1%} efficient",
            f"  {pr.ranks} steps: the slowest rank computes {_range(compute)} per step while the messages take "
            f"{_range(comm)}; hidden at {hidden} of {pr.ranks} steps, {_s(phase.exposed_comm_s)} exposed",
            f"  messages hide from n* = {phase.hide_tokens:,.0f} tokens per rank{balanced}: "
            f"{'met' if lo >= phase.hide_tokens else 'NOT met'} by {lo:,}",
        ]
    if p.backward is not None:
        lines.append(f"forward + backward: {_s(p.time_s)}")
    most = max(p.memory.values()) if p.backward else p.memory["forward"]
    fits = "" if hw.memory is None else (f" of the device's {_b(hw.memory)}"
                                          + (": does NOT fit" if most > hw.memory else ""))
    lines += [
        f"load: the busiest rank computes {p.imbalance:.2f}x the mean; {p.tile_use:.1%} of the computed pairs are "
        "visible",
        "memory per rank (specs/memory.md): forward " + _b(p.memory["forward"])
        + (", backward " + _b(p.memory["backward"]) if p.backward else "") + fits,
    ]
    return "\n".join(lines)


def _range(values):
    lo, hi = min(values), max(values)
    return _s(hi) if _s(lo) == _s(hi) else f"{_s(lo)} to {_s(hi)}"


def paper_text():
    """The paper's table with the model's values beside it."""
    lines = ["Ring Attention (Liu et al. 2023, arXiv 2310.01889), minimal block size c = F/B and sequence length "
             "per device s = 6c, x1e3 tokens:",
             f"{'spec':<16} {'TFLOP/s':>8} {'GB/s':>6}  {'c paper':>8} {'c model':>8}  {'s paper':>8} {'s model':>8}"]
    for row in paper_rows():
        lines.append(f"{row['spec']:<16} {row['tflops']:>8} {row['bandwidth_gbs']:>6}  "
                     f"{row['paper_block'] / 1e3:>8.1f} "
                     f"{row['block'] / 1e3:>8.2f}  {row['paper_seq'] / 1e3:>8.1f} {row['seq'] / 1e3:>8.2f}")
    lines.append("c model: this model's n* with one host's K/V block travelling per step, no mask, bf16, MHA, no "
                 "latency, tiles at peak (specs/model.md section 4)")
    return "\n".join(lines)


# -- the plot ---------------------------------------------------------------------------------------

def plot(problem, hw, path, backward=False):
    """Efficiency against tokens per rank (the K/V block each step moves) at P, and against P at N."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--png needs matplotlib: pip install matplotlib") from None
    phase = "backward" if backward else "forward"
    shown = LAYOUTS if problem.causal else ("contiguous",)

    def eff(pr):
        pred = predict(pr, hw, backward=backward)
        return (pred.backward if backward else pred.forward).efficiency

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    per_rank = [2 ** e for e in range(6, 23)]
    for layout in shown:
        left.plot(per_rank, [eff(replace(problem, layout=layout, seq=n * problem.ranks)) for n in per_rank],
                  label=layout)
    left.axvline(hide_tokens(problem, hw, phase), color="gray", ls="--", lw=1, label="n* (messages hide)")
    left.axvline(problem.seq / problem.ranks, color="black", ls=":", lw=1, label="this run")
    left.set(xscale="log", xlabel="tokens per rank (K/V block per step)", ylabel=f"{phase} efficiency",
             title=f"P = {problem.ranks}", ylim=(0, 1.05))
    ranks = [2 ** e for e in range(0, 13) if 2 ** e <= problem.seq]
    for layout in shown:
        right.plot(ranks, [eff(replace(problem, layout=layout, ranks=P)) for P in ranks], marker=".", label=layout)
    right.axvline(problem.ranks, color="black", ls=":", lw=1)
    right.set(xscale="log", xlabel="ranks P", title=f"N = {problem.seq:,}", ylim=(0, 1.05))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{hw.name.split(':')[0]}, {problem.dtype}, Hq={problem.heads} Hkv={problem.kv_heads} "
                 f"D={problem.dim}, {'causal' if problem.causal else 'no mask'}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
