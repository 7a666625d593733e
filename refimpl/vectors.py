"""Golden vectors: the conformance cases on disk, with the float64 answers and the bounds to judge them by.

``ringattn vectors --out DIR`` writes, for every case of a suite (``cases.py``) and input dtype, one
``.npz`` file (a zip of ``.npy`` arrays, readable from any language) holding::

    q (B, N, Hq, D)  k, v (B, N, Hkv, D)  dout (B, N, Hq, D)   the inputs, in the case's dtype (bf16: float32
    [mask (N, N) bool, True = visible]                          holding bfloat16 values exactly)
    out (B, N, Hq, D)  lse (B, Hq, N)  dq (B, N, Hq, D)          the float64 oracle (``naive.py``) on those inputs
    dk, dv (B, N, Hkv, D)
    bounds (5, 6) float64                                        row per output (OUTPUTS), column per BOUND_FIELDS

and, for each requested rank count P and layout, one file per rank with that rank's rows of every
array (``shard_arrays``) and the global positions it holds. ``manifest.json`` lists every file with its
parameters, its bounds and the shape, dtype and sha256 of every array. ``specs/vectors.md`` is the
format, field by field, and how a checker in any language applies the rule.

The bound of an output is the one ``verify`` holds a foreign backend to, the tolerance rule
(``tolerance.py``) plus its allowance (``verify.ALLOWANCE``), evaluated once, at generation::

    bound = (k * plain_error + floor) + allowance        (bitwise: the same float64 operations)

where plain_error is the error of the plain same-precision computation (``plain.py``) against the
oracle, so a checker needs nothing but ``error = max |x - ref| <= bound``. A shard is judged against
the bound of the whole case: the error of the whole output is the largest error of its shards.

The bytes are deterministic: members are stored uncompressed with a fixed date and attributes, arrays
are little-endian ``.npy`` version 1.0, and the manifest is written with a fixed key order. Generating
twice with the same NumPy and BLAS gives identical files. Reading (``read``) checks every array against
the manifest's sha256, so a changed or truncated file is an error that names it.
"""

import hashlib
import io
import json
import os
import zipfile

import numpy as np

from . import cases as cases_module
from . import tolerance
from .layouts import Contiguous
from .naive import naive_attention, naive_attention_backward
from .plain import plain_outputs
from .verify import ALLOWANCE

FORMAT = "ringattn-vectors/1"
MANIFEST = "manifest.json"
INPUTS = ("q", "k", "v", "dout")
OUTPUTS = tolerance.OUTPUTS
BOUND_FIELDS = ("k", "plain_error", "floor", "allowance", "bound", "scale")
LAYOUTS = {"contiguous": Contiguous}
DEFAULT_DTYPES = ("fp32", "fp64")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)          # the earliest date a zip can hold


class VectorsError(ValueError):
    """A vectors directory that cannot be used: a missing, changed or truncated file, named."""


# -- writing ----------------------------------------------------------------------------------------

def case_arrays(case, dtype, seed=0):
    """Everything the vector file of ``case`` in ``dtype`` ("fp32", ...) holds, as {name: array}.

    The inputs are ``case.inputs``; bfloat16 inputs are kept widened to float32 (exactly), which is also
    what the oracle sees. The bounds follow ``bounds``.
    """
    input_dtype = cases_module.DTYPES[dtype]
    inputs = case.inputs(dtype, seed)
    q, k, v, dout = (_portable(x) for x in inputs[:4])
    mask = inputs[4]
    options = dict(causal=case.causal, scale=case.scale, mask=mask)
    refs = dict(zip(("out", "lse"), naive_attention(q, k, v, **options)))
    refs.update(zip(("dq", "dk", "dv"), naive_attention_backward(q, k, v, dout, **options)))
    plain = {} if input_dtype == np.float64 else plain_outputs(q, k, v, dout, round_to=input_dtype, **options)
    table = bounds(refs, plain, tolerance.Scales.of(q, k, v, dout, scale=case.scale), input_dtype)
    arrays = dict(zip(INPUTS, (q, k, v, dout)))
    if mask is not None:
        arrays["mask"] = mask
    arrays.update(refs)
    arrays["bounds"] = np.array([[table[name][f] for f in BOUND_FIELDS] for name in OUTPUTS], np.float64)
    return arrays


