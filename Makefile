# Two commands on a fresh machine: `make demo` and `make test`. Each builds its own environment.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: test test-kernels demo bench bench-gpu clean

# The exact tested set (constraints.txt) inside the ranges pyproject.toml declares.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[test]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The numerically sensitive tests under each kernel setting another processor would pick (tests/kernel_settings.py).
test-kernels: $(STAMP)
	$(PY) tests/kernel_settings.py

demo: $(STAMP)
	$(VENV)/bin/latentforge demo --out runs/demo

bench: $(STAMP)
	$(PY) bench/run_all.py --out docs/BENCHMARKS.md

# One CUDA GPU, about 6-8 minutes: a markdown section for docs/BENCHMARKS.md (bench/gpu_check.py says what it runs).
# Without a GPU: `bench/gpu_check.sh --dry-run` (make test runs it, tests/test_gpu_check.py).
bench-gpu: $(STAMP)
	PYTHON=$(PY) bench/gpu_check.sh --out gpu_check.md

clean:
	rm -rf $(VENV) runs .pytest_cache
