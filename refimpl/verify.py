"""Check someone else's attention kernel against the float64 oracle, in one call: ``verify(fn)``.

``fn`` is the backend under test (PyTorch, JAX, Triton, CuPy, C++ through bindings, or NumPy)::

    fn(q, k, v, *, causal, scale[, dout][, mask]) -> {"out": ..., "lse": ..., "dq": ..., "dk": ..., "dv": ...}

It is run on the conformance cases (``cases.py``) in each dtype; every output it returns is judged by
the one tolerance rule (``tolerance.judge``: at most twice the error of the plain same-precision
computation, ``plain.py``, plus a floor; float64 against the oracle at 1e-12) with the allowance a
foreign flash-style kernel gets below float64 (``tolerance.SCORE_ROUNDING``: its float32 running max
and stored lse; ``specs/tolerances.md`` section 7), and every failure is localised (``diagnose.py``).
Options declare the backend's conventions instead of forcing glue:

    layout    "bnhd": q (B, N, Hq, D) as here and in flash-attn; "bhnd": q (B, Hq, N, D), as torch SDPA.
              lse is (B, Hq, N) in both. Inputs are transposed before the call, outputs after.
    gqa       "grouped": query head h reads kv head h // G (G = Hq / Hkv: flash-attn, torch, ringattn);
              "interleaved": h % Hkv (lucidrains' ring-attention-pytorch). For the latter the query
              heads are permuted going in (and dout's), and out, lse, dq permuted back.
    provides  the outputs fn returns; lse may be left out. The gradients are asked for (``dout=``) when
              ``backward`` is true and judged when provided.
    features  what fn supports beyond the basics: "gqa" (Hq != Hkv), "mask" (a dense (N, N) bool
              ``mask=``, True = visible, combined with causal). A case that needs another feature is
              skipped and listed in the report, never passed.

Arrays fn returns may be NumPy, or anything with ``__dlpack__`` or ``__array__`` on the host (torch,
JAX, CuPy after ``.get()``). Whatever goes wrong inside a case (an exception in fn, a missing output,
a wrong shape or dtype, NaN) is a failed case in the report; only a bad argument to ``verify`` itself
raises (``ValueError`` naming it).
"""

import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from . import cases as cases_mod
from . import diagnose as diagnose_mod
from . import plain, tolerance
from .naive import naive_attention, naive_attention_backward
from .validate import BFLOAT16

LAYOUTS = ("bnhd", "bhnd")
GQA = ("grouped", "interleaved")
FEATURES = ("gqa", "mask")
GRADIENTS = ("dq", "dk", "dv")
ALLOWANCE = tolerance.SCORE_ROUNDING     # a foreign backend's allowance (specs/tolerances.md section 7)
MAP_TILES = 20          # the diagnosis map has at most this many row tiles (of 16, 32, 64, ... rows)
DETAILED = 3            # Report.text() shows the full diagnosis of this many failures, then one line each


@dataclass
class CaseResult:
    """One case in one dtype: the verdict of each judged output, or why none could be reached."""
    case: cases_mod.Case
    dtype: str
    verdicts: dict = field(default_factory=dict)          # {name: tolerance.Verdict}
    problems: list = field(default_factory=list)          # what went wrong besides a number out of bounds
    diagnosis: Optional[diagnose_mod.Diagnosis] = None

    @property
    def passed(self):
        return not self.problems and all(v.passed for v in self.verdicts.values())

    def line(self):
        """PASS/FAIL, dtype, case, then error/bound for each output."""
        ratios = "  ".join(f"{n} {_ratio(v.ratio)}" + ("" if v.passed else "!") for n, v in self.verdicts.items())
        extra = f"  ({self.problems[0]})" if self.problems else ""
        return f"{'PASS' if self.passed else 'FAIL'} {self.dtype:<4} {self.case.name:<28} {ratios}{extra}"

    def details(self):
        lines = [f"--- {self.case.name} ({self.dtype}): {_describe(self.case)}"]
        lines += [f"  {p}" for p in self.problems]
        if self.diagnosis is not None and self.diagnosis.outputs:
            lines += ["  " + line for line in self.diagnosis.text().splitlines()]
        return "\n".join(lines)

    def to_dict(self):
        return {"case": self.case.name, "dtype": self.dtype, "params": self.case.params(), "passed": self.passed,
                "problems": list(self.problems),
                "outputs": {n: v.to_dict() for n, v in self.verdicts.items()},
                "diagnosis": None if self.diagnosis is None else self.diagnosis.to_dict()}


