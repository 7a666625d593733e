#!/usr/bin/env bash
# Everything a GPU machine should run, as one command: the GPU tests, then the GPU benchmark.
#
#   tests/gpu/run_all.sh OUT [bench/gpu.py options...]
#
# Logs and numbers go to OUT: nvidia-smi.txt, warmup.log, tests.log, bench.log, bench.json. It needs a
# Python ($PYTHON, default python3) with CuPy and ml_dtypes (and PyTorch for the SDPA comparison). MPI comes from the mpich and
# mpi4py wheels: taken from .whl/ when that folder holds them (machines without a network), else from
# PyPI, installed into a venv that sees the system packages. Exit status: non-zero if the tests or the
# bench failed. RINGATTN_PHASE_TIMEOUT (seconds, default none) bounds the tests and the bench each;
# RINGATTN_PYTEST_ARGS adds pytest options (e.g. --ignore=tests/gpu/test_gpu_compile.py).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${1:?usage: tests/gpu/run_all.sh OUT [bench options...]}
shift
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
BASE=${PYTHON:-python3}
if [ -x "$(dirname "$(command -v "$BASE")")/mpiexec" ]; then
    PY=$BASE                                  # e.g. make gpu: the project's venv already has MPI
else
    VENV=${RINGATTN_GPU_VENV:-/tmp/ringattn-gpu-venv}
    "$BASE" -m venv "$VENV" || exit 1
    # The venv sees every package of $BASE (itself often a venv, which --system-site-packages misses).
    "$BASE" -c "import site, sys; print('\n'.join(site.getsitepackages() + [p for p in sys.path if p.endswith('site-packages')]))" \
        > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/parent.pth"
    if ls .whl/mpich-*.whl >/dev/null 2>&1; then
        "$VENV/bin/python" -m pip install -q --no-index --no-deps .whl/mpich-*.whl .whl/mpi4py-*.whl || exit 1
    else
        "$VENV/bin/python" -m pip install -q mpich 'mpi4py>=4.1' || exit 1
    fi
    PY="$VENV/bin/python"
fi
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
"$PY" -m gpu.kernels --dims 40 64 72 128 --processes 14 2>&1 | tee "$OUT/warmup.log"
TIMEOUT=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300")
LIMIT=${RINGATTN_PHASE_TIMEOUT:-0}
timeout "$LIMIT" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rfE --durations=15 $TIMEOUT ${RINGATTN_PYTEST_ARGS:-} tests/gpu 2>&1 | tee "$OUT/tests.log"
tests=$?
timeout "$LIMIT" "$PY" bench/gpu.py --json "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
bench=$?
echo "tests exit $tests, bench exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
