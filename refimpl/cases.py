"""Conformance cases: the problems a backend is checked on, by ``verify`` and by the golden vectors.

A case is a small, named attention problem whose inputs are generated deterministically from its
parameters, so that ``verify`` (in-process) and ``ringattn vectors`` (files) check the same thing. The
list is chosen to catch the classic bugs, each of which hides at some shape or scale and not at others:

- N not a multiple of 16, 64 or 128: a dropped or doubled tail tile;
- D in {40, 64, 80, 96, 128}: head dims that are not a power of two, and the usual ones;
- GQA with G > 2, 1 < Hkv < Hq, and MQA (Hkv = 1): a wrong query-head to kv-head mapping
  (h // G is the convention here, flash-attn's and torch's; h % Hkv is another library's);
- logits of about 1e2 and 1e4: a missing max subtraction (exp overflows), a float32 running lse;
- causal with many tiles: an off-by-one on the diagonal, a tile skipped or classified wrongly;
- rows that see no key (a dense mask, for backends that take one): out = 0 and lse = -inf, not NaN.

Inputs: q and k are standard normal times sqrt(logits), so that the scores scale * q.k with
scale = 1/sqrt(D) have a standard deviation of about ``logits``; v and dout are standard normal. They
are drawn in float64 from ``numpy.random.default_rng([seed, case index])`` and rounded to the case's
dtype; the oracle sees the rounded arrays.
"""

import zlib
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from .validate import BFLOAT16

DTYPES = {"fp16": np.dtype(np.float16), "fp32": np.dtype(np.float32), "fp64": np.dtype(np.float64)}
if BFLOAT16 is not None:
    DTYPES["bf16"] = BFLOAT16


@dataclass(frozen=True)
class Case:
    """One problem. ``features`` are what a backend must support to run it (``verify(features=...)``)."""
    name: str
    B: int
    N: int
    Hq: int
    Hkv: int
    D: int
    causal: bool
    logits: float = 1.0                     # standard deviation of the scores
    mask: Optional[str] = None              # None, or "empty_rows": a dense (N, N) mask hiding some rows wholly
    features: tuple = field(default=())     # e.g. ("gqa",), ("mask",)

    @property
    def scale(self):
        return 1.0 / np.sqrt(self.D)

    def params(self):
        """The case as the API's keyword names (for manifests and reports)."""
        p = asdict(self)
        p["features"] = list(self.features)
        p["scale"] = self.scale
        return p

    def inputs(self, dtype, seed=0):
        """q (B, N, Hq, D), k, v (B, N, Hkv, D), dout (B, N, Hq, D) in ``dtype``, and the mask or None."""
        rng = np.random.default_rng([seed, zlib.crc32(self.name.encode())])
        m = np.sqrt(self.logits)
        q = rng.standard_normal((self.B, self.N, self.Hq, self.D)) * m
        k = rng.standard_normal((self.B, self.N, self.Hkv, self.D)) * m
        v = rng.standard_normal((self.B, self.N, self.Hkv, self.D))
        dout = rng.standard_normal((self.B, self.N, self.Hq, self.D))
        dt = DTYPES[dtype] if isinstance(dtype, str) else np.dtype(dtype)
        return tuple(x.astype(dt) for x in (q, k, v, dout)) + (self.dense_mask(),)

    def dense_mask(self):
        """(N, N) bool, True = visible, or None. "empty_rows": every third query row sees nothing, the
        others see every key (combined with ``causal`` by the oracle and the backend alike)."""
        if self.mask is None:
            return None
        visible = np.ones((self.N, self.N), bool)
        visible[::3] = False
        return visible


def _features(Hq, Hkv, mask):
    return tuple(f for f, on in (("gqa", Hq != Hkv), ("mask", mask is not None)) if on)


def _case(name, B, N, Hq, Hkv, D, causal, logits=1.0, mask=None):
    return Case(name, B, N, Hq, Hkv, D, causal, logits, mask, _features(Hq, Hkv, mask))


SMOKE = [
    _case("mha-n33-d16", 1, 33, 2, 2, 16, False),
    _case("gqa-causal-n50-d16", 1, 50, 4, 2, 16, True),
    _case("mqa-logits1e2-n40-d8", 2, 40, 3, 1, 8, True, logits=1e2),
]

STANDARD = SMOKE + [
    _case("mha-n100-d64", 1, 100, 2, 2, 64, False),
    _case("mha-causal-n130-d40", 1, 130, 2, 2, 40, True),
    _case("gqa-g4-n200-d80", 1, 200, 8, 2, 80, False),
    _case("gqa-causal-n70-d96", 2, 70, 6, 3, 96, True),
    _case("mqa-causal-n129-d128", 1, 129, 4, 1, 128, True),
    _case("logits1e2-causal-n96-d64", 1, 96, 2, 1, 64, True, logits=1e2),
    _case("logits1e4-n64-d32", 1, 64, 2, 2, 32, False, logits=1e4),
    _case("logits1e4-causal-n80-d16", 2, 80, 2, 1, 16, True, logits=1e4),
    _case("causal-many-tiles-n300-d16", 1, 300, 2, 2, 16, True),
    _case("empty-rows-n48-d16", 1, 48, 2, 2, 16, False, mask="empty_rows"),
]

FULL = STANDARD + [
    _case("mha-n1000-d64", 1, 1000, 4, 4, 64, False),
    _case("gqa-causal-n1000-d128", 1, 1000, 8, 2, 128, True),
    _case("gqa-g8-causal-n257-d64", 2, 257, 8, 1, 64, True),
    _case("logits1e4-causal-n513-d64", 1, 513, 4, 2, 64, True, logits=1e4),
    _case("n1-d64", 1, 1, 2, 2, 64, False),
    _case("empty-rows-causal-n96-d40", 1, 96, 4, 2, 40, True, mask="empty_rows"),
]

SUITES = {"smoke": SMOKE, "standard": STANDARD, "full": FULL}


def suite(cases):
    """A list of ``Case`` from a suite name or a list of cases/names."""
    if isinstance(cases, str):
        if cases not in SUITES:
            raise ValueError(f"cases must be one of {', '.join(SUITES)} or a list of Case, got {cases!r}")
        return list(SUITES[cases])
    by_name = {c.name: c for c in FULL}
    out = []
    for c in cases:
        if isinstance(c, Case):
            out.append(c)
        elif c in by_name:
            out.append(by_name[c])
        else:
            raise ValueError(f"unknown case {c!r}; the cases are: {', '.join(by_name)}")
    return out
