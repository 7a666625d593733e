# Two commands on a fresh machine with Python 3.9+ and nothing else:
#   make demo    create .venv, install ringattn with MPI (PyPI wheels, no apt), run the main job
#   make test    the same set-up, then the whole test suite
#   make mutation  the suite against plausible one-line bugs (tests/mutation/README.md; slow, by hand)
# On a machine with an NVIDIA GPU (CUDA 13 driver; for CUDA 12 use GPU_EXTRA=gpu-cuda12):
#   make gpu     the same set-up plus CuPy, then the GPU tests and bench/gpu.py, logs in out/gpu
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= mpi,test
GPU_EXTRA ?= gpu

.PHONY: demo test explore bench gpu mutation clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ringattn run

test: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

explore: $(STAMP)
	HYPOTHESIS_PROFILE=explore OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(PY) -m pytest -q tests/test_ring.py tests/test_tile.py

mutation: $(STAMP)
	$(PY) tests/mutation/run.py

gpu: $(STAMP)
	$(PY) -m pip install --quiet -e '.[$(GPU_EXTRA)]'
	PYTHON=$(PY) tests/gpu/run_all.sh out/gpu

bench: $(STAMP)
	$(PY) bench/forward.py
	$(PY) bench/backward.py
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