@dataclass
class Report:
    """What ``verify`` found. ``passed`` needs at least one case run and every run passing."""
    results: list                       # CaseResult, per case and dtype
    skipped: list                       # (case name, [missing features])
    options: dict

    @property
    def passed(self):
        return bool(self.results) and all(r.passed for r in self.results)

    @property
    def failures(self):
        return [r for r in self.results if not r.passed]

    def text(self, detailed=DETAILED):
        """One line per case and dtype with each output's error / bound (! where above 1), the skipped
        cases, a summary, then the diagnosis of the first ``detailed`` failures (None: all)."""
        o = self.options
        lines = [f"verify: layout {o['layout']}, gqa {o['gqa']}, provides {' '.join(o['provides'])}, "
                 f"features {' '.join(o['features']) or 'none'}, backward {o['backward']}; "
                 f"each output: error / bound (pass <= 1; "
                 f"{'the 2x rule alone (strict)' if o['strict'] else 'the 2x rule + allowance ' + ALLOWANCE.name})"]
        lines += [r.line() for r in self.results]
        lines += [f"SKIP {name} (needs {', '.join(missing)}: declare it in features= if the backend supports it)"
                  for name, missing in self.skipped]
        failures = self.failures
        verdict = "PASSED" if self.passed else "FAILED"
        lines.append(f"{verdict}: {len(self.results) - len(failures)} of {len(self.results)} runs pass, "
                     f"{len(self.skipped)} cases skipped")
        pattern = self.pattern()
        if pattern:
            lines.append(pattern)
        beyond = [f"{r.dtype} {r.case.name} {n}" for r in self.results for n, v in r.verdicts.items()
                  if v.passed and not v.strict]
        if beyond:
            lines.append(f"within the allowance but not the strict 2x rule ({len(beyond)}): " + ", ".join(beyond[:8])
                         + (", ..." if len(beyond) > 8 else ""))
        shown = failures if detailed is None else failures[:detailed]
        lines += [r.details() for r in shown]
        for r in failures[len(shown):]:
            hint = r.diagnosis.hint if r.diagnosis is not None and r.diagnosis.hint else (r.problems or ["-"])[0]
            lines.append(f"--- {r.case.name} ({r.dtype}): {hint}")
        return "\n".join(lines)

    def pattern(self):
        """What every failing run has and every passing run lacks (causal, G > 1, large logits, a mask,
        a dtype), as one line, or None."""
        failures = self.failures
        if not failures or len(failures) == len(self.results):
            return None
        shared = [label for label, has in _TRAITS
                  if all(has(r) for r in failures) and not any(has(r) for r in self.results if r.passed)]
        return f"only failing where: {', '.join(shared)}" if shared else None

    def to_dict(self):
        return _strict({"passed": self.passed, "options": self.options,
                        "results": [r.to_dict() for r in self.results],
                        "skipped": [{"case": n, "needs": m} for n, m in self.skipped]})

    def to_json(self, **kwargs):
        """Strict JSON (non-finite numbers as the strings "inf", "-inf", "nan")."""
        return json.dumps(self.to_dict(), allow_nan=False, **kwargs)


_TRAITS = [
    ("causal", lambda r: r.case.causal),
    ("G = Hq / Hkv > 1", lambda r: r.case.Hq != r.case.Hkv),
    ("logits >= 1e2", lambda r: r.case.logits >= 1e2),
    ("a mask", lambda r: r.case.mask is not None),
] + [(f"dtype {d}", lambda r, d=d: r.dtype == d) for d in cases_mod.DTYPES]


def _ratio(r):
    return f"{r:.2f}" if r < 100 else f"{r:.2g}"


def _describe(case):
    return (f"B={case.B} N={case.N} Hq={case.Hq} Hkv={case.Hkv} D={case.D} causal={case.causal}"
            + (f" logits~{case.logits:g}" if case.logits != 1 else "") + (f" mask={case.mask}" if case.mask else ""))


