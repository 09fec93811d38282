# mae_fast: `make test` and `make bench` do all set-up on a fresh machine.
#
# Environment:
#   PYTHON=/path/to/python  use that interpreter as is: no venv, no installs (install mae_fast there
#                           yourself with `pip install --no-deps --no-build-isolation -e .`)
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
# the CPU passes run one test process per core (pytest-xdist; each with one torch thread): the interpreter is
# single-threaded Python, so two processes on two cores take about half the time of one
TEST_JOBS ?= auto
BENCH_ARGS ?=
NATIVE_SOURCES := $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh)

# `make test-compat`: a second, separate pass on the newest stack the machines offer, torch 2.14.1 +
# torchvision 0.29.1 (a CUDA build from local disk, run on the CPU) + timm, in its own venv and its own
# copy of the tree (the extension is built against that torch, so it cannot share this tree's build;
# CPU-only, MAE_FAST_NO_CUDA=1). It runs the tests marked compat (real timm, an official-structure MAE)
# and the timm-free nn and patch_model tests, then the official-structure tests again with older
# timm (their Block layouts differ). MAE_FAST_COMPAT=1 there: a missing timm or a skipped compat test fails.
COMPAT_DIR ?= build/compat
COMPAT_TORCH ?= torch==2.14.1 torchvision==0.29.1
COMPAT_TIMM ?= timm==1.0.31
COMPAT_OLD_TIMM ?= 0.4.12 0.9.16
COMPAT_TESTS ?= tests/integrations tests/nn/test_layers.py tests/test_patching.py
COMPAT_VENV := $(abspath $(COMPAT_DIR))/venv
COMPAT_SRC := $(COMPAT_DIR)/src

.PHONY: setup test test-compat bench cuda-check triton-check gpu-check-dry clean

setup: $(SETUP_STAMP)

.venv/bin/python:
	@echo "set-up: creating .venv (the first set-up takes minutes: torch, the C++ extension, test dependencies)"
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip setuptools wheel

ifdef SETUP_STAMP
$(SETUP_STAMP): $(PY) setup.py pyproject.toml $(NATIVE_SOURCES)
	@$(PY) -c "import torch" 2>/dev/null || { echo "set-up: installing $(TORCH_PIN) (a large download)"; \
	  $(PY) -m pip install -q "$(TORCH_PIN)"; }
	$(PY) -m pip install -q setuptools wheel ninja pybind11
	@echo "set-up: installing mae_fast with [$(EXTRAS)]: compiling its C++ extension, then the test dependencies"
	$(PY) -m pip install -q --no-build-isolation -e ".[$(EXTRAS)]"
	touch $@
	@echo "set-up done. The mae-fast command is $(dir $(PY))mae-fast; \`source $(dir $(PY))activate\` puts it on your PATH"
endif

# Triton kernels run through the interpreter (TRITON_INTERPRET=1) where there is no GPU; the
# ops then run a second time on the plain torch path, which is what CPU tensors take outside the interpreter.
# OpenMP threads that sleep while they wait (the mae-fast command's default): with spinning threads a busy
# machine makes CPU steps many times slower
test: export OMP_WAIT_POLICY ?= PASSIVE
test: setup
	@if $(PY) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then \
	  echo "CUDA found: GPU tests on, Triton compiled"; \
	  $(PY) -m pytest -q -rs $(PYTEST_ARGS); \
	else \
	  echo "no CUDA: Triton kernels under TRITON_INTERPRET=1 ($(TEST_JOBS) test processes)"; \
	  TRITON_INTERPRET=1 $(PY) -m pytest -q -rs -n $(TEST_JOBS) $(PYTEST_ARGS) || exit 1; \
	  echo "no CUDA: the plain torch path of the ops (what CPU tensors run)"; \
	  TRITON_INTERPRET=0 $(PY) -m pytest -q -n $(TEST_JOBS) tests/ops $(PYTEST_ARGS); \
	fi
	@if command -v nvcc >/dev/null 2>&1 || [ -x "$${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then \
	  $(MAKE) --no-print-directory cuda-check PYTHON=$(PY); \
	else echo "cuda-check skipped: no nvcc"; fi
	@$(MAKE) --no-print-directory triton-check PYTHON=$(PY)
	@$(MAKE) --no-print-directory gpu-check-dry PYTHON=$(PY)

test-compat:
	@test -x $(COMPAT_VENV)/bin/python || python3 -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/python -m pip install -q $(COMPAT_TORCH)
	$(COMPAT_VENV)/bin/python -m pip install -q "$(COMPAT_TIMM)" setuptools wheel ninja pybind11
	@mkdir -p $(COMPAT_SRC) && find $(COMPAT_SRC) -type f ! -name '*.so' ! -path '*/build/*' -delete
	git ls-files -co --exclude-standard -z | xargs -0 cp -P --parents -t $(COMPAT_SRC)
	cd $(COMPAT_SRC) && MAE_FAST_NO_CUDA=1 $(COMPAT_VENV)/bin/python -m pip install -q --no-build-isolation -e ".[compat]"
	cd $(COMPAT_SRC) && MAE_FAST_COMPAT=1 $(COMPAT_VENV)/bin/python -m pytest -q -rs $(COMPAT_TESTS) $(PYTEST_ARGS)
	@for v in $(COMPAT_OLD_TIMM); do \
	  test -d $(COMPAT_VENV)/timm-$$v || $(COMPAT_VENV)/bin/python -m pip install -q --no-deps --target $(COMPAT_VENV)/timm-$$v timm==$$v || exit 1; \
	  echo "official-structure tests with timm $$v"; \
	  (cd $(COMPAT_SRC) && PYTHONPATH=$(COMPAT_VENV)/timm-$$v MAE_FAST_EXPECT_TIMM=$$v MAE_FAST_COMPAT=1 \
	    $(COMPAT_VENV)/bin/python -m pytest -q -m compat tests/integrations/test_official.py $(PYTEST_ARGS)) || exit 1; \
	done

bench: setup
	$(PY) -m mae_fast bench $(BENCH_ARGS)

# Compile every .cu in csrc/ to an object for sm_90 against the installed torch's headers
# (no linking), so the CUDA code cannot rot on machines without a GPU.
cuda-check:
	@$(PY) scripts/cuda_check.py

# Compile every Triton kernel, as the ops launch it (a full-size ViT-B/L step included), for sm_90 with
# Triton's own compiler (no GPU needed); ptxas reports registers and spills.
triton-check:
	@TRITON_DEFAULT_FP_FUSION=1 $(PY) scripts/triton_check.py

# Every stage of the GPU machine's first call (scripts/gpu_check.sh) on this CPU at tiny sizes, so the script
# that only runs where a GPU is lent cannot rot; its files go to build/gpu-check-dry.
gpu-check-dry:
	@OUT=build/gpu-check-dry PYTHON=$(PY) bash scripts/gpu_check.sh --dry-run > build/gpu-check-dry.log 2>&1 \
	  || { tail -60 build/gpu-check-dry.log; echo "gpu-check-dry: FAILED (build/gpu-check-dry.log)"; exit 1; }
	@sed -n '/^gpu_check on/,$$p' build/gpu-check-dry.log

clean:
	rm -rf build dist *.egg-info mae_fast/*.so