def bounds(refs, plain, scales, input_dtype):
    """{output: {"k", "plain_error", "floor", "allowance", "bound", "scale"}}: each output's bound, as
    ``verify`` judges a foreign backend: the tolerance rule plus ``verify.ALLOWANCE``.

    refs: the oracle's outputs; plain: the plain same-precision ones ({} for float64, which has none:
    k = 0 and plain_error is written as 0). ``tolerance.judge`` of the plain result gives plain_error and
    the rule's bound; judging the oracle against itself (a plain error of 0) gives the floor alone.
    """
    table = {}
    for name in OUTPUTS:
        ref, rule = refs[name], tolerance.rule_for(name, input_dtype)
        verdict = tolerance.judge(name, plain.get(name, ref), ref, input_dtype=input_dtype, plain=plain.get(name),
                                  scales=scales)
        floor = tolerance.judge(name, ref, ref, input_dtype=input_dtype, plain=ref, scales=scales).bound
        allowed = tolerance.with_allowance(verdict, ALLOWANCE, scales)
        table[name] = dict(k=rule.k, plain_error=verdict.plain_error or 0.0, floor=floor, allowance=allowed.allowance,
                           bound=allowed.bound, scale=verdict.scale)
    return table


def bounds_of(arrays):
    """{output: {field: value}} (``BOUND_FIELDS``) from a vector file's ``bounds`` table."""
    return {name: dict(zip(BOUND_FIELDS, (float(f) for f in row))) for name, row in zip(OUTPUTS, arrays["bounds"])}


def shard_arrays(arrays, positions):
    """The rows of one rank, whose global token positions are ``positions`` (int64, shard order).

    q, k, v, dout, out, dq, dk, dv: (B, n_r, H, D), the rows at ``positions``; lse (B, Hq, n_r); mask
    (n_r, N): the rank's query rows against every key; bounds: the whole case's; positions (n_r,) int64.
    """
    shard = {name: np.take(arrays[name], positions, axis=2 if name == "lse" else 1) for name in INPUTS + OUTPUTS}
    if "mask" in arrays:
        shard["mask"] = arrays["mask"][positions]
    shard["bounds"] = arrays["bounds"]
    shard["positions"] = np.asarray(positions, np.int64)
    return {name: shard[name] for name in _order(shard)}


def _order(arrays):
    """The order of the members in a file: inputs, mask, oracle outputs, bounds, positions."""
    order = INPUTS + ("mask",) + OUTPUTS + ("bounds", "positions")
    return [name for name in order if name in arrays]


def _portable(x):
    """bfloat16 (which a .npy file can only hold as opaque 2-byte records) widened to float32: exact."""
    return x.astype(np.float32) if tolerance.dtype_name(x.dtype) == "bfloat16" else x


def _little(x):
    """A C-ordered little-endian copy of x (the byte order the files and the sha256 sums are in)."""
    return np.ascontiguousarray(x, x.dtype if x.dtype.byteorder == "|" else x.dtype.newbyteorder("<"))


def sha256(x):
    """sha256 of the raw bytes of x, C order, little-endian (what the manifest records per array)."""
    return hashlib.sha256(_little(x).tobytes()).hexdigest()


def describe(arrays):
    """{name: {"shape", "dtype", "sha256"}} of the arrays, as the manifest lists them."""
    return {name: {"shape": list(x.shape), "dtype": x.dtype.name, "sha256": sha256(x)} for name, x in arrays.items()}


