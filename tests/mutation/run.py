"""Mutation testing: apply each mutant of ``mutants.py`` to a copy of the repository and run the suite there.

A mutant is KILLED when the suite fails (or hangs past ``--timeout``) with it, SURVIVED when the suite passes:
a bug the tests cannot see. STALE: its snippet no longer occurs in the file (update ``mutants.py``); INVALID:
the snippet occurs more than once, or the mutated file does not compile. The kill rate is killed / (killed +
survived); equivalent mutants are listed but not run.

The working tree is never touched: the tracked and untracked, not ignored, files are copied to a temporary
directory once, the suite is run there unmutated first (it must pass, else nothing is measured), then each
mutant in turn is written, run and undone. ``PYTHONPATH`` points at the copy, so its ``refimpl`` is imported,
not the installed one; no bytecode is written, so an undone mutant never leaves a stale ``.pyc`` behind.

    .venv/bin/python tests/mutation/run.py                       every mutant, the whole suite (not tests/gpu)
    .venv/bin/python tests/mutation/run.py --only tile_ merge_   mutants whose name starts with one of these
    .venv/bin/python tests/mutation/run.py --tests "tests/test_tile.py tests/test_blockwise.py -k merge"
    .venv/bin/python tests/mutation/run.py --list                the mutants, and whether each still applies

Not part of ``make test`` (``make mutation`` runs it). It is slow: a survivor costs a whole suite run.
"""

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from mutants import MUTANTS

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TESTS = "tests --ignore=tests/gpu --ignore=tests/mutation"


def repository_files(root):
    """Tracked and untracked, not ignored, files of the working tree (as they are now), relative paths."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=root,
                            capture_output=True, check=True).stdout.decode().split("\0")
    return sorted({f for f in listed if f and (root / f).is_file()})


def copy_repository(root, dest):
    for f in repository_files(root):
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / f, dest / f)


def status(mutant, root):
    """'ok', 'stale' or 'invalid: why', and the mutated source (for 'ok')."""
    source = (root / mutant.file).read_text()
    count = source.count(mutant.original)
    if count == 0:
        return "stale", None
    if count > 1:
        return f"invalid: the snippet occurs {count} times", None
    mutated = source.replace(mutant.original, mutant.replacement)
    try:
        compile(mutated, mutant.file, "exec")
    except SyntaxError as exc:
        return f"invalid: {exc.msg} at line {exc.lineno}", None
    return "ok", mutated


def suite_env(copy):
    """The environment of a suite run in ``copy``: its refimpl first on the path, one BLAS thread, no .pyc."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", PYTHONPATH=str(copy),
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("HYPOTHESIS_PROFILE", None)                       # the reproducible draws of tests/conftest.py
    return env


def imports_the_copy(copy):
    """Whether ``import refimpl`` in a suite run finds the copy's package (not an installed one)."""
    found = subprocess.run([sys.executable, "-c", "import refimpl; print(refimpl.__file__)"], cwd=copy,
                           env=suite_env(copy), capture_output=True, text=True).stdout.strip()
    return Path(found).resolve().is_relative_to(copy.resolve())


def run_suite(copy, tests, timeout):
    """(outcome, seconds, first failing test or ''); outcome 'passed', 'failed' or 'timeout'."""
    env = suite_env(copy)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=copy, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return "timeout", time.monotonic() - t0, ""
    seconds = time.monotonic() - t0
    if proc.returncode == 0:
        return "passed", seconds, ""
    first = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return "failed", seconds, first.group(1) if first else out.strip().splitlines()[-1] if out.strip() else ""


def try_mutant(m, copy, tests, timeout):
    """Apply mutant ``m`` to the copy, run the suite, undo it. Returns (verdict, seconds, note): verdict
    'killed', 'SURVIVED', 'stale', 'invalid' or 'equivalent'; note the first failing test, or why."""
    if m.equivalent:
        return "equivalent", 0.0, m.equivalent
    state, mutated = status(m, copy)
    if state != "ok":
        return state.split(":")[0], 0.0, state
    path = copy / m.file
    original = path.read_text()
    path.write_text(mutated)
    try:
        outcome, seconds, first = run_suite(copy, tests, timeout)
    finally:
        path.write_text(original)
    if outcome == "timeout":
        return "killed", seconds, f"(the suite hung: timed out after {timeout:g} s)"
    return ("killed", seconds, first) if outcome == "failed" else ("SURVIVED", seconds, m.why)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="+", metavar="NAME", help="run the mutants whose name starts with one of these")
    p.add_argument("--tests", metavar="ARGS", default=DEFAULT_TESTS,
                   help="what pytest runs, one quoted string (paths, node ids, -k ...); default: %(default)s")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one suite run may take (default 600)")
    p.add_argument("--list", action="store_true", help="list the mutants and whether each applies; run nothing")
    p.add_argument("--no-baseline", action="store_true", help="skip the unmutated run (it must pass otherwise)")
    args = p.parse_args(argv)
    args.tests = shlex.split(args.tests)

    names = [m.name for m in MUTANTS]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        sys.exit(f"mutants.py: duplicate names {sorted(duplicates)}")
    chosen = [m for m in MUTANTS if not args.only or m.name.startswith(tuple(args.only))]
    if not chosen:
        sys.exit(f"no mutant starts with {' or '.join(args.only)}")
    if args.list:
        for m in chosen:
            state = f"equivalent: {m.equivalent}" if m.equivalent else status(m, ROOT)[0]
            print(f"{m.name:<36} {m.file:<24} {state:<10} {m.why}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="ringattn-mutation-") as tmp:
        copy = Path(tmp)
        copy_repository(ROOT, copy)
        print(f"copy of {ROOT} in {copy}; pytest -x -q {' '.join(args.tests)}", flush=True)
        if not imports_the_copy(copy):
            sys.exit(f"import refimpl in {copy} does not find the copy: the mutants would not be tested")
        if not args.no_baseline:
            outcome, seconds, first = run_suite(copy, args.tests, args.timeout)
            print(f"{'baseline':<36} {outcome:<9} {seconds:6.1f} s {first}", flush=True)
            if outcome != "passed":
                sys.exit("the unmutated suite does not pass in the copy: nothing can be measured")
        for m in chosen:
            verdict, seconds, note = try_mutant(m, copy, args.tests, args.timeout)
            results.append((m, verdict))
            print(f"{m.name:<36} {verdict:<10} {seconds:6.1f} s  {note}", flush=True)

    counts = {v: sum(1 for _, verdict in results if verdict == v) for v in ("killed", "SURVIVED", "stale", "invalid", "equivalent")}
    run = counts["killed"] + counts["SURVIVED"]
    rate = counts["killed"] / run if run else float("nan")
    others = ", ".join(f"{v.lower()} {n}" for v, n in counts.items() if v != "killed" and n)
    print(f"\n{date.today()}: killed {counts['killed']} of {run} ({100 * rate:.0f}%)" + (f"; {others}" if others else ""))
    for m, verdict in results:
        if verdict in ("SURVIVED", "stale", "invalid"):
            print(f"  {verdict}: {m.name} ({m.file}): {m.why}")
    return 1 if counts["SURVIVED"] or counts["stale"] or counts["invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
