# bert-ds: `make demo` runs the whole pipeline on an embedded corpus; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
# auto | cpu | cuda. auto picks cuda when nvidia-smi lists a GPU, else the CPU build.
TORCH_DEVICE ?= auto
# Where the CPU build comes from when no local wheel is on pip's find-links path.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# DeepSpeed JIT-builds ops on first use; a project-owned cache stops environments rebuilding each other's.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
PYTEST_ARGS ?=
# tested versions of the main dependencies (empty: whatever pip resolves from pyproject.toml's ranges)
CONSTRAINTS ?= .ci/constraints.txt
STAMP := $(VENV)/.bert-ds-setup

.PHONY: setup ops test test-fast lint demo bench clean
setup: $(STAMP)

$(STAMP): pyproject.toml Makefile $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	@device="$(TORCH_DEVICE)"; \
	if [ "$$device" = auto ]; then \
	  if nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi; \
	fi; \
	if $(PY) -c "import sys, torch; cpu = torch.version.cuda is None; sys.exit(0 if torch.__version__.split('+')[0] == '$(TORCH_VERSION)' and cpu == ('$$device' == 'cpu') else 1)" 2>/dev/null; then \
	  echo "torch $(TORCH_VERSION) ($$device) already installed"; \
	elif [ "$$device" = cpu ]; then \
	  echo "installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PIP) install -q --no-index --no-deps "torch==$(TORCH_VERSION)" 2>/dev/null \
	    || $(PIP) install -q --no-deps "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX); \
	  $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
	  echo "installing the CUDA build of torch $(TORCH_VERSION)"; \
	  $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	fi
	$(PIP) install -q -e ".[test]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	touch $(STAMP)

# DeepSpeed's CPU comm op, compiled once into TORCH_EXTENSIONS_DIR (about a minute the first time, then cached)
ops: setup
	$(PY) -m bert_ds.jit_ops

test: ops
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

# the quick inner loop: everything but the multi-process tests
test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(PY) -m ruff check bert_ds data_tools tests bench

demo: ops
	PYTHON=$(PY) bash launch/demo.sh

bench: setup
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) demo_out .pytest_cache
