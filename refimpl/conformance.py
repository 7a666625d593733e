"""``ringattn check``: judge a backend against golden vectors (``vectors.py``), from its function or from
the files it wrote.

The results come from one of two places:

``--impl MODULE:FUNCTION``
    A backend function with ``verify``'s calling convention, given the vector file's inputs as NumPy
    arrays of the case's dtype (bf16: ml_dtypes' bfloat16)::

        fn(q, k, v, *, causal, scale, dout=None[, mask]) -> {"out", "lse", "dq", "dk", "dv"}

    ``dout`` is passed when a gradient is judged; ``mask`` (N, N) bool, True = visible, only to cases
    that have one. Under ``mpiexec -n P`` each process is one rank of a context-parallel backend, and
    the function is called with that rank's shard and three more keywords::

        fn(q, k, v, *, causal, scale, dout=None[, mask], comm, positions, layout)

    q, k, v, dout (B, n_r, H, D): the rows at ``positions`` (int64, global token positions, in shard
    order) of ``layout`` ("contiguous"); mask (n_r, N): this rank's query rows against every key; comm:
    ``refimpl.comm.mpi.MPIComm`` (``.rank``, ``.size``, and ``.comm``, the mpi4py communicator). It
    returns this rank's rows of every output. ``refimpl`` names ringattn itself (``ring_backend``,
    ``ring_rank_backend``).

``--results DIR``
    Arrays another program wrote, one ``.npy`` per output: ``DIR/STEM.NAME.npy``, where STEM is the
    vector file's name without ``.npz`` and NAME is out, lse, dq, dk or dv. For the shard of rank r,
    STEM is that shard file's stem (``mha-n33-d16.fp32.contiguous-2.rank1``).

Shapes and dtypes come from the vector files, never from flags. An output is judged against its stored
bound (``vectors.bounds``: the bound ``verify`` applies): ``error = max |x - ref| <= bound``, measured as
``tolerance.judge`` measures it. With P ranks each rank judges its own shard; the case is then judged whole, from the shards put
back at their positions, so its error is the largest over the ranks, and a failing case is localised
by ``diagnose``.

Under MPI every rank runs the same loop: a file that cannot be read on one rank is an error on every
rank (``VectorsError``), and an exception raised by the backend ends the whole job (the abort hook of
``refimpl.comm.mpi``), since its peers may be waiting inside the backend for a message.
"""

import dataclasses
import importlib
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import cases as cases_module
from . import diagnose as diagnose_module
from . import tolerance, vectors
from .ring import ring_attention, ring_attention_backward
from .simulate import simulate_ring
from .validate import BFLOAT16
from .verify import exception_text, host_array, map_block

GRADIENTS = ("dq", "dk", "dv")
FEATURES = ("gqa", "mask")
REFIMPL = "refimpl"
REFIMPL_FEATURES = ("gqa",)
REFIMPL_DTYPES = ("fp16", "fp32", "fp64")       # the NumPy engine's; bf16 needs the GPU
REFIMPL_TILE = 16                               # small tiles, so that even the smoke cases span several


class CheckError(ValueError):
    """Options that cannot be checked (no such case, no shards for P ranks, ...): the same on every rank."""


class BackendError(RuntimeError):
    """An exception in a per-rank backend under MPI: it ends the job (never a ValueError, which every
    rank would have to raise together)."""


# -- ringattn as a backend ---------------------------------------------------------------------------

def _outputs(forward, backward):
    results = {"out": forward.out, "lse": forward.lse}
    if backward is not None:
        results.update(dq=backward.dq, dk=backward.dk, dv=backward.dv)
    return results


def ring_backend(q, k, v, *, causal, scale, dout=None):
    """ringattn as a backend: ``simulate_ring`` over min(4, N) ranks, 16 x 16 tiles."""
    result = simulate_ring(q, k, v, ranks=min(4, q.shape[1]), causal=causal, scale=scale, dout=dout,
                           block_q=REFIMPL_TILE, block_k=REFIMPL_TILE)
    return _outputs(result, result if dout is not None else None)


