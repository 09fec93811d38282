# mae_fast: `make test` and `make bench` do all set-up on a fresh machine.
#
# Environment:
#   PYTHON=/path/to/python  use that interpreter as is: no venv, no installs (the GPU machine
#                           installs with `pip install --no-deps --no-build-isolation -e .`)
#   an active virtualenv    ($VIRTUAL_ENV) is used and installed into
#   otherwise               ./.venv is created and used
# torch==2.13.0 is installed only when torch is not importable (never a range: on a
# machine without torch a range would pull several GB of CUDA wheels).

SHELL := /bin/bash
TORCH_PIN ?= torch==2.13.0
EXTRAS ?= test,plot

ifdef PYTHON
  PY := $(PYTHON)
  SETUP_STAMP :=
else ifdef VIRTUAL_ENV
  PY := $(VIRTUAL_ENV)/bin/python
  SETUP_STAMP := $(VIRTUAL_ENV)/.mae_fast-setup
else
  PY := .venv/bin/python
  SETUP_STAMP := .venv/.mae_fast-setup
endif

PYTEST_ARGS ?=
BENCH_ARGS ?=
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

.PHONY: setup test bench cuda-check triton-check clean

setup: $(SETUP_STAMP)

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip setuptools wheel

ifdef SETUP_STAMP
$(SETUP_STAMP): $(PY) setup.py pyproject.toml $(NATIVE_SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_PIN)"
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@
endif

# Triton kernels run through the interpreter (TRITON_INTERPRET=1) where there is no GPU; the
# ops then run a second time on the plain torch path, which is what CPU tensors take outside the interpreter.
test: setup
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  echo "CUDA found: GPU tests on, Triton compiled"; \
	  $(PY) -m pytest -q -rs $(PYTEST_ARGS); \
	else \
	  echo "no CUDA: Triton kernels under TRITON_INTERPRET=1"; \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -rs $(PYTEST_ARGS) || exit 1; \
	  echo "no CUDA: the plain torch path of the ops (what CPU tensors run)"; \
	  TRITON_INTERPRET=0 $(PY) -m pytest -q tests/ops $(PYTEST_ARGS); \
	fi
	@if command -v nvcc >/dev/null 2>&1 || [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then \
	  $(MAKE) --no-print-directory cuda-check PYTHON=$(PY); \
	else echo "cuda-check skipped: no nvcc"; fi

bench: setup
	$(PY) -m mae_fast bench $(BENCH_ARGS)

# Compile every .cu in csrc/ to an object for sm_90 against the installed torch's headers
# (no linking), so the CUDA code cannot rot on machines without a GPU.
cuda-check:
	@$(PY) scripts/cuda_check.py

# Compile every Triton kernel variant the ops launch for sm_90 (Triton's compiler and ptxas, no GPU):
# the interpreter CI runs does not compile them.
triton-check:
	@$(PY) scripts/triton_check.py

clean:
	rm -rf build dist *.egg-info mae_fast/*.so
