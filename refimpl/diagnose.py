"""Where a failing output is wrong, and what that pattern usually means: reports that localise a bug.

One scalar per output says *that* a backend is wrong; finding *why* needs to know where. For each
failing output this module measures the error of every row of every head (the largest over the head
dimension) against the same bound the output failed (``tolerance.judge``), and reports:

- the worst (b, h, row), with the result and the reference there;
- a map of heads x row tiles (``block`` rows each), '.' where every row passes, 'X' where one fails;
- the rows that fail, as ranges, and the first NaN or inf where the reference is finite;
- a hint: the classic bug whose signature the failures match (``HINTS``), or None.

Rows are query rows for out, lse and dq (heads: the Hq query heads), key rows for dk and dv (heads:
the Hkv kv heads). Shapes: out, dq (B, N, Hq, D); dk, dv (B, N, Hkv, D); lse (B, Hq, N).
"""

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .tolerance import OUTPUTS

LARGE_LSE = 80.0      # exp overflows float32 beyond 88.7: an |lse| this large means logits that need the max
SHOWN = 4             # entries of the worst row shown in the report

# The signatures, in the order they are tried; each hint is tested by a kernel with that bug
# (tests/test_verify.py). {placeholders} are filled from the measurements.
HINTS = {
    "empty_rows": "NaN on rows that see no key (the reference has out = 0, lse = -inf there): the "
                  "normalisation divides 0 by 0; such a row must give out = 0, lse = -inf and no gradient",
    "diagonal_hidden": "non-finite on row 0 under causal, which sees only key 0: the diagonal is hidden, a "
                       "causal off-by-one (query i sees key j iff j <= i, not j < i)",
    "max_subtraction": "NaN/inf at large logits (|lse| up to {lse:.3g}): exp overflowed, a missing max "
                       "subtraction (exp(s - rowmax) keeps every exponent <= 0)",
    "nonfinite": "NaN/inf where the reference is finite: a division by a zero sum or an unwritten value",
    "precision": "every failing output is within {ratio:.3g}x its bound, a rounding problem rather than a "
                 "wrong formula (a wrong formula is off by about the size of the output): an accumulation "
                 "in a lower precision, or a sum in an unusual order",
    "rescale": "lse right, {wrong} wrong{where}: the rescale of the running output in the online-softmax "
               "merge (o = o * exp(m_old - m_new) + o_tile * exp(m_tile - m_new))",
    "gqa_interleaved": "only query heads {heads} wrong, exactly those where h // G != h % Hkv (G = {G}): "
                       "the GQA head mapping; the backend pairs query head h with kv head h % Hkv "
                       "(interleaved), ringattn, flash-attn and torch with h // G (if that is your convention, "
                       "pass gqa=\"interleaved\")",
    "some_heads": "only heads {heads} wrong: the head mapping (GQA: h // G vs h % Hkv) or a per-head offset",
    "dkdv_sum": "dk/dv wrong while out, lse and dq are right, with G = Hq / Hkv = {G}: dk/dv overwritten "
                "instead of summed over the G query heads that share a kv head",
    "dkdv": "only dk/dv wrong: their accumulation over the query tiles (summed, not overwritten)",
    "causal_diagonal": "the first rows are the most wrong and the error fades along the sequence{sign}: a "
                       "causal off-by-one at the diagonal (query i sees key j iff j <= i)",
    "tail": "only rows {first}..{last} wrong, rows 0..{before} right{sign}: a dropped tail tile (a loop "
            "that stops at N // block * block), or chunks attended independently (each row sees only its "
            "own chunk's keys: no ring)",
    "missing_keys": "lse below the reference on every failing row: those rows miss keys, e.g. chunks "
                    "attended independently (each row sees only its own chunk's keys: no ring) or a "
                    "dropped key tile",
    "extra_keys": "lse above the reference on every failing row: those rows see keys they should not, e.g. "
                  "a causal mask missing or shifted",
}
STRUCTURAL = 100      # a failing output this many times over its bound is a wrong formula, not rounding,
ROUNDING = 1e-2       # and so is one wrong by this much relative to its size (a bound may be loose at logits 1e4)