def _strict(x):
    """x with every float made strict-JSON-safe and tuples as lists."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return diagnose_mod._json_float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# -- the arguments ----------------------------------------------------------------------------------

def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def _names(name, value, allowed):
    """A tuple of strings from ``allowed``; a lone string is an error (it would iterate by letter)."""
    if isinstance(value, str) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{name} must be a sequence of names from {', '.join(allowed)}, got {value!r}")
    unknown = [v for v in value if v not in allowed]
    if unknown:
        raise ValueError(f"{name} has unknown entries {unknown}; the known ones are {', '.join(allowed)}")
    return tuple(dict.fromkeys(value))


def _check_options(fn, dtypes, backward, layout, gqa, provides, features, seed):
    if not callable(fn):
        raise ValueError(f"fn must be callable as fn(q, k, v, *, causal, scale, dout=None), got {type(fn).__name__}")
    dtypes = _names("dtypes", dtypes, tuple(dict.fromkeys(tuple(cases_mod.DTYPES) + ("bf16",))))
    if "bf16" in dtypes and BFLOAT16 is None:
        raise ValueError("dtypes has 'bf16', which needs the ml_dtypes package (pip install ml_dtypes)")
    if not dtypes:
        raise ValueError("dtypes must name at least one dtype")
    if not isinstance(backward, bool):
        raise ValueError(f"backward must be True or False, got {backward!r}")
    provides = _names("provides", provides, tolerance.OUTPUTS)
    if "out" not in provides:
        raise ValueError(f"provides must include 'out', got {provides!r}")
    if backward and not set(GRADIENTS) & set(provides):
        raise ValueError(f"backward=True but provides {provides!r} names none of dq, dk, dv: pass backward=False "
                         "for a forward-only backend")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return dict(layout=_one_of("layout", layout, LAYOUTS), gqa=_one_of("gqa", gqa, GQA), provides=list(provides),
                features=list(_names("features", features, FEATURES)), dtypes=list(dtypes), backward=backward,
                seed=int(seed))


# -- one case -----------------------------------------------------------------------------------------

def head_order(Hq, Hkv, gqa):
    """pi (Hq,): the backend's query head j is our head pi[j]. Grouped: the identity. Interleaved: the
    backend pairs head j with kv head j % Hkv, which is ours for head (j % Hkv) * G + j // Hkv."""
    j = np.arange(Hq)
    return j if gqa == "grouped" else (j % Hkv) * (Hq // Hkv) + j // Hkv


def _to_backend(x, pi, layout):
    """Our (B, N, H, D) array as the backend expects it: heads reordered by pi (None: kv heads, kept),
    then (B, H, N, D) for layout bhnd."""
    if pi is not None:
        x = x[:, :, pi]
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3) if layout == "bhnd" else x)


def _from_backend(name, x, pi, layout):
    """The backend's output back in our layout and head order (inverse of ``_to_backend``)."""
    if name != "lse" and layout == "bhnd":
        x = x.transpose(0, 2, 1, 3)
    if pi is None:
        return x
    ours = np.empty_like(x)
    if name == "lse":
        ours[:, pi] = x
    else:
        ours[:, :, pi] = x
    return ours


def host_array(x):
    """A returned array as NumPy: ndarray as is, else via DLPack, else via __array__."""
    if isinstance(x, np.ndarray):
        return x
    errors = []
    if hasattr(x, "__dlpack__"):
        try:
            return np.from_dlpack(x)
        except Exception as e:          # a device array, or a dtype NumPy's DLPack does not take
            errors.append(f"np.from_dlpack: {type(e).__name__}: {e}")
    try:
        a = np.asarray(x)
    except Exception as e:
        errors.append(f"np.asarray: {type(e).__name__}: {e}")
        raise TypeError("cannot read it as a NumPy array (return host arrays, e.g. .detach().cpu() or .get()): "
                        + "; ".join(errors)) from None
    if a.dtype == object:
        raise TypeError(f"cannot read a {type(x).__name__} as a numeric array")
    return a


def _expected(case, dtype):
    """{name: (shape in our layout, dtype)}: out, dq in the input dtype like q, dk, dv like k, lse (B, Hq, N)
    in float64 for float64 inputs and float32 otherwise."""
    dt = cases_mod.DTYPES[dtype]
    q_shape, kv_shape = (case.B, case.N, case.Hq, case.D), (case.B, case.N, case.Hkv, case.D)
    return {"out": (q_shape, dt), "lse": ((case.B, case.Hq, case.N), plain.computing_dtype(dt)),
            "dq": (q_shape, dt), "dk": (kv_shape, dt), "dv": (kv_shape, dt)}


def _backend_shape(name, shape, layout):
    return shape if name == "lse" or layout == "bnhd" else (shape[0], shape[2], shape[1], shape[3])


