"""The tolerance rule: when a result in some precision counts as correct. One rule for everyone.

The command line's ``--check``, ``verify``, ``ringattn check`` and the test suite all judge an output with
``judge``. A result ``x`` of one output (``out``, ``lse``, ``dq``, ``dk`` or ``dv``) is compared with the
float64 oracle ``ref`` computed from the same input arrays::

    error  = max |x - ref|                         entries where both are -inf count 0; a NaN, or an
                                                   infinity where ref is finite, makes it inf
    bound  = k * error(plain) + floor              plain: ``plain.py``, the textbook computation in the
                                                   same precision, compared with the same oracle
    pass   = error <= bound

per dtype of the *inputs* (``RULES``)::

    float64    k = 0 (the oracle *is* the plain float64 computation), floor = 1e-12 S + 64 eps (1 + sigma) T
    float32    k = 2, floor = 1e-7 S                         (1e-7 ~ one float32 ulp, eps = 1.19e-7)
    float16    k = 2, floor = half a float16 ulp at S        out, dq, dk, dv are float16: so is plain's
    bfloat16   k = 2, floor = half a bfloat16 ulp at S       (as float16)

and ``lse``, which every backend returns in float32 for float16/bfloat16 inputs, follows the float32 row.
k = 2 is flash-attention's test rule: a careful kernel may be up to twice as wrong as the obvious
computation, never more. The floor only matters when the plain computation happens to be exact.

S is the scale of the output, max |ref| over its finite entries (the error is normwise). When the output
is zero (N = 1, or equal v rows: the gradient cancels exactly, and the oracle holds only its own rounding,
below 1e-12 T), S is T instead, the size of one term of the sum that cancelled (``Scales``), so a correct
run is judged against the size of what cancelled, not against zero; without ``scales``, S is then 1.

float64 has no plain computation to compare with, so its bound models one: 1e-12 S (about 4500 ulps) plus
the error that rounding the scores themselves causes. A score s = scale q.k carries an error of a few
ulps of sigma = scale max|q_i| max|k_j| (the largest possible |s|); that moves lse by as much, and any
other output by as much times the size T of its terms. At logits of 1e4 this term is what lets a correct
float64 run pass; at logits of order 1 it is below 1e-12 S.
"""

import math
from dataclasses import asdict, astuple, dataclass, replace
from typing import Optional

import numpy as np

from .validate import BFLOAT16

OUTPUTS = ("out", "lse", "dq", "dk", "dv")


@dataclass(frozen=True)
class Rule:
    """The tolerance of one input dtype: ``bound = k * error(plain) + floor``."""
    dtype: str
    k: float
    relative_floor: float        # floor = relative_floor * S (float64, float32)
    half_ulp_floor: bool         # floor = half the spacing of the output dtype at S (float16, bfloat16)
    why: str


RULES = {
    "float64": Rule("float64", 0.0, 1e-12, False,
                    "the oracle is the plain float64 computation; 1e-12 S plus the rounding of the scores"),
    "float32": Rule("float32", 2.0, 1e-7, False,
                    "2x plain float32 (flash-attention's rule); floor one float32 ulp of S"),
    "float16": Rule("float16", 2.0, 0.0, True,
                    "2x plain float32 rounded to float16; floor half a float16 ulp of S"),
    "bfloat16": Rule("bfloat16", 2.0, 0.0, True,
                     "2x plain float32 rounded to bfloat16; floor half a bfloat16 ulp of S"),
}
LOGIT_ULPS = 64                  # float64: the scores' rounding, in ulps of sigma (see the module docstring)


def dtype_name(dtype):
    """'float64', 'float32', 'float16' or 'bfloat16', or a ValueError naming the dtype."""
    dt = np.dtype(dtype)
    if BFLOAT16 is not None and dt == BFLOAT16:
        return "bfloat16"
    if dt.name not in RULES:
        raise ValueError(f"dtype must be float16, bfloat16, float32 or float64, got {dt}")
    return dt.name


def rule_for(name, input_dtype):
    """The rule that judges output ``name`` of a backend given inputs of ``input_dtype``: lse of a float16
    or bfloat16 backend is float32, and is held to the float32 rule."""
    if name not in OUTPUTS:
        raise ValueError(f"name must be one of {', '.join(OUTPUTS)}, got {name!r}")
    dt = dtype_name(input_dtype)
    return RULES["float32" if name == "lse" and dt in ("float16", "bfloat16") else dt]