def _json_float(x):
    """A float as strict JSON allows: the non-finite ones as the strings "inf", "-inf", "nan"."""
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def _ranges(rows):
    """Sorted ints -> [(first, last), ...] of consecutive runs."""
    runs = []
    for r in rows:
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return [tuple(run) for run in runs]


def _ranges_text(runs, limit=6):
    text = ", ".join(str(a) if a == b else f"{a}..{b}" for a, b in runs[:limit])
    return text + (f", ... ({len(runs) - limit} more runs)" if len(runs) > limit else "")


def row_errors(x, ref):
    """Per (b, h, row) error: max over the head dimension of |x - ref|, inf where x is NaN or infinite
    and ref is not the same -inf (``tolerance.abs_error``'s convention). Returns (B, H, N) float64, and
    the (B, H, N) bool array of rows holding such a non-finite entry."""
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    both = np.isneginf(x) & np.isneginf(ref)
    bad = np.isnan(x) | ((np.isinf(x) | np.isinf(ref)) & ~both)
    with np.errstate(invalid="ignore"):
        d = np.where(both | bad, 0.0, np.abs(x - ref))
    d = np.where(bad, np.inf, d)
    if x.ndim == 4:                                    # (B, N, H, D) -> (B, H, N)
        return d.max(axis=3, initial=0.0).transpose(0, 2, 1), bad.any(axis=3).transpose(0, 2, 1)
    return d, bad


@dataclass
class OutputReport:
    """Where one failing output is wrong."""
    name: str
    error: float
    bound: float
    worst: Optional[tuple]              # (b, h, row)
    worst_x: list                       # the first SHOWN entries of that row (lse: the one value)
    worst_ref: list
    tile_map: list                      # one string per head: '.' or 'X' per row tile
    failing_heads: list
    failing_rows: list                  # [(first, last), ...]
    first_nonfinite: Optional[tuple]    # index into the output array
    nonfinite_value: Optional[float]
    row_profile: np.ndarray = field(repr=False)   # (N,) the worst error of each row over b and h
    nonfinite_rows: list = field(default_factory=list)   # [(first, last), ...] rows holding a NaN or inf
    lse_sign: int = 0                   # lse only: +1 (-1) if it is above (below) the reference on every failing row

    @property
    def rows(self):
        return len(self.row_profile)

    @property
    def head_kind(self):
        return "kv head" if self.name in ("dk", "dv") else "head"

    def text(self):
        """The output's error, its worst row and first non-finite entry, and where it fails (no map)."""
        lines = [f"{self.name}: error {self.error:.3g} > bound {self.bound:.3g} "
                 f"(ratio {self.error / self.bound if self.bound else math.inf:.3g})"]
        if self.worst is not None:
            b, h, r = self.worst
            lines.append(f"  worst at (b={b}, {self.head_kind}={h}, row={r}): got {_fmt(self.worst_x)}, "
                         f"expected {_fmt(self.worst_ref)}")
        if self.first_nonfinite is not None:
            lines.append(f"  first non-finite: {self.name}{list(self.first_nonfinite)} = {self.nonfinite_value}")
        lines.append(f"  failing {self.head_kind}s {self.failing_heads}, rows {_ranges_text(self.failing_rows)}")
        return "\n".join(lines)

    def to_dict(self):
        return {
            "name": self.name, "error": _json_float(self.error), "bound": _json_float(self.bound),
            "worst": None if self.worst is None else {"b": self.worst[0], "h": self.worst[1], "row": self.worst[2],
                                                      "x": [_json_float(v) for v in self.worst_x],
                                                      "ref": [_json_float(v) for v in self.worst_ref]},
            "tile_map": list(self.tile_map), "failing_heads": list(self.failing_heads),
            "failing_rows": [list(r) for r in self.failing_rows],
            "first_nonfinite": None if self.first_nonfinite is None else {
                "index": list(self.first_nonfinite), "value": _json_float(self.nonfinite_value)},
        }


def _fmt(values):
    return "[" + ", ".join(f"{v:.6g}" for v in values) + "]" if len(values) != 1 else f"{values[0]:.6g}"


