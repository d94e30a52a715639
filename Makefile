# Two commands on a fresh machine with python3 and the package registry:
#   make demo   -> .venv + the embedded end-to-end demo
#   make test   -> .venv + dev extras + the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip

# torch first, chosen for the machine: a box where `nvidia-smi -L` lists a GPU gets the
# registry's newest default CUDA wheel (CUDA 12.8+ builds, which have sm_120 kernels for the
# RTX 5090); a machine without one gets a pinned release (2.13.0: on this project's CI machines
# a local CPU build; elsewhere the registry's wheel, which also runs on CPU). Override with
# `make TORCH_SPEC='torch==X.Y'`, or add an index with `make PIP_TORCH_ARGS='--index-url URL'`.
HAS_GPU        := $(shell nvidia-smi -L 2>/dev/null | grep -q GPU && echo 1)
TORCH_SPEC     ?= $(if $(HAS_GPU),torch>=2.9,torch==2.13.0)
PIP_TORCH_ARGS ?=

.PHONY: demo test test-fast bench clean-venv

$(VENV)/.base: pyproject.toml
	@$(PYTHON) -c "import venv, ensurepip" 2>/dev/null || { echo "error: $(PYTHON) cannot create virtual environments; install python3-venv (Debian/Ubuntu: apt install python3-venv) or run make PYTHON=/path/to/python3"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(PIP_TORCH_ARGS) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.base
	$(PIP) install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.base
	$(VENV)/bin/trainrig demo --output_dir outputs/demo

test: $(VENV)/.dev
	$(PY) -m pytest tests -q -rs

# everything but the multi-process runs, for a quick loop while editing
test-fast: $(VENV)/.dev
	$(PY) -m pytest tests -q -rs -m "not slow"

bench: $(VENV)/.dev
	$(PY) bench/run.py --output bench/RESULTS.md

clean-venv:
	rm -rf $(VENV)
