# Two commands on a fresh machine (each sets itself up):
#   make bench   microbenchmarks of every backend against the baselines
#   make test    the test suite (CPU: Triton kernels run in the interpreter)
# On a machine with a GPU:
#   make gpu-check   build in place against $(PYTHON), GPU tests + benchmarks
#                    into benchmarks/results/gpu-session/ (no venv, no downloads)

PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python
# The CUDA build of torch is needed to compile the CUDA extension (headers, nvcc flags).
TORCH_SPEC ?= torch==2.14.1
DEV_DEPS := numpy pytest pytest-benchmark hypothesis matplotlib ninja setuptools wheel ruff transformers datasets tokenizers trl
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

# verl and OpenRLHF, for tests/test_frameworks.py only: --no-deps into their own folder, so
# that nothing they pin shadows the venv's packages in the main test run.
FRAMEWORKS ?= .frameworks

.PHONY: setup test test-frameworks bench bench-pytest gpu-check compile-check lint info clean

$(VENV)/.deps: Makefile
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q "$(TORCH_SPEC)" $(DEV_DEPS)
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	MAX_JOBS=$(JOBS) $(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

setup: $(VENV)/.built

test: setup
	$(VPY) -m pytest -q tests --ignore=tests/test_frameworks.py
	$(MAKE) --no-print-directory test-frameworks

# The drop-ins against the real verl / OpenRLHF releases. Without the package index the
# install fails, and the tests skip and say why.
$(FRAMEWORKS)/.installed: tests/frameworks/requirements.txt $(VENV)/.deps
	rm -rf $(FRAMEWORKS)
	$(VPY) -m pip install -q --no-deps --target $(FRAMEWORKS) -r $< && touch $@ \
		|| echo "make: verl / OpenRLHF could not be installed; tests/test_frameworks.py skips"

test-frameworks: setup $(FRAMEWORKS)/.installed
	PYTHONPATH=$(FRAMEWORKS):tests/frameworks/stubs $(VPY) -m pytest -q -W ignore::FutureWarning tests/test_frameworks.py

bench: setup
	$(VPY) -m rlhf_kernels.cli bench --out bench-out

bench-pytest: setup
	$(VPY) -m pytest -q benchmarks --benchmark-only --benchmark-json=bench-out/pytest-benchmark.json

compile-check: setup
	env -u TRITON_INTERPRET $(VPY) -m rlhf_kernels.compile_check

lint: setup
	$(VPY) -m ruff check rlhf_kernels tests benchmarks setup.py

info: setup
	$(VPY) -m rlhf_kernels.cli info

# For a GPU machine whose Python already has torch and triton: no network needed.
# benchmarks/gpu_session.sh says how the phases are limited in time.
gpu-check:
	OUT=benchmarks/results/gpu-session PYTHON=$(PYTHON) MAX_JOBS=$(JOBS) benchmarks/gpu_session.sh

clean:
	rm -rf build bench-out rlhf_kernels/_C*.so *.egg-info $(FRAMEWORKS)