@dataclass(frozen=True)
class Scales:
    """The sizes the rule needs from the inputs: maxima over the tokens, so shards combine with ``max``.

    From them (row norms |x_i| over D, scale = the attention scale)::

        sigma   scale |q| |k|                  the largest |score| possible
        T_out   max |v|                        out is a convex combination of v rows
        T_dv    max |dout|                     dv_j = sum_i p_ij dout_i
        T_dq    2 scale |dout| |v| max|k|      one term of dq_i = scale sum_j p_ij (dp_ij - delta_i) k_j
        T_dk    2 scale |dout| |v| max|q|      one term of dk_j
    """
    scale: float
    q_norm: float
    k_norm: float
    q_max: float
    k_max: float
    v_norm: float
    v_max: float
    dout_norm: float = 0.0
    dout_max: float = 0.0

    @staticmethod
    def of(q, k, v, dout=None, *, scale):
        """The scales of host arrays q (B, n, Hq, D), k, v (B, n, Hkv, D), dout (B, n, Hq, D) (any shard)."""
        def norm(x):
            x = np.asarray(x, np.float64)
            return float(np.sqrt(np.max(np.sum(np.square(x), axis=-1)))) if x.size else 0.0

        def largest(x):
            return float(np.max(np.abs(np.asarray(x, np.float64)))) if np.size(x) else 0.0

        extra = {} if dout is None else dict(dout_norm=norm(dout), dout_max=largest(dout))
        return Scales(abs(float(scale)), norm(q), norm(k), largest(q), largest(k), norm(v), largest(v), **extra)

    def combine(self, other):
        """The scales of two shards together."""
        if self.scale != other.scale:
            raise ValueError(f"cannot combine the scales of runs with scale {self.scale} and {other.scale}")
        return Scales(*(max(a, b) for a, b in zip(astuple(self), astuple(other))))

    @property
    def sigma(self):
        return self.scale * self.q_norm * self.k_norm

    def term(self, name):
        """T: the size of one term of output ``name`` (1 for lse, which moves as much as a score does)."""
        grad = 2 * self.scale * self.dout_norm * self.v_norm
        return {"out": self.v_max, "lse": 1.0, "dq": grad * self.k_max, "dk": grad * self.q_max,
                "dv": self.dout_max}[name]


def abs_error(x, ref):
    """(max |x - ref|, flat index of the worst entry or of the first mismatch). Matching -inf count 0; a
    NaN in x, or an infinite entry of x or ref that the other does not match, makes the error inf."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        raise ValueError(f"result has shape {x.shape} but the reference has {ref.shape}")
    if x.size == 0:
        return 0.0, None
    both = np.isneginf(x) & np.isneginf(ref)
    bad = np.isnan(x) | ((np.isinf(x) | np.isinf(ref)) & ~both)
    if bad.any():
        return math.inf, int(np.flatnonzero(bad)[0])
    with np.errstate(invalid="ignore"):
        d = np.abs(np.where(both, 0.0, x - ref))
    worst = int(np.argmax(d))
    return float(d.flat[worst]), worst


CANCELLED = 1e-12       # an output below this fraction of its terms' size T is zero, up to float64 rounding


def output_scale(name, ref, scales=None):
    """S: max |ref| over the finite entries; if that is 0 (or, with ``scales``, below ``CANCELLED`` T: the
    float64 rounding of a sum that cancels exactly), one term's size T, or 1."""
    ref = np.asarray(ref, np.float64)
    finite = ref[np.isfinite(ref)]
    s = float(np.abs(finite).max()) if finite.size else 0.0
    if scales is not None and s <= CANCELLED * scales.term(name):
        s = scales.term(name)
    return s if s > 0 else 1.0


@dataclass
class Verdict:
    """How one output fared. ``worst`` is the index of the largest error (or of the first NaN/inf)."""
    name: str
    dtype: str                       # the rule's dtype
    error: float                     # max |x - ref|
    bound: float
    plain_error: Optional[float]     # max |plain - ref| (None for float64)
    scale: float                     # S
    worst: Optional[tuple]
    x_at_worst: Optional[float]
    ref_at_worst: Optional[float]
    nonfinite: Optional[tuple]       # first NaN/inf of x where ref is finite, if any
    allowance: float = 0.0           # the part of ``bound`` that an ``Allowance`` added

    @property
    def passed(self):
        return bool(self.error <= self.bound)

    @property
    def strict(self):
        """Whether the error is within the bound without the allowance."""
        return bool(self.error <= self.bound - self.allowance)

    @property
    def relative(self):
        """error / S: the normwise relative error."""
        return self.error / self.scale

    @property
    def ratio(self):
        """error / bound: at most 1 to pass."""
        return self.error / self.bound if self.bound > 0 else (0.0 if self.error == 0 else math.inf)

    def line(self):
        """One line: name, error, bound, ratio, where."""
        plain = "" if self.plain_error is None else f" (plain {self.plain_error:.2e})"
        where = "" if self.worst is None else f" worst at {self.worst}: {self.x_at_worst:.6g} vs {self.ref_at_worst:.6g}"
        nonfinite = "" if self.nonfinite is None else f"; first non-finite at {self.nonfinite}"
        return (f"{self.name:<4} {'ok  ' if self.passed else 'FAIL'} error {self.error:.2e} "
                f"{'<=' if self.passed else '>'} bound {self.bound:.2e}{plain}  ratio {self.ratio:.2f}{where}{nonfinite}")

    def to_dict(self):
        d = asdict(self)
        d.update(passed=self.passed, strict=self.strict, ratio=self.ratio, relative=self.relative)
        return d


