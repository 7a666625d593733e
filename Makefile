# Two commands on a fresh machine with Python 3.9+ and nothing else:
#   make demo    create .venv, install ringattn with MPI (PyPI wheels, no apt), run the main job
#   make test    the same set-up, then the whole test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS ?= mpi,test

.PHONY: demo test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ringattn run

test: $(STAMP)
	OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q

bench: $(STAMP)
	$(PY) bench/forward.py
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