def exception_text(e):
    """The exception and the innermost frame it came from."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"fn raised {type(e).__name__}: {e}{where}"


def map_block(N):
    """Rows per tile of the diagnosis map: 16, 32, 64, ..., the first giving at most MAP_TILES tiles."""
    block = 16
    while -(-N // block) > MAP_TILES:
        block *= 2
    return block


def run_case(fn, case, dtype, options):
    """Run fn on one case in one dtype and judge its outputs. Never raises for what fn does."""
    result = CaseResult(case, dtype)
    q, k, v, dout, mask = case.inputs(dtype, options["seed"])
    backward = options["backward"]
    refs = dict(zip(("out", "lse"), naive_attention(q, k, v, causal=case.causal, scale=case.scale, mask=mask)))
    if backward:
        refs.update(zip(GRADIENTS, naive_attention_backward(q, k, v, dout, causal=case.causal, scale=case.scale,
                                                            mask=mask)))
    wanted = [n for n in options["provides"] if n in ("out", "lse") or backward]
    layout, pi = options["layout"], head_order(case.Hq, case.Hkv, options["gqa"])
    kwargs = dict(causal=case.causal, scale=case.scale)
    if backward:
        kwargs["dout"] = _to_backend(dout, pi, layout)
    if mask is not None:
        kwargs["mask"] = mask.copy()
    try:
        returned = fn(_to_backend(q, pi, layout), _to_backend(k, None, layout), _to_backend(v, None, layout), **kwargs)
    except Exception as e:
        result.problems.append(exception_text(e))
        return result
    if not isinstance(returned, Mapping):
        result.problems.append(f"fn returned a {type(returned).__name__}, expected a mapping with "
                               f"{', '.join(repr(n) for n in wanted)}")
        return result
    results = {}
    for name, (shape, dt) in _expected(case, dtype).items():
        if name not in wanted:
            continue
        if name not in returned or returned[name] is None:
            result.problems.append(f"{name} is missing from what fn returned (provides= promises it; "
                                   f"it returned {sorted(map(str, returned))})")
            continue
        try:
            x = host_array(returned[name])
        except TypeError as e:
            result.problems.append(f"{name}: {e}")
            continue
        want = _backend_shape(name, shape, layout)
        if x.shape != want:
            result.problems.append(f"{name} has shape {tuple(x.shape)}, expected {want} (layout {layout})")
            continue
        if x.dtype != dt:
            result.problems.append(f"{name} has dtype {x.dtype}, expected {np.dtype(dt).name}"
                                   + (" (lse: float32 below float64)" if name == "lse" else " (the input dtype)"))
            continue
        results[name] = _from_backend(name, x, None if name in ("dk", "dv") else pi, layout)
    plains = (plain.plain_outputs(q, k, v, dout if backward else None, causal=case.causal, scale=case.scale,
                                  mask=mask) if cases_mod.DTYPES[dtype] != np.float64 else {})
    scales = tolerance.Scales.of(q, k, v, dout if backward else None, scale=case.scale)
    for name, x in results.items():
        verdict = tolerance.judge(name, x, refs[name], input_dtype=q.dtype, plain=plains.get(name), scales=scales)
        result.verdicts[name] = verdict if options["strict"] else tolerance.with_allowance(verdict, ALLOWANCE, scales)
        bad = result.verdicts[name].nonfinite
        if bad is not None:
            result.problems.append(f"{name} has a non-finite value {result.verdicts[name].x_at_worst} at {list(bad)} "
                                   "where the reference is finite")
    if not result.passed and result.verdicts:
        result.diagnosis = diagnose_mod.diagnose(results, refs, result.verdicts, Hq=case.Hq, Hkv=case.Hkv,
                                                 block=map_block(case.N), causal=case.causal)
    return result


def verify(fn, *, cases="standard", dtypes=("fp32", "fp64"), backward=True, layout="bnhd", gqa="grouped",
           provides=("out", "lse", "dq", "dk", "dv"), features=("gqa",), seed=0, strict=False):
    """Run backend ``fn`` on the conformance cases and judge every output it returns.

    cases: "smoke", "standard", "full", or a list of ``cases.Case`` or case names. dtypes: from "fp16",
    "fp32", "fp64" (and "bf16" with ml_dtypes). ``strict``: judge by the 2x rule alone, without the
    allowance (the rule ringattn holds itself to). The other options: the module docstring. Returns a
    ``Report`` (``.passed``, ``.text()``, ``.to_json()``, ``.skipped``, ``.results``).
    """
    options = _check_options(fn, dtypes, backward, layout, gqa, provides, features, seed)
    if not isinstance(strict, bool):
        raise ValueError(f"strict must be True or False, got {strict!r}")
    options["strict"] = strict
    selected = cases_mod.suite(cases)
    results, skipped = [], []
    for case in selected:
        missing = [f for f in case.features if f not in options["features"]]
        if missing:
            skipped.append((case.name, missing))
            continue
        results += [run_case(fn, case, dtype, options) for dtype in options["dtypes"]]
    return Report(results, skipped, options)