def judge(name, x, ref, *, input_dtype, plain=None, scales=None):
    """Judge output ``name`` of a backend run on inputs of ``input_dtype``: x and its float64 oracle ``ref``.

    ``plain`` is the plain same-precision result (``plain.plain_outputs``), required unless the rule is
    float64's. ``scales`` (``Scales``) lets the rule judge outputs that cancel to zero, and adds the score
    rounding term of float64. Returns a ``Verdict``.
    """
    rule = rule_for(name, input_dtype)
    if rule.k and plain is None:
        raise ValueError(f"judging {name} in {rule.dtype} needs the plain {rule.dtype} result (plain=)")
    error, worst = abs_error(x, ref)
    plain_error = abs_error(plain, ref)[0] if rule.k else None
    S = output_scale(name, ref, scales)
    floor = half_ulp(rule.dtype, S) if rule.half_ulp_floor else rule.relative_floor * S
    if rule.dtype == "float64" and scales is not None:
        floor += LOGIT_ULPS * float(np.finfo(np.float64).eps) * (1 + scales.sigma) * scales.term(name)
    bound = float(rule.k * (plain_error or 0.0) + floor)
    shape = np.shape(x)
    index = None if worst is None else tuple(int(i) for i in np.unravel_index(worst, shape))
    xv = rv = None
    if index is not None:
        xv, rv = float(np.asarray(x, np.float64)[index]), float(np.asarray(ref, np.float64)[index])
    nonfinite = index if error == math.inf and not math.isfinite(xv) else None
    return Verdict(name, rule.dtype, error, bound, plain_error, S, index, xv, rv, nonfinite)


SIGNIFICAND_BITS = {"float16": (11, -24), "bfloat16": (8, -133)}   # (bits, exponent of the smallest subnormal)


def half_ulp(dtype, S):
    """Half the spacing of float16 or bfloat16 numbers at magnitude S: the error of rounding to them."""
    bits, tiniest = SIGNIFICAND_BITS[dtype]
    return math.ldexp(1.0, max(math.frexp(S)[1] - bits, tiniest) - 1)


# -- The allowance of a foreign backend: the scores' rounding in float32 (specs/tolerances.md section 7) --
#
# Separate from the rules above, which are unchanged; ``verify`` adds it to the bound of every output it
# judges under the float32, float16 and bfloat16 rules. The plain computation rounds the scores once and
# uses the same rounded scores everywhere (its backward recomputes p from its own float32 lse and the same
# scores). A flash-style kernel does not: its forward subtracts a running max, a float32 number of
# magnitude up to sigma, and its backward recomputes p = exp(s' - lse') from scores s' that it computes
# again, in another order (q pre-scaled, other tiles). So the exponent of each of its probabilities
# carries up to 2 ulps of sigma that the plain computation's does not. On a saturated row (logits of 1e2
# and more) the plain computation is nearly exact, and the 2x rule then asks for nearly nothing. A
# relative error delta common to a row's probabilities moves every output by delta times itself: the
# bound grows by 2 eps sigma S (S = max |ref|), and lse, which moves by delta itself, by 2 eps sigma.
# Measured (section 7): without it torch's CPU kernel fails 37 of 210 float32 runs (dv up to 3e4 times
# the bound at logits 1e4); with it, the worst is 0.87 of the bound (dq at logits 1e4).


@dataclass(frozen=True)
class Allowance:
    """An extra bound ``ulps * eps(float32) * (1 + sigma) * S`` (lse: ``* 1``) for ``outputs`` under the rules of
    ``dtypes``."""
    name: str
    outputs: tuple
    dtypes: tuple
    ulps: float
    why: str

    def extra(self, name, rule_dtype, scales, S):
        """The term added to the bound of output ``name`` judged under ``rule_dtype`` (0 where it does
        not apply); ``S`` is the output's scale (``output_scale``)."""
        if name not in self.outputs or rule_dtype not in self.dtypes:
            return 0.0
        return self.ulps * float(np.finfo(np.float32).eps) * (1 + scales.sigma) * (1.0 if name == "lse" else S)


SCORE_ROUNDING = Allowance("score_rounding", OUTPUTS, ("float32", "float16", "bfloat16"), 2.0,
                           "a float32 running max and stored lse, and scores recomputed in float32: 2 ulps "
                           "of sigma in each probability's exponent, times the output's scale S")


def with_allowance(verdict, allowance, scales):
    """``verdict`` with ``allowance.extra`` added to its bound (``scales``: the run's ``Scales``)."""
    extra = allowance.extra(verdict.name, verdict.dtype, scales, verdict.scale)
    return replace(verdict, bound=verdict.bound + extra, allowance=verdict.allowance + extra)