def write_npz(path, arrays):
    """Write ``arrays`` to an .npz that is the same bytes every time: stored members ``NAME.npy`` (npy
    format 1.0, little-endian) with a fixed date and Unix attributes, in the order given."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, x in arrays.items():
            member = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_DATE)
            member.create_system, member.external_attr = 3, 0o644 << 16
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, _little(x), version=(1, 0), allow_pickle=False)
            archive.writestr(member, buffer.getvalue())


def shard_file(case_file, layout, P, rank):
    """'mha-n33-d16.fp32.npz' -> 'mha-n33-d16.fp32.contiguous-2.rank0.npz'."""
    return f"{case_file[:-len('.npz')]}.{layout}-{P}.rank{rank}.npz"


def _runs(positions):
    """[[start, stop), ...]: the positions as runs of consecutive integers (the manifest's summary)."""
    runs = []
    for p in (int(p) for p in positions):
        if runs and runs[-1][1] == p:
            runs[-1][1] = p + 1
        else:
            runs.append([p, p + 1])
    return runs


def generate(directory, *, suite="smoke", dtypes=DEFAULT_DTYPES, ranks=(), layout="contiguous", seed=0):
    """Write the golden vectors of ``suite`` in ``dtypes``, with the shards of every P in ``ranks``, to
    ``directory``; the manifest last. Returns the manifest (a dict).

    ``directory`` must be empty, absent or hold a previous set of vectors, which is removed first
    (manifest first). A case with N < P has no shards for that P.
    """
    for dtype in dtypes:
        if dtype not in cases_module.DTYPES:
            raise ValueError(f"dtypes must be among {', '.join(cases_module.DTYPES)}, got {dtype!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    for P in ranks:
        if int(P) < 2:
            raise ValueError(f"ranks must be at least 2 (the case file itself is the single-rank set), got {P}")
    _clear(directory)
    entries = []
    for case in cases_module.suite(suite):
        for dtype in dtypes:
            arrays = case_arrays(case, dtype, seed)
            file = f"{case.name}.{dtype}.npz"
            write_npz(os.path.join(directory, file), {name: arrays[name] for name in _order(arrays)})
            params = {key: value for key, value in case.params().items() if key != "name"}
            entry = dict(name=case.name, file=file, params=dict(params, dtype=dtype, seed=seed),
                         bounds=bounds_of(arrays),
                         arrays=describe({name: arrays[name] for name in _order(arrays)}), shards=[])
            for P in ranks:
                if P > case.N:
                    continue
                cut = LAYOUTS[layout](case.N, P)
                for rank in range(P):
                    shard = shard_arrays(arrays, cut.positions(rank))
                    name = shard_file(file, layout, P, rank)
                    write_npz(os.path.join(directory, name), shard)
                    entry["shards"].append(dict(layout=layout, ranks=P, rank=rank, file=name,
                                                positions=_runs(shard["positions"]), arrays=describe(shard)))
            entries.append(entry)
    manifest = dict(format=FORMAT,
                    generator=dict(command="ringattn vectors", suite=suite, dtypes=list(dtypes),
                                   ranks=[int(P) for P in ranks], layout=layout, seed=seed),
                    outputs=list(OUTPUTS), bound_fields=list(BOUND_FIELDS), cases=entries)
    with open(os.path.join(directory, MANIFEST), "w") as f:
        f.write(json.dumps(manifest, indent=1, allow_nan=False) + "\n")
    return manifest


def _clear(directory):
    """Make ``directory`` ready for a new set: create it, or remove the previous set it holds."""
    os.makedirs(directory, exist_ok=True)
    present = sorted(os.listdir(directory))
    if not present:
        return
    if MANIFEST not in present:
        raise VectorsError(f"{directory} is not empty and holds no {MANIFEST}: choose an empty directory")
    old = load_manifest(directory)
    files = [e["file"] for e in old["cases"]] + [s["file"] for e in old["cases"] for s in e["shards"]]
    others = sorted(set(present) - set(files) - {MANIFEST})
    if others:
        raise VectorsError(f"{directory} holds files that its {MANIFEST} does not list ({', '.join(others[:4])}"
                           f"{', ...' if len(others) > 4 else ''}): not a set of vectors; choose an empty directory")
    os.remove(os.path.join(directory, MANIFEST))
    for file in files:
        if os.path.exists(os.path.join(directory, file)):
            os.remove(os.path.join(directory, file))


# -- reading ----------------------------------------------------------------------------------------

def load_manifest(directory):
    """The manifest of a vectors directory, or a ``VectorsError`` naming what is wrong with it."""
    path = os.path.join(directory, MANIFEST)
    try:
        with open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise VectorsError(f"{path} does not exist: not a directory of vectors (make one with ringattn vectors "
                           "--out DIR)") from None
    except (OSError, ValueError) as exc:
        raise VectorsError(f"{path} is not readable JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise VectorsError(f"{path} has format {found!r}, expected {FORMAT!r}")
    return manifest


def read(directory, entry):
    """The arrays of one file of the manifest (a case or a shard ``entry``), each checked against the
    manifest's shape, dtype and sha256. A missing, truncated or changed file is a ``VectorsError``
    naming it."""
    path = os.path.join(directory, entry["file"])
    expected = entry["arrays"]
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except FileNotFoundError:
        raise VectorsError(f"{path} does not exist, but {MANIFEST} lists it") from None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise VectorsError(f"{path} is damaged ({type(exc).__name__}: {exc}): the file was truncated or changed "
                           "after ringattn vectors wrote it; regenerate it") from None
    if sorted(arrays) != sorted(expected):
        raise VectorsError(f"{path} holds arrays {sorted(arrays)}, but {MANIFEST} lists {sorted(expected)}")
    for name, x in arrays.items():
        want = expected[name]
        if list(x.shape) != want["shape"] or x.dtype.name != want["dtype"]:
            raise VectorsError(f"{path}: array {name} has shape {list(x.shape)} and dtype {x.dtype.name}, but "
                               f"{MANIFEST} says {want['shape']} and {want['dtype']}")
        digest = sha256(x)
        if digest != want["sha256"]:
            raise VectorsError(f"{path}: sha256 mismatch in array {name} ({digest}, {MANIFEST} says "
                               f"{want['sha256']}): the file was changed; regenerate it")
    return arrays