def ring_rank_backend(q, k, v, *, causal, scale, dout=None, comm, positions, layout):
    """One rank of ringattn's ring (``ring_attention``) on this rank's shard, 16 x 16 tiles."""
    if layout != "contiguous":
        raise ValueError(f"ring_attention takes the contiguous layout, got {layout!r}")
    options = dict(causal=causal, scale=scale, block_q=REFIMPL_TILE, block_k=REFIMPL_TILE)
    forward = ring_attention(q, k, v, comm, **options)
    backward = None
    if dout is not None:
        backward = ring_attention_backward(q, k, v, forward.out, forward.lse, dout, comm, **options)
    return _outputs(forward, backward)


def load_backend(spec, per_rank):
    """The function ``spec`` names: "refimpl", or "MODULE:FUNCTION" (imported with the current directory
    on sys.path). A ``CheckError`` says what is wrong."""
    if spec == REFIMPL:
        return ring_rank_backend if per_rank else ring_backend
    module_name, _, function = spec.partition(":")
    if not module_name or not function:
        raise CheckError(f"--impl must be MODULE:FUNCTION or {REFIMPL}, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckError(f"--impl {spec}: cannot import {module_name} ({type(exc).__name__}: {exc})") from None
    fn = getattr(module, function, None)
    if not callable(fn):
        raise CheckError(f"--impl {spec}: {module_name} has no function {function}")
    return fn


# -- the report -------------------------------------------------------------------------------------

@dataclass
class CaseCheck:
    """One vector file (a case in one dtype), checked whole: its verdicts, or why it was skipped."""
    name: str
    dtype: str
    file: str
    skipped: Optional[str] = None                       # why the case was not run
    verdicts: dict = field(default_factory=dict)        # {output: tolerance.Verdict}, the whole case
    problems: list = field(default_factory=list)        # what went wrong besides a number out of bounds
    ranks: list = field(default_factory=list)           # P > 1: per rank {output: error / bound}
    diagnosis: Optional[diagnose_module.Diagnosis] = None

    @property
    def passed(self):
        return self.skipped is None and not self.problems and all(v.passed for v in self.verdicts.values())

    def line(self):
        """PASS/FAIL/SKIP, dtype, case, then error / bound per output (! above 1)."""
        if self.skipped is not None:
            return f"SKIP {self.dtype:<4} {self.name:<28} {self.skipped}"
        ratios = "  ".join(f"{n} {_ratio(v.ratio)}{'' if v.passed else '!'}" for n, v in self.verdicts.items())
        extra = f"  ({self.problems[0]})" if self.problems else ""
        return f"{'PASS' if self.passed else 'FAIL'} {self.dtype:<4} {self.name:<28} {ratios}{extra}"

    def details(self):
        """The problems, the failing outputs' verdicts, each rank's ratios and the diagnosis."""
        lines = [f"--- {self.name} ({self.dtype}, {self.file})"]
        lines += [f"  {p}" for p in self.problems]
        lines += [f"  {v.line()}" for v in self.verdicts.values() if not v.passed]
        for rank, ratios in ((r, ratios) for r, ratios in enumerate(self.ranks) if ratios):
            lines.append(f"  rank {rank}: " + "  ".join(f"{n} {_ratio(r)}{'!' if r > 1 else ''}"
                                                         for n, r in ratios.items()))
        if self.diagnosis is not None and self.diagnosis.outputs:
            lines += ["  " + line for line in self.diagnosis.text().splitlines()]
        return "\n".join(lines)

    def to_dict(self):
        return {"name": self.name, "dtype": self.dtype, "file": self.file,
                "status": "skip" if self.skipped is not None else ("pass" if self.passed else "fail"),
                "skipped": self.skipped, "problems": list(self.problems),
                "outputs": {n: v.to_dict() for n, v in self.verdicts.items()}, "ranks": list(self.ranks),
                "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict()}


def _ratio(r):
    return f"{r:.2g}"


@dataclass
class Report:
    """What ``check`` found (complete on rank 0). ``passed`` needs a case checked and every one passing."""
    vectors: str
    source: str                         # "--impl SPEC" or "--results DIR"
    ranks: int
    layout: str
    cases: list                         # CaseCheck

    @property
    def passed(self):
        run = [c for c in self.cases if c.skipped is None]
        return bool(run) and all(c.passed for c in run)

    def text(self):
        run = [c for c in self.cases if c.skipped is None]
        failed = [c for c in run if not c.passed]
        where = "one process" if self.ranks == 1 else f"{self.ranks} ranks, {self.layout} layout"
        lines = [f"check {self.vectors} against {self.source} ({where}); each output: error / bound (pass <= 1)"]
        lines += [c.line() for c in self.cases]
        lines.append(f"{'PASSED' if self.passed else 'FAILED'}: {len(run) - len(failed)} of {len(run)} cases "
                     f"pass, {len(self.cases) - len(run)} skipped")
        lines += [c.details() for c in failed]
        return "\n".join(lines)

    def to_dict(self):
        return {"vectors": self.vectors, "source": self.source, "ranks": self.ranks, "layout": self.layout,
                "passed": self.passed, "cases": [c.to_dict() for c in self.cases]}


# -- judging ----------------------------------------------------------------------------------------

def judge(name, x, ref, bound, dtype):
    """The ``tolerance.Verdict`` of output ``name`` against the bound the vectors store for it (a dict of
    ``vectors.BOUND_FIELDS``). ``tolerance.judge`` measures the error and finds where it is; the bound
    is the stored one, so every checker of the same files applies the same number."""
    measured = tolerance.judge(name, x, ref, input_dtype=np.float64)
    rule = tolerance.rule_for(name, cases_module.DTYPES[dtype])
    return dataclasses.replace(measured, dtype=rule.dtype, bound=bound["bound"], scale=bound["scale"],
                               plain_error=bound["plain_error"] if rule.k else None)


def _results(source, arrays, unit, params, wanted, comm, layout):
    """The backend's outputs for one vector file: ({name: ndarray}, [problems]).

    ``source`` is a backend function or a results directory. Problems (a missing output, a wrong shape,
    an exception in a single-process backend) are returned, not raised.
    """
    if isinstance(source, str):
        return _read_results(source, unit, wanted)
    dtype = cases_module.DTYPES[params["dtype"]]
    q, k, v, dout = (arrays[n].astype(dtype, copy=False) for n in ("q", "k", "v", "dout"))
    kwargs = dict(causal=params["causal"], scale=params["scale"])
    if set(wanted) & set(GRADIENTS):
        kwargs["dout"] = dout
    if "mask" in arrays:
        kwargs["mask"] = arrays["mask"]
    if comm is not None:
        kwargs.update(comm=comm, positions=arrays["positions"], layout=layout)
    try:
        returned = source(q, k, v, **kwargs)
    except Exception as exc:
        if comm is not None:              # peers may be blocked inside the backend: end the job
            raise BackendError(f"rank {comm.rank}: the backend raised on {unit['file']}") from exc
        return {}, [exception_text(exc)]
    if not isinstance(returned, Mapping):
        return {}, [f"fn returned a {type(returned).__name__}, expected a mapping with {', '.join(wanted)}"]
    results, problems = {}, []
    for name in wanted:
        if returned.get(name) is None:
            problems.append(f"{name} is missing from what fn returned ({sorted(map(str, returned))})")
            continue
        try:
            results[name] = host_array(returned[name])
        except TypeError as exc:
            problems.append(f"{name}: {exc}")
    return results, problems


def _read_results(directory, unit, wanted):
    """DIR/STEM.NAME.npy for each wanted output: ({name: ndarray}, [problems])."""
    stem = os.path.join(directory, unit["file"][:-len(".npz")])
    if not any(os.path.exists(f"{stem}.{name}.npy") for name in wanted):
        return {}, [f"no results: {stem}.{{{','.join(wanted)}}}.npy do not exist"]
    results, problems = {}, []
    for name in wanted:
        path = f"{stem}.{name}.npy"
        try:
            results[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            problems.append(f"{path} does not exist")
        except (OSError, ValueError) as exc:
            problems.append(f"{path} is not a readable .npy ({exc})")
    return results, problems


def _judged(results, problems, arrays, bounds, dtype):
    """Verdicts of the results whose shape and dtype can be compared with the reference in ``arrays``."""
    verdicts = {}
    for name, x in results.items():
        ref = arrays[name]
        if x.shape != ref.shape:
            problems.append(f"{name} has shape {tuple(x.shape)}, expected {ref.shape} (from the vector file)")
        elif not (x.dtype.kind == "f" or x.dtype == BFLOAT16):
            problems.append(f"{name} has dtype {x.dtype}, expected a floating-point dtype")
        else:
            verdicts[name] = judge(name, x, ref, bounds[name], dtype)
    return verdicts


# -- the loop ---------------------------------------------------------------------------------------

def _together(comm, step):
    """``step()`` on this rank; if it raises ``VectorsError`` (or ValueError) on any rank, every rank
    raises ``VectorsError`` with the first failing rank's message. Returns this rank's value."""
    if comm is None:
        return step()
    try:
        value, error = step(), None
    except ValueError as exc:
        value, error = None, str(exc)
    for rank, message in enumerate(comm.allgather(error)):
        if message is not None:
            raise vectors.VectorsError(f"rank {rank}: {message}")
    return value


def _each_rank(comm, P, work):
    """[work(r) for every rank r]: under MPI each rank runs its own and the list is gathered."""
    return [work(r) for r in range(P)] if comm is None else comm.allgather(work(comm.rank))


def _unit(entry, P, layout, rank):
    """The manifest entry of the file rank ``rank`` of P reads: the case file itself when P = 1."""
    if P == 1:
        return entry
    return next(s for s in entry["shards"] if s["layout"] == layout and s["ranks"] == P and s["rank"] == rank)


def _skip(entry, P, layout, features, refimpl):
    """Why the case of ``entry`` is not run, or None."""
    params = entry["params"]
    missing = [f for f in params["features"] if f not in features]
    if missing:
        return f"needs {', '.join(missing)} (pass --features {' '.join(features + missing)} if the backend has it)"
    if params["dtype"] not in cases_module.DTYPES:
        return f"{params['dtype']} needs the ml_dtypes package"
    if refimpl and params["dtype"] not in REFIMPL_DTYPES:
        return f"ringattn's NumPy ring takes {', '.join(REFIMPL_DTYPES)}"
    if P > 1 and not any(s["layout"] == layout and s["ranks"] == P for s in entry["shards"]):
        return f"no {layout} shards for {P} ranks (N = {params['N']})"
    return None


def _assemble(parts, name, shape):
    """The whole output ``name`` (``shape``) from every rank's rows, each put back at its positions."""
    axis = 2 if name == "lse" else 1
    whole = np.empty(shape, np.result_type(*(p["results"][name].dtype for p in parts)))
    for part in parts:
        index = [slice(None)] * len(shape)
        index[axis] = part["positions"]
        whole[tuple(index)] = part["results"][name]
    return whole


def check_case(directory, entry, source, *, comm, P, layout, wanted):
    """Check one case (every rank calls it under MPI). Returns its ``CaseCheck`` on rank 0, None elsewhere."""
    params, dtype = entry["params"], entry["params"]["dtype"]

    def part(rank):
        unit = _unit(entry, P, layout, rank)
        arrays = _together(comm, lambda: vectors.read(directory, unit))
        results, problems = _results(source, arrays, unit, params, wanted, comm, layout)
        verdicts = _judged(results, problems, arrays, vectors.bounds_of(arrays), dtype)
        return dict(results=results, problems=problems, verdicts=verdicts, positions=arrays.get("positions"),
                    refs=arrays if P == 1 else None)

    parts = _each_rank(comm, P, part)
    refs = parts[0]["refs"] if P == 1 else _together(
        comm, lambda: vectors.read(directory, entry) if comm is None or comm.rank == 0 else None)
    if comm is not None and comm.rank != 0:
        return None
    case = CaseCheck(entry["name"], dtype, entry["file"])
    if P == 1:
        results, case.verdicts, case.problems = parts[0]["results"], parts[0]["verdicts"], parts[0]["problems"]
    else:
        case.problems = [f"rank {r}: {problem}" for r, mine in enumerate(parts) for problem in mine["problems"]]
        case.ranks = [{n: v.ratio for n, v in mine["verdicts"].items()} for mine in parts]
        judged = [n for n in wanted if all(n in mine["verdicts"] for mine in parts)]       # on every rank
        results = {n: _assemble(parts, n, refs[n].shape) for n in judged}
        case.verdicts = {n: judge(n, results[n], refs[n], vectors.bounds_of(refs)[n], dtype) for n in judged}
    if not case.passed and case.verdicts:
        case.diagnosis = diagnose_module.diagnose(results, refs, case.verdicts, Hq=params["Hq"], Hkv=params["Hkv"],
                                                  block=map_block(params["N"]), causal=params["causal"])
    return case


def check(directory, *, impl=None, results=None, comm=None, ranks=None, layout="contiguous", features=None,
          outputs=tolerance.OUTPUTS, dtypes=None, names=None):
    """Check a backend (``impl``: "refimpl" or "MODULE:FUNCTION") or its result files (``results``: a
    directory) against the vectors in ``directory``.

    ``comm`` (an ``MPIComm``): every rank of the job calls this, and rank r checks the shards of rank r
    of ``comm.size``. Without it, P = ``ranks`` (default 1: the whole case files); P > 1 without MPI
    reads the result files of every rank. ``features``: what the backend supports (default: everything;
    refimpl's: gqa). ``outputs``: the outputs it returns. ``dtypes``, ``names``: only these dtypes and
    cases. Returns a ``Report`` (on rank 0; None on the other ranks). A directory or file that cannot be
    used, or a bad argument, is a ``VectorsError`` or ``CheckError`` on every rank.
    """
    if (impl is None) == (results is None):
        raise CheckError("give exactly one of impl (a backend function) and results (a directory)")
    if comm is not None and ranks not in (None, comm.size):
        raise CheckError(f"--ranks {ranks} contradicts the MPI job, which has {comm.size} ranks")
    P = comm.size if comm is not None else (ranks or 1)
    if impl is not None and P > 1 and comm is None:
        raise CheckError(f"--ranks {P} with --impl: a per-rank backend runs under mpiexec -n {P} (without MPI, "
                         "--ranks reads the result files of every rank: --results)")
    unknown = [o for o in outputs if o not in tolerance.OUTPUTS]
    if unknown or "out" not in outputs:
        raise CheckError(f"outputs must include out and be among {', '.join(tolerance.OUTPUTS)}, got {list(outputs)}")
    if layout not in vectors.LAYOUTS:
        raise CheckError(f"layout must be one of {', '.join(vectors.LAYOUTS)}, got {layout!r}")
    manifest = _together(comm, lambda: vectors.load_manifest(directory))
    source = results if impl is None else _together(comm, lambda: load_backend(impl, P > 1))
    refimpl = impl == REFIMPL
    features = list(REFIMPL_FEATURES if refimpl else FEATURES) if features is None else list(features)
    entries = [e for e in manifest["cases"] if (dtypes is None or e["params"]["dtype"] in dtypes)
               and (names is None or e["name"] in names)]
    unknown = sorted(set(names or ()) - {e["name"] for e in manifest["cases"]})
    if unknown or not entries:
        wanted = f"case {unknown}" if unknown else f"case in dtypes {dtypes}"
        raise CheckError(f"{directory} has no {wanted}; it has "
                         + ", ".join(f"{e['name']} ({e['params']['dtype']})" for e in manifest["cases"]))
    if P > 1 and not any(s["ranks"] == P and s["layout"] == layout for e in entries for s in e["shards"]):
        raise CheckError(f"{directory} has no {layout} shards for {P} ranks; write them with ringattn vectors "
                         f"--ranks {P}")
    report = Report(str(directory), f"--impl {impl}" if impl is not None else f"--results {results}", P, layout, [])
    for entry in entries:
        reason = _skip(entry, P, layout, features, refimpl)
        if reason is not None:
            report.cases.append(CaseCheck(entry["name"], entry["params"]["dtype"], entry["file"], skipped=reason))
            continue
        case = check_case(directory, entry, source, comm=comm, P=P, layout=layout, wanted=list(outputs))
        report.cases.append(case)
    return report if comm is None or comm.rank == 0 else None