@dataclass
class Diagnosis:
    """The failing outputs of one run, localised, and a hint. ``text()``, ``to_dict()``, ``hint``."""
    outputs: list                       # OutputReport for each failing output, in OUTPUTS order
    hint: Optional[str]
    block: int
    Hq: int
    Hkv: int

    def text(self):
        """Each failing output, then the maps (outputs with the same map share it), then the hint."""
        if not self.outputs:
            return "every output passes"
        lines = [o.text() for o in self.outputs]
        maps = {}
        for o in self.outputs:
            maps.setdefault((o.head_kind, tuple(o.tile_map)), []).append(o.name)
        for (kind, tile_map), names in maps.items():
            lines.append(f"map of {', '.join(names)} ({kind} x row tiles of {self.block} rows; '.' pass, 'X' fail):")
            width = len(str(len(tile_map) - 1))
            lines += [f"  {h:>{width}} {row}" for h, row in enumerate(tile_map)]
        lines.append(f"hint: {self.hint}" if self.hint else "hint: none (no known signature matches)")
        return "\n".join(lines)

    def to_dict(self):
        return {"block": self.block, "Hq": self.Hq, "Hkv": self.Hkv, "hint": self.hint,
                "outputs": [o.to_dict() for o in self.outputs]}


def _localise(name, x, ref, verdict, block):
    """The ``OutputReport`` of one failing output."""
    err, bad = row_errors(x, ref)                                  # (B, H, N) each
    B, H, N = err.shape
    fails = err > verdict.bound
    n_tiles = max(1, -(-N // block))
    tile_map = ["".join("X" if fails[:, h, t * block:(t + 1) * block].any() else "." for t in range(n_tiles))
                for h in range(H)]
    worst = np.unravel_index(int(np.argmax(err)), err.shape) if err.size else None
    worst_x = worst_ref = []
    if worst is not None:
        b, h, r = (int(i) for i in worst)
        worst = (b, h, r)
        xa, ra = np.asarray(x, np.float64), np.asarray(ref, np.float64)
        row_x, row_ref = (xa[b, r, h, :SHOWN], ra[b, r, h, :SHOWN]) if xa.ndim == 4 else (xa[b, h, r:r + 1],
                                                                                          ra[b, h, r:r + 1])
        worst_x, worst_ref = [float(v) for v in row_x], [float(v) for v in row_ref]
    first = value = None
    xa = np.asarray(x, np.float64)
    refa = np.asarray(ref, np.float64)
    nonfinite = ~np.isfinite(xa) & ~(np.isneginf(xa) & np.isneginf(refa))
    if nonfinite.any():
        first = tuple(int(i) for i in np.argwhere(nonfinite)[0])
        value = float(xa[first])
    sign = 0
    if name == "lse" and fails.any():
        with np.errstate(invalid="ignore"):
            above = (xa > refa)[fails]
        sign = 1 if above.all() else -1 if not above.any() else 0
    return OutputReport(name, verdict.error, verdict.bound, worst, worst_x, worst_ref, tile_map,
                        [h for h in range(H) if fails[:, h].any()],
                        _ranges([int(r) for r in np.flatnonzero(fails.any(axis=(0, 1)))]),
                        first, value, err.max(axis=(0, 1)) if err.size else np.zeros(0),
                        _ranges([int(r) for r in np.flatnonzero(bad.any(axis=(0, 1)))]), sign)


def _hint(failing, verdicts, refs, Hq, Hkv, causal):
    """The first signature in ``HINTS`` that the failing outputs match, or None."""
    names = set(failing)
    G = Hq // Hkv if Hkv else 1
    ok = {n for n, v in verdicts.items() if v.passed}
    q_side = [o for n, o in failing.items() if n in ("out", "lse", "dq")]
    nonfinite = [o for o in q_side if o.first_nonfinite is not None]
    if any(o.first_nonfinite is not None for o in failing.values()):
        lse_ref = None if refs.get("lse") is None else np.asarray(refs["lse"], np.float64)
        if lse_ref is not None and nonfinite and all(_nonfinite_rows_within(o, np.isneginf(lse_ref))
                                                     for o in nonfinite):
            return HINTS["empty_rows"]
        if causal and nonfinite and all(o.nonfinite_rows == [(0, 0)] for o in nonfinite):
            return HINTS["diagonal_hidden"]
        if lse_ref is not None:
            finite = np.abs(lse_ref[np.isfinite(lse_ref)])
            if finite.size and finite.max() > LARGE_LSE:
                return HINTS["max_subtraction"].format(lse=float(finite.max()))
        return HINTS["nonfinite"]
    worst = max(o.error / o.bound if o.bound else math.inf for o in failing.values())
    if worst < STRUCTURAL and all(verdicts[n].relative < ROUNDING for n in names):
        return HINTS["precision"].format(ratio=worst)
    if "out" in names and "lse" in ok:
        later = failing["out"].failing_rows
        where = f" on rows {_ranges_text(later)} only" if later and later[0][0] > 0 else ""
        wrong = " and ".join(n for n in ("out", "dq") if n in names)
        return HINTS["rescale"].format(wrong=wrong, where=where)
    if q_side:
        heads = sorted(set().union(*(o.failing_heads for o in q_side)))
        if len(heads) < Hq:
            interleaved = [h for h in range(Hq) if h // G != h % Hkv]
            if Hkv > 1 and G > 1 and heads == interleaved:
                return HINTS["gqa_interleaved"].format(heads=heads, G=G)
            return HINTS["some_heads"].format(heads=heads)
    if names <= {"dk", "dv"}:
        return HINTS["dkdv_sum"].format(G=G) if G > 1 else HINTS["dkdv"]
    if not q_side:
        return None
    sign = failing["lse"].lse_sign if "lse" in failing else 0
    words = {1: " (lse above the reference: extra keys)", -1: " (lse below the reference: missing keys)", 0: ""}
    profile = np.max([o.row_profile for o in q_side], axis=0)
    if causal is not False and _fades_from_first_row(profile, max(o.bound for o in q_side)):
        return HINTS["causal_diagonal"].format(sign=words[sign])
    runs = sorted({r for o in q_side for r in o.failing_rows})
    N = q_side[0].rows
    if runs and runs[0][0] > 0 and runs[-1][1] == N - 1 and all(a == b + 1 for (a, _), (_, b) in zip(runs[1:], runs)):
        return HINTS["tail"].format(first=runs[0][0], last=N - 1, before=runs[0][0] - 1, sign=words[sign])
    if sign:
        return HINTS["missing_keys" if sign < 0 else "extra_keys"]
    return None


def _row_of(report):
    """The row of an output's first non-finite entry."""
    idx = report.first_nonfinite
    return idx[1] if len(idx) == 4 else idx[2]


def _nonfinite_rows_within(report, empty):
    """True if the output's non-finite entries are confined to rows whose reference lse is -inf.
    (Only its first one is kept, which is enough: the 0/0 hits every empty row alike.)"""
    idx = report.first_nonfinite
    b, h = (idx[0], idx[2]) if len(idx) == 4 else idx[:2]
    return bool(empty[b, h, _row_of(report)])


def _fades_from_first_row(profile, bound):
    """Row 0 (or 1) fails, the worst row is among the first eighth, and the last quarter of the rows is at
    least 4x less wrong than the first: the error of a row that sees one key too many or too few is about
    1 / (number of keys it sees)."""
    N = len(profile)
    if N < 8 or not (profile[:2] > bound).any():
        return False
    head, tail = profile[:max(2, N // 8)].max(), profile[-max(1, N // 4):].max()
    return bool(int(np.argmax(profile)) < max(2, N // 8) and tail * 4 < head)


def diagnose(results, refs, verdicts, *, Hq, Hkv, block=64, causal=None):
    """Localise the failing outputs of one run.

    results, refs: {name: array}, out/dq (B, N, Hq, D), dk/dv (B, N, Hkv, D), lse (B, Hq, N); verdicts:
    {name: tolerance.Verdict}, one for each judged output (an output without a verdict is not examined).
    ``block``: rows per tile of the map. ``causal``: whether the case is causal, if known (the causal
    off-by-one hint is not offered when it is False). Returns a ``Diagnosis``.
    """
    if int(block) < 1:
        raise ValueError(f"block must be a positive number of rows, got {block!r}")
    failing = {}
    for name in OUTPUTS:
        v = verdicts.get(name)
        if v is None or v.passed or name not in results or name not in refs:
            continue
        failing[name] = _localise(name, results[name], refs[name], v, int(block))
    hint = _hint(failing, verdicts, refs, Hq, Hkv, causal) if failing else None
    return Diagnosis(list(failing.values()), hint, int(block), Hq, Hkv)
